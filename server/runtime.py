"""What a request works with, in one place: settings, the model's description, store, the engine process's
client, metrics; and the request flow that ties a session's stored memory to a generation.

A request on a session: lease the session (409 if another request holds it), load its snapshot, run the job in
the engine process (which checks the snapshot), and only when it has finished commit the new snapshot with a
compare-and-set on the version the lease was taken at. Cancellation, disconnects and errors release the lease
without a commit, so the session is exactly as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio

from engine import SamplingParams, SessionState, SnapshotError
from engine.core import ClientGone, DoneEvent, EngineRequest, EngineStopped, ErrorEvent, QueueFull, TokenEvent
from server.engine_process import EngineClient, Job, ModelInfo
from server.errors import APIError
from server.metrics import Metrics
from server.quotas import Quotas
from server.settings import Settings
from server.store import Lease, Receipt, SessionBusy, SessionRecord, SessionStore, StoreUnavailable, VersionConflict

log = logging.getLogger("titans.server")

INLINE_ENCODE_CHARS = 4096


def failure(error: BaseException) -> Exception:
    """What a request that failed in the engine raises: the engine's own words go to the log under a reference
    the caller gets, never to the caller (they may name files, shapes, internals)."""
    if isinstance(error, SnapshotError):  # the stored memory is damaged: 400, as on import
        return error
    reference = uuid.uuid4().hex[:12]
    log.error("request failed in the engine (reference %s): %r", reference, error)
    if isinstance(error, EngineStopped):
        return APIError(503, f"the engine has stopped (reference {reference}); retry later", "engine_dead",
                        headers={"Retry-After": "1"})
    return APIError(500, f"generation failed in the engine (reference {reference}, in the server's log)",
                    "engine_error")


@dataclass(frozen=True)
class Replay:
    """A request whose Idempotency-Key was committed already: what it answered then (Answer.body), and the
    session's record now. Nothing ran."""
    answer: dict
    record: SessionRecord


@dataclass
class Answer:
    """What a request answers, gathered from its events: the body of its receipt."""
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    surprise: list[float] = dataclasses.field(default_factory=list)
    stop_reason: str | None = None
    done: DoneEvent | None = None

    def add(self, event: TokenEvent | DoneEvent) -> None:
        self.surprise += event.surprise
        if isinstance(event, TokenEvent):
            self.text += event.text
            self.token_ids += event.token_ids
            self.stop_reason = event.stop_reason
        else:
            self.done = event

    def body(self) -> bytes:
        done = self.done
        return json.dumps({"text": self.text, "token_ids": self.token_ids, "surprise": self.surprise,
                           "finish_reason": done.finish_reason, "stop_reason": self.stop_reason,
                           "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
                          separators=(",", ":")).encode()


@dataclass
class Held:
    """A session leased by a request: the lease, and the record and snapshot at its version if loaded with it."""
    lease: Lease
    record: SessionRecord | None = None
    snapshot: bytes | None = None
    released: bool = False  # given up with the commit


@dataclass
class Runtime:
    settings: Settings
    model: ModelInfo  # config, tokenizer, fresh states and snapshot checks; the engine process holds the weights
    store: SessionStore
    core: EngineClient
    metrics: Metrics
    model_name: str
    created: int = 0  # unix time the model was loaded
    state_bytes: int = 0  # size of one session's snapshot
    quotas: Quotas = dataclasses.field(default_factory=Quotas)
    _background: set = dataclasses.field(default_factory=set)  # tasks that outlive their request (held here)

    # --- sessions as the API shows them ---------------------------------------------------------------------

    def session_object(self, record: SessionRecord) -> dict:
        return {"id": record.id, "object": "session", "model": self.model_name, "version": record.version,
                "tokens_seen": record.tokens_seen, "created_at": int(record.created_at),
                "updated_at": int(record.updated_at), "parent_id": record.parent_id, "name": record.name,
                "metadata": record.metadata, "snapshot_bytes": record.snapshot_bytes,
                "history": list(record.history)}

    async def to_bytes(self, state: SessionState) -> bytes:
        started = time.perf_counter()
        blob = await asyncio.to_thread(state.to_bytes)
        self.metrics.state_bytes.observe(len(blob))
        self.metrics.memory_save.observe(time.perf_counter() - started)
        return blob

    async def encode(self, text: str) -> list[int]:
        """Token ids of text; a long text is encoded off the event loop (a short one costs less than the hop)."""
        try:
            if len(text) < INLINE_ENCODE_CHARS:
                return self.model.tokenizer.encode(text)
            return await asyncio.to_thread(self.model.tokenizer.encode, text)
        except UnicodeEncodeError as e:  # JSON may carry half of a UTF-16 pair ("\ud83d"), which no UTF-8 holds
            raise APIError(400, f"the text holds a lone surrogate at character {e.start} (half of a character "
                                "split from its other half): send whole characters", "invalid_text") from e

    async def import_bytes(self, blob: bytes) -> SessionState:
        """A snapshot from outside (SnapshotError when it is damaged, foreign or out of bounds)."""
        return await asyncio.to_thread(self.model.load_state, blob, True)

    async def keep_engine_alive(self) -> None:
        """Restart the engine process whenever it dies (its requests have failed with 503 engine_dead, and /health
        answers 503 until it is back), after engine_restart_delay_s, doubled after each failed start up to 30 s.
        After engine_restarts failed starts in a row the server stops, for whatever supervises it to act."""
        delay, failures = self.settings.engine_restart_delay_s, 0
        while True:
            await asyncio.sleep(0.2)
            if self.core.alive or self.core.stopping:
                continue
            log.error("the engine process has stopped; starting a new one in %.1f s", delay)
            await asyncio.sleep(delay)
            try:
                await asyncio.to_thread(self.core.restart)
            except Exception:
                failures += 1
                log.exception("starting a new engine process failed (%d in a row)", failures)
                if failures >= self.settings.engine_restarts:
                    log.critical("the engine process cannot be restarted: stopping the server")
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                delay = min(30.0, delay * 2)
                continue
            self.metrics.engine_restarts.inc()
            log.warning("a new engine process serves requests")
            failures, delay = 0, self.settings.engine_restart_delay_s

    @contextlib.asynccontextmanager
    async def leased(self, tenant: str, session_id: str, load: bool = False):
        """Hold the session's lease (renewed in the background) for the body of the block; with load, the
        session's record and snapshot come with it (one store call where the store can)."""
        try:
            if load:
                held = Held(*await self.store.checkout(tenant, session_id, self.settings.lease_ttl_s))
            else:
                held = Held(await self.store.acquire(tenant, session_id, self.settings.lease_ttl_s))
        except SessionBusy:
            self.metrics.conflicts.inc()
            raise
        renewer = asyncio.create_task(self._renew(held.lease))
        try:
            yield held
        finally:
            renewer.cancel()
            if not held.released:
                with anyio.CancelScope(shield=True):  # even when cancelled
                    await self._release(held.lease)

    async def _renew(self, lease: Lease) -> None:
        """The heartbeat: a lease lives lease_ttl_s (a few seconds) unless renewed, so a holder that dies frees
        its session that soon."""
        while True:
            await asyncio.sleep(self.settings.lease_ttl_s / 3)
            with contextlib.suppress(StoreUnavailable):
                await self.store.renew(lease, self.settings.lease_ttl_s)

    async def _release(self, lease: Lease) -> None:
        """Give the lease up; when the store cannot take it now, keep trying in the background until the lease
        would have expired anyway (a session freed as soon as the store is back, not a TTL later)."""
        try:
            await self.store.release(lease)
        except StoreUnavailable:
            self._background.add(task := asyncio.create_task(self._release_later(lease)))
            task.add_done_callback(self._background.discard)
        except Exception:
            log.warning("releasing the lease on session %s failed", lease.session_id, exc_info=True)

    async def _release_later(self, lease: Lease) -> None:
        deadline = time.monotonic() + self.settings.lease_ttl_s
        while time.monotonic() < deadline:
            await asyncio.sleep(min(0.25, self.settings.lease_ttl_s / 8))
            try:
                await self.store.release(lease)
                return
            except StoreUnavailable:
                continue
            except Exception:  # taken over or gone meanwhile: nothing left to free
                return

    async def commit(self, tenant: str, held: Held, snapshot: bytes, tokens_seen: int,
                     release: bool = False, receipt: Receipt | None = None) -> SessionRecord:
        """Commit under the held lease; release: and give the lease up with it (the holder's last store call)."""
        lease = held.lease
        try:
            record = await self.store.commit(tenant, lease.session_id, lease.version, snapshot, tokens_seen, lease,
                                             release, receipt)
        except (VersionConflict, SessionBusy):
            self.metrics.conflicts.inc()
            raise
        held.released = release
        return record

    def admit(self, tenant: str, quota: str, amount: int = 1) -> None:
        """Count against the tenant's quota (Quotas.admit); a refusal is counted by its reason."""
        try:
            self.quotas.admit(tenant, quota, amount)
        except APIError:
            self.metrics.rejected(quota)
            raise

    def check_served_model(self, model: str | None) -> None:
        """A request that names a model must name this server's."""
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model_not_found", "model")

    def check_memory_model(self, record: SessionRecord) -> None:
        """A session's memory is only meaningful to the model that wrote it."""
        if record.fingerprint != self.model.fingerprint:
            raise APIError(409, f"session {record.id} holds memory of another model ({record.fingerprint})",
                           "model_mismatch", "session_id")

    # --- a generation, stateless or on a session -------------------------------------------------------------

    def check_prompt(self, prompt_ids: list[int], max_tokens: int) -> None:
        s = self.settings
        if not prompt_ids:
            raise APIError(400, "the prompt must contain at least one token", "empty_prompt", "prompt")
        if len(prompt_ids) > s.max_prompt_tokens:
            raise APIError(413, f"the prompt has {len(prompt_ids)} tokens; the limit is {s.max_prompt_tokens}",
                           "prompt_too_long", "prompt")
        if max_tokens > s.max_output_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; the limit is {s.max_output_tokens}",
                           "max_tokens_too_large", "max_tokens")
        if any(not 0 <= t < self.model.config.vocab_size for t in prompt_ids):
            raise APIError(400, f"token ids must be in [0, {self.model.config.vocab_size})", "invalid_token",
                           "prompt")

    async def generate(self, tenant: str, session_id: str | None, prompt_ids: list[int], params: SamplingParams,
                       commit: bool, want_surprise: bool, on_job: Callable[[Job], None] | None = None,
                       idempotency_key: str | None = None) -> AsyncIterator[TokenEvent | DoneEvent | Replay]:
        """Yields TokenEvents, then one DoneEvent once the session (if any, and if `commit`) is committed.
        on_job sees the engine job once it exists (to abort it when the client leaves: Job.abort).
        idempotency_key (a committing request): the commit stores what the request answered, and a request with
        a key already committed yields one Replay of that answer instead, applying nothing."""
        self.check_prompt(prompt_ids, params.max_tokens)
        self.admit(tenant, "tokens_per_minute", len(prompt_ids) + params.max_tokens)
        if session_id is None:
            async for event in self._run(None, prompt_ids, params, want_surprise, False, on_job):
                yield event
            return
        keyed = idempotency_key if commit else None
        started = time.perf_counter()
        async with self.leased(tenant, session_id, load=True) as held:
            if keyed is not None:  # under the lease: the first request cannot commit in between
                prior = await self.store.receipt(tenant, session_id, keyed)
                if prior is not None:
                    yield Replay(json.loads(prior), held.record)
                    return
            self.check_memory_model(held.record)
            self.metrics.memory_load.observe(time.perf_counter() - started)
            answer = Answer()
            async for event in self._run(held.snapshot, prompt_ids, params, want_surprise, commit, on_job):
                answer.add(event)
                if isinstance(event, DoneEvent):
                    record = held.record
                    if commit:
                        receipt = Receipt(keyed, answer.body()) if keyed is not None else None
                        record = await self.commit(tenant, held, event.snapshot, event.tokens_seen, release=True,
                                                   receipt=receipt)
                    event = dataclasses.replace(event, record=record)
                yield event

    async def _run(self, snapshot: bytes | None, prompt_ids: list[int], params: SamplingParams, want_surprise: bool,
                   keep_state: bool, on_job: Callable[[Job], None] | None) -> AsyncIterator[TokenEvent | DoneEvent]:
        job = Job(EngineRequest(-1, prompt_ids, snapshot, params, want_surprise, keep_state))
        if on_job is not None:
            on_job(job)
        try:
            self.core.submit(job)
        except QueueFull as e:
            self.metrics.request_failed("rejected")
            self.metrics.rejected("queue_full")
            raise APIError(429, f"server busy: {e}", "queue_full", headers={"Retry-After": "1"}) from e
        except EngineStopped as e:
            raise failure(e) from e
        finished, surprise, after = False, [], None
        try:
            while True:
                event, after = after or await job.events.get(), None
                # A stream that fell behind the engine sends what has piled up as one event (vLLM merges its
                # deltas the same way): the event loop and the client then do work per step, not per token.
                while isinstance(event, TokenEvent) and event.finish_reason is None and not job.events.empty():
                    after = job.events.get_nowait()
                    if not isinstance(after, TokenEvent):
                        break
                    event, after = event.then(after), None
                if isinstance(event, ErrorEvent) and isinstance(event.error, ClientGone):
                    raise ClientGone  # finished stays False: counted as an abort below
                if isinstance(event, ErrorEvent):
                    finished = True
                    self.metrics.request_failed("error")
                    raise failure(event.error)
                surprise += event.surprise
                if isinstance(event, DoneEvent):
                    finished = True
                    if surprise:
                        self.metrics.surprise.observe(sum(surprise) / len(surprise))
                yield event
                if finished:
                    return
        finally:
            if not finished:  # cancelled or disconnected: the engine drops the job at its next step
                job.cancel()
                self.metrics.request_failed("abort")
