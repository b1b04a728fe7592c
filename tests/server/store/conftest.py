from __future__ import annotations

import pytest
from redis.asyncio import RedisCluster

from server.store import StoreOptions, open_store


async def make_store(kind: str, redis_server, tmp_path, flush: bool = True, **options):
    """A store on an empty database (the Redis db is flushed unless flush=False). kind "cluster": redis_server is
    a RedisClusterServers; "tls": a RedisServer speaking TLS to an ACL user."""
    url = f"sqlite:///{tmp_path}/sessions.db" if kind == "sqlite" else redis_server.url
    store = open_store(url, StoreOptions(**options))
    if kind in ("redis", "tls") and flush:
        await store.redis.flushdb()
    if kind == "cluster" and flush:
        await store.redis.flushdb(target_nodes=RedisCluster.PRIMARIES)
    return store


@pytest.fixture(params=["sqlite", "redis", "cluster", "tls"])
def store_kind(request):
    return request.param


@pytest.fixture
def store_server(store_kind, request):
    """The Redis a store kind runs on (None for SQLite)."""
    if store_kind == "sqlite":
        return None
    servers = {"redis": "redis_server", "cluster": "redis_cluster", "tls": "redis_tls"}
    return request.getfixturevalue(servers[store_kind])


@pytest.fixture
async def store(store_kind, store_server, tmp_path):
    store = await make_store(store_kind, store_server, tmp_path)
    yield store
    await store.close()
