"""Crash safety and outages: SIGKILL in the middle of commits, Redis stopped and restarted, AOF durability."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from server.store import StoreOptions, StoreUnavailable, open_store
from tests.redis_server import RedisServer
from tests.server.store.conftest import make_store

FP = "fp"
PAYLOAD = 1 << 20  # 1 MiB per snapshot: a kill lands in the middle of writing one


def snapshot_for(version: int) -> bytes:
    """A self-checking snapshot: its version, a payload, and the sha256 of both."""
    body = version.to_bytes(8, "little") + random.Random(version).randbytes(PAYLOAD)
    return body + hashlib.sha256(body).digest()


def check_snapshot(data: bytes) -> int:
    body, digest = data[:-32], data[-32:]
    assert hashlib.sha256(body).digest() == digest, "torn snapshot"
    return int.from_bytes(body[:8], "little")


COMMITTER = """
import asyncio, sys
from server.store import open_store
from tests.server.store.test_durability import snapshot_for

async def main(url, session_id):
    store = open_store(url)
    while True:
        record = await store.get("t", session_id)
        await store.commit("t", session_id, record.version, snapshot_for(record.version + 1), record.version)
        print("committed", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.slow
async def test_sigkill_mid_commit_never_tears_a_record(store_kind, store_server, tmp_path):
    store = await make_store(store_kind, store_server, tmp_path)
    url = store_server.url if store_server is not None else f"sqlite:///{tmp_path}/sessions.db"
    rec = await store.create("t", FP, snapshot_for(1))
    rng = random.Random(0)
    try:
        for _ in range(6):
            child = subprocess.Popen([sys.executable, "-c", COMMITTER, url, rec.id], stdout=subprocess.PIPE,
                                     cwd=os.getcwd())
            child.stdout.readline()  # at least one commit went through: the loop is running
            time.sleep(rng.uniform(0.0, 0.15))
            child.kill()
            child.wait()
            record, data = await store.load("t", rec.id)
            assert check_snapshot(data) == record.version  # bytes and record belong to the same version
            assert record.tokens_seen == record.version - 1
            for version in record.history:  # kept versions are whole too
                back = await store.rollback("t", rec.id, version)
                assert check_snapshot((await store.load("t", rec.id))[1]) == version
                assert back.version == record.version + 1
                break
        assert record.version > 6
    finally:
        await store.close()


async def test_redis_outage_fails_fast_and_recovers_with_aof(tmp_path):
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    store = open_store(server.url, StoreOptions(timeout_s=0.5))
    try:
        rec = await store.create("t", FP, b"v1")
        rec = await store.commit("t", rec.id, 1, b"v2", 5)

        server.stop()
        for call in (lambda: store.get("t", rec.id), lambda: store.commit("t", rec.id, 2, b"v3", 6), store.ping,
                     lambda: store.create("t", FP, b"x")):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - started < 1.5  # fails fast, within about the configured timeout

        server.start()  # same port and directory: the AOF brings the committed session back
        record, data = await store.load("t", rec.id)  # the same store object reconnects by itself
        assert (record.version, data, record.tokens_seen) == (2, b"v2", 5)
        await store.commit("t", rec.id, 2, b"v3", 6)

        server.kill()  # even SIGKILL: appendfsync always
        server.start()
        assert (await store.load("t", rec.id))[1] == b"v3"
    finally:
        await store.close()
        server.stop()


async def test_redis_unreachable_from_the_start(tmp_path):
    from tests.redis_server import free_port

    store = open_store(f"redis://127.0.0.1:{free_port()}/0", StoreOptions(timeout_s=0.3))
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await store.ping()
        assert time.monotonic() - started < 1.0
    finally:
        await store.close()


async def test_sqlite_survives_reopen(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    store = open_store(url)
    rec = await store.create("t", FP, b"v1")
    await store.commit("t", rec.id, 1, b"v2", 1)
    await store.close()
    again = open_store(url)
    try:
        assert (await again.load("t", rec.id))[1] == b"v2"
    finally:
        await again.close()


async def test_stores_can_be_used_from_one_event_loop_concurrently(store):
    recs = await asyncio.gather(*(store.create("t", FP, b"%d" % i) for i in range(20)))
    loaded = await asyncio.gather(*(store.load("t", r.id) for r in recs))
    assert [d for _, d in loaded] == [b"%d" % i for i in range(20)]


async def checkpoint_done(store) -> None:
    """Wait (up to 10 s) for a background checkpoint in progress to finish."""
    deadline = time.monotonic() + 10
    while store._checkpointing and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def test_sqlite_checkpoints_off_the_request_thread_and_keeps_the_wal_bounded(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    store.CHECKPOINT_BYTES, store.WAL_LIMIT_BYTES = 1 << 20, 8 << 20
    try:
        autocheckpoint = await store._run(lambda db: db.execute("PRAGMA wal_autocheckpoint").fetchone()[0], False)
        assert autocheckpoint == 0  # a commit never checkpoints on the request thread
        record = await store.create("t", FP, snapshot_for(1))
        for version in range(2, 42):  # 40 MiB through the WAL
            record = await store.commit("t", record.id, record.version, snapshot_for(version), version)
        await checkpoint_done(store)
        assert store.checkpoints >= 2
        # back-to-back commits keep a passive checkpoint from completing, so the WAL is restarted at its limit:
        # without checkpoints it would hold all 40 MiB (80 with the history pages freed), the limit only ~8 + one
        assert (tmp_path / "s.db-wal").stat().st_size < 20 * PAYLOAD
        assert check_snapshot((await store.load("t", record.id))[1]) == 41
    finally:
        await store.close()
    again = open_store(f"sqlite:///{tmp_path}/s.db")
    try:
        assert check_snapshot((await again.load("t", record.id))[1]) == 41
    finally:
        await again.close()


async def test_sqlite_keeps_the_wal_bounded_when_its_checkpoint_thread_is_starved(tmp_path):
    """On a loaded machine the checkpoint thread may not run for a while: the WAL must stay bounded anyway."""
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    store.CHECKPOINT_BYTES, store.WAL_LIMIT_BYTES = 1 << 20, 8 << 20
    starved = threading.Event()
    store._checkpointer.submit(starved.wait)  # the checkpoints queue behind this until it is set
    try:
        record = await store.create("t", FP, snapshot_for(1))
        for version in range(2, 42):  # 40 MiB through the WAL, no checkpoint thread
            record = await store.commit("t", record.id, record.version, snapshot_for(version), version)
        assert store.checkpoints == 0
        assert (tmp_path / "s.db-wal").stat().st_size < 12 * PAYLOAD  # the limit and about one commit
        assert check_snapshot((await store.load("t", record.id))[1]) == 41
    finally:
        starved.set()
        await store.close()


async def test_sqlite_group_commit_undoes_a_commit_that_fails_halfway_and_keeps_the_others(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    install = store._install

    def failing_install(db, row, blob, tokens_seen, now):  # writes, then fails: only a rollback undoes it
        install(db, row, blob, tokens_seen, now)
        if tokens_seen == 666:
            raise RuntimeError("failed halfway")

    store._install = failing_install
    try:
        recs = [await store.create("t", FP, b"v1-%d" % i) for i in range(4)]
        busy = threading.Event()
        store._executor.submit(busy.wait)  # the store's thread is busy: the four commits wait for it together
        commits = asyncio.gather(*(store.commit("t", rec.id, 1, b"v2-%d" % i, 666 if i == 2 else 5)
                                   for i, rec in enumerate(recs)), return_exceptions=True)
        await asyncio.sleep(0.1)
        assert len(store._commits) == 4
        busy.set()
        outcomes = await commits
        assert isinstance(outcomes[2], RuntimeError)
        loaded = [await store.load("t", rec.id) for rec in recs]
        assert [(r.version, r.tokens_seen, data) for r, data in loaded] == [
            (2, 5, b"v2-0"), (2, 5, b"v2-1"), (1, 0, b"v1-2"), (2, 5, b"v2-3")]
    finally:
        await store.close()


async def test_sqlite_writes_without_snapshots_also_lead_to_checkpoints(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    store.CHECKPOINT_BYTES = 64 << 10
    try:
        record = await store.create("t", FP, b"small")
        for _ in range(40):  # forks and deletes move no snapshot bytes, but each writes pages to the WAL
            fork = await store.fork("t", record.id)
            await store.delete("t", fork.id)
        await checkpoint_done(store)
        assert store.checkpoints >= 1
    finally:
        await store.close()
