"""What the sync and async clients share: errors, the retry policy, request shapes and SSE parsing."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import httpx


class TitansError(Exception):
    """An error answered by the server with the OpenAI error envelope."""

    status: int = 0

    def __init__(self, message: str, status: int = 0, code: str | None = None, type: str | None = None,
                 param: str | None = None, response: httpx.Response | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.type, self.param = message, status, code, type, param
        self.response = response


class BadRequestError(TitansError): ...            # 400, 413, 422


class AuthenticationError(TitansError): ...        # 401


class NotFoundError(TitansError): ...              # 404: unknown session (or another tenant's)


class ConflictError(TitansError): ...              # 409: the session is busy with another request


class RateLimitError(TitansError): ...             # 429: the server's queue is full


class ServiceUnavailableError(TitansError): ...    # 503: loading, or the session store is unreachable


class ServerError(TitansError): ...                # other 5xx


class StreamError(TitansError):
    """An error the server reported inside a stream, after it had started."""


ERRORS = {400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 409: ConflictError,
          413: BadRequestError, 422: BadRequestError, 429: RateLimitError, 503: ServiceUnavailableError}


def error_from(response: httpx.Response) -> TitansError:
    try:
        err = response.json()["error"]
        message, code, kind, param = err.get("message", ""), err.get("code"), err.get("type"), err.get("param")
    except (ValueError, KeyError, TypeError):
        message, code, kind, param = response.text or response.reason_phrase, None, None, None
    cls = ERRORS.get(response.status_code, ServerError if response.status_code >= 500 else TitansError)
    return cls(message, response.status_code, code, kind, param, response)


@dataclass(frozen=True)
class RetryPolicy:
    """Retry 429 and 503 (and connection errors) with exponential back-off, honouring Retry-After."""

    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    retry_statuses: tuple[int, ...] = (429, 503)

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            after = response.headers.get("retry-after")
            if after:
                try:
                    return min(float(after), self.max_backoff_s)
                except ValueError:
                    pass
        return min(self.backoff_s * 2**attempt, self.max_backoff_s) * (0.5 + random.random() / 2)


@dataclass
class Request:
    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    params: dict | None = None
    headers: dict = field(default_factory=dict)


def drop_none(**fields) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


def completion_request(prompt, *, stream: bool, session_id=None, **options) -> Request:
    body = drop_none(prompt=prompt, stream=stream, session_id=session_id, **options)
    if stream:
        body.setdefault("stream_options", {"include_usage": True})
    return Request("POST", "/v1/completions", json=body)


def chat_request(messages, *, stream: bool, session_id=None, **options) -> Request:
    body = drop_none(messages=messages, stream=stream, session_id=session_id, **options)
    if stream:
        body.setdefault("stream_options", {"include_usage": True})
    return Request("POST", "/v1/chat/completions", json=body)


def sse_data(line: str) -> dict | None:
    """One SSE line -> the chunk it carries, None for blank/comment lines and [DONE]; raises StreamError."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return None
    chunk = json.loads(payload)
    if "error" in chunk:
        err = chunk["error"]
        raise StreamError(err.get("message", ""), int(err.get("code") or 0) if str(err.get("code", "")).isdigit()
                          else 0, err.get("code"), err.get("type"), err.get("param"))
    return chunk


def chunk_text(chunk: dict) -> str:
    """The new text in a completions or chat chunk ('' for role, usage and final chunks)."""
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""
