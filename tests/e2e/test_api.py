"""The HTTP API against a real uvicorn process: wire format, memory continuity, sessions, errors, concurrency."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch

from engine import Engine
from tests.server_process import sse_events

GREEDY = {"temperature": 0, "return_token_ids": True}


def new_session(client, **body) -> dict:
    r = client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def complete(client, prompt, session_id=None, max_tokens=6, **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, **GREEDY, **extra}
    if session_id:
        body["session_id"] = session_id
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code, err
    return err


# --- wire format ---------------------------------------------------------------------------------------------

def test_openai_sdk_streams_chat_and_completions_with_usage(server):
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    model = api.models.list().data[0].id
    chunks = list(api.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"
    text_chunks = list(api.completions.create(model=model, prompt="def f(x):", max_tokens=4, stream=True,
                                              stream_options={"include_usage": True}))
    assert text_chunks[-1].usage.prompt_tokens == len(b"def f(x):") and text_chunks[-1].usage.total_tokens == 13
    done = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert done.choices[0].message.role == "assistant" and done.usage.completion_tokens == 3


def test_a_chat_without_max_tokens_stops_at_the_server_default(client):
    from server.settings import Settings

    body = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0}
    done = client.post("/v1/chat/completions", json=body).json()
    used, reason, default = done["usage"]["completion_tokens"], done["choices"][0]["finish_reason"], \
        Settings().default_max_tokens
    assert used == default and reason == "length" or used < default and reason == "stop", done


def test_sse_framing_matches_vllm_byte_for_byte(client):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    raw = r.content
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    first, *content, usage = events[:-1]
    for chunk in events[:-1]:  # key order as vLLM serialises them, compact JSON
        assert list(chunk) == ["id", "object", "created", "model", "choices", *(["usage"] if not chunk["choices"]
                                                                                else [])]
        assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == first["id"]
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * (len(content) - 1) + ["length"]
    assert list(content[0]["choices"][0]) == ["index", "delta", "logprobs", "finish_reason"]
    assert list(content[-1]["choices"][0]) == ["index", "delta", "logprobs", "finish_reason", "stop_reason"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    line = raw.split(b"\n\n")[1] + b"\n\n"
    assert line.startswith(b'data: {"id":"chatcmpl-') and line.endswith(b"}\n\n")  # compact, one line

    r = client.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 2, "stream": True})
    chunks = sse_events(r.content)
    # two tokens: two chunks, or one when the stream fell behind the engine (it then merges what piled up, as
    # vLLM does; on a loaded 2-core CI machine it does)
    assert chunks[-1] == "[DONE]" and 1 <= len(chunks[:-1]) <= 2
    assert all(list(c) == ["id", "object", "created", "model", "choices"] for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[0]["object"] == "text_completion"
    assert list(chunks[0]["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "stop_reason"]
    assert "usage" not in json.dumps(chunks[:-1])  # no include_usage, no usage chunk


def test_models_health_ready_metrics(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["capabilities"]["memory"]["variant"] == "mal"
    assert client.get("/health").status_code == 200
    assert client.get("/ready").json() == {"status": "ok"}
    sid = new_session(client)["id"]
    complete(client, "abc", sid)
    metrics = client.get("/metrics").text
    for name in ("titans_time_to_first_token_seconds_bucket", "titans_prompt_tokens_total",
                 "titans_generation_tokens_total", "titans_request_success_total", "titans_memory_load_seconds",
                 "titans_memory_save_seconds", "titans_sessions_total", "titans_num_requests_running",
                 "titans_request_prefill_time_seconds", "titans_request_decode_time_seconds",
                 "titans_request_inference_time_seconds_count", "titans_snapshot_cache_bytes"):
        assert name in metrics, name
    assert sid not in metrics  # never a session id as a label
    from prometheus_client.parser import text_string_to_metric_families

    labels = {name for family in text_string_to_metric_families(metrics) if family.name.startswith("titans_")
              for sample in family.samples for name in sample.labels}
    assert labels <= {"model_name", "le", "finished_reason", "op", "reason"}, labels  # as the README says
    assert client.get("/openapi.json").status_code == 200


def test_the_docs_page_loads_nothing_from_outside(client):
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and not [a for a in assets if a.startswith(("http:", "https:", "//"))], assets
    for asset in assets:
        if not asset.startswith("data:"):
            served = client.get(asset)
            assert served.status_code == 200 and len(served.content) > 10_000, asset  # the real bundle
    assert client.get("/redoc").status_code == 404  # FastAPI's own page loads its script from a CDN


# --- memory continuity -----------------------------------------------------------------------------------------

def test_two_requests_on_a_session_equal_one_request_over_the_joined_text(client):
    sid = new_session(client)["id"]
    a, b = list(b"The cat sat on "), list(b"the mat. Then ")
    first = complete(client, a, sid)["choices"][0]["token_ids"]
    second = complete(client, b, sid)["choices"][0]["token_ids"]
    joined = complete(client, a + first + b)["choices"][0]["token_ids"]  # stateless, the whole text at once
    assert second == joined
    session = client.get(f"/v1/sessions/{sid}").json()
    assert session["version"] == 3 and session["tokens_seen"] == len(a + first + b) + len(second)


def test_memorize_in_pieces_equals_memorize_at_once(client, model_dir):
    one, two = new_session(client)["id"], new_session(client)["id"]
    r = client.post(f"/v1/sessions/{one}/memorize", json={"text": "alpha beta "})
    assert r.status_code == 200 and r.json()["tokens"] == 11 and r.json()["mean_surprise"] > 0
    client.post(f"/v1/sessions/{one}/memorize", json={"text": "gamma delta"})
    client.post(f"/v1/sessions/{two}/memorize", json={"text": "alpha beta gamma delta"})
    engine = Engine.load(model_dir)
    s1 = engine.load_state(client.get(f"/v1/sessions/{one}/snapshot").content)
    s2 = engine.load_state(client.get(f"/v1/sessions/{two}/snapshot").content)
    assert s1.tokens_seen == s2.tokens_seen == 22
    fresh = engine.new_state()
    for k in s1.tensors:  # fp32: the two chunkings round differently, by ~1e-6
        torch.testing.assert_close(s1.tensors[k], s2.tensors[k], rtol=1e-4, atol=1e-5)
    assert max(float((s1.tensors[k] - fresh.tensors[k]).abs().max()) for k in s1.tensors) > 1e-3  # it did learn


def test_discard_mode_reads_the_memory_but_changes_nothing(client):
    sid = new_session(client)["id"]
    complete(client, "remember this: ", sid)
    before = client.get(f"/v1/sessions/{sid}").json()
    probe = complete(client, "what? ", sid, memory="discard")["choices"][0]["token_ids"]
    assert client.get(f"/v1/sessions/{sid}").json()["version"] == before["version"]
    assert complete(client, "what? ", sid)["choices"][0]["token_ids"] == probe  # the same memory was read


def test_session_header_binds_and_body_wins(client):
    a, b = new_session(client)["id"], new_session(client)["id"]
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"X-Session-ID": a})
    assert r.status_code == 200 and client.get(f"/v1/sessions/{a}").json()["version"] == 2
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "session_id": b},
                headers={"X-Session-ID": a})
    assert client.get(f"/v1/sessions/{a}").json()["version"] == 2
    assert client.get(f"/v1/sessions/{b}").json()["version"] == 2


# --- session verbs ---------------------------------------------------------------------------------------------

def test_fork_is_independent_of_its_parent(client):
    parent = new_session(client, name="p")["id"]
    complete(client, "shared past. ", parent)
    r = client.post(f"/v1/sessions/{parent}/fork", json={"name": "child"})
    assert r.status_code == 201
    child = r.json()
    assert child["parent_id"] == parent and child["version"] == 1 and child["name"] == "child"
    assert client.get(f"/v1/sessions/{child['id']}/snapshot").content == \
        client.get(f"/v1/sessions/{parent}/snapshot").content
    complete(client, "only the child hears this", child["id"], max_tokens=2)
    assert client.get(f"/v1/sessions/{parent}").json()["version"] == 2
    assert client.get(f"/v1/sessions/{child['id']}/snapshot").content != \
        client.get(f"/v1/sessions/{parent}/snapshot").content


def same_memory(a: bytes, b: bytes, engine: Engine) -> bool:
    """Snapshots hold the same memory (their created_at stamps may differ)."""
    sa, sb = engine.load_state(a), engine.load_state(b)
    return sa.tokens_seen == sb.tokens_seen and all(torch.equal(sa.tensors[k], sb.tensors[k]) for k in sa.tensors)


def test_reset_and_rollback(client, model_dir):
    engine = Engine.load(model_dir)
    sid = new_session(client)["id"]
    pristine = client.get(f"/v1/sessions/{sid}/snapshot").content
    complete(client, "one ", sid)
    after_one = client.get(f"/v1/sessions/{sid}/snapshot").content
    complete(client, "two ", sid)
    assert not same_memory(client.get(f"/v1/sessions/{sid}/snapshot").content, pristine, engine)
    r = client.post(f"/v1/sessions/{sid}/reset")
    assert r.status_code == 200 and r.json()["version"] == 4 and r.json()["tokens_seen"] == 0
    assert same_memory(client.get(f"/v1/sessions/{sid}/snapshot").content, pristine, engine)
    r = client.post(f"/v1/sessions/{sid}/rollback", json={"version": 2})
    assert r.status_code == 200 and r.json()["version"] == 5 and r.json()["tokens_seen"] == 10
    assert client.get(f"/v1/sessions/{sid}/snapshot").content == after_one  # the very bytes of version 2
    assert_error(client.post(f"/v1/sessions/{sid}/rollback", json={"version": 1}), 400)  # no longer kept (K=3)


def test_list_get_delete(client):
    ids = [new_session(client, metadata={"n": str(i)})["id"] for i in range(3)]
    page = client.get("/v1/sessions", params={"limit": 2}).json()
    assert page["object"] == "list" and [s["id"] for s in page["data"]] == ids[::-1][:2] and page["has_more"]
    nxt = client.get("/v1/sessions", params={"limit": 2, "after": page["last_id"]}).json()
    assert nxt["data"][0]["id"] == ids[0]
    r = client.delete(f"/v1/sessions/{ids[1]}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert_error(client.get(f"/v1/sessions/{ids[1]}"), 404, "session_not_found")


def test_export_import_round_trip_and_foreign_snapshots_are_refused(client, tmp_path):
    sid = new_session(client)["id"]
    complete(client, "a memory worth keeping. ", sid)
    blob = client.get(f"/v1/sessions/{sid}/snapshot").content
    r = client.post("/v1/sessions/import", content=blob, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201
    twin = r.json()["id"]
    assert complete(client, "next", twin)["choices"][0]["token_ids"] == \
        complete(client, "next", sid)["choices"][0]["token_ids"]
    from tests.engine.helpers import tiny

    foreign = Engine.from_config(tiny("mal"), seed=99)  # same shapes, other weights
    assert_error(client.post("/v1/sessions/import", content=foreign.new_state().to_bytes()), 400,
                 "invalid_snapshot")
    corrupt = bytearray(blob)
    corrupt[len(corrupt) // 2] ^= 0xFF
    assert_error(client.post("/v1/sessions/import", content=bytes(corrupt)), 400, "invalid_snapshot")
    assert_error(client.post("/v1/sessions/import", content=b"not a snapshot"), 400)


# --- concurrency and cancellation -------------------------------------------------------------------------------

def test_a_second_concurrent_request_on_a_session_gets_409(client, server):
    sid = new_session(client)["id"]
    body = {"prompt": "long ", "max_tokens": 300, "stream": True, "session_id": sid}
    with httpx.Client(base_url=server.url, timeout=60) as other, \
            client.stream("POST", "/v1/completions", json=body) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        next(lines)  # it is running
        assert_error(other.post("/v1/completions", json={"prompt": "x", "session_id": sid}), 409, "session_busy")
        rest = list(lines)
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    assert client.get(f"/v1/sessions/{sid}").json()["version"] == 2


def test_a_client_that_disconnects_mid_stream_leaves_the_session_unchanged(client, server):
    sid = new_session(client)["id"]
    complete(client, "before ", sid)
    before = client.get(f"/v1/sessions/{sid}").json()
    body = {"prompt": "a long answer ", "max_tokens": 2000, "stream": True, "session_id": sid}
    with httpx.Client(base_url=server.url, timeout=60) as gone, gone.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        next(lines)
    # leaving the block closed the connection mid-stream
    deadline = time.monotonic() + 10
    while True:  # the server notices the disconnect, drops the job and releases the lease
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "session_id": sid,
                                                 "memory": "discard"})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200
    after = client.get(f"/v1/sessions/{sid}").json()
    assert (after["version"], after["tokens_seen"]) == (before["version"], before["tokens_seen"])


def test_a_non_streaming_client_that_gives_up_leaves_the_session_unchanged(client, server):
    sid = new_session(client)["id"]
    before = client.get(f"/v1/sessions/{sid}").json()
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=0.5) as impatient:
        impatient.post("/v1/completions", json={"prompt": "x", "max_tokens": 3000, "session_id": sid})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the lease comes back once the server has dropped the job
        r = client.post("/v1/completions", json={"prompt": "y", "max_tokens": 1, "session_id": sid,
                                                 "memory": "discard"})
        if r.status_code == 200:
            break
        time.sleep(0.1)
    assert r.status_code == 200
    assert client.get(f"/v1/sessions/{sid}").json()["version"] == before["version"]


def test_stop_strings_cut_the_text_and_name_the_stop_reason(client):
    free = complete(client, "def f(x):", max_tokens=12)
    text = free["choices"][0]["text"]
    firsts = [i for i, ch in enumerate(text) if text.find(ch) == i and ch.isprintable() and ch != "\ufffd"]
    stop = text[firsts[-1]]  # the last character to appear for the first time: the cut keeps what precedes it
    cut = complete(client, "def f(x):", max_tokens=12, stop=[stop])["choices"][0]
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop" and cut["stop_reason"] == stop
    chunks = sse_events(client.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 12, "stream": True,
                                                               "temperature": 0, "stop": [stop]}).content)[:-1]
    assert all("stop_reason" in c["choices"][0] for c in chunks)  # completions chunks always carry it (vLLM)
    assert chunks[-1]["choices"][0]["stop_reason"] == stop
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]


def test_concurrent_sessions_are_batched_and_each_gets_its_own_answer(client, server):
    sids = [new_session(client)["id"] for _ in range(6)]
    prompts = [f"session {i} says: " for i in range(6)]
    alone = [complete(client, p, max_tokens=8)["choices"][0]["token_ids"] for p in prompts]
    results = [None] * 6

    def run(i):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            results[i] = complete(c, prompts[i], sids[i], max_tokens=8)["choices"][0]["token_ids"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone  # fresh sessions: same as stateless, whoever shared the batch


# --- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, status, code", [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_request"),
    ({"json": {"prompt": 12.5}}, 400, "invalid_request"),
    ({"json": {"prompt": "x", "max_tokens": -1}}, 400, "invalid_request"),
    ({"json": {"prompt": "x", "temperature": "hot"}}, 400, "invalid_request"),
    ({"json": {"prompt": "x", "model": "gpt-4"}}, 404, "model_not_found"),
    ({"json": {"prompt": "x", "session_id": "nope"}}, 404, "session_not_found"),
    ({"json": {"prompt": "x", "session_id": "A" * 28}}, 404, "session_not_found"),
    ({"json": {"prompt": "x" * 20000}}, 413, "prompt_too_long"),
    ({"json": {"prompt": "x", "max_tokens": 10**6}}, 400, "max_tokens_too_large"),
    ({"json": {"prompt": ""}}, 400, "empty_prompt"),
    ({"json": {"prompt": [300]}}, 400, "invalid_token"),
    ({"json": {"prompt": "x", "n": 2}}, 400, "invalid_request"),
    ({"json": {"prompt": "x", "logprobs": 2}}, 400, "invalid_request"),
    ({"json": {"prompt": "x", "seed": 2**64}}, 400, "invalid_request"),
    ({"json": {"prompt": [-1], "echo": True}}, 400, "invalid_token"),
    ({"content": b'{"prompt": "x"}'}, 415, "unsupported_media_type"),  # JSON, but not said to be
    ({"content": b'{"prompt": "half an emoji: \\ud83d"}', "headers": {"content-type": "application/json"}}, 400,
     "invalid_text"),  # valid JSON, but no UTF-8 holds it
    ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
])
def test_bad_requests_get_the_right_status_and_envelope(client, kwargs, status, code):
    assert_error(client.post("/v1/completions", **kwargs), status, code)
    assert client.get("/health").status_code == 200


def test_bad_session_requests(client):
    assert_error(client.post("/v1/chat/completions", json={"messages": []}), 400)
    assert_error(client.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_error(client.post("/v1/sessions", json={"metadata": {"k": 1}}), 400)
    assert_error(client.post("/v1/sessions", json={"metadata": {f"k{i}": "v" for i in range(40)}}), 413)
    assert_error(client.get("/v1/sessions", params={"limit": 0}), 400)
    assert_error(client.post("/v1/sessions/unknown/fork"), 404)
    assert_error(client.post("/v1/sessions/import", content=b""), 400)
    sid = new_session(client)["id"]
    refused = client.post(f"/v1/sessions/{sid}/memorize", content=b'{"text": "hi"}')
    assert_error(refused, 415, "unsupported_media_type")
    assert "Content-Type: application/json" in refused.json()["error"]["message"]
    assert_error(client.get("/v1/nothing-here"), 404)


def test_an_idle_connection_outlives_a_client_pool_s_expiry(server):
    # httpx (and the openai SDK over it) reuses a pooled connection for up to 5 s idle: a server that closed it
    # first would make a request sent meanwhile fail with a reset (seen under load: bench/many_sessions.py)
    import http.client
    from urllib.parse import urlparse

    url = urlparse(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.request("GET", "/health")
    first = connection.getresponse()
    first.read()
    socket = connection.sock
    assert first.status == 200 and socket is not None
    time.sleep(6)  # past uvicorn's default keep-alive (5 s), far inside --keep-alive-s (75 s)
    connection.request("GET", "/health")  # on a socket the server closed this raises RemoteDisconnected
    assert connection.getresponse().status == 200 and connection.sock is socket
    connection.close()
