from __future__ import annotations

import httpx
import pytest

from tests.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    store = f"sqlite:///{tmp_path_factory.mktemp('store')}/sessions.db"
    with ServerProcess(model_dir, store) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c
