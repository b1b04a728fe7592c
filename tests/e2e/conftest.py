from __future__ import annotations

import httpx
import pytest

from engine import Engine
from tests.engine.helpers import tiny
from tests.server_process import ServerProcess


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random MAL model (window 16, chunk 4): small enough that a server starts in a second or two."""
    path = tmp_path_factory.mktemp("model") / "tiny-mal"
    Engine.from_config(tiny("mal"), seed=3).save(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    store = f"sqlite:///{tmp_path_factory.mktemp('store')}/sessions.db"
    with ServerProcess(model_dir, store) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c
