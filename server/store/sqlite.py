"""LocalStore: the embedded default for one machine, an SQLite file in WAL mode.

Every operation is one transaction (BEGIN IMMEDIATE for writes), so a process killed mid-commit leaves the
previous record intact; several server processes on one machine may share the file. Calls run on one worker
thread per store so the event loop never waits on disk (commits that wait for it together share one transaction),
and checkpoints (copying the WAL back into the database, with an fsync) on another, so no request waits for one.
As in the Redis store, snapshots are immutable blobs with reference counts: fork and rollback move pointers, and
history never copies bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .base import (
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
)

T = TypeVar("T")

log = logging.getLogger("titans.store")

PAGE_BYTES = 4096  # SQLite's default page: what any write transaction adds to the WAL at least

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    id INTEGER PRIMARY KEY,
    refs INTEGER NOT NULL,
    size INTEGER NOT NULL
);
-- the bytes live apart from the counts: changing a count must not rewrite megabytes of row
CREATE TABLE IF NOT EXISTS blob_data (
    id INTEGER PRIMARY KEY REFERENCES blobs (id),
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    version INTEGER NOT NULL,
    tokens_seen INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    name TEXT,
    metadata TEXT NOT NULL,
    parent_id TEXT,
    blob INTEGER NOT NULL REFERENCES blobs (id),
    lease_token TEXT,
    lease_expires REAL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS sessions_by_tenant ON sessions (tenant, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS receipts (
    id TEXT NOT NULL,
    key TEXT NOT NULL,
    body BLOB NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (id, key)
);
CREATE INDEX IF NOT EXISTS receipts_by_expiry ON receipts (expires_at);
CREATE TABLE IF NOT EXISTS history (
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    tokens_seen INTEGER NOT NULL,
    blob INTEGER NOT NULL REFERENCES blobs (id),
    PRIMARY KEY (id, version)
);
"""

COLUMNS = "id, tenant, fingerprint, version, tokens_seen, created_at, updated_at, name, metadata, parent_id"
SELECT = (f"SELECT s.{COLUMNS.replace(', ', ', s.')}, s.blob, s.lease_token, s.lease_expires, s.expires_at, b.size "
          "FROM sessions s JOIN blobs b ON b.id = s.blob")


class _HalfDone(Exception):
    """A grouped call failed after it had written: only undoing its whole transaction undoes it."""


def _settle(future: asyncio.Future, ok: bool, value) -> None:
    if not future.done():  # its caller may have been cancelled meanwhile
        future.set_result(value) if ok else future.set_exception(value)


class LocalStore(SessionStore):
    CHECKPOINT_BYTES = 16 << 20  # snapshot bytes written between two background checkpoints
    WAL_LIMIT_BYTES = 64 << 20  # a WAL this long is restarted by the store's thread, writers waiting

    def __init__(self, path: str | Path, options: StoreOptions | None = None):
        self.options = options or StoreOptions()
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="titans-sqlite")
        self._db: sqlite3.Connection | None = None
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="titans-sqlite-checkpoint")
        self._checkpoint_db: sqlite3.Connection | None = None
        self._written = 0  # bytes committed since the last checkpoint began
        self._checkpointing = False
        self.checkpoints = 0  # completed background checkpoints
        self._commits: list[tuple[Callable, int, asyncio.Future]] = []  # waiting to be committed together
        self._commits_lock = threading.Lock()

    # -- plumbing --------------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=self.options.timeout_s, isolation_level=None,
                                 check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a process crash
            db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run on their own thread: see _wrote
            # a WAL that starts over is cut to half the limit, so its file's size tells when it outgrows the limit
            db.execute(f"PRAGMA journal_size_limit={self.WAL_LIMIT_BYTES // 2}")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    @contextlib.contextmanager
    def _transaction(self, write: bool):
        """One transaction on the store's connection, on its thread (BEGIN IMMEDIATE when it writes), rolled back
        if the body raises; the database's own failures become StoreUnavailable."""
        try:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as e:  # locked past the timeout, disk gone, ...
            reason = "read_only" if "readonly" in str(e) else "busy" if "locked" in str(e) else "unreachable"
            raise StoreUnavailable(reason, f"session database {self.path}: {e}") from e

    async def _run(self, fn: Callable[[sqlite3.Connection], T], write: bool = True, snapshot_bytes: int = 0) -> T:
        """Run fn(db) on the store's thread, as one transaction (counting what a write wrote toward the next
        checkpoint: at least a page, plus the snapshot it stored, if any)."""
        def call() -> T:
            with self._transaction(write) as db:
                result = fn(db)
            if write:  # forks, leases and deletes, which store no snapshot, must lead to checkpoints too
                self._wrote(PAGE_BYTES + snapshot_bytes)
            return result

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _run_grouped(self, fn: Callable[[sqlite3.Connection], T], snapshot_bytes: int) -> T:
        """Run the write fn(db) on the store's thread together with the others waiting for it, in one
        transaction (group commit). When many requests finish at once, a transaction per snapshot costs more per
        commit, and each waits for all before it. fn must check before it writes: a call that fails having
        written nothing fails alone; one that fails halfway sends every call of its group to a transaction of
        its own."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._commits_lock:
            self._commits.append((fn, snapshot_bytes, future))
            first = len(self._commits) == 1
        if first:  # later ones join the batch this call will take, unless it has been taken already
            loop.run_in_executor(self._executor, self._commit_waiting)
        return await future

    def _commit_waiting(self) -> None:
        with self._commits_lock:
            batch, self._commits = self._commits, []
        for (_, _, future), (ok, value) in zip(batch, self._commit_batch(batch)):
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits for it any more
                future.get_loop().call_soon_threadsafe(_settle, future, ok, value)

    def _commit_batch(self, batch: list[tuple[Callable, int, asyncio.Future]]) -> list[tuple[bool, object]]:
        """(succeeded, result or exception) of each call, all in one transaction."""
        outcomes: list[tuple[bool, object]] = []
        try:
            with self._transaction(write=True) as db:
                for fn, _, _ in batch:
                    changes = db.total_changes
                    try:
                        outcomes.append((True, fn(db)))
                    except sqlite3.OperationalError:
                        raise  # the database, not this call: the whole transaction fails
                    except Exception as e:  # this call's own failure: conflict, busy, not found
                        if db.total_changes != changes:
                            raise _HalfDone from e
                        outcomes.append((False, e))
        except _HalfDone as e:
            return [(False, e.__cause__)] if len(batch) == 1 else [self._commit_batch([call])[0] for call in batch]
        except Exception as e:  # StoreUnavailable, or anything else that failed the transaction: every call fails
            return [(False, e)] * len(batch)
        self._wrote(sum(PAGE_BYTES + nbytes for (_, nbytes, _), (ok, _) in zip(batch, outcomes) if ok))
        return outcomes

    def _wrote(self, nbytes: int) -> None:
        """Count the bytes a transaction just committed (on the store's thread). Past CHECKPOINT_BYTES, start a
        passive checkpoint on the checkpoint thread: SQLite's own checkpoint runs inside the commit that crosses
        its threshold, and with its fsync it holds the store's one thread, every request queued behind it. A
        passive checkpoint on a connection of its own waits for no one and blocks no writer, and once it has
        copied the whole WAL back,
        the next write starts the WAL over. Writers that never pause keep it from completing, and a busy machine
        may not run its thread in time, so the WAL's length is bounded here, where it grows: once its file is
        longer than WAL_LIMIT_BYTES, this thread restarts the WAL itself before it writes on (rarely: only under
        sustained writes, and then the writers wait, which is the backpressure they need); the next write starts
        it over and cuts the file to half that."""
        self._written += nbytes
        if self.path == ":memory:":
            return
        try:
            if os.path.getsize(self.path + "-wal") > self.WAL_LIMIT_BYTES:
                self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()  # all: no statement left open
        except (OSError, sqlite3.Error):  # the transaction is committed all the same: not this request's failure
            log.warning("restarting the WAL of %s failed", self.path, exc_info=True)
        if self._written >= self.CHECKPOINT_BYTES and not self._checkpointing:
            self._written, self._checkpointing = 0, True
            self._checkpointer.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            if self._checkpoint_db is None:
                self._checkpoint_db = sqlite3.connect(self.path, timeout=self.options.timeout_s, isolation_level=None,
                                                      check_same_thread=False)
            self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # all: no statement left open
            self.checkpoints += 1
        except sqlite3.Error:  # the next one retries; meanwhile the WAL grows, up to the store thread's restart
            log.warning("background checkpoint of %s failed", self.path, exc_info=True)
        finally:
            self._checkpointing = False

    def _expiry(self, now: float) -> float | None:
        return now + self.options.ttl_s if self.options.ttl_s else None

    def _row(self, db: sqlite3.Connection, tenant: str, session_id: str, now: float) -> sqlite3.Row:
        check_id(session_id)
        row = db.execute(SELECT + " WHERE s.id = ? AND s.tenant = ?", (session_id, tenant)).fetchone()
        if row is None or (row["expires_at"] is not None and row["expires_at"] <= now):
            raise SessionNotFound(f"no session {session_id!r}")
        return row

    def _record(self, db: sqlite3.Connection, row: sqlite3.Row) -> SessionRecord:
        history = tuple(v for (v,) in db.execute(
            "SELECT version FROM history WHERE id = ? ORDER BY version DESC", (row["id"],)))
        return SessionRecord(id=row["id"], tenant=row["tenant"], fingerprint=row["fingerprint"],
                             version=row["version"], tokens_seen=row["tokens_seen"], created_at=row["created_at"],
                             updated_at=row["updated_at"], name=row["name"], metadata=json.loads(row["metadata"]),
                             parent_id=row["parent_id"], snapshot_bytes=row["size"], history=history)

    def _fetch(self, db, tenant, session_id, now) -> SessionRecord:
        return self._record(db, self._row(db, tenant, session_id, now))

    def _touch(self, db: sqlite3.Connection, session_id: str, now: float) -> None:
        if self.options.ttl_s:
            db.execute("UPDATE sessions SET expires_at = ? WHERE id = ?", (self._expiry(now), session_id))

    def _check_lease(self, row: sqlite3.Row, lease: Lease | None, now: float) -> None:
        token = row["lease_token"]
        live = token is not None and row["lease_expires"] > now
        if lease is not None and (not live or token != lease.token):
            raise SessionBusy(f"the lease on session {row['id']} expired or was taken over")
        if lease is None and live:
            raise SessionBusy(f"session {row['id']} is in use by another request")

    @staticmethod
    def _snapshot(db: sqlite3.Connection, row: sqlite3.Row) -> bytes:
        return bytes(db.execute("SELECT data FROM blob_data WHERE id = ?", (row["blob"],)).fetchone()[0])

    @staticmethod
    def _new_blob(db: sqlite3.Connection, snapshot: bytes) -> int:
        blob = db.execute("INSERT INTO blobs (refs, size) VALUES (1, ?)", (len(snapshot),)).lastrowid
        db.execute("INSERT INTO blob_data (id, data) VALUES (?, ?)", (blob, snapshot))
        return blob

    @staticmethod
    def _decref(db: sqlite3.Connection, blob: int) -> None:
        db.execute("UPDATE blobs SET refs = refs - 1 WHERE id = ?", (blob,))
        if db.execute("SELECT refs FROM blobs WHERE id = ?", (blob,)).fetchone()[0] <= 0:
            db.execute("DELETE FROM blob_data WHERE id = ?", (blob,))
            db.execute("DELETE FROM blobs WHERE id = ?", (blob,))

    def _remove(self, db: sqlite3.Connection, session_id: str) -> None:
        blobs = [r[0] for r in db.execute("SELECT blob FROM history WHERE id = ? UNION ALL "
                                          "SELECT blob FROM sessions WHERE id = ?", (session_id, session_id))]
        db.execute("DELETE FROM history WHERE id = ?", (session_id,))
        db.execute("DELETE FROM receipts WHERE id = ?", (session_id,))
        db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        for blob in blobs:
            self._decref(db, blob)

    def _purge_expired(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("DELETE FROM receipts WHERE expires_at <= ?", (now,))
        for (session_id,) in db.execute("SELECT id FROM sessions WHERE expires_at <= ?", (now,)).fetchall():
            self._remove(db, session_id)

    def _install(self, db: sqlite3.Connection, row: sqlite3.Row, blob: int, tokens_seen: int, now: float) -> None:
        """`blob` (already counted) becomes current; the old current moves into history, trimmed to K."""
        session_id, version, keep = row["id"], row["version"], self.options.history
        if keep:
            db.execute("INSERT INTO history (id, version, tokens_seen, blob) VALUES (?, ?, ?, ?)",
                       (session_id, version, row["tokens_seen"], row["blob"]))
        else:
            self._decref(db, row["blob"])
        for old_version, old_blob in db.execute("SELECT version, blob FROM history WHERE id = ? AND version <= ?",
                                                (session_id, version - keep)).fetchall():
            db.execute("DELETE FROM history WHERE id = ? AND version = ?", (session_id, old_version))
            self._decref(db, old_blob)
        db.execute("UPDATE sessions SET version = ?, tokens_seen = ?, blob = ?, updated_at = ?, expires_at = ? "
                   "WHERE id = ?", (version + 1, tokens_seen, blob, now, self._expiry(now), session_id))

    def _check_quota(self, db: sqlite3.Connection, tenant: str) -> None:
        """In the write transaction that adds a session (BEGIN IMMEDIATE: no other writer counts meanwhile)."""
        cap = self.options.limits.max_sessions_per_tenant
        if cap and db.execute("SELECT COUNT(*) FROM sessions WHERE tenant = ?", (tenant,)).fetchone()[0] >= cap:
            raise self.options.limits.quota_error()

    # -- the contract ----------------------------------------------------------------------------------------

    async def create(self, tenant, fingerprint, snapshot, *, tokens_seen=0, name=None, metadata=None):
        metadata = metadata or {}
        self.options.limits.check(snapshot, name, metadata)

        def op(db):
            now = time.time()
            self._purge_expired(db, now)
            self._check_quota(db, tenant)
            session_id = new_session_id()
            db.execute(f"INSERT INTO sessions ({COLUMNS}, blob, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (session_id, tenant, fingerprint, 1, tokens_seen, now, now, name, encode_metadata(metadata),
                        None, self._new_blob(db, snapshot), self._expiry(now)))
            return self._fetch(db, tenant, session_id, now)

        return await self._run(op, snapshot_bytes=len(snapshot))

    async def get(self, tenant, session_id):
        def op(db):
            now = time.time()
            record = self._fetch(db, tenant, session_id, now)
            self._touch(db, session_id, now)
            return record

        return await self._run(op, write=bool(self.options.ttl_s))

    async def load(self, tenant, session_id):
        def op(db):  # one transaction: the record and the bytes of the same version
            now = time.time()
            row = self._row(db, tenant, session_id, now)
            self._touch(db, session_id, now)
            return self._record(db, row), self._snapshot(db, row)

        return await self._run(op, write=bool(self.options.ttl_s))

    async def list(self, tenant, limit=20, after=None):
        check_limit(limit)

        def op(db):
            now = time.time()
            sql = SELECT + " WHERE s.tenant = ? AND (s.expires_at IS NULL OR s.expires_at > ?)"
            args: list[Any] = [tenant, now]
            if after is not None:
                cursor = db.execute("SELECT created_at, id FROM sessions WHERE id = ? AND tenant = ?",
                                    (after, tenant)).fetchone()
                if cursor is None:
                    raise InvalidArgument(f"'after' is not one of your sessions: {after!r}")
                sql += " AND (s.created_at < ? OR (s.created_at = ? AND s.id < ?))"
                args += [cursor[0], cursor[0], cursor[1]]
            rows = db.execute(sql + " ORDER BY s.created_at DESC, s.id DESC LIMIT ?", (*args, limit + 1)).fetchall()
            return Page([self._record(db, r) for r in rows[:limit]], has_more=len(rows) > limit)

        return await self._run(op, write=False)

    async def delete(self, tenant, session_id):
        def op(db):
            self._row(db, tenant, session_id, time.time())
            self._remove(db, session_id)

        await self._run(op)

    async def commit(self, tenant, session_id, expected_version, snapshot, tokens_seen, lease=None, release=False,
                     receipt=None):
        self.options.limits.check(snapshot)
        receipt_key = receipt_id(tenant, receipt.key) if receipt else None

        def op(db):
            now = time.time()
            row = self._row(db, tenant, session_id, now)
            self._check_lease(row, lease, now)
            if row["version"] != expected_version:
                raise VersionConflict(session_id, expected_version, row["version"])
            self._install(db, row, self._new_blob(db, snapshot), tokens_seen, now)
            if receipt is not None:
                db.execute("INSERT OR REPLACE INTO receipts (id, key, body, expires_at) VALUES (?, ?, ?, ?)",
                           (session_id, receipt_key, receipt.body, now + self.options.receipt_ttl_s))
            if release and lease is not None:
                self._release(db, lease)
            return self._fetch(db, tenant, session_id, now)

        return await self._run_grouped(op, len(snapshot))

    async def receipt(self, tenant, session_id, key):
        receipt_key = receipt_id(tenant, key)

        def op(db):
            self._row(db, tenant, session_id, time.time())  # another tenant's session: SessionNotFound
            row = db.execute("SELECT body FROM receipts WHERE id = ? AND key = ? AND expires_at > ?",
                             (session_id, receipt_key, time.time())).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(op, write=False)

    def _acquire(self, db: sqlite3.Connection, tenant: str, session_id: str, ttl_s: float, now: float):
        row = self._row(db, tenant, session_id, now)
        self._check_lease(row, None, now)
        lease = Lease(session_id, new_lease_token(), row["version"], now + ttl_s)
        db.execute("UPDATE sessions SET lease_token = ?, lease_expires = ? WHERE id = ?",
                   (lease.token, lease.expires_at, session_id))
        self._touch(db, session_id, now)
        return lease, row

    async def acquire(self, tenant, session_id, ttl_s):
        return await self._run(lambda db: self._acquire(db, tenant, session_id, ttl_s, time.time())[0])

    async def checkout(self, tenant, session_id, ttl_s):
        """The lease and the snapshot in one transaction: apart, requests arriving together would each take their
        lease and then, behind all the other leases on the store's one thread, their snapshot."""
        def op(db):
            lease, row = self._acquire(db, tenant, session_id, ttl_s, time.time())
            return lease, self._record(db, row), self._snapshot(db, row)

        return await self._run(op)

    async def renew(self, lease, ttl_s):
        def op(db):
            now = time.time()
            updated = db.execute("UPDATE sessions SET lease_expires = ? WHERE id = ? AND lease_token = ? "
                                 "AND lease_expires > ?", (now + ttl_s, lease.session_id, lease.token, now))
            if updated.rowcount != 1:
                raise SessionBusy(f"the lease on session {lease.session_id} expired or was taken over")
            return Lease(lease.session_id, lease.token, lease.version, now + ttl_s)

        return await self._run(op)

    async def release(self, lease):
        await self._run(lambda db: self._release(db, lease))

    @staticmethod
    def _release(db: sqlite3.Connection, lease: Lease) -> None:
        db.execute("UPDATE sessions SET lease_token = NULL, lease_expires = NULL WHERE id = ? AND lease_token = ?",
                   (lease.session_id, lease.token))

    async def fork(self, tenant, session_id, *, name=None, metadata=None):
        metadata = metadata or {}
        self.options.limits.check(name=name, metadata=metadata)

        def op(db):
            now = time.time()
            parent = self._row(db, tenant, session_id, now)
            self._purge_expired(db, now)
            self._check_quota(db, tenant)
            child = new_session_id(session_id)
            db.execute(f"INSERT INTO sessions ({COLUMNS}, blob, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (child, tenant, parent["fingerprint"], 1, parent["tokens_seen"], now, now, name,
                        encode_metadata(metadata), session_id, parent["blob"], self._expiry(now)))
            db.execute("UPDATE blobs SET refs = refs + 1 WHERE id = ?", (parent["blob"],))
            self._touch(db, session_id, now)
            return self._fetch(db, tenant, child, now)

        return await self._run(op)

    async def rollback(self, tenant, session_id, version, lease=None):
        def op(db):
            now = time.time()
            row = self._row(db, tenant, session_id, now)
            self._check_lease(row, lease, now)
            old = db.execute("SELECT tokens_seen, blob FROM history WHERE id = ? AND version = ?",
                             (session_id, version)).fetchone()
            if old is None:
                raise InvalidArgument(f"session {session_id} keeps no version {version}; "
                                      f"kept: {list(self._record(db, row).history)}")
            db.execute("UPDATE blobs SET refs = refs + 1 WHERE id = ?", (old["blob"],))
            self._install(db, row, old["blob"], old["tokens_seen"], now)
            return self._fetch(db, tenant, session_id, now)

        return await self._run(op)

    async def ping(self):
        await self._run(lambda db: db.execute("SELECT 1").fetchone(), write=False)

    async def close(self):
        for executor, attribute in ((self._executor, "_db"), (self._checkpointer, "_checkpoint_db")):
            await asyncio.get_running_loop().run_in_executor(executor, self._close_connection, attribute)
            executor.shutdown(wait=True)

    def _close_connection(self, attribute: str) -> None:
        """Run on the connection's own thread, the one that used it."""
        db = getattr(self, attribute)
        if db is not None:
            db.close()
            setattr(self, attribute, None)
