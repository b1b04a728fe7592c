"""Client (blocking) and AsyncClient: completions, chat and the sessions API of a Titans server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx

from . import _ops as ops
from ._core import RetryPolicy, chat_request, completion_request, error_from, sse_data
from ._ops import Memorized, Session

DEFAULT_URL = "http://127.0.0.1:8000"


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """A Titans server. `session_id` on a generation call binds it to that session's memory."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 120.0,
                 retry: RetryPolicy = RetryPolicy(), http: httpx.Client | None = None):
        self.retry = retry
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout, headers=_headers(api_key))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, req, stream: bool = False) -> httpx.Response:
        for attempt in range(self.retry.max_retries + 1):
            try:
                built = self.http.build_request(req.method, req.path, json=req.json, content=req.content,
                                                params=req.params, headers=req.headers)
                response = self.http.send(built, stream=stream)
            except httpx.TransportError:
                if attempt == self.retry.max_retries:
                    raise
                time.sleep(self.retry.delay(attempt, None))
                continue
            if response.status_code < 400:
                return response
            if stream:
                response.read()
            if response.status_code not in self.retry.retry_statuses or attempt == self.retry.max_retries:
                raise error_from(response)
            time.sleep(self.retry.delay(attempt, response))
        raise AssertionError("unreachable")

    def _call(self, op):
        req, parse = op
        return parse(self._send(req))

    def _chunks(self, req) -> Iterator[dict]:
        response = self._send(req, stream=True)
        try:
            for line in response.iter_lines():
                chunk = sse_data(line)
                if chunk is not None:
                    yield chunk
        finally:
            response.close()

    # --- generation ---------------------------------------------------------------------------------------
    def complete(self, prompt: str | list[int], *, session_id: str | None = None, **options) -> dict:
        return self._send(completion_request(prompt, stream=False, session_id=session_id, **options)).json()

    def stream_complete(self, prompt: str | list[int], *, session_id: str | None = None, **options) -> Iterator[dict]:
        """Chunks as the server sends them (the last one with choices == [] carries usage)."""
        return self._chunks(completion_request(prompt, stream=True, session_id=session_id, **options))

    def chat(self, messages: list[dict], *, session_id: str | None = None, **options) -> dict:
        return self._send(chat_request(messages, stream=False, session_id=session_id, **options)).json()

    def stream_chat(self, messages: list[dict], *, session_id: str | None = None, **options) -> Iterator[dict]:
        return self._chunks(chat_request(messages, stream=True, session_id=session_id, **options))

    # --- sessions -----------------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        return self._call(ops.models())

    def create_session(self, name: str | None = None, metadata: dict | None = None) -> Session:
        return self._call(ops.create_session(name, metadata))

    def get_session(self, session_id: str) -> Session:
        return self._call(ops.get_session(session_id))

    def list_sessions(self, page_size: int = 20) -> Iterator[Session]:
        """Every session of this tenant, newest first (pages fetched as needed)."""
        after = None
        while True:
            page, more = self._call(ops.list_sessions(page_size, after))
            yield from page
            if not more or not page:
                return
            after = page[-1].id

    def delete_session(self, session_id: str) -> None:
        self._call(ops.delete_session(session_id))

    def reset_session(self, session_id: str) -> Session:
        return self._call(ops.reset_session(session_id))

    def fork_session(self, session_id: str, name: str | None = None, metadata: dict | None = None) -> Session:
        return self._call(ops.fork_session(session_id, name, metadata))

    def rollback_session(self, session_id: str, version: int) -> Session:
        return self._call(ops.rollback_session(session_id, version))

    def memorize(self, session_id: str, text: str) -> Memorized:
        return self._call(ops.memorize(session_id, text))

    def export_session(self, session_id: str, path: str | Path) -> int:
        """Write the session's snapshot (safetensors) to `path`; returns its size in bytes."""
        return self._call(ops.export_session(session_id, path))

    def import_session(self, path: str | Path) -> Session:
        return self._call(ops.import_session(path))


class AsyncClient:
    """The same API as Client, awaitable; streams are async iterators."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 120.0,
                 retry: RetryPolicy = RetryPolicy(), http: httpx.AsyncClient | None = None):
        self.retry = retry
        self.http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=_headers(api_key))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _send(self, req, stream: bool = False) -> httpx.Response:
        for attempt in range(self.retry.max_retries + 1):
            try:
                built = self.http.build_request(req.method, req.path, json=req.json, content=req.content,
                                                params=req.params, headers=req.headers)
                response = await self.http.send(built, stream=stream)
            except httpx.TransportError:
                if attempt == self.retry.max_retries:
                    raise
                await asyncio.sleep(self.retry.delay(attempt, None))
                continue
            if response.status_code < 400:
                return response
            if stream:
                await response.aread()
            if response.status_code not in self.retry.retry_statuses or attempt == self.retry.max_retries:
                raise error_from(response)
            await asyncio.sleep(self.retry.delay(attempt, response))
        raise AssertionError("unreachable")

    async def _call(self, op):
        req, parse = op
        return parse(await self._send(req))

    async def _chunks(self, req) -> AsyncIterator[dict]:
        response = await self._send(req, stream=True)
        try:
            async for line in response.aiter_lines():
                chunk = sse_data(line)
                if chunk is not None:
                    yield chunk
        finally:
            await response.aclose()

    async def complete(self, prompt: str | list[int], *, session_id: str | None = None, **options) -> dict:
        return (await self._send(completion_request(prompt, stream=False, session_id=session_id, **options))).json()

    def stream_complete(self, prompt: str | list[int], *, session_id: str | None = None,
                        **options) -> AsyncIterator[dict]:
        return self._chunks(completion_request(prompt, stream=True, session_id=session_id, **options))

    async def chat(self, messages: list[dict], *, session_id: str | None = None, **options) -> dict:
        return (await self._send(chat_request(messages, stream=False, session_id=session_id, **options))).json()

    def stream_chat(self, messages: list[dict], *, session_id: str | None = None, **options) -> AsyncIterator[dict]:
        return self._chunks(chat_request(messages, stream=True, session_id=session_id, **options))

    async def models(self) -> list[dict]:
        return await self._call(ops.models())

    async def create_session(self, name: str | None = None, metadata: dict | None = None) -> Session:
        return await self._call(ops.create_session(name, metadata))

    async def get_session(self, session_id: str) -> Session:
        return await self._call(ops.get_session(session_id))

    async def list_sessions(self, page_size: int = 20) -> AsyncIterator[Session]:
        after = None
        while True:
            page, more = await self._call(ops.list_sessions(page_size, after))
            for session in page:
                yield session
            if not more or not page:
                return
            after = page[-1].id

    async def delete_session(self, session_id: str) -> None:
        await self._call(ops.delete_session(session_id))

    async def reset_session(self, session_id: str) -> Session:
        return await self._call(ops.reset_session(session_id))

    async def fork_session(self, session_id: str, name: str | None = None, metadata: dict | None = None) -> Session:
        return await self._call(ops.fork_session(session_id, name, metadata))

    async def rollback_session(self, session_id: str, version: int) -> Session:
        return await self._call(ops.rollback_session(session_id, version))

    async def memorize(self, session_id: str, text: str) -> Memorized:
        return await self._call(ops.memorize(session_id, text))

    async def export_session(self, session_id: str, path: str | Path) -> int:
        return await self._call(ops.export_session(session_id, path))

    async def import_session(self, path: str | Path) -> Session:
        return await self._call(ops.import_session(path))
