from __future__ import annotations

import pytest

from server.store import StoreOptions, open_store
from tests.redis_server import RedisServer


async def make_store(kind: str, redis_server: RedisServer, tmp_path, flush: bool = True, **options):
    """A store on an empty database (the Redis db is flushed unless flush=False)."""
    url = redis_server.url if kind == "redis" else f"sqlite:///{tmp_path}/sessions.db"
    store = open_store(url, StoreOptions(**options))
    if kind == "redis" and flush:
        await store.redis.flushdb()
    return store


@pytest.fixture(params=["sqlite", "redis"])
def store_kind(request):
    return request.param


@pytest.fixture
async def store(store_kind, redis_server, tmp_path):
    store = await make_store(store_kind, redis_server, tmp_path)
    yield store
    await store.close()
