"""Every endpoint once: the request to send and how to read the answer. Client and AsyncClient only transport."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import httpx

from ._core import Request, drop_none


@dataclass(frozen=True)
class Session:
    """A memory session as the server describes it."""

    id: str
    version: int
    tokens_seen: int
    model: str = ""
    created_at: int = 0
    updated_at: int = 0
    parent_id: str | None = None
    name: str | None = None
    metadata: dict = field(default_factory=dict)
    snapshot_bytes: int = 0
    history: list = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict) -> Session:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Memorized:
    tokens: int
    mean_surprise: float
    session: Session


Op = tuple[Request, Callable[[httpx.Response], Any]]


def _json(r: httpx.Response) -> Any:
    return r.json()


def _session(r: httpx.Response) -> Session:
    return Session.from_json(r.json())


def models() -> Op:
    return Request("GET", "/v1/models"), lambda r: r.json()["data"]


def create_session(name: str | None = None, metadata: dict | None = None) -> Op:
    return Request("POST", "/v1/sessions", json=drop_none(name=name, metadata=metadata)), _session


def get_session(session_id: str) -> Op:
    return Request("GET", f"/v1/sessions/{session_id}"), _session


def list_sessions(limit: int = 20, after: str | None = None) -> Op:
    def parse(r):
        page = r.json()
        return [Session.from_json(s) for s in page["data"]], page["has_more"]

    return Request("GET", "/v1/sessions", params=drop_none(limit=limit, after=after)), parse


def delete_session(session_id: str) -> Op:
    return Request("DELETE", f"/v1/sessions/{session_id}"), lambda r: None


def reset_session(session_id: str) -> Op:
    return Request("POST", f"/v1/sessions/{session_id}/reset"), _session


def fork_session(session_id: str, name: str | None = None, metadata: dict | None = None) -> Op:
    return Request("POST", f"/v1/sessions/{session_id}/fork", json=drop_none(name=name, metadata=metadata)), _session


def rollback_session(session_id: str, version: int) -> Op:
    return Request("POST", f"/v1/sessions/{session_id}/rollback", json={"version": version}), _session


def memorize(session_id: str, text: str) -> Op:
    def parse(r):
        body = r.json()
        return Memorized(body["tokens"], body["mean_surprise"], Session.from_json(body["session"]))

    return Request("POST", f"/v1/sessions/{session_id}/memorize", json={"text": text}), parse


def export_session(session_id: str, path: str | Path) -> Op:
    def parse(r):
        Path(path).write_bytes(r.content)
        return len(r.content)

    return Request("GET", f"/v1/sessions/{session_id}/snapshot"), parse


def import_session(path: str | Path) -> Op:
    return Request("POST", "/v1/sessions/import", content=Path(path).read_bytes(),
                   headers={"content-type": "application/octet-stream"}), _session
