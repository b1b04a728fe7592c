"""Several server processes, restarts, Redis outages, API keys and back-pressure: each test runs its own servers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.e2e.test_api import assert_error, complete, new_session
from tests.redis_server import RedisServer
from tests.server_process import ServerProcess, sse_events


def continue_twice(first_url: str, second_url: str, sid: str) -> tuple[list[int], list[int], list[int]]:
    a, b = list(b"Memory across "), list(b"processes: ")
    with httpx.Client(base_url=first_url, timeout=30) as c:
        g1 = complete(c, a, sid)["choices"][0]["token_ids"]
    with httpx.Client(base_url=second_url, timeout=30) as c:
        g2 = complete(c, b, sid)["choices"][0]["token_ids"]
        joined = complete(c, a + g1 + b)["choices"][0]["token_ids"]
    return g1, g2, joined


def test_memory_survives_a_server_restart(model_dir, tmp_path):
    store = f"sqlite:///{tmp_path}/sessions.db"
    with ServerProcess(model_dir, store) as srv, httpx.Client(base_url=srv.url) as c:
        sid = new_session(c)["id"]
        a = list(b"Memory across ")
        g1 = complete(c, a, sid)["choices"][0]["token_ids"]
    with ServerProcess(model_dir, store) as srv, httpx.Client(base_url=srv.url) as c:
        b = list(b"a restart: ")
        g2 = complete(c, b, sid)["choices"][0]["token_ids"]
        assert g2 == complete(c, a + g1 + b)["choices"][0]["token_ids"]


def test_two_servers_sharing_redis_continue_each_others_sessions(model_dir, redis_server):
    with ServerProcess(model_dir, redis_server.url) as one, ServerProcess(model_dir, redis_server.url) as two:
        with httpx.Client(base_url=one.url) as c:
            sid = new_session(c)["id"]
        _, g2, joined = continue_twice(one.url, two.url, sid)
        assert g2 == joined
        with httpx.Client(base_url=two.url) as c:
            assert c.get(f"/v1/sessions/{sid}").json()["version"] == 3


def test_redis_outage_gives_503_and_the_server_recovers(model_dir, tmp_path):
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        with ServerProcess(model_dir, redis.url, "--store-timeout-s", "0.5") as srv, \
                httpx.Client(base_url=srv.url, timeout=30) as c:
            sid = new_session(c)["id"]
            complete(c, "before the outage ", sid)
            redis.stop()
            assert_error(c.post("/v1/completions", json={"prompt": "x", "session_id": sid}), 503,
                         "store_unavailable")
            assert_error(c.post("/v1/sessions"), 503, "store_unavailable")
            assert c.get("/ready").status_code == 503
            assert c.get("/health").status_code == 200  # alive, just not ready
            assert c.post("/v1/completions", json={"prompt": "stateless still works", "max_tokens": 2}
                          ).status_code == 200
            redis.start()
            assert c.get("/ready").status_code == 200
            complete(c, "after ", sid)
            assert c.get(f"/v1/sessions/{sid}").json()["version"] == 3  # nothing was lost (AOF)
    finally:
        redis.stop()


def test_api_keys_map_to_tenants_that_cannot_see_each_other(model_dir, tmp_path):
    store = f"sqlite:///{tmp_path}/sessions.db"
    with ServerProcess(model_dir, store, "--api-key", "key-a:alice", env={"TITANS_API_KEYS": "key-x"}) as srv:
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer key-a"}).status_code == 200
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer key-x"}).status_code == 401
    with ServerProcess(model_dir, store, env={"TITANS_API_KEYS": "key-a:alice,key-b:bob,key-c"}) as srv:
        a = httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer key-a"})
        b = httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer key-b"})
        anon = httpx.Client(base_url=srv.url)
        wrong = httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer key-z"})
        sid = new_session(a)["id"]
        complete(a, "alice's secret ", sid)
        for call in (lambda: b.get(f"/v1/sessions/{sid}"), lambda: b.get(f"/v1/sessions/{sid}/snapshot"),
                     lambda: b.post(f"/v1/sessions/{sid}/fork"), lambda: b.delete(f"/v1/sessions/{sid}"),
                     lambda: b.post("/v1/completions", json={"prompt": "x", "session_id": sid})):
            assert_error(call(), 404, "session_not_found")
        assert b.get("/v1/sessions").json()["data"] == []
        assert [s["id"] for s in a.get("/v1/sessions").json()["data"]] == [sid]
        assert_error(anon.get("/v1/models"), 401, "invalid_api_key")
        assert_error(wrong.post("/v1/completions", json={"prompt": "x"}), 401, "invalid_api_key")
        for public in ("/health", "/ready", "/metrics", "/docs", "/static/swagger-ui/swagger-ui.css"):
            assert anon.get(public).status_code == 200, public
        assert a.get(f"/v1/sessions/{sid}").json()["version"] == 2
        for client in (a, b, anon, wrong):
            client.close()


def test_a_full_queue_answers_429_with_retry_after(model_dir, tmp_path):
    store = f"sqlite:///{tmp_path}/sessions.db"
    with ServerProcess(model_dir, store, "--max-running", "1", "--max-waiting", "0") as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c, \
            c.stream("POST", "/v1/completions", json={"prompt": "busy ", "max_tokens": 400, "stream": True}) as r:
        lines = r.iter_lines()  # keep it: a dropped iterator closes the stream, which cancels the request
        next(lines)  # the only running slot is taken
        refused = c.post("/v1/completions", json={"prompt": "x"})
        assert_error(refused, 429, "queue_full")
        assert refused.headers["retry-after"] == "1"


def test_oversize_bodies_get_413_even_without_content_length(model_dir, tmp_path):
    store = f"sqlite:///{tmp_path}/sessions.db"
    with ServerProcess(model_dir, store, "--max-body-bytes", "2000") as srv, httpx.Client(base_url=srv.url) as c:
        assert_error(c.post("/v1/sessions/import", content=b"x" * 5000), 413, "body_too_large")

        def chunked():  # no Content-Length: the limit is enforced while reading
            for _ in range(10):
                yield b"x" * 1000

        assert_error(c.post("/v1/sessions/import", content=chunked()), 413, "body_too_large")
        assert c.post("/v1/completions", json={"prompt": "still fine", "max_tokens": 1}).status_code == 200


@pytest.mark.slow
def test_a_compiled_server_answers_like_an_eager_one_and_shares_its_sessions(model_dir, redis_server):
    """--compile changes speed only: same fingerprint, so sessions move between the servers, and the same greedy
    answers (compiled decode equals eager decode to fp32 rounding)."""
    compiled = ServerProcess(model_dir, redis_server.url, "--compile", "true").start(timeout=600)  # compiles first
    try:
        with ServerProcess(model_dir, redis_server.url) as eager:
            with httpx.Client(base_url=eager.url) as c:
                sid = new_session(c)["id"]
            g1, g2, joined = continue_twice(eager.url, compiled.url, sid)  # written eagerly, continued compiled
            assert g2 == joined
            with httpx.Client(base_url=eager.url, timeout=30) as c:
                prompt = list(b"Memory across ") + g1 + list(b"processes: ")
                assert complete(c, prompt)["choices"][0]["token_ids"] == joined
    finally:
        compiled.stop()


@pytest.mark.parametrize("weights", ["fp16", "int8"])
def test_reduced_weights_serve_and_their_sessions_do_not_move_to_an_fp32_server(model_dir, redis_server, weights):
    """--weights fp16 or int8 changes the numerics, so it changes the fingerprint: a session written by such a server
    is refused by an fp32 server with 409 model_mismatch (and its memory is untouched), never silently reused."""
    with ServerProcess(model_dir, redis_server.url, "--weights", weights) as half, \
            ServerProcess(model_dir, redis_server.url) as full:
        with httpx.Client(base_url=half.url, timeout=30) as c:
            sid = new_session(c)["id"]
            assert len(complete(c, list(b"fewer bytes "), sid)["choices"][0]["token_ids"]) > 0
            version = c.get(f"/v1/sessions/{sid}").json()["version"]
        with httpx.Client(base_url=full.url, timeout=30) as c:
            assert_error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "session_id": sid}),
                         409, "model_mismatch")
        with httpx.Client(base_url=half.url, timeout=30) as c:
            assert c.get(f"/v1/sessions/{sid}").json()["version"] == version


def engine_process_of(srv: ServerProcess) -> int:
    pid = srv.engine_pid()
    assert pid is not None, "no engine process"
    return pid


def test_a_dead_engine_process_fails_requests_cleanly_loses_no_memory_and_comes_back(model_dir, tmp_path):
    # issue 24: the API process starts a new engine process, so a server heals without an orchestrator
    with ServerProcess(model_dir, f"sqlite:///{tmp_path}/sessions.db", "--engine-restart-delay-s", "3") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        sid = new_session(c)["id"]
        complete(c, "remember this ", sid)
        before = c.get(f"/v1/sessions/{sid}").json()
        with c.stream("POST", "/v1/completions", json={"prompt": "and then ", "max_tokens": 4000, "stream": True,
                                                       "session_id": sid}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            os.kill(engine_process_of(srv), signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"engine_dead"' in rest[-2]  # the error in-band, then [DONE]
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == before["version"]  # nothing half-committed
        assert c.get("/health").status_code == 503 and c.get("/ready").status_code == 503
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert_error(r, 503, "engine_dead")
        assert r.headers["retry-after"] == "1" and "reference" in r.json()["error"]["message"]
        deadline = time.monotonic() + 60
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "no new engine process"
            time.sleep(0.2)
        assert complete(c, "back again ", sid)["session"]["version"] == before["version"] + 1
        assert 'titans_engine_restarts_total{model_name="tiny-mal"} 1.0' in c.get("/metrics").text


def test_a_server_whose_engine_cannot_start_again_exits_for_its_supervisor(model_dir, tmp_path):
    model = tmp_path / "tiny-mal"
    shutil.copytree(model_dir, model)
    with ServerProcess(model, f"sqlite:///{tmp_path}/sessions.db", "--engine-restart-delay-s", "0.1",
                       "--engine-restarts", "2") as srv:
        (model / "model.safetensors").write_bytes(b"gone")  # every new engine process fails to load
        os.kill(engine_process_of(srv), signal.SIGKILL)
        srv.process.wait(60)  # rather than stay up with /health 503 forever
        srv.log.flush()
        assert "cannot be restarted" in srv.log_path.read_text()


def test_the_engine_process_exits_when_the_api_process_dies_mid_generation(model_dir, tmp_path):
    """No orphan: an engine left generating for a dead API process would hold a core (and its memory) forever.
    It leaves quietly: a dead API process is a normal end for it, not a crash of its loop."""
    with ServerProcess(model_dir, f"sqlite:///{tmp_path}/sessions.db") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "and then ", "max_tokens": 4000,
                                                       "stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: {")
            engine_pid = engine_process_of(srv)
            srv.process.kill()
        srv.process.wait(10)
        try:
            deadline = time.monotonic() + 10
            while Path(f"/proc/{engine_pid}").exists() and _state_of(engine_pid) != "Z":
                assert time.monotonic() < deadline, "the engine process outlived the API process"
                time.sleep(0.05)
        finally:  # a failing run must not leave the orphan behind either
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine_pid, signal.SIGKILL)
        srv.log.flush()
        assert "engine loop died" not in srv.log_path.read_text()


def test_a_stream_interval_sends_fewer_larger_chunks_of_the_same_tokens(model_dir, tmp_path):
    """--stream-interval-ms: tokens wait until the interval has passed since the engine last sent, then go
    together; the first token never waits, and the stream carries exactly the tokens of an unheld request."""
    with ServerProcess(model_dir, f"sqlite:///{tmp_path}/sessions.db", "--stream-interval-ms", "200") as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        reference = complete(c, "held back ", max_tokens=40)["choices"][0]["token_ids"]
        r = c.post("/v1/completions", json={"prompt": "held back ", "max_tokens": 40, "temperature": 0,
                                            "stream": True, "return_token_ids": True})
        chunks = [e["choices"][0]["token_ids"] for e in sse_events(r.content)[:-1] if e["choices"]]
        assert [t for chunk in chunks for t in chunk] == reference
        assert len(chunks[0]) == 1 and len(chunks) < len(reference) / 4  # 40 tokens take far less than 800 ms


@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2, reason="needs 2 CPUs and Linux")
def test_the_engine_and_http_processes_run_on_cpus_of_their_own(model_dir, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    with ServerProcess(model_dir, f"sqlite:///{tmp_path}/sessions.db", "--torch-threads", "1",
                       "--engine-cpus", "auto") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        complete(c, "pinned ")  # every thread of a serving process exists by now
        engine_pid = engine_process_of(srv)
        assert _affinities(engine_pid) == {frozenset(cpus[-1:])}
        assert _affinities(srv.process.pid) == {frozenset(cpus[:-1])}


def _affinities(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets of a process's threads."""
    return {frozenset(os.sched_getaffinity(int(task))) for task in os.listdir(f"/proc/{pid}/task")}


def _state_of(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return "gone"


def test_a_message_that_cannot_reach_the_engine_stops_it_and_fails_its_requests(model_dir):
    """A failed send must not leave the engine idle and the API waiting on it forever."""
    import asyncio

    from engine import SamplingParams
    from engine.core import EngineRequest, EngineStopped, ErrorEvent
    from server.engine_process import EngineClient, EngineOptions, Job
    from server.metrics import Metrics

    async def main():
        client = EngineClient(EngineOptions(str(model_dir), "cpu", "fp32", False, False, 1, 4, 64),
                              Metrics("m", 64), max_waiting=4)
        client.start()
        client.attach(asyncio.get_running_loop())
        try:
            job = Job(EngineRequest(-1, [1, 2, 3], None, SamplingParams(max_tokens=2), False, False))
            object.__setattr__(job.request, "params", lambda: None)  # does not pickle: the sender fails
            client.submit(job)
            event = await asyncio.wait_for(job.events.get(), 30)
            assert isinstance(event, ErrorEvent) and isinstance(event.error, EngineStopped)
            assert not client.alive
        finally:
            client.stop()

    asyncio.run(main())


def test_two_servers_on_a_redis_cluster_serve_each_others_sessions_across_slots(model_dir, redis_cluster):
    # issue 24: where users outgrow one Redis they move to Redis Cluster; sessions hash to every master's slots
    with ServerProcess(model_dir, redis_cluster.url) as one, \
            ServerProcess(model_dir, redis_cluster.url) as two, \
            httpx.Client(base_url=one.url, timeout=30) as a, httpx.Client(base_url=two.url, timeout=30) as b:
        sids = [new_session(a)["id"] for _ in range(8)]
        for sid in sids:
            complete(a, "on one ", sid)
            complete(b, "then the other ", sid)
        fork = b.post(f"/v1/sessions/{sids[0]}/fork").json()
        assert a.get(f"/v1/sessions/{fork['id']}").json()["parent_id"] == sids[0]
        listed = a.get("/v1/sessions", params={"limit": 100}).json()["data"]
        assert {s["id"] for s in listed} >= {*sids, fork["id"]}
        assert all(a.get(f"/v1/sessions/{sid}").json()["version"] == 3 for sid in sids)
        blob = a.get(f"/v1/sessions/{sids[1]}/snapshot").content
        assert b.post("/v1/sessions/import", content=blob).status_code == 201
    holding = []
    for node in redis_cluster.nodes:  # the sessions really are spread over the masters
        with redis.Redis(port=node.port) as master:
            holding.append(master.dbsize() > 0)
    assert sum(holding) > 1


def test_a_model_directory_brings_its_chat_template(model_dir, tmp_path):
    templated = tmp_path / "templated"
    shutil.copytree(model_dir, templated)
    (templated / "chat_template.json").write_text(json.dumps(
        {"message": "### {role}: {content}\n", "reply": "### assistant: ", "stop": ["###", "\n\n"]}))
    with ServerProcess(templated, f"sqlite:///{tmp_path}/sessions.db") as srv, httpx.Client(base_url=srv.url) as c:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
        done = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 40, "temperature": 0})
        rendered = "### system: be brief\n### user: hello\n### assistant: "
        assert done.status_code == 200 and done.json()["usage"]["prompt_tokens"] == len(rendered.encode())
        reply = done.json()["choices"][0]["message"]["content"]
        assert "###" not in reply and "\n\n" not in reply  # the template's stops end a reply
    (templated / "chat_template.json").write_text(json.dumps({"message": "{speaker}: {content}"}))
    # a broken template stops the server at start, saying why
    with pytest.raises(RuntimeError, match=r"names \{speaker\}; it may use \{role\} and \{content\}"):
        ServerProcess(templated, f"sqlite:///{tmp_path}/other.db").start(timeout=60)
