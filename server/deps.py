"""FastAPI dependencies, all in one place: the runtime, the caller's tenant, the session a request binds to, and
the watch on a client that leaves."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import Header, Request

from server.errors import APIError
from server.runtime import Runtime

OPEN_TENANT = "default"  # the single tenant of a server without API keys
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, but the access log says what happened
REPLAYED = {"Idempotent-Replayed": "true"}  # the header of an answer given again for its Idempotency-Key


# async, though nothing here awaits: FastAPI runs a plain `def` dependency on its thread pool, a thread hop per
# dependency per request, which under a burst of requests costs more than the dependency itself


async def get_runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise APIError(503, "the model is still loading", "loading")
    return runtime


async def get_tenant(request: Request, authorization: str | None = Header(None)) -> str:
    return tenant_of(authorization, request.app.state.tenants_by_key)


def tenant_of(authorization: str | None, keys: dict[str, str]) -> str:
    """The tenant an Authorization header names (APIError 401 when it names none); OPEN_TENANT without keys."""
    if not keys:
        return OPEN_TENANT
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    tenant = None
    for key, owner in keys.items():  # compare against every key, in constant time each
        if hmac.compare_digest(key.encode(), token.encode()):
            tenant = owner
    if tenant is None:
        raise APIError(401, "invalid API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


def session_binding(body_session_id: str | None, header_session_id: str | None) -> str | None:
    """The body's session_id wins over the X-Session-ID header (vLLM precedent)."""
    return body_session_id or header_session_id or None



class Departure:
    """Watches for the client leaving: every engine job it tracks is aborted then, so a request whose client left
    commits nothing (completions and memorize alike). Call close() when the request is over."""

    def __init__(self, request: Request):
        self.jobs: list = []
        self.watch = asyncio.ensure_future(disconnected(request))
        self.watch.add_done_callback(lambda f: None if f.cancelled() else [job.abort() for job in self.jobs])

    def track(self, job) -> None:
        self.jobs.append(job)

    def close(self) -> None:
        self.watch.cancel()


async def disconnected(request: Request) -> None:
    """Returns when the client goes away (the body was already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
