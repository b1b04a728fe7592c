"""titans_client (clients/python) against a real server process."""

from __future__ import annotations

import io
import threading

import pytest
from titans_client import (
    AsyncClient,
    BadRequestError,
    Client,
    ConflictError,
    NotFoundError,
    RateLimitError,
    RetryPolicy,
    chunk_text,
)
from titans_client.chat import main as chat_main

from tests.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    store = f"sqlite:///{tmp_path_factory.mktemp('store')}/sessions.db"
    with ServerProcess(model_dir, store, "--max-running", "2", "--max-waiting", "0") as srv:
        yield srv


@pytest.fixture
def client(server):
    with Client(server.url) as c:
        yield c


def test_generation_and_every_session_verb(client, tmp_path):
    assert client.models()[0]["object"] == "model"
    s = client.create_session(name="notes", metadata={"k": "v"})
    assert (s.version, s.tokens_seen, s.name, s.metadata) == (1, 0, "notes", {"k": "v"})
    m = client.memorize(s.id, "hello memory")
    assert m.tokens == 12 and m.mean_surprise > 0 and m.session.version == 2
    done = client.complete("x = ", session_id=s.id, max_tokens=5, temperature=0)
    assert done["usage"]["completion_tokens"] == 5
    chunks = list(client.stream_complete("y = ", session_id=s.id, max_tokens=4, temperature=0))
    assert chunks[-1]["usage"]["completion_tokens"] == 4 and chunks[-1]["choices"] == []
    streamed = "".join(chunk_text(c) for c in client.stream_chat([{"role": "user", "content": "hi"}], max_tokens=3,
                                                                  temperature=0))
    plain = client.chat([{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
    assert streamed == plain["choices"][0]["message"]["content"]
    assert client.get_session(s.id).version == 4
    fork = client.fork_session(s.id, name="branch")
    assert fork.parent_id == s.id
    assert client.rollback_session(s.id, 2).version == 5
    assert client.reset_session(s.id).tokens_seen == 0
    path = tmp_path / "snap.safetensors"
    assert client.export_session(fork.id, path) == path.stat().st_size > 0
    twin = client.import_session(path)
    assert twin.tokens_seen == fork.tokens_seen and twin.id != fork.id
    client.delete_session(twin.id)
    with pytest.raises(NotFoundError) as err:
        client.get_session(twin.id)
    assert err.value.status == 404 and err.value.code == "session_not_found"
    with pytest.raises(BadRequestError):
        client.complete("x", max_tokens=-1)


def test_list_pages_through_every_session(client):
    made = {client.create_session().id for _ in range(5)}
    listed = [s.id for s in client.list_sessions(page_size=2)]
    assert made <= set(listed) and len(listed) == len(set(listed))


def test_conflict_is_typed_and_429_is_retried_honouring_retry_after(server, client):
    s = client.create_session()
    with Client(server.url) as other:
        stream = client.stream_complete("long ", session_id=s.id, max_tokens=150)
        next(stream)
        with pytest.raises(ConflictError):
            other.complete("x", session_id=s.id)
        busy = other.stream_complete("busy ", max_tokens=150)  # both running slots are now taken
        next(busy)
        with pytest.raises(RateLimitError) as err:
            Client(server.url, retry=RetryPolicy(max_retries=0)).complete("x")
        assert err.value.response.headers["retry-after"] == "1"
        drain = [threading.Thread(target=lambda g=g: list(g)) for g in (stream, busy)]
        for t in drain:
            t.start()
        patient = Client(server.url, retry=RetryPolicy(max_retries=20, max_backoff_s=1.0))
        assert patient.complete("x", max_tokens=2)["usage"]["completion_tokens"] == 2  # once a slot frees up
        for t in drain:
            t.join()


async def test_async_client(server):
    async with AsyncClient(server.url) as client:
        s = await client.create_session()
        chunks = [c async for c in client.stream_complete("a", session_id=s.id, max_tokens=3)]
        assert chunks[-1]["usage"]["completion_tokens"] == 3
        assert (await client.get_session(s.id)).version == 2
        assert [x.id async for x in client.list_sessions()][0] == s.id
        with pytest.raises(NotFoundError):
            await client.memorize("A" * 28, "x")


def test_chat_cli_commands(server, tmp_path):
    out = io.StringIO()
    commands = ["/help", "/surprise on", "hello there", "/session", "/fork", f"/export {tmp_path / 'm.safetensors'}",
                "/reset", "/bogus", "/quit"]
    script = "\n".join(commands) + "\n"
    assert chat_main(["--url", server.url, "--max-tokens", "3"], stdin=io.StringIO(script), out=out) == 0
    text = out.getvalue()
    for expected in ("[session ", "[surprise on]", "[mean surprise", "tokens seen]", "[forked ", "[exported ",
                     "[memory reset: version", "[unknown command /bogus", "/export FILE", "\ntitans> ",
                     "[cut at 3 tokens"):
        assert expected in text, (expected, text)
    assert "you> " not in text  # a prompt only when a person types
    assert (tmp_path / "m.safetensors").stat().st_size > 0
