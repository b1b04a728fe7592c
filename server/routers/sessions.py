"""/v1/sessions: a session is one user's memory (the memory MLP's weights), stored and versioned."""

from __future__ import annotations

import contextlib
import math

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from engine import SamplingParams
from engine.core import ClientGone, DoneEvent
from server.deps import CLIENT_CLOSED, REPLAYED, Departure, get_runtime, get_tenant
from server.errors import APIError
from server.protocol import SessionCreate, SessionFork, SessionMemorize, SessionRollback
from server.runtime import Replay, Runtime

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


@router.post("", status_code=201)
async def create_session(body: SessionCreate | None = None, rt: Runtime = Depends(get_runtime),
                         tenant: str = Depends(get_tenant)):
    body = body or SessionCreate()
    rt.check_served_model(body.model)
    blob = await rt.to_bytes(rt.model.new_state())
    record = await rt.store.create(tenant, rt.model.fingerprint, blob, name=body.name, metadata=body.metadata)
    rt.metrics.session_op("create")
    return rt.session_object(record)


@router.get("")
async def list_sessions(limit: int = Query(20, ge=1, le=100), after: str | None = None,
                        rt: Runtime = Depends(get_runtime), tenant: str = Depends(get_tenant)):
    page = await rt.store.list(tenant, limit, after)
    data = [rt.session_object(r) for r in page.data]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": page.has_more}


@router.get("/{session_id}")
async def get_session(session_id: str, rt: Runtime = Depends(get_runtime), tenant: str = Depends(get_tenant)):
    return rt.session_object(await rt.store.get(tenant, session_id))


@router.delete("/{session_id}")
async def delete_session(session_id: str, rt: Runtime = Depends(get_runtime), tenant: str = Depends(get_tenant)):
    async with rt.leased(tenant, session_id):  # not while a request is writing it
        await rt.store.delete(tenant, session_id)
    rt.metrics.session_op("delete")
    return {"id": session_id, "object": "session.deleted", "deleted": True}


@router.post("/{session_id}/reset")
async def reset_session(session_id: str, rt: Runtime = Depends(get_runtime), tenant: str = Depends(get_tenant)):
    """Forget everything: the memory returns to the model's learned initial state (a new version)."""
    async with rt.leased(tenant, session_id) as held:
        rt.check_memory_model(await rt.store.get(tenant, session_id))
        fresh = rt.model.new_state()
        record = await rt.commit(tenant, held, await rt.to_bytes(fresh), fresh.tokens_seen, release=True)
    rt.metrics.session_op("reset")
    return rt.session_object(record)


@router.post("/{session_id}/fork", status_code=201)
async def fork_session(session_id: str, body: SessionFork | None = None, rt: Runtime = Depends(get_runtime),
                       tenant: str = Depends(get_tenant)):
    body = body or SessionFork()
    record = await rt.store.fork(tenant, session_id, name=body.name, metadata=body.metadata)
    rt.metrics.session_op("fork")
    return rt.session_object(record)


@router.post("/{session_id}/rollback")
async def rollback_session(session_id: str, body: SessionRollback, rt: Runtime = Depends(get_runtime),
                           tenant: str = Depends(get_tenant)):
    async with rt.leased(tenant, session_id) as held:
        record = await rt.store.rollback(tenant, session_id, body.version, held.lease)
    rt.metrics.session_op("rollback")
    return rt.session_object(record)


@router.post("/{session_id}/memorize")
async def memorize(request: Request, session_id: str, body: SessionMemorize, rt: Runtime = Depends(get_runtime),
                   tenant: str = Depends(get_tenant), idempotency_key: str | None = Header(None)):
    """Read text into the memory without generating: {"tokens", "mean_surprise", "session"}. Commits only if the
    client is still there (as completions do); with an Idempotency-Key, a retry after the commit answers the
    same tokens and surprise (and the session as it is now) without reading the text again."""
    ids = await rt.encode(body.text)
    surprise, done, gone = [], None, Departure(request)
    events = rt.generate(tenant, session_id, ids, SamplingParams(max_tokens=0), commit=True, want_surprise=True,
                         on_job=gone.track, idempotency_key=idempotency_key)
    try:
        # closed before the answer goes out: leaving an async for does not close its generator, and the session's
        # lease, held inside it, would then be released whenever the generator is collected, after the client's
        # next request may have found the session busy
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Replay):
                    surprise, record = event.answer["surprise"], event.record
                    break
                surprise += event.surprise
                if isinstance(event, DoneEvent):
                    done, record = event, event.record  # the record this commit produced
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        gone.close()
    rt.metrics.session_op("memorize")
    finite = [v for v in surprise if math.isfinite(v)]  # JSON has no NaN; a memory driven to overflow has some
    answer = {"tokens": len(ids), "mean_surprise": sum(finite) / len(finite) if finite else None,
              "session": rt.session_object(record)}
    return answer if done is not None else JSONResponse(answer, headers=REPLAYED)


@router.get("/{session_id}/snapshot")
async def export_snapshot(session_id: str, rt: Runtime = Depends(get_runtime), tenant: str = Depends(get_tenant)):
    record, blob = await rt.store.load(tenant, session_id)
    rt.metrics.session_op("export")
    return Response(blob, media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{session_id}.safetensors"',
        "X-Session-Version": str(record.version)})


@router.post("/import", status_code=201)
async def import_snapshot(request: Request, rt: Runtime = Depends(get_runtime), tenant: str = Depends(get_tenant)):
    """The raw bytes of a snapshot (as GET .../snapshot returns them) become a new session. A snapshot of
    another model, a damaged one, or one out of a model state's bounds is refused with 400."""
    blob = await request.body()
    if not blob:
        raise APIError(400, "send the snapshot bytes as the request body", "empty_body")
    state = await rt.import_bytes(blob)  # SnapshotError -> 400
    # stored as this server writes it: nothing of the sender's file beyond the state itself is kept
    record = await rt.store.import_(tenant, rt.model.fingerprint, await rt.to_bytes(state),
                                    tokens_seen=state.tokens_seen)
    rt.metrics.session_op("import")
    return rt.session_object(record)
