import os
import random

import pytest
import torch

from tests.redis_server import RedisClusterServers, RedisServer

torch.set_num_threads(2)
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    random.seed(1234)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the whole run (tests that stop Redis start their own)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_tls(tmp_path_factory):
    """A real redis-server that speaks TLS only, to an ACL user (rediss://user:password@...)."""
    server = RedisServer(tmp_path_factory.mktemp("redis-tls"), user="titans", password="tls-secret", tls=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real 3-master Redis Cluster for the whole run."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random MAL model (window 16, chunk 4): small enough that a server starts in a second or two."""
    from engine import Engine
    from tests.engine.helpers import tiny

    path = tmp_path_factory.mktemp("model") / "tiny-mal"
    Engine.from_config(tiny("mal"), seed=3).save(path)
    return path
