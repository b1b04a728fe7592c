"""The outside review's findings (issue 24), each reproduced against a real server process: a snapshot is
untrusted input, secrets never reach a caller or a log, and a store that cannot serve answers 503 with Retry-After."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import time

import httpx
import pytest
import redis
from safetensors.torch import load as load_safetensors

from engine.state import SessionState, _checksum
from tests.e2e.test_api import assert_error, complete, new_session
from tests.redis_server import RedisServer
from tests.server_process import ServerProcess, sse_events

PASSWORD = "s3cret-pa55word"


def re_signed(blob: bytes, edit_meta=None, edit_tensors=None) -> bytes:
    """The snapshot with its metadata or tensors changed and its checksum made to match (it has no key)."""
    (n,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8:8 + n])["__metadata__"]
    tensors = load_safetensors(blob)
    if edit_tensors:
        edit_tensors(tensors)
    state = SessionState(tensors, int(meta["tokens_seen"]), meta["model_fingerprint"], float(meta["created_at"]))
    out = state.to_bytes()
    if edit_meta is None:
        return out
    (n,) = struct.unpack("<Q", out[:8])
    header = json.loads(out[8:8 + n])
    edit_meta(header["__metadata__"])
    header["__metadata__"]["content_sha256"] = _checksum(header["__metadata__"], out[8 + n:])
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + out[8 + n:]


def test_re_signed_snapshots_out_of_bounds_are_refused_and_no_other_session_is_hurt(model_dir, tmp_path):
    # finding 1: tokens_seen 2**63 - 10 overflowed positions a few steps later and failed the whole batch;
    # finding 7: weights of 3e38 made surprise inf and sampling fail; finding 10: 1 MiB of junk metadata was kept
    with ServerProcess(model_dir, f"sqlite:///{tmp_path}/s.db") as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        sid = new_session(c)["id"]
        complete(c, "a memory worth keeping. ", sid)
        blob = c.get(f"/v1/sessions/{sid}/snapshot").content
        first = next(iter(load_safetensors(blob)))
        hostile = {
            "position": re_signed(blob, lambda m: m.update(tokens_seen=str(2**63 - 10))),
            "weights": re_signed(blob, edit_tensors=lambda t: t[first].view(-1).__setitem__(0, 3e38)),
            "junk": re_signed(blob, lambda m: m.update(note="x" * 500_000)),
            "nan time": re_signed(blob, lambda m: m.update(created_at="nan")),
        }
        for name, forged in hostile.items():
            r = c.post("/v1/sessions/import", content=forged)
            assert_error(r, 400, "invalid_snapshot")
            assert name and "Traceback" not in r.text
        imported = c.post("/v1/sessions/import", content=re_signed(blob)).json()  # a fair re-signing is fine
        assert len(c.get(f"/v1/sessions/{imported['id']}/snapshot").content) == len(blob)
        assert complete(c, "next", imported["id"])["choices"][0]["token_ids"] == \
            complete(c, "next", sid)["choices"][0]["token_ids"]


def test_the_store_password_reaches_no_caller_and_no_log(model_dir, tmp_path):
    # finding 2: the Redis URL, password included, was in /ready (no key needed), every 503 and the start-up log
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    try:
        with ServerProcess(model_dir, server.url, "--store-timeout-s", "0.5", "--log-level", "info",
                           env={"TITANS_API_KEYS": "key-a"}) as srv:
            with httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": "Bearer key-a"}) as c:
                sid = new_session(c)["id"]
                server.kill()
                answers = [httpx.get(srv.url + "/ready"), c.post("/v1/sessions"),
                           c.post("/v1/completions", json={"prompt": "x", "session_id": sid}),
                           c.get(f"/v1/sessions/{sid}")]
            for r in answers:
                assert_error(r, 503, "store_unavailable")
                assert r.headers["retry-after"] == "1"
                assert PASSWORD not in r.text and "127.0.0.1" not in r.text, r.text
        log = srv.log_path.read_text()
        assert "store unavailable" in log and "redis://***@127.0.0.1" in log  # redacted, not silent
        assert PASSWORD not in log
    finally:
        server.kill()


@pytest.mark.parametrize("fault", ["out_of_memory", "read_only"])
def test_a_full_or_read_only_redis_answers_503_and_the_server_heals(model_dir, tmp_path, fault):
    # finding 3: OOM / READONLY became 500 and dropped the connection (the code read the message's first word;
    # redis-py turns those replies into exception classes and drops it)
    server = RedisServer(tmp_path / "redis").start()
    admin = redis.Redis.from_url(server.url)
    try:
        with ServerProcess(model_dir, server.url) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
            sid = new_session(c)["id"]
            complete(c, "before ", sid)
            if fault == "out_of_memory":
                admin.config_set("maxmemory-policy", "noeviction")
                admin.config_set("maxmemory", max(1, admin.info("memory")["used_memory"] - 1))
            else:  # a failover: this node became a replica
                admin.execute_command("REPLICAOF", "127.0.0.1", "1")
            for r in (c.post("/v1/sessions"), c.post("/v1/completions", json={"prompt": "x", "session_id": sid})):
                assert_error(r, 503, "store_unavailable")
                assert r.headers["retry-after"] == "1" and fault.replace("_", " ") in r.json()["error"]["message"]
            admin.config_set("maxmemory", 0)
            admin.execute_command("REPLICAOF", "NO", "ONE")
            complete(c, "after ", sid)
            assert c.get(f"/v1/sessions/{sid}").json()["version"] == 3  # the refused commit left nothing
    finally:
        admin.close()
        server.kill()


def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 10) -> str:
    """Send a request's head (and maybe part of its body) on a socket; the status line and body that come back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            part = s.recv(65536)
            if not part:
                break
            answer += part
    return answer.decode("latin-1")


def test_the_key_and_the_size_are_checked_before_the_body_is_read(model_dir, tmp_path):
    # finding 5: a 60 MB body without a key was read and parsed before the 401 (the event loop froze); with a
    # key, a 60 MB prompt grew the API process by ~700 MB before its 413. finding 11: an oversized chunked body got
    # 400, a 405 was typed server_error, a JSON syntax error's param was a character offset
    with ServerProcess(model_dir, f"sqlite:///{tmp_path}/s.db", "--max-json-body-bytes", "50000",
                       env={"TITANS_API_KEYS": "key-a"}) as srv:
        head = "POST {} HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: {}\n{}"
        # the server answers while the client has sent none of the 60 MB it announced
        assert raw_request(srv.url, head.format("/v1/completions", 60_000_000, "")).startswith("HTTP/1.1 401")
        answer = raw_request(srv.url, head.format("/v1/completions", 60_000_000, "Authorization: Bearer key-a\n"))
        assert answer.startswith("HTTP/1.1 413") and "body_too_large" in answer
        answer = raw_request(srv.url, head.format("/v1/sessions/import", 70_000_000, "Authorization: Bearer key-a\n"))
        assert answer.startswith("HTTP/1.1 413")  # over the import limit (64 MiB by default) too
        with httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": "Bearer key-a"}) as c:
            def chunked():  # no Content-Length: the limit holds while reading
                for _ in range(20):
                    yield b" " * 5_000

            assert_error(c.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}),
                         413, "body_too_large")
            snapshot = c.get(f"/v1/sessions/{new_session(c)['id']}/snapshot").content
            assert len(snapshot) > 50_000  # an import keeps its own, larger limit
            assert c.post("/v1/sessions/import", content=snapshot).status_code == 201
            err = assert_error(c.put("/v1/completions", json={"prompt": "x"}), 405, "method_not_allowed")
            assert err["type"] == "invalid_request_error"
            err = assert_error(c.post("/v1/completions", content=b'{"prompt": "x",,}',
                                      headers={"content-type": "application/json"}), 400)
            assert err["param"] is None and "not valid JSON" in err["message"]
            assert c.get("/health").status_code == 200


def test_openai_fields_the_server_does_not_implement_are_refused_not_ignored(model_dir, tmp_path):
    # finding 13: logit_bias, best_of, tools were accepted and silently ignored. finding 9: /v1/models named the
    # model's directory on the server's disk
    with ServerProcess(model_dir, f"sqlite:///{tmp_path}/s.db") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        for field, value in [("logit_bias", {"65": 100}), ("best_of", 3), ("presence_penalty", 0.5),
                             ("frequency_penalty", -1), ("suffix", "end"), ("logprobs", 2)]:
            err = assert_error(c.post("/v1/completions", json={"prompt": "x", field: value}), 400, "invalid_request")
            assert field in err["message"]
        chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        for field, value in [("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
                             ("response_format", {"type": "json_object"}), ("logprobs", True)]:
            assert_error(c.post("/v1/chat/completions", json={**chat, field: value}), 400, "invalid_request")
        for neutral in ({"logit_bias": {}}, {"best_of": 1}, {"tools": None}, {"presence_penalty": 0},
                        {"logprobs": False}, {"response_format": {"type": "text"}}):
            assert c.post("/v1/chat/completions", json={**chat, **neutral}).status_code == 200, neutral
        root = c.get("/v1/models").json()["data"][0]["root"]
        assert root == model_dir.name and "/" not in root


def test_a_holder_that_dies_frees_its_session_within_seconds(model_dir, redis_server):
    # finding 6: a session stayed locked (409) for the whole 60 s lease after its API process was killed
    with httpx.Client(timeout=30) as c:
        with ServerProcess(model_dir, redis_server.url) as srv:
            sid = c.post(srv.url + "/v1/sessions").json()["id"]
            body = {"prompt": "hold ", "session_id": sid, "max_tokens": 4000, "stream": True}
            with c.stream("POST", srv.url + "/v1/completions", json=body) as r:
                next(r.iter_lines())  # generating: the lease is held
                os.kill(srv.process.pid, signal.SIGKILL)  # the engine process follows its parent
                killed = time.monotonic()
        with ServerProcess(model_dir, redis_server.url) as srv:
            while True:
                r = c.post(srv.url + "/v1/completions", json={"prompt": "y", "session_id": sid, "max_tokens": 1})
                if r.status_code == 200:
                    break
                assert_error(r, 409, "session_busy")
                assert time.monotonic() - killed < 20, "the dead holder's lease outlived a few heartbeats"
                time.sleep(0.25)
        assert r.json()["session"]["version"] == 2  # the killed request committed nothing


def test_per_tenant_quotas_answer_429_and_spare_the_other_tenants(model_dir, tmp_path):
    # finding 4: no per-tenant limits; one tenant could fill the store and break everyone's commits
    # finding 12: keys on the command line show in `ps`; a key file keeps them out of it
    (tmp_path / "keys").write_text("# tenant keys\nkey-a:alice\n\nkey-b:bob  # the second\n")
    with ServerProcess(model_dir, f"sqlite:///{tmp_path}/s.db", "--max-sessions-per-tenant", "2",
                       "--requests-per-minute", "7", "--tokens-per-minute", "40",
                       "--api-keys-file", str(tmp_path / "keys")) as srv:
        assert "key-a" not in " ".join(srv.cmd)
        a = httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": "Bearer key-a"})
        b = httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": "Bearer key-b"})
        first = new_session(a)["id"]
        new_session(a)
        r = a.post("/v1/sessions")  # request 3 of alice's 7
        assert_error(r, 429, "sessions_per_tenant_exceeded")
        assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
        assert_error(a.post(f"/v1/sessions/{first}/fork"), 429, "sessions_per_tenant_exceeded")
        # tokens: prompt + max_tokens; 30 of 40 fit, then 20 more do not
        assert a.post("/v1/completions", json={"prompt": "x" * 24, "max_tokens": 6}).status_code == 200
        r = a.post("/v1/completions", json={"prompt": "x" * 14, "max_tokens": 6})
        assert_error(r, 429, "tokens_per_minute_exceeded")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert_error(a.post("/v1/completions", json={"prompt": "x" * 50, "max_tokens": 1}), 429,
                     "tokens_per_minute_exceeded")  # more than the quota itself: waiting will not help
        r = a.get("/v1/models")  # request 8: over the request quota, refused before its body
        assert_error(r, 429, "requests_per_minute_exceeded")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert new_session(b)["id"]  # bob is not alice
        assert b.post("/v1/completions", json={"prompt": "x" * 24, "max_tokens": 6}).status_code == 200
        metrics = httpx.get(srv.url + "/metrics").text
        for reason, count in [("requests_per_minute", 1), ("tokens_per_minute", 2)]:
            assert f'titans_rejected_requests_total{{model_name="tiny-mal",reason="{reason}"}} {count}.0' in metrics
        a.close()
        b.close()


def test_memorize_commits_only_for_a_client_still_there_and_a_keyed_retry_applies_once(model_dir, tmp_path):
    # finding 8: memorize committed after its client had gone; without an idempotency key a client's retry
    # memorized twice
    with ServerProcess(model_dir, f"sqlite:///{tmp_path}/s.db", "--prefill-chunk", "8") as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        sid = new_session(c)["id"]
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=srv.url, timeout=0.5) as impatient:
            # ~1,900 engine steps of reading (seconds): the client leaves long before the end
            impatient.post(f"/v1/sessions/{sid}/memorize", json={"text": "a long document. " * 900})
        while (r := c.post(f"/v1/sessions/{sid}/reset")).status_code == 409:  # the aborted request's lease goes
            time.sleep(0.1)
        assert r.json()["version"] == 2  # the reset alone: nothing was memorized

        key = {"Idempotency-Key": "memo-1"}
        first = c.post(f"/v1/sessions/{sid}/memorize", json={"text": "the code is 4821. "}, headers=key)
        again = c.post(f"/v1/sessions/{sid}/memorize", json={"text": "the code is 4821. "}, headers=key)
        assert first.status_code == again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert first.json()["session"]["version"] == again.json()["session"]["version"] == 3
        assert first.json()["mean_surprise"] == again.json()["mean_surprise"]
        # the replay gave the session's lease back before it answered: the next request finds the session free
        assert c.post(f"/v1/sessions/{sid}/memorize", json={"text": " "}).status_code == 200

        body = {"prompt": "and then ", "session_id": sid, "max_tokens": 5, "temperature": 1.0, "seed": 7,
                "return_token_ids": True}
        key = {"Idempotency-Key": "turn-2"}
        first = c.post("/v1/completions", json=body, headers=key)
        assert first.status_code == 200, first.text
        first = first.json()
        again = c.post("/v1/completions", json=body, headers=key)
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true", again.text
        assert again.json()["choices"] == first["choices"] and again.json()["session"] == first["session"]
        streamed = sse_events(c.post("/v1/completions", json={**body, "stream": True}, headers=key).content)
        assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == first["choices"][0]["text"]
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == 5  # three answers, one commit
        other = c.post("/v1/completions", json=body, headers={"Idempotency-Key": "turn-3"}).json()
        assert other["session"]["version"] == 6
