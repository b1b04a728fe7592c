"""The session-store contract (DESIGN §5): records, errors, limits, and the async interface both stores implement.

A session's memory is its snapshot bytes (engine SessionState.to_bytes). Every change is a commit: a compare-and-
set on the version, which moves the old snapshot into a short history (for rollback) in the same atomic step.
A lease is the per-session lock of a running request; its version is the fencing token, because a holder whose
lease expired can no longer commit once someone else has moved the version on.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

# Session ids: a 6-character family tag, then 128 random bits (22 base64url characters). A fork keeps its
# parent's tag, so one family's keys share a Redis Cluster slot and fork can copy bytes inside Redis.
TAG_CHARS = 6
ID_CHARS = TAG_CHARS + 22


def _random_chars(n_bytes: int) -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(n_bytes)).decode().rstrip("=")


def new_session_id(family_of: str | None = None) -> str:
    tag = family_of[:TAG_CHARS] if family_of else _random_chars(6)[:TAG_CHARS]
    return tag + _random_chars(16)


def is_session_id(value: str) -> bool:
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    return len(value) == ID_CHARS and set(value) <= alphabet


class StoreError(Exception):
    """Base of the store's errors; `status` is the HTTP status the server answers with."""

    status = 500
    code = "store_error"


class SessionNotFound(StoreError):
    """Unknown, deleted, expired or another tenant's session (the three look the same to a caller)."""

    status, code = 404, "session_not_found"


class VersionConflict(StoreError):
    status, code = 409, "version_conflict"

    def __init__(self, session_id: str, expected: int, current: int):
        super().__init__(f"session {session_id} is at version {current}, not {expected}")
        self.expected, self.current = expected, current


class SessionBusy(StoreError):
    """Another request holds the session's lease (or ours expired and was taken over)."""

    status, code = 409, "session_busy"


class LimitExceeded(StoreError):
    status, code = 413, "limit_exceeded"


class QuotaExceeded(StoreError):
    """The tenant keeps as many sessions as StoreLimits.max_sessions_per_tenant allows: waiting does not help,
    deleting one does (so 429 without Retry-After, and no SDK retries)."""

    status, code = 429, "sessions_per_tenant_exceeded"


class InvalidArgument(StoreError):
    status, code = 400, "invalid_argument"


class StoreUnavailable(StoreError):
    """The store cannot serve now; a client should retry. `reason` (a metric label too): unreachable (down, or
    no answer within the timeout), out_of_memory (full), read_only (a failover under way), loading, busy. The
    message a caller sees names the reason alone; `detail` (for the log) says more, never a secret."""

    status, code = 503, "store_unavailable"
    retry_after_s = 1

    def __init__(self, reason: str = "unreachable", detail: str = ""):
        super().__init__(f"the session store is unavailable ({reason.replace('_', ' ')}); retry later")
        self.reason, self.detail = reason, detail


def redact_url(url: str) -> str:
    """A store URL fit for logs and messages: any password (and user name) replaced by ***."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


@dataclass(frozen=True)
class StoreLimits:
    max_snapshot_bytes: int = 256 * 2**20
    max_metadata_bytes: int = 4096  # the metadata dict as compact JSON
    max_metadata_keys: int = 16
    max_name_chars: int = 256
    max_sessions_per_tenant: int = 0  # 0: no limit

    def quota_error(self) -> QuotaExceeded:
        return QuotaExceeded(f"you keep {self.max_sessions_per_tenant} sessions, the most this server allows; "
                             "delete one to create another")

    def check(self, snapshot: bytes | None = None, name: str | None = None, metadata: dict | None = None) -> None:
        if snapshot is not None and len(snapshot) > self.max_snapshot_bytes:
            raise LimitExceeded(f"snapshot is {len(snapshot)} bytes; the limit is {self.max_snapshot_bytes}")
        if name is not None and len(name) > self.max_name_chars:
            raise LimitExceeded(f"name is {len(name)} characters; the limit is {self.max_name_chars}")
        if metadata is not None:
            if not isinstance(metadata, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise InvalidArgument("metadata must map strings to strings")
            if len(metadata) > self.max_metadata_keys:
                raise LimitExceeded(f"metadata has {len(metadata)} keys; the limit is {self.max_metadata_keys}")
            size = len(encode_metadata(metadata))
            if size > self.max_metadata_bytes:
                raise LimitExceeded(f"metadata is {size} bytes as JSON; the limit is {self.max_metadata_bytes}")


def encode_metadata(metadata: dict[str, str]) -> str:
    return json.dumps(metadata, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class StoreOptions:
    history: int = 3  # K: older versions kept for rollback
    ttl_s: float | None = None  # sliding expiry, renewed on every use; None = sessions never expire
    timeout_s: float = 2.0  # every call answers or raises StoreUnavailable within about this long
    limits: StoreLimits = field(default_factory=StoreLimits)
    cache_bytes: int = 256 * 2**20  # snapshots a remote store keeps in this process (BlobCache); 0 = none
    receipt_ttl_s: float = 24 * 3600  # how long a commit's receipt answers a retry of its request

    def __post_init__(self) -> None:
        if self.history < 0:
            raise ValueError("history must be >= 0")
        if self.cache_bytes < 0:
            raise ValueError("cache_bytes must be >= 0")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError("ttl_s must be positive (or None for no expiry)")


class BlobCache:
    """Snapshot bytes by blob id, least recently used out first, at most `capacity` bytes in all.

    A remote store names every snapshot it writes with a fresh random blob id and never rewrites a blob, so bytes
    cached under an id are those bytes forever: a replica that committed or loaded a version serves the next
    load of that version from memory, after the store has checked the tenant and read which blob is current.
    """

    def __init__(self, capacity: int):
        self.capacity, self.size = capacity, 0
        self._blobs: OrderedDict[str, bytes] = OrderedDict()

    def get(self, blob: str) -> bytes | None:
        data = self._blobs.get(blob)
        if data is not None:
            self._blobs.move_to_end(blob)
        return data

    def put(self, blob: str, data: bytes) -> None:
        if len(data) > self.capacity or blob in self._blobs:
            return
        self._blobs[blob] = bytes(data)  # no copy for bytes; a caller's mutable buffer is copied
        self.size += len(data)
        while self.size > self.capacity:
            self.size -= len(self._blobs.popitem(last=False)[1])


@dataclass(frozen=True)
class SessionRecord:
    id: str
    tenant: str
    fingerprint: str  # the model the snapshot belongs to
    version: int  # 1 at creation, +1 per commit
    tokens_seen: int
    created_at: float  # unix seconds
    updated_at: float
    snapshot_bytes: int
    name: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    parent_id: str | None = None
    history: tuple[int, ...] = ()  # older versions that rollback can return to, newest first


@dataclass(frozen=True)
class Lease:
    session_id: str
    token: str
    version: int  # the version the holder read; its commit must expect exactly this
    expires_at: float


@dataclass(frozen=True)
class Page:
    data: list[SessionRecord]
    has_more: bool


def new_lease_token() -> str:
    return _random_chars(16)


@dataclass(frozen=True)
class Receipt:
    """What a committing request answered, stored atomically with its commit under the request's idempotency key:
    a retry of the request finds it and answers the same instead of applying twice."""
    key: str  # the client's Idempotency-Key
    body: bytes


MAX_IDEMPOTENCY_KEY = 255


def receipt_id(tenant: str, key: str) -> str:
    """The stored name of a tenant's idempotency key (another tenant's same key is another receipt)."""
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise InvalidArgument(f"an Idempotency-Key has 1 to {MAX_IDEMPOTENCY_KEY} characters")
    return hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()[:32]


class SessionStore(ABC):
    """Every method is scoped to a tenant: another tenant's session is SessionNotFound, never an error that
    tells it exists. Methods raise StoreUnavailable when the backend does not answer in time."""

    options: StoreOptions

    @property
    def cached_bytes(self) -> int:
        """Snapshot bytes kept in this process (a remote store's BlobCache; none for a local one)."""
        return 0

    @abstractmethod
    async def create(self, tenant: str, fingerprint: str, snapshot: bytes, *, tokens_seen: int = 0,
                     name: str | None = None, metadata: dict[str, str] | None = None) -> SessionRecord: ...

    @abstractmethod
    async def get(self, tenant: str, session_id: str) -> SessionRecord: ...

    @abstractmethod
    async def load(self, tenant: str, session_id: str) -> tuple[SessionRecord, bytes]:
        """The record and its snapshot, read together (never a snapshot of another version)."""

    @abstractmethod
    async def list(self, tenant: str, limit: int = 20, after: str | None = None) -> Page:
        """Newest first; `after` is the id of the last session of the previous page."""

    @abstractmethod
    async def delete(self, tenant: str, session_id: str) -> None: ...

    @abstractmethod
    async def commit(self, tenant: str, session_id: str, expected_version: int, snapshot: bytes,
                     tokens_seen: int, lease: Lease | None = None, release: bool = False,
                     receipt: Receipt | None = None) -> SessionRecord:
        """Compare-and-set: VersionConflict unless the session is at `expected_version`; SessionBusy if someone
        else holds the lease (or `lease` is no longer the live one). release: a successful commit also gives
        `lease` up (a request's last store call). receipt: stored with the commit, all or nothing."""

    @abstractmethod
    async def receipt(self, tenant: str, session_id: str, key: str) -> bytes | None:
        """The body of the receipt a commit of this session stored under `key` (None: no such commit, or it is
        older than receipt_ttl_s)."""

    @abstractmethod
    async def acquire(self, tenant: str, session_id: str, ttl_s: float) -> Lease:
        """SessionBusy while another unexpired lease exists."""

    async def checkout(self, tenant: str, session_id: str, ttl_s: float) -> tuple[Lease, SessionRecord, bytes]:
        """acquire, then load (a request's first store calls): the lease, and the record and snapshot of the
        version it was taken at. A store that can do both in one call overrides this."""
        lease = await self.acquire(tenant, session_id, ttl_s)
        try:
            record, snapshot = await self.load(tenant, session_id)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.release(lease)
            raise
        return lease, record, snapshot

    @abstractmethod
    async def renew(self, lease: Lease, ttl_s: float) -> Lease: ...

    @abstractmethod
    async def release(self, lease: Lease) -> None:
        """Idempotent; never releases someone else's lease."""

    @abstractmethod
    async def fork(self, tenant: str, session_id: str, *, name: str | None = None,
                   metadata: dict[str, str] | None = None) -> SessionRecord:
        """A new session (version 1) with a copy of the current snapshot; parent_id = session_id."""

    @abstractmethod
    async def rollback(self, tenant: str, session_id: str, version: int, lease: Lease | None = None) -> SessionRecord:
        """Commit the snapshot of a kept older version as a new version (history is kept, nothing is erased)."""

    async def export(self, tenant: str, session_id: str) -> bytes:
        return (await self.load(tenant, session_id))[1]

    async def import_(self, tenant: str, fingerprint: str, snapshot: bytes, *, tokens_seen: int = 0,
                      name: str | None = None, metadata: dict[str, str] | None = None) -> SessionRecord:
        return await self.create(tenant, fingerprint, snapshot, tokens_seen=tokens_seen, name=name, metadata=metadata)

    @abstractmethod
    async def ping(self) -> None:
        """Raises StoreUnavailable unless the backend answers (readiness)."""

    @abstractmethod
    async def close(self) -> None: ...


def check_id(session_id: str) -> None:
    if not is_session_id(session_id):
        raise SessionNotFound(f"no session {session_id!r}")


def check_limit(limit: int) -> None:
    if not 1 <= limit <= 100:
        raise InvalidArgument("limit must be between 1 and 100")
