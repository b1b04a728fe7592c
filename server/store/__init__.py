"""Session persistence: one async contract (base.py), a Redis store and an embedded SQLite store."""

from __future__ import annotations

from .base import (
    InvalidArgument,
    Lease,
    LimitExceeded,
    Page,
    QuotaExceeded,
    Receipt,
    SessionBusy,
    SessionNotFound,
    SessionRecord,
    SessionStore,
    StoreError,
    StoreLimits,
    StoreOptions,
    StoreUnavailable,
    VersionConflict,
    redact_url,
)

__all__ = ["InvalidArgument", "Lease", "LimitExceeded", "Page", "QuotaExceeded", "Receipt", "SessionBusy",
           "SessionNotFound", "SessionRecord", "SessionStore", "StoreError", "StoreLimits", "StoreOptions",
           "StoreUnavailable", "VersionConflict", "open_store", "redact_url"]


def open_store(url: str, options: StoreOptions | None = None) -> SessionStore:
    """`sqlite:///relative/path.db`, `sqlite:////absolute/path.db`, `redis://[user:password@]host:port/db`,
    `rediss://...` (TLS), or `redis-cluster://[user:password@]host:port` (any node of a Redis Cluster)."""
    if url.startswith("sqlite:///"):
        from .sqlite import LocalStore

        return LocalStore(url[len("sqlite:///"):], options)
    if url.startswith(("redis://", "rediss://", "unix://", "redis-cluster://", "rediss-cluster://")):
        from .redis import RedisStore

        return RedisStore(url, options)
    raise ValueError(f"store URL must start with sqlite:/// or redis:// (got {redact_url(url)!r})")
