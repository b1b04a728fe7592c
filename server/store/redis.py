"""RedisStore: production persistence, shared by every server replica.

Snapshots are immutable blobs with reference counts, so a fork or a rollback moves a pointer instead of
copying megabytes, and a commit never copies the old snapshot into history. Every key of a session shares a
hash tag, and a fork keeps its parent's tag, so each script below touches one Redis Cluster slot:
    titans:{tag}:<id>:meta   hash: tenant, fingerprint, version, tokens_seen, timestamps, name, metadata,
                             parent_id, snapshot_bytes, blob (the current snapshot), history
                             ("version:tokens_seen:blob ..." newest first, at most K entries)
    titans:{tag}:<id>:lease  the lease token, expiring by itself (PX)
    titans:{tag}:refs        hash blob -> number of sessions and history entries that point at it
    titans:{tag}:b:<blob>    the snapshot bytes
    titans:{t:<sha of tenant>}:sessions   sorted set of the tenant's session ids by creation time (for listing)
A commit first uploads its bytes as a pending blob that expires by itself, then one Lua script checks the
tenant, the lease and the version and swaps the pointer; a crash between the two leaves only a blob that
disappears. The tenant check happens inside Redis, so another tenant's bytes never leave it. Every mutating
script is safe to run twice, because the client retries once when a connection drops (a reply may be lost
after the script ran). On Redis Cluster (a `redis-cluster://` URL naming any node) every script and every
transaction touches one slot: a session family's, or a tenant index's; only reads that list sessions span slots.
Sessions that expire by TTL leave their entries in the family's refs hash; the blobs themselves expire with the
same TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ExecAbortError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .base import (
    TAG_CHARS,
    BlobCache,
    InvalidArgument,
    Lease,
    Page,
    SessionBusy,
    SessionNotFound,
    SessionRecord,
    SessionStore,
    StoreOptions,
    StoreUnavailable,
    VersionConflict,
    check_id,
    check_limit,
    encode_metadata,
    new_lease_token,
    new_session_id,
    receipt_id,
    redact_url,
)

# KEYS = meta, lease, refs. ARGV[1] = tenant, ARGV[2] = sliding ttl in ms (0 = none), ARGV[3] = blob key prefix.
PRELUDE = """
local function owned() return redis.call('HGET', KEYS[1], 'tenant') == ARGV[1] end
local function blob_key(blob) return ARGV[3] .. blob end
local function history()
  local entries = {}
  for v, t, b in string.gmatch(redis.call('HGET', KEYS[1], 'history') or '', '(%d+):(%d+):(%S+)') do
    table.insert(entries, {v, t, b})
  end
  return entries
end
local function encode(entries)
  local parts = {}
  for i, e in ipairs(entries) do parts[i] = e[1] .. ':' .. e[2] .. ':' .. e[3] end
  return table.concat(parts, ' ')
end
local function decref(blob)
  if redis.call('HINCRBY', KEYS[3], blob, -1) <= 0 then
    redis.call('HDEL', KEYS[3], blob)
    redis.call('DEL', blob_key(blob))
  end
end
local function touch()
  local ms = tonumber(ARGV[2])
  if ms > 0 then
    redis.call('PEXPIRE', KEYS[1], ms)
    redis.call('PEXPIRE', KEYS[3], ms)
    redis.call('PEXPIRE', blob_key(redis.call('HGET', KEYS[1], 'blob')), ms)
    for _, e in ipairs(history()) do redis.call('PEXPIRE', blob_key(e[3]), ms) end
  end
end
local function lease_ok(token)  -- token '' = the caller holds no lease, so nobody may
  local holder = redis.call('GET', KEYS[2])
  if token == '' then return not holder end
  return holder == token
end
local function install(blob, tokens, now, keep)
  -- `blob` (already counted) becomes current; the old current moves into history, trimmed to `keep`
  local entries = history()
  local old = redis.call('HMGET', KEYS[1], 'version', 'tokens_seen', 'blob')
  if keep > 0 then table.insert(entries, 1, old) else decref(old[3]) end
  while #entries > keep do decref(table.remove(entries)[3]) end
  redis.call('HSET', KEYS[1], 'version', tonumber(old[1]) + 1, 'tokens_seen', tokens, 'updated_at', now,
             'history', encode(entries), 'blob', blob, 'snapshot_bytes', redis.call('STRLEN', blob_key(blob)))
  touch()
  return redis.call('HGETALL', KEYS[1])
end
"""

# The bytes are read with a plain GET after this script: Lua copies a multi-megabyte string several times over
READ = PRELUDE + """
if not owned() then return {'NOTFOUND'} end
touch()
return {'OK', redis.call('HGETALL', KEYS[1])}
"""

# ARGV[4..] = expected version, pending blob, tokens_seen, now, lease token, keep.
# Safe to run twice (a client retry after a lost reply): the second run sees its blob installed and answers OK.
COMMIT = PRELUDE + """
local function refuse(status, detail)
  if redis.call('HEXISTS', KEYS[3], ARGV[5]) == 0 then redis.call('DEL', blob_key(ARGV[5])) end
  return {status, detail}
end
if not owned() then return refuse('NOTFOUND') end
if redis.call('HGET', KEYS[1], 'blob') == ARGV[5] then return {'OK', redis.call('HGETALL', KEYS[1])} end
if not lease_ok(ARGV[8]) then return refuse('BUSY') end
local version = redis.call('HGET', KEYS[1], 'version')
if version ~= ARGV[4] then return refuse('CONFLICT', version) end
if redis.call('PERSIST', blob_key(ARGV[5])) == 0 then return {'EXPIRED'} end
redis.call('HSET', KEYS[3], ARGV[5], 1)
if KEYS[4] then redis.call('SET', KEYS[4], ARGV[10], 'PX', ARGV[11]) end  -- the request's receipt, with it
return {'OK', install(ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[9]))}
"""

# ARGV[4..] = version to return to, now, lease token, keep, operation id (a retry of the same call is a no-op)
ROLLBACK = PRELUDE + """
if not owned() then return {'NOTFOUND'} end
if redis.call('HGET', KEYS[1], 'op') == ARGV[8] then return {'OK', redis.call('HGETALL', KEYS[1])} end
if not lease_ok(ARGV[6]) then return {'BUSY'} end
for _, e in ipairs(history()) do
  if e[1] == ARGV[4] then
    redis.call('HINCRBY', KEYS[3], e[3], 1)
    redis.call('HSET', KEYS[1], 'op', ARGV[8])
    return {'OK', install(e[3], e[2], ARGV[5], tonumber(ARGV[7]))}
  end
end
return {'NOVERSION', redis.call('HGET', KEYS[1], 'history')}
"""

# ARGV[4..] = lease token, lease ttl ms
ACQUIRE = PRELUDE + """
if not owned() then return {'NOTFOUND'} end
if redis.call('GET', KEYS[2]) == ARGV[4] then return {'OK', redis.call('HGET', KEYS[1], 'version')} end  -- a retry
if not redis.call('SET', KEYS[2], ARGV[4], 'NX', 'PX', ARGV[5]) then return {'BUSY'} end
touch()
return {'OK', redis.call('HGET', KEYS[1], 'version')}
"""

RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

DELETE = PRELUDE + """
if not owned() then return {'NOTFOUND'} end
decref(redis.call('HGET', KEYS[1], 'blob'))
for _, e in ipairs(history()) do decref(e[3]) end
redis.call('DEL', KEYS[1], KEYS[2])
return {'OK'}
"""

# KEYS[4] = the child's meta (same family tag, same slot). ARGV[4..] = child id, now, name, metadata, parent id
FORK = PRELUDE + """
if not owned() then return {'NOTFOUND'} end
if redis.call('EXISTS', KEYS[4]) == 1 then return {'OK', redis.call('HGETALL', KEYS[4])} end  -- a retry
local parent = redis.call('HMGET', KEYS[1], 'fingerprint', 'tokens_seen', 'snapshot_bytes', 'blob')
redis.call('HINCRBY', KEYS[3], parent[4], 1)
redis.call('HSET', KEYS[4], 'tenant', ARGV[1], 'fingerprint', parent[1], 'version', 1, 'tokens_seen', parent[2],
           'created_at', ARGV[5], 'updated_at', ARGV[5], 'name', ARGV[6], 'metadata', ARGV[7],
           'parent_id', ARGV[8], 'snapshot_bytes', parent[3], 'blob', parent[4], 'history', '')
touch()
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[4], ARGV[2]) end
return {'OK', redis.call('HGETALL', KEYS[4])}
"""


# KEYS[1] = a tenant's index. ARGV = session id, created_at, the tenant's session quota (0: none) -> 1, or 0 when
# the index holds the quota already
INDEX = """
local cap = tonumber(ARGV[3])
if cap > 0 and redis.call('ZSCORE', KEYS[1], ARGV[1]) == false and redis.call('ZCARD', KEYS[1]) >= cap then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"""

# redis-py turns most error replies into exception classes (and drops their first word from the message); the
# others keep it: "MISCONF ...", "BUSY ...", "NOREPLICAS ..."
UNAVAILABLE_CLASSES = ((OutOfMemoryError, "out_of_memory"), (ReadOnlyError, "read_only"),
                       (BusyLoadingError, "loading"), (MasterDownError, "read_only"), (TryAgainError, "busy"),
                       (ClusterDownError, "unreachable"), (ExecAbortError, "busy"),
                       (RedisConnectionError, "unreachable"), (RedisTimeoutError, "unreachable"),
                       (RedisClusterException, "unreachable"))
UNAVAILABLE_WORDS = {"OOM": "out_of_memory", "READONLY": "read_only", "MASTERDOWN": "read_only", "LOADING": "loading",
                     "MISCONF": "read_only", "NOREPLICAS": "read_only", "BUSY": "busy", "TRYAGAIN": "busy",
                     "EXECABORT": "busy", "CLUSTERDOWN": "unreachable"}


def unavailable_reason(error: Exception) -> str | None:
    """Why Redis cannot serve now (StoreUnavailable.reason), or None for an error a retry will not cure."""
    for cls, reason in UNAVAILABLE_CLASSES:
        if isinstance(error, cls):
            return reason
    return UNAVAILABLE_WORDS.get(str(error).split(" ", 1)[0])


CLUSTER_SCHEMES = ("redis-cluster://", "rediss-cluster://")


def family(session_id: str) -> str:
    return f"titans:{{{session_id[:TAG_CHARS]}}}"


def session_keys(session_id: str) -> list[str]:
    """meta, lease, refs"""
    return [f"{family(session_id)}:{session_id}:meta", f"{family(session_id)}:{session_id}:lease",
            f"{family(session_id)}:refs"]


def receipt_key(session_id: str, tenant: str, key: str) -> str:
    """Beside the session's keys (the same slot: its commit script writes it)."""
    return f"{family(session_id)}:{session_id}:r:{receipt_id(tenant, key)}"


def blob_prefix(session_id: str) -> str:
    return f"{family(session_id)}:b:"


def tenant_index(tenant: str) -> str:
    return f"titans:{{t:{hashlib.sha256(tenant.encode()).hexdigest()[:24]}}}:sessions"


def _record(session_id: str, flat: list[bytes]) -> SessionRecord:
    meta = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
    return SessionRecord(
        id=session_id, tenant=meta["tenant"], fingerprint=meta["fingerprint"], version=int(meta["version"]),
        tokens_seen=int(meta["tokens_seen"]), created_at=float(meta["created_at"]),
        updated_at=float(meta["updated_at"]), snapshot_bytes=int(meta["snapshot_bytes"]),
        name=meta.get("name") or None, metadata=json.loads(meta.get("metadata") or "{}"),
        parent_id=meta.get("parent_id") or None,
        history=tuple(int(entry.split(":")[0]) for entry in meta.get("history", "").split()))


class RedisStore(SessionStore):
    def __init__(self, url: str = "redis://localhost:6379/0", options: StoreOptions | None = None,
                 max_connections: int = 64):
        self.options = options or StoreOptions()
        timeout = self.options.timeout_s
        # one retry without back-off: a pooled connection that went stale while Redis restarted is replaced at once
        # reads of 1 MiB: snapshots are megabytes, and the default 32 KiB reads make parsing one a loop of hundreds
        if url.startswith(CLUSTER_SCHEMES):  # redis-cluster://[user:password@]host:port: any node; the rest found
            self.redis = RedisCluster.from_url(url.replace("-cluster://", "://", 1), max_connections=max_connections,
                                               socket_timeout=timeout, socket_connect_timeout=timeout,
                                               socket_read_size=2**20)
        else:
            pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout,
                                                   socket_timeout=timeout, socket_connect_timeout=timeout,
                                                   socket_read_size=2**20, retry=Retry(NoBackoff(), 1))
            self.redis = Redis(connection_pool=pool)
        self.blobs = BlobCache(self.options.cache_bytes)
        self.url = url
        self._scripts = {name: self.redis.register_script(src) for name, src in [
            ("read", READ), ("commit", COMMIT), ("rollback", ROLLBACK), ("acquire", ACQUIRE), ("renew", RENEW),
            ("release", RELEASE), ("delete", DELETE), ("fork", FORK), ("index", INDEX)]}

    @property
    def cached_bytes(self) -> int:
        return self.blobs.size

    async def _call(self, coro) -> Any:
        """Every Redis round trip goes through here: bounded in time, and Redis errors become StoreUnavailable."""
        try:
            return await asyncio.wait_for(coro, self.options.timeout_s)
        except (RedisError, RedisClusterException) as e:
            reason = unavailable_reason(e)
            if reason is None:
                raise
            raise StoreUnavailable(reason, f"redis at {redact_url(self.url)}: {type(e).__name__}: {e}") from e
        except (TimeoutError, OSError) as e:
            raise StoreUnavailable("unreachable", f"redis at {redact_url(self.url)}: {type(e).__name__}: {e}") from e

    def _ttl_ms(self) -> int:
        return int(self.options.ttl_s * 1000) if self.options.ttl_s else 0

    async def _script(self, name: str, session_id: str, tenant: str, *args, extra_keys: list[str] = ()) -> list:
        check_id(session_id)
        result = await self._call(self._scripts[name](
            keys=session_keys(session_id) + list(extra_keys),
            args=[tenant, self._ttl_ms(), blob_prefix(session_id), *args]))
        status = result[0].decode()
        if status == "NOTFOUND":
            raise SessionNotFound(f"no session {session_id!r}")
        if status == "BUSY":
            raise SessionBusy(f"session {session_id} is in use by another request (or the lease expired)")
        return [status, *result[1:]]

    async def create(self, tenant, fingerprint, snapshot, *, tokens_seen=0, name=None, metadata=None):
        metadata = metadata or {}
        self.options.limits.check(snapshot, name, metadata)
        session_id, blob, now = new_session_id(), new_lease_token(), time.time()
        meta, _, refs = session_keys(session_id)
        fields = {"tenant": tenant, "fingerprint": fingerprint, "version": 1, "tokens_seen": tokens_seen,
                  "created_at": repr(now), "updated_at": repr(now), "name": name or "",
                  "metadata": encode_metadata(metadata), "parent_id": "", "snapshot_bytes": len(snapshot),
                  "blob": blob, "history": ""}
        async with self.redis.pipeline(transaction=True) as pipe:  # MULTI: all or nothing, the index included
            pipe.set(blob_prefix(session_id) + blob, snapshot, px=self._ttl_ms() or None)
            pipe.hset(refs, blob, 1)
            pipe.hset(meta, mapping=fields)
            if self.options.ttl_s:
                pipe.pexpire(refs, self._ttl_ms())
                pipe.pexpire(meta, self._ttl_ms())
            await self._call(pipe.execute())
        await self._index(tenant, session_id, now)
        self.blobs.put(blob_prefix(session_id) + blob, snapshot)
        return SessionRecord(id=session_id, tenant=tenant, fingerprint=fingerprint, version=1,
                             tokens_seen=tokens_seen, created_at=now, updated_at=now, snapshot_bytes=len(snapshot),
                             name=name, metadata=metadata)

    async def get(self, tenant, session_id):
        _, flat = await self._script("read", session_id, tenant)
        return _record(session_id, flat)

    async def load(self, tenant, session_id):
        """The record (tenant-checked in Redis), then its blob by id, from this process's BlobCache when it holds
        it. Blobs never change, so the bytes are those of that record's version; if a burst of commits freed the
        blob in between, read again."""
        for _ in range(5):
            _, flat = await self._script("read", session_id, tenant)
            blob = next(flat[i + 1] for i in range(0, len(flat), 2) if flat[i] == b"blob").decode()
            key = blob_prefix(session_id) + blob
            snapshot = self.blobs.get(key)
            if snapshot is None:
                snapshot = await self._call(self.redis.get(key))
            if snapshot is not None:
                self.blobs.put(key, snapshot)
                return _record(session_id, flat), snapshot
        raise StoreUnavailable("busy", f"session {session_id} changed faster than it could be read")

    async def list(self, tenant, limit=20, after=None):
        check_limit(limit)
        index = tenant_index(tenant)
        start = 0
        if after is not None:
            rank = await self._call(self.redis.zrevrank(index, after))
            if rank is None:
                raise InvalidArgument(f"'after' is not one of your sessions: {after!r}")
            start = rank + 1
        records: list[SessionRecord] = []
        while len(records) <= limit:
            ids = [i.decode() for i in await self._call(self.redis.zrevrange(index, start, start + limit))]
            if not ids:
                break
            start += len(ids)
            async with self.redis.pipeline(transaction=False) as pipe:
                for session_id in ids:
                    pipe.hgetall(session_keys(session_id)[0])
                metas = await self._call(pipe.execute())
            stale = []
            for session_id, meta in zip(ids, metas):
                if not meta or meta.get(b"tenant", b"").decode() != tenant:  # expired or deleted half-way
                    stale.append(session_id)
                    continue
                records.append(_record(session_id, [x for kv in meta.items() for x in kv]))
            if stale:
                await self._call(self.redis.zrem(index, *stale))
                start -= len(stale)
        return Page(records[:limit], has_more=len(records) > limit)

    async def delete(self, tenant, session_id):
        await self._script("delete", session_id, tenant)
        await self._call(self.redis.zrem(tenant_index(tenant), session_id))

    async def commit(self, tenant, session_id, expected_version, snapshot, tokens_seen, lease=None, release=False,
                     receipt=None):
        self.options.limits.check(snapshot)
        check_id(session_id)
        with_receipt = {} if receipt is None else {"extra_keys": [receipt_key(session_id, tenant, receipt.key)]}
        receipt_args = [] if receipt is None else [receipt.body, int(self.options.receipt_ttl_s * 1000)]
        # the bytes go up first as a pending blob that expires by itself unless the commit script adopts it
        blob = new_lease_token()
        pending_ms = int(max(60.0, 10 * self.options.timeout_s) * 1000)
        await self._call(self.redis.set(blob_prefix(session_id) + blob, snapshot, px=pending_ms))
        result = await self._script("commit", session_id, tenant, expected_version, blob, tokens_seen,
                                    repr(time.time()), lease.token if lease else "", self.options.history,
                                    *receipt_args, **with_receipt)
        if result[0] == "CONFLICT":
            raise VersionConflict(session_id, expected_version, int(result[1]))
        if result[0] == "EXPIRED":
            raise StoreUnavailable("busy", f"the snapshot upload for session {session_id} expired before its commit")
        self.blobs.put(blob_prefix(session_id) + blob, snapshot)
        if release and lease is not None:  # committed: a lease left behind only expires early or late
            with contextlib.suppress(StoreUnavailable):
                await self.release(lease)
        return _record(session_id, result[1])

    async def receipt(self, tenant, session_id, key):
        await self._script("read", session_id, tenant)  # another tenant's session: SessionNotFound
        return await self._call(self.redis.get(receipt_key(session_id, tenant, key)))

    async def acquire(self, tenant, session_id, ttl_s):
        token = new_lease_token()
        _, version = await self._script("acquire", session_id, tenant, token, int(ttl_s * 1000))
        return Lease(session_id, token, int(version), time.time() + ttl_s)

    async def renew(self, lease, ttl_s):
        lease_key = session_keys(lease.session_id)[1]
        if not await self._call(self._scripts["renew"](keys=[lease_key], args=[lease.token, int(ttl_s * 1000)])):
            raise SessionBusy(f"the lease on session {lease.session_id} expired or was taken over")
        return Lease(lease.session_id, lease.token, lease.version, time.time() + ttl_s)

    async def release(self, lease):
        await self._call(self._scripts["release"](keys=[session_keys(lease.session_id)[1]], args=[lease.token]))

    async def fork(self, tenant, session_id, *, name=None, metadata=None):
        metadata = metadata or {}
        self.options.limits.check(name=name, metadata=metadata)
        child, now = new_session_id(session_id), time.time()
        _, flat = await self._script("fork", session_id, tenant, child, repr(now), name or "",
                                     encode_metadata(metadata), session_id, extra_keys=session_keys(child)[:1])
        await self._index(tenant, child, now)
        return _record(child, flat)

    async def _index(self, tenant: str, session_id: str, now: float) -> None:
        """List a new session in its tenant's index, within the tenant's session quota (checked and added in one
        script on the index alone). Over the quota, entries of sessions that expired are dropped and the quota
        checked again; still over, the new session is deleted and QuotaExceeded raised. A session is indexed only
        once it exists, so a listing never drops it as half-written."""
        index, cap = tenant_index(tenant), self.options.limits.max_sessions_per_tenant
        for attempt in range(2):
            if await self._call(self._scripts["index"](keys=[index], args=[session_id, repr(now), cap])):
                return
            if attempt == 0:
                await self._drop_expired(tenant, index)
        await self._script("delete", session_id, tenant)
        raise self.options.limits.quota_error()

    async def _drop_expired(self, tenant: str, index: str) -> None:
        ids = [i.decode() for i in await self._call(self.redis.zrange(index, 0, -1))]
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in ids:
                pipe.hget(session_keys(session_id)[0], "tenant")
            owners = await self._call(pipe.execute())
        stale = [i for i, owner in zip(ids, owners) if owner is None or owner.decode() != tenant]
        if stale:
            await self._call(self.redis.zrem(index, *stale))

    async def rollback(self, tenant, session_id, version, lease=None):
        result = await self._script("rollback", session_id, tenant, version, repr(time.time()),
                                    lease.token if lease else "", self.options.history, new_lease_token())
        if result[0] == "NOVERSION":
            kept = [int(e.split(":")[0]) for e in (result[1] or b"").decode().split()]
            raise InvalidArgument(f"session {session_id} keeps no version {version}; kept: {kept}")
        return _record(session_id, result[1])

    async def ping(self):
        await self._call(self.redis.ping())

    async def close(self):
        await self.redis.aclose()
