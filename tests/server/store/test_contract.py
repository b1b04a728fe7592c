"""One contract suite, run against every store: SQLite, a real redis-server (plain, and TLS to an ACL user) and a
real 3-master Redis Cluster."""

from __future__ import annotations

import asyncio
import os

import pytest
from redis.asyncio import RedisCluster

from server.store import (
    InvalidArgument,
    LimitExceeded,
    QuotaExceeded,
    Receipt,
    SessionBusy,
    SessionNotFound,
    StoreLimits,
    VersionConflict,
)
from server.store.base import BlobCache, is_session_id
from tests.server.store.conftest import make_store

FP = "fingerprint-of-the-model"


async def test_create_get_load_round_trip(store):
    snapshot = os.urandom(10_000)
    rec = await store.create("a", FP, snapshot, tokens_seen=7, name="notes", metadata={"user": "42"})
    assert is_session_id(rec.id) and rec.version == 1 and rec.tokens_seen == 7 and rec.snapshot_bytes == 10_000
    got = await store.get("a", rec.id)
    assert (got.id, got.tenant, got.fingerprint, got.version, got.tokens_seen) == (rec.id, "a", FP, 1, 7)
    assert got.name == "notes" and got.metadata == {"user": "42"} and got.parent_id is None and got.history == ()
    loaded, data = await store.load("a", rec.id)
    assert data == snapshot and loaded.version == 1
    assert await store.export("a", rec.id) == snapshot


async def test_import_is_a_new_session_with_those_bytes(store):
    snapshot = os.urandom(5000)
    rec = await store.import_("a", FP, snapshot, tokens_seen=3)
    assert (await store.load("a", rec.id))[1] == snapshot and rec.tokens_seen == 3


async def test_unknown_and_malformed_ids_are_not_found(store):
    for bad in ["x" * 28, "nope", "../../etc/passwd", ""]:
        with pytest.raises(SessionNotFound):
            await store.get("a", bad)
        with pytest.raises(SessionNotFound):
            await store.load("a", bad)


async def test_commit_is_compare_and_set_and_keeps_history(store):
    rec = await store.create("a", FP, b"v1")
    for version in range(1, 6):
        rec = await store.commit("a", rec.id, version, f"v{version + 1}".encode(), tokens_seen=10 * version)
        assert rec.version == version + 1 and rec.tokens_seen == 10 * version
    assert rec.history == (5, 4, 3)  # K = 3 older versions, newest first
    with pytest.raises(VersionConflict) as err:
        await store.commit("a", rec.id, 4, b"stale", tokens_seen=0)
    assert err.value.current == 6
    record, data = await store.load("a", rec.id)
    assert data == b"v6" and record.version == 6


async def test_rollback_restores_a_kept_version_as_a_new_version(store):
    rec = await store.create("a", FP, b"v1")
    for version in range(1, 5):
        rec = await store.commit("a", rec.id, version, f"v{version + 1}".encode(), tokens_seen=version)
    assert rec.history == (4, 3, 2)
    back = await store.rollback("a", rec.id, 3)
    assert back.version == 6 and back.tokens_seen == 2  # version 3 was committed with tokens_seen 2
    assert (await store.load("a", rec.id))[1] == b"v3"
    assert back.history == (5, 4, 3)
    with pytest.raises(InvalidArgument):
        await store.rollback("a", rec.id, 1)  # no longer kept
    assert (await store.get("a", rec.id)).version == 6


async def test_list_is_newest_first_paginated_and_per_tenant(store):
    ids = [(await store.create("a", FP, b"x")).id for _ in range(7)]
    await store.create("b", FP, b"y")
    page = await store.list("a", limit=3)
    assert [r.id for r in page.data] == ids[::-1][:3] and page.has_more
    seen = [r.id for r in page.data]
    while page.has_more:
        page = await store.list("a", limit=3, after=seen[-1])
        seen += [r.id for r in page.data]
    assert seen == ids[::-1]
    with pytest.raises(InvalidArgument):
        await store.list("a", limit=0)
    with pytest.raises(InvalidArgument):
        await store.list("b", after=ids[0])  # a's id is no cursor for b


async def test_delete(store):
    keep = await store.create("a", FP, b"keep")
    gone = await store.create("a", FP, b"gone")
    await store.delete("a", gone.id)
    with pytest.raises(SessionNotFound):
        await store.get("a", gone.id)
    with pytest.raises(SessionNotFound):
        await store.delete("a", gone.id)
    assert [r.id for r in (await store.list("a")).data] == [keep.id]


async def test_fork_copies_the_snapshot_and_then_lives_apart(store):
    parent = await store.create("a", FP, b"shared", tokens_seen=5, metadata={"k": "v"})
    parent = await store.commit("a", parent.id, 1, b"shared-2", tokens_seen=6)
    child = await store.fork("a", parent.id, name="branch")
    assert child.id != parent.id and child.parent_id == parent.id and child.version == 1
    assert child.tokens_seen == 6 and child.name == "branch" and child.fingerprint == FP
    assert (await store.load("a", child.id))[1] == b"shared-2"
    await store.commit("a", child.id, 1, b"child", tokens_seen=9)
    await store.commit("a", parent.id, 2, b"parent", tokens_seen=8)
    assert (await store.load("a", child.id))[1] == b"child"
    assert (await store.load("a", parent.id))[1] == b"parent"
    await store.delete("a", parent.id)
    assert (await store.load("a", child.id))[1] == b"child"


async def test_tenants_cannot_touch_each_others_sessions(store):
    rec = await store.create("a", FP, b"secret of a")
    for call in (lambda: store.get("b", rec.id), lambda: store.load("b", rec.id),
                 lambda: store.export("b", rec.id), lambda: store.fork("b", rec.id),
                 lambda: store.delete("b", rec.id), lambda: store.commit("b", rec.id, 1, b"evil", 0),
                 lambda: store.acquire("b", rec.id, 5.0), lambda: store.rollback("b", rec.id, 1)):
        with pytest.raises(SessionNotFound):
            await call()
    assert (await store.list("b")).data == []
    record, data = await store.load("a", rec.id)
    assert data == b"secret of a" and record.version == 1


async def test_a_lease_is_exclusive_until_released_or_expired(store):
    rec = await store.create("a", FP, b"v1")
    lease = await store.acquire("a", rec.id, ttl_s=5.0)
    assert lease.version == 1
    with pytest.raises(SessionBusy):
        await store.acquire("a", rec.id, ttl_s=5.0)
    with pytest.raises(SessionBusy):  # nobody else may commit while it is held
        await store.commit("a", rec.id, 1, b"intruder", 0)
    await store.commit("a", rec.id, lease.version, b"v2", 1, lease=lease)
    lease = await store.renew(lease, ttl_s=5.0)
    await store.release(lease)
    await store.release(lease)  # idempotent
    short = await store.acquire("a", rec.id, ttl_s=0.2)
    await asyncio.sleep(0.35)
    taken = await store.acquire("a", rec.id, ttl_s=5.0)  # expired: another request may take it
    with pytest.raises(SessionBusy):  # the expired holder can neither commit nor renew
        await store.commit("a", rec.id, 2, b"late", 0, lease=short)
    with pytest.raises(SessionBusy):
        await store.renew(short, ttl_s=5.0)
    await store.release(short)  # does not release the new holder's lease
    with pytest.raises(SessionBusy):
        await store.acquire("a", rec.id, ttl_s=5.0)
    await store.release(taken)
    assert (await store.load("a", rec.id))[1] == b"v2"


async def test_checkout_leases_and_loads_and_a_releasing_commit_gives_the_lease_up(store):
    rec = await store.create("a", FP, b"v1")
    lease, record, data = await store.checkout("a", rec.id, ttl_s=5.0)
    assert (lease.version, record.version, data) == (1, 1, b"v1")
    with pytest.raises(SessionBusy):  # checkout takes the lease as acquire does
        await store.checkout("a", rec.id, ttl_s=5.0)
    with pytest.raises(SessionNotFound):
        await store.checkout("b", rec.id, ttl_s=5.0)  # another tenant's session
    committed = await store.commit("a", rec.id, lease.version, b"v2", 3, lease=lease, release=True)
    assert committed.version == 2
    lease, record, data = await store.checkout("a", rec.id, ttl_s=5.0)  # released with the commit
    assert (lease.version, record.tokens_seen, data) == (2, 3, b"v2")
    with pytest.raises(VersionConflict):  # a commit that fails releases nothing
        await store.commit("a", rec.id, 1, b"stale", 0, lease=lease, release=True)
    with pytest.raises(SessionBusy):
        await store.acquire("a", rec.id, ttl_s=5.0)
    await store.release(lease)


async def test_commits_at_once_each_succeed_or_fail_on_their_own(store):
    # the SQLite store commits what waits for it in one transaction: a conflict, a held lease or an unknown
    # session fails that commit alone, and every other lands
    recs = [await store.create("a", FP, b"v1-%d" % i) for i in range(6)]
    held = await store.acquire("a", recs[1].id, ttl_s=5.0)
    calls = [("a", rec.id, 1, b"v2-%d" % i, 2) for i, rec in enumerate(recs)]
    calls[0] = ("a", recs[0].id, 7, b"stale", 2)  # wrong version
    calls[3] = ("b", recs[3].id, 1, b"foreign", 2)  # another tenant's session
    outcomes = await asyncio.gather(*(store.commit(*call) for call in calls), return_exceptions=True)
    assert isinstance(outcomes[0], VersionConflict)
    assert isinstance(outcomes[1], SessionBusy)
    assert isinstance(outcomes[3], SessionNotFound)
    assert [o.version for i, o in enumerate(outcomes) if i in (2, 4, 5)] == [2, 2, 2]
    loaded = [await store.load("a", rec.id) for rec in recs]
    assert [(r.version, data) for r, data in loaded] == [
        (1, b"v1-0"), (1, b"v1-1"), (2, b"v2-2"), (1, b"v1-3"), (2, b"v2-4"), (2, b"v2-5")]
    await store.release(held)


async def test_limits_are_enforced_with_clear_errors(store_kind, store_server, tmp_path):
    store = await make_store(store_kind, store_server, tmp_path, limits=StoreLimits(max_snapshot_bytes=1000))
    try:
        with pytest.raises(LimitExceeded, match="1001 bytes"):
            await store.create("a", FP, b"x" * 1001)
        rec = await store.create("a", FP, b"x" * 1000)
        with pytest.raises(LimitExceeded):
            await store.commit("a", rec.id, 1, b"x" * 1001, 0)
        with pytest.raises(LimitExceeded):
            await store.create("a", FP, b"x", metadata={f"k{i}": "v" for i in range(17)})
        with pytest.raises(LimitExceeded):
            await store.create("a", FP, b"x", metadata={"k": "v" * 5000})
        with pytest.raises(InvalidArgument):
            await store.create("a", FP, b"x", metadata={"k": 1})
        with pytest.raises(LimitExceeded):
            await store.fork("a", rec.id, name="n" * 300)
        assert (await store.get("a", rec.id)).version == 1
    finally:
        await store.close()


async def test_a_tenant_keeps_at_most_its_session_quota_even_when_creating_at_once(store_kind, store_server,
                                                                                      tmp_path):
    # issue 24, finding 4: 400 creates in 3.4 s grew Redis by 153 MB; with noeviction one tenant could fill it
    store = await make_store(store_kind, store_server, tmp_path, ttl_s=0.5,
                             limits=StoreLimits(max_sessions_per_tenant=3))
    try:
        results = await asyncio.gather(*(store.create("a", FP, b"x") for _ in range(8)), return_exceptions=True)
        made = [r for r in results if not isinstance(r, BaseException)]
        assert len(made) == 3 and all(isinstance(r, QuotaExceeded) for r in results if r not in made)
        with pytest.raises(QuotaExceeded, match="delete one"):
            await store.fork("a", made[0].id)
        with pytest.raises(QuotaExceeded):
            await store.import_("a", FP, b"y")
        assert len((await store.list("a")).data) == 3  # the refused ones left nothing behind
        await store.create("b", FP, b"x")  # another tenant's quota is its own
        await store.delete("a", made[0].id)
        await store.fork("a", made[1].id)  # a place freed by a delete
        await asyncio.sleep(0.7)  # the sliding TTL expires them all: their places are free again
        assert len([await store.create("a", FP, b"z") for _ in range(3)]) == 3
    finally:
        await store.close()


async def test_a_receipt_is_stored_with_its_commit_or_not_at_all(store):
    # issue 24, finding 8: an Idempotency-Key makes a retried request answer its first result
    rec = await store.create("a", FP, b"v1")
    assert await store.receipt("a", rec.id, "k1") is None
    await store.commit("a", rec.id, 1, b"v2", 5, receipt=Receipt("k1", b'{"text": "first"}'))
    assert await store.receipt("a", rec.id, "k1") == b'{"text": "first"}'
    with pytest.raises(VersionConflict):  # a refused commit leaves no receipt
        await store.commit("a", rec.id, 1, b"v2'", 5, receipt=Receipt("k2", b"second"))
    assert await store.receipt("a", rec.id, "k2") is None
    with pytest.raises(SessionNotFound):  # another tenant's session, whatever the key
        await store.receipt("b", rec.id, "k1")
    other = await store.create("b", FP, b"v1")
    await store.commit("b", other.id, 1, b"v2", 5, receipt=Receipt("k1", b"bob's"))
    assert await store.receipt("b", other.id, "k1") == b"bob's"
    assert await store.receipt("a", rec.id, "k1") == b'{"text": "first"}'
    with pytest.raises(InvalidArgument):
        await store.receipt("a", rec.id, "x" * 300)
    await store.delete("a", rec.id)
    with pytest.raises(SessionNotFound):
        await store.receipt("a", rec.id, "k1")


async def test_sliding_ttl_expires_idle_sessions_only(store_kind, store_server, tmp_path):
    store = await make_store(store_kind, store_server, tmp_path, ttl_s=0.6)
    try:
        idle = await store.create("a", FP, b"idle")
        used = await store.create("a", FP, b"used")
        for _ in range(4):
            await asyncio.sleep(0.25)
            await store.get("a", used.id)  # every use renews the expiry
        with pytest.raises(SessionNotFound):
            await store.get("a", idle.id)
        assert (await store.load("a", used.id))[1] == b"used"
        assert [r.id for r in (await store.list("a")).data] == [used.id]
    finally:
        await store.close()


async def test_fifty_concurrent_committers_lose_no_update(store_kind, store_server, tmp_path):
    """Each writer appends its mark to the snapshot and commits with CAS, retrying on conflict. Every mark must
    end up in the final snapshot exactly once, and the versions a writer sees must strictly increase."""
    # several connections (sqlite) or pools (redis) racing
    stores = [await make_store(store_kind, store_server, tmp_path, flush=i == 0) for i in range(4)]
    rec = await stores[0].create("a", FP, b"")
    conflicts = 0
    committed_versions: list[int] = []

    async def writer(i: int):
        nonlocal conflicts
        store = stores[i % len(stores)]
        seen = 0
        while True:
            record, data = await store.load("a", rec.id)
            assert record.version >= seen
            seen = record.version
            try:
                done = await store.commit("a", rec.id, record.version, data + b"%d," % i, record.tokens_seen + 1)
            except VersionConflict:
                conflicts += 1
                continue
            committed_versions.append(done.version)
            return

    try:
        await asyncio.gather(*(writer(i) for i in range(50)))
        record, data = await stores[0].load("a", rec.id)
        marks = data.decode().rstrip(",").split(",")
        assert sorted(map(int, marks)) == list(range(50))
        assert record.version == 51 and record.tokens_seen == 50
        assert sorted(committed_versions) == list(range(2, 52))  # each success got its own version
        assert conflicts > 0  # the writers really raced
    finally:
        for store in stores:
            await store.close()


async def blob_count(store) -> int:
    if isinstance(getattr(store, "redis", None), RedisCluster):
        return len(await store.redis.keys("titans:*:b:*", target_nodes=RedisCluster.PRIMARIES))
    if hasattr(store, "redis"):
        return len(await store.redis.keys("titans:*:b:*"))
    return await store._run(lambda db: db.execute("SELECT count(*) FROM blobs").fetchone()[0], write=False)


async def test_snapshots_are_shared_not_copied_and_never_leak(store):
    """Fork and rollback point at existing bytes; deleting every session frees every snapshot."""
    rec = await store.create("a", FP, b"v1")
    for version in range(1, 7):
        rec = await store.commit("a", rec.id, version, b"v%d" % (version + 1), version)
    assert await blob_count(store) == 4  # current + K = 3 kept versions
    child = await store.fork("a", rec.id)
    await store.rollback("a", rec.id, 5)
    assert await blob_count(store) == 3  # copied nothing; v4 left the kept three (7, 6, 5)
    await store.commit("a", child.id, 1, b"child", 0)
    assert (await store.load("a", child.id))[1] == b"child"
    await store.delete("a", rec.id)
    assert (await store.rollback("a", child.id, 1)).version == 3  # the child's history outlives its parent
    assert (await store.load("a", child.id))[1] == b"v7"
    await store.delete("a", child.id)
    assert await blob_count(store) == 0


async def test_redis_scripts_are_safe_to_run_twice(redis_server, tmp_path):
    """redis-py retries a command once when the connection drops, so a script may run again after it already
    took effect (its reply lost). Replaying each mutating script must not change anything the second time."""
    from server.store.redis import blob_prefix, session_keys

    store = await make_store("redis", redis_server, tmp_path)
    try:
        rec = await store.create("a", FP, b"v1")
        rec = await store.commit("a", rec.id, 1, b"v2", 1)
        blob = (await store.redis.hget(session_keys(rec.id)[0], "blob")).decode()
        replay = await store._script("commit", rec.id, "a", 1, blob, 1, "0", "", 3)  # the same commit again
        assert replay[0] == "OK" and (await store.load("a", rec.id))[1] == b"v2"
        assert await store.redis.exists(blob_prefix(rec.id) + blob)  # its snapshot was not deleted

        op = "op-1"
        first = await store._script("rollback", rec.id, "a", 1, "0", "", 3, op)
        second = await store._script("rollback", rec.id, "a", 1, "0", "", 3, op)
        assert first[0] == second[0] == "OK" and (await store.get("a", rec.id)).version == 3  # applied once

        token = "lease-token"
        assert (await store._script("acquire", rec.id, "a", token, 5000))[0] == "OK"
        assert (await store._script("acquire", rec.id, "a", token, 5000))[0] == "OK"  # the same holder
        with pytest.raises(SessionBusy):
            await store.acquire("a", rec.id, 5.0)
        await store.redis.delete(session_keys(rec.id)[1])

        child = rec.id[:6] + "C" * 22
        current = (await store.redis.hget(session_keys(rec.id)[0], "blob")).decode()
        before = int(await store.redis.hget(session_keys(rec.id)[2], current))
        for _ in range(2):
            await store._script("fork", rec.id, "a", child, "0", "", "{}", rec.id, extra_keys=session_keys(child)[:1])
        assert int(await store.redis.hget(session_keys(rec.id)[2], current)) == before + 1  # counted once
    finally:
        await store.close()


async def test_the_blob_cache_never_serves_a_stale_or_foreign_snapshot(redis_server, tmp_path):
    """Two replicas on one Redis, each with its own BlobCache: each load returns the current version's bytes, even
    when the other replica moved the session on, and a cached snapshot is never handed to another tenant."""
    one = await make_store("redis", redis_server, tmp_path)
    two = await make_store("redis", redis_server, tmp_path, flush=False)
    try:
        rec = await one.create("a", FP, b"v1")
        assert (await two.load("a", rec.id))[1] == b"v1"  # now cached by both
        await one.commit("a", rec.id, 1, b"v2", 1)
        assert (await two.load("a", rec.id))[1] == b"v2"
        await two.commit("a", rec.id, 2, b"v3", 2)
        assert (await one.load("a", rec.id))[1] == b"v3"
        await one.rollback("a", rec.id, 1)  # back to v1's bytes, which both replicas still cache
        assert (await two.load("a", rec.id))[1] == b"v1" == (await one.load("a", rec.id))[1]
        with pytest.raises(SessionNotFound):
            await two.load("b", rec.id)
        await one.redis.flushdb()  # the session is gone from Redis: the cached bytes must not resurrect it
        with pytest.raises(SessionNotFound):
            await one.load("a", rec.id)
    finally:
        await one.close()
        await two.close()


def test_blob_cache_keeps_the_most_recently_used_within_its_capacity():
    cache = BlobCache(10)
    cache.put("a", b"1234")
    cache.put("b", b"5678")
    assert cache.get("a") == b"1234"  # a is now the most recent
    cache.put("c", b"90")
    cache.put("d", b"xy")  # 12 bytes: b, the least recently used, goes
    assert cache.get("b") is None and cache.get("a") == b"1234" and cache.get("d") == b"xy"
    assert cache.size <= 10
    cache.put("big", b"x" * 11)  # larger than the whole cache: not kept, nothing evicted for it
    assert cache.get("big") is None and cache.get("a") == b"1234"
    assert BlobCache(0).get("a") is None


async def test_cached_bytes_count_the_snapshots_a_remote_store_keeps(store, store_kind):
    snapshot = os.urandom(5_000)
    rec = await store.create("a", FP, snapshot)
    await store.load("a", rec.id)
    assert store.cached_bytes == (0 if store_kind == "sqlite" else 5_000)
