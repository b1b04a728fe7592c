"""LocalStore: the embedded default for one machine, an SQLite file in WAL mode.

Every operation is one transaction (BEGIN IMMEDIATE for writes), so a process killed mid-commit leaves the
previous record intact; several server processes on one machine may share the file. Calls run on one worker
thread per store so the event loop never waits on disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
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
)

T = TypeVar("T")

SCHEMA = """
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
    snapshot BLOB NOT NULL,
    lease_token TEXT,
    lease_expires REAL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS sessions_by_tenant ON sessions (tenant, created_at DESC, id DESC);
CREATE TABLE IF NOT EXISTS history (
    id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    tokens_seen INTEGER NOT NULL,
    snapshot BLOB NOT NULL,
    PRIMARY KEY (id, version)
);
"""

COLUMNS = "id, tenant, fingerprint, version, tokens_seen, created_at, updated_at, name, metadata, parent_id"


class LocalStore(SessionStore):
    def __init__(self, path: str | Path, options: StoreOptions | None = None):
        self.options = options or StoreOptions()
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="titans-sqlite")
        self._db: sqlite3.Connection | None = None

    # -- plumbing --------------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=self.options.timeout_s, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a process crash
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                return fn(self._connect())
            except sqlite3.OperationalError as e:  # locked past the timeout, disk gone, ...
                raise StoreUnavailable(f"session database {self.path}: {e}") from e

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _write(self, db: sqlite3.Connection, fn: Callable[[], T]) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn()
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def _expiry(self, now: float) -> float | None:
        return now + self.options.ttl_s if self.options.ttl_s else None

    def _row(self, db: sqlite3.Connection, tenant: str, session_id: str, now: float, with_snapshot: bool = False):
        check_id(session_id)
        cols = COLUMNS + ", lease_token, lease_expires, expires_at" + (", snapshot" if with_snapshot else "")
        row = db.execute(f"SELECT {cols}, length(snapshot) FROM sessions WHERE id = ? AND tenant = ?",
                         (session_id, tenant)).fetchone()
        if row is None or (row[12] is not None and row[12] <= now):
            raise SessionNotFound(f"no session {session_id!r}")
        return row

    def _record(self, db: sqlite3.Connection, row) -> SessionRecord:
        history = tuple(v for (v,) in db.execute(
            "SELECT version FROM history WHERE id = ? ORDER BY version DESC", (row[0],)))
        return SessionRecord(id=row[0], tenant=row[1], fingerprint=row[2], version=row[3], tokens_seen=row[4],
                             created_at=row[5], updated_at=row[6], name=row[7], metadata=json.loads(row[8]),
                             parent_id=row[9], snapshot_bytes=row[-1], history=history)

    def _touch(self, db: sqlite3.Connection, session_id: str, now: float) -> None:
        if self.options.ttl_s:
            db.execute("UPDATE sessions SET expires_at = ? WHERE id = ?", (self._expiry(now), session_id))

    def _check_lease(self, row, lease: Lease | None, now: float) -> None:
        token, expires = row[10], row[11]
        live = token is not None and expires > now
        if lease is not None and (not live or token != lease.token):
            raise SessionBusy(f"the lease on session {row[0]} expired or was taken over")
        if lease is None and live:
            raise SessionBusy(f"session {row[0]} is in use by another request")

    def _insert(self, db, tenant, fingerprint, snapshot, tokens_seen, name, metadata, parent_id, now) -> str:
        session_id = new_session_id(parent_id)
        db.execute(f"INSERT INTO sessions ({COLUMNS}, snapshot, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                   (session_id, tenant, fingerprint, 1, tokens_seen, now, now, name, encode_metadata(metadata),
                    parent_id, snapshot, self._expiry(now)))
        return session_id

    def _set_version(self, db, row, snapshot, tokens_seen, now) -> None:
        """Move the current snapshot into history, install the new one, trim history to K versions."""
        session_id, version = row[0], row[3]
        keep = self.options.history
        if keep:
            db.execute("INSERT OR REPLACE INTO history (id, version, tokens_seen, snapshot) "
                       "SELECT id, version, tokens_seen, snapshot FROM sessions WHERE id = ?", (session_id,))
            db.execute("DELETE FROM history WHERE id = ? AND version <= ?", (session_id, version - keep))
        db.execute("UPDATE sessions SET version = ?, tokens_seen = ?, snapshot = ?, updated_at = ?, expires_at = ? "
                   "WHERE id = ?", (version + 1, tokens_seen, snapshot, now, self._expiry(now), session_id))

    def _fetch(self, db, tenant, session_id, now) -> SessionRecord:
        return self._record(db, self._row(db, tenant, session_id, now))

    # -- the contract ----------------------------------------------------------------------------------------

    async def create(self, tenant, fingerprint, snapshot, *, tokens_seen=0, name=None, metadata=None):
        metadata = metadata or {}
        self.options.limits.check(snapshot, name, metadata)

        def op(db):
            now = time.time()
            return self._write(db, lambda: self._fetch(db, tenant, self._insert(
                db, tenant, fingerprint, snapshot, tokens_seen, name, metadata, None, now), now))

        return await self._run(op)

    async def get(self, tenant, session_id):
        def op(db):
            now = time.time()
            record = self._fetch(db, tenant, session_id, now)
            if self.options.ttl_s:
                self._write(db, lambda: self._touch(db, session_id, now))
            return record

        return await self._run(op)

    async def load(self, tenant, session_id):
        def op(db):
            now = time.time()

            def read():  # one transaction: the record and the snapshot of the same version
                row = self._row(db, tenant, session_id, now, with_snapshot=True)
                self._touch(db, session_id, now)
                return self._record(db, row[:13] + row[14:]), bytes(row[13])

            return self._write(db, read)

        return await self._run(op)

    async def list(self, tenant, limit=20, after=None):
        check_limit(limit)

        def op(db):
            now = time.time()
            sql = f"SELECT {COLUMNS}, lease_token, lease_expires, expires_at, length(snapshot) FROM sessions " \
                  "WHERE tenant = ? AND (expires_at IS NULL OR expires_at > ?)"
            args: list[Any] = [tenant, now]
            if after is not None:
                cursor = db.execute("SELECT created_at, id FROM sessions WHERE id = ? AND tenant = ?",
                                    (after, tenant)).fetchone()
                if cursor is None:
                    raise InvalidArgument(f"'after' is not one of your sessions: {after!r}")
                sql += " AND (created_at < ? OR (created_at = ? AND id < ?))"
                args += [cursor[0], cursor[0], cursor[1]]
            rows = db.execute(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit + 1)).fetchall()
            return Page([self._record(db, r) for r in rows[:limit]], has_more=len(rows) > limit)

        return await self._run(op)

    async def delete(self, tenant, session_id):
        def op(db):
            def delete():
                self._row(db, tenant, session_id, time.time())
                db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

            self._write(db, delete)

        await self._run(op)

    async def commit(self, tenant, session_id, expected_version, snapshot, tokens_seen, lease=None):
        self.options.limits.check(snapshot)

        def op(db):
            def commit():
                now = time.time()
                row = self._row(db, tenant, session_id, now)
                self._check_lease(row, lease, now)
                if row[3] != expected_version:
                    raise VersionConflict(session_id, expected_version, row[3])
                self._set_version(db, row, snapshot, tokens_seen, now)
                return self._fetch(db, tenant, session_id, now)

            return self._write(db, commit)

        return await self._run(op)

    async def acquire(self, tenant, session_id, ttl_s):
        def op(db):
            def acquire():
                now = time.time()
                row = self._row(db, tenant, session_id, now)
                self._check_lease(row, None, now)
                lease = Lease(session_id, new_lease_token(), row[3], now + ttl_s)
                db.execute("UPDATE sessions SET lease_token = ?, lease_expires = ? WHERE id = ?",
                           (lease.token, lease.expires_at, session_id))
                self._touch(db, session_id, now)
                return lease

            return self._write(db, acquire)

        return await self._run(op)

    async def renew(self, lease, ttl_s):
        def op(db):
            def renew():
                now = time.time()
                updated = db.execute("UPDATE sessions SET lease_expires = ? WHERE id = ? AND lease_token = ? "
                                     "AND lease_expires > ?", (now + ttl_s, lease.session_id, lease.token, now))
                if updated.rowcount != 1:
                    raise SessionBusy(f"the lease on session {lease.session_id} expired or was taken over")
                return Lease(lease.session_id, lease.token, lease.version, now + ttl_s)

            return self._write(db, renew)

        return await self._run(op)

    async def release(self, lease):
        def op(db):
            db.execute("UPDATE sessions SET lease_token = NULL, lease_expires = NULL WHERE id = ? AND lease_token = ?",
                       (lease.session_id, lease.token))

        await self._run(op)

    async def fork(self, tenant, session_id, *, name=None, metadata=None):
        metadata = metadata or {}
        self.options.limits.check(name=name, metadata=metadata)

        def op(db):
            def fork():
                now = time.time()
                self._row(db, tenant, session_id, now)
                child = new_session_id(session_id)
                db.execute(f"INSERT INTO sessions ({COLUMNS}, snapshot, expires_at) "
                           "SELECT ?, tenant, fingerprint, 1, tokens_seen, ?, ?, ?, ?, id, snapshot, ? "
                           "FROM sessions WHERE id = ?",
                           (child, now, now, name, encode_metadata(metadata), self._expiry(now), session_id))
                self._touch(db, session_id, now)
                return self._fetch(db, tenant, child, now)

            return self._write(db, fork)

        return await self._run(op)

    async def rollback(self, tenant, session_id, version, lease=None):
        def op(db):
            def rollback():
                now = time.time()
                row = self._row(db, tenant, session_id, now)
                self._check_lease(row, lease, now)
                old = db.execute("SELECT tokens_seen, snapshot FROM history WHERE id = ? AND version = ?",
                                 (session_id, version)).fetchone()
                if old is None:
                    raise InvalidArgument(f"session {session_id} keeps no version {version}; "
                                          f"kept: {list(self._record(db, row).history)}")
                self._set_version(db, row, old[1], old[0], now)
                return self._fetch(db, tenant, session_id, now)

            return self._write(db, rollback)

        return await self._run(op)

    async def ping(self):
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def close(self):
        def op():
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, op)
        self._executor.shutdown(wait=True)
