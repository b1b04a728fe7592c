"""Chaos: SIGKILL the API or the engine process (or Redis; or fill Redis to its maxmemory) at random moments of
commits, memorize and streams, on either store, and check every session afterwards. A session must be at the
version of its last acknowledged commit or the one after it (a commit in flight at the kill may have landed), its
snapshot whole (it exports and imports again), its record and snapshot of one version (tokens_seen agree); an
acknowledged commit is never lost.

    .venv/bin/python bench/chaos.py --trials 50 --store both      # the long run (bench/RESULTS.md)

tests/reliability/test_chaos.py runs a few trials of each kind in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis as redis_client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.redis_server import RedisServer  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

SESSIONS = 6


@dataclass
class Report:
    trials: int = 0
    kills: dict = field(default_factory=lambda: {"api": 0, "engine": 0, "redis": 0, "redis_full": 0})
    requests: int = 0
    acknowledged: int = 0  # commits whose answer reached the client
    refused: int = 0  # answered with an error (409, 503, ...) or cut off by the kill
    violations: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"trials": self.trials, "kills": self.kills, "requests": self.requests,
                "acknowledged_commits": self.acknowledged, "failed_or_cut": self.refused,
                "violations": self.violations}


class Traffic:
    """Clients that commit to the sessions (non-streamed and streamed completions, memorize) until stopped,
    recording each session's last acknowledged version."""

    def __init__(self, url: str, sessions: list[str], acked: dict[str, int], report: Report, seed: int):
        self.url, self.sessions, self.acked, self.report = url, sessions, acked, report
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self, clients: int) -> list[threading.Thread]:
        self.clients = clients
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        return threads

    def _client(self, i: int) -> None:
        rng = random.Random(self.rng.random())
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while not self.stop.is_set():
                sid = rng.choice(self.sessions[i::self.clients])  # its own sessions: no 409 from one another
                kind = rng.choice(["complete", "stream", "memorize"])
                version = None
                try:
                    if kind == "memorize":
                        r = c.post(f"/v1/sessions/{sid}/memorize", json={"text": "chaos " * rng.randint(1, 300)})
                        version = r.json()["session"]["version"] if r.status_code == 200 else None
                    elif kind == "complete":
                        r = c.post("/v1/completions", json={"prompt": "x" * rng.randint(1, 200), "session_id": sid,
                                                            "max_tokens": rng.randint(1, 40)})
                        version = r.json()["session"]["version"] if r.status_code == 200 else None
                    else:
                        body = {"prompt": "y", "session_id": sid, "max_tokens": rng.randint(1, 60), "stream": True}
                        with c.stream("POST", "/v1/completions", json=body) as r:
                            for line in r.iter_lines():
                                if line.startswith("data: {") and '"session"' in line:
                                    version = json.loads(line[6:])["session"]["version"]
                except (httpx.HTTPError, ValueError, KeyError):
                    version = None
                with self.lock:
                    self.report.requests += 1
                    if version is None:
                        self.report.refused += 1
                if version is None:
                    time.sleep(0.05)  # a server that is down answers at once: do not spin
                    continue
                with self.lock:
                    self.report.acknowledged += 1
                    self.acked[sid] = max(self.acked.get(sid, 1), version)


def check(url: str, acked: dict[str, int], report: Report, label: str) -> None:
    """Every session at its last acknowledged version or the next, whole, record and snapshot of one version."""
    with httpx.Client(base_url=url, timeout=30) as c:
        for sid, version in acked.items():
            record = c.get(f"/v1/sessions/{sid}").json()
            if record["version"] not in (version, version + 1):
                report.violations.append(f"{label}: {sid} at version {record['version']}, acknowledged {version}")
            snapshot = c.get(f"/v1/sessions/{sid}/snapshot")
            if int(snapshot.headers["x-session-version"]) < version:
                report.violations.append(f"{label}: {sid} exported version {snapshot.headers['x-session-version']}")
            imported = c.post("/v1/sessions/import", content=snapshot.content)
            if imported.status_code != 201:
                report.violations.append(f"{label}: {sid} snapshot is torn: {imported.text[:200]}")
                continue
            again = c.get(f"/v1/sessions/{sid}").json()
            if again["version"] == int(snapshot.headers["x-session-version"]) and \
                    imported.json()["tokens_seen"] != again["tokens_seen"]:
                report.violations.append(f"{label}: {sid} record and snapshot disagree on tokens_seen")
            c.delete(f"/v1/sessions/{imported.json()['id']}")


def wait_ready(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def trials(model_dir: Path, store: str, n: int, report: Report, seed: int = 0, redis: RedisServer | None = None,
           clients: int = 4, victims: list[str] | None = None) -> None:
    """n trials on one store: each lets traffic run, kills a process (API, engine, or Redis when given; drawn at
    random, or victims in turn) at a random moment, brings it back and checks every session."""
    rng = random.Random(seed)
    acked: dict[str, int] = {}
    server = ServerProcess(model_dir, store, "--engine-restart-delay-s", "0.2", "--lease-ttl-s", "2").start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            sessions = [c.post("/v1/sessions").json()["id"] for _ in range(SESSIONS)]
        acked.update({sid: 1 for sid in sessions})
        for trial in range(n):
            traffic = Traffic(server.url, sessions, acked, report, rng.random())
            threads = traffic.run(clients)
            time.sleep(rng.uniform(0.5, 2.5))
            kinds = victims or ["api", "engine"] + (["redis", "redis_full"] if redis else [])
            victim = kinds[trial % len(kinds)] if victims else rng.choice(kinds)
            if victim == "api":
                os.kill(server.process.pid, signal.SIGKILL)
                server.process.wait(10)
            elif victim == "engine":
                os.kill(server.engine_pid(), signal.SIGKILL)  # ready: it has one
            elif victim == "redis":
                redis.kill()
                time.sleep(rng.uniform(0.1, 1.0))
                redis.start()
            elif victim == "redis_full":  # noeviction at its maxmemory: every write refused (OOM) for a while
                with redis_client.Redis.from_url(redis.url) as admin:
                    admin.config_set("maxmemory-policy", "noeviction")
                    admin.config_set("maxmemory", max(1, admin.info("memory")["used_memory"] - 1))
                    time.sleep(rng.uniform(0.2, 1.0))
                    admin.config_set("maxmemory", 0)
            report.kills[victim] += 1
            time.sleep(rng.uniform(0.0, 0.5))
            traffic.stop.set()
            for t in threads:
                t.join(30)
            if victim == "api":
                server.stop()
                server = ServerProcess(model_dir, store, "--engine-restart-delay-s", "0.2", "--lease-ttl-s",
                                       "2").start()
            wait_ready(server.url)
            time.sleep(2.5)  # leases of requests cut off by the kill expire (lease_ttl_s 2)
            check(server.url, acked, report, f"trial {trial} ({victim})")
            report.trials += 1
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100, help="per store")
    parser.add_argument("--store", choices=["sqlite", "redis", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--victims", default=None, help="comma-separated, taken in turn (default: drawn at random "
                                                          "from api, engine and, on Redis, redis, redis_full)")
    parser.add_argument("--out", default="bench/results/chaos.json")
    args = parser.parse_args()
    from engine import Engine
    from tests.engine.helpers import tiny

    report = Report()
    victims = args.victims.split(",") if args.victims else None
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny-mal"
        Engine.from_config(tiny("mal"), seed=3).save(model_dir)
        if args.store in ("sqlite", "both"):
            trials(model_dir, f"sqlite:///{tmp}/sessions.db", args.trials, report, args.seed,
                   victims=[v for v in victims if not v.startswith("redis")] if victims else None)
        if args.store in ("redis", "both"):
            redis = RedisServer(Path(tmp) / "redis", appendonly=True).start()
            try:
                trials(model_dir, redis.url, args.trials, report, args.seed + 1, redis=redis, victims=victims)
            finally:
                redis.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    print(json.dumps(report.as_dict(), indent=2))
    sys.exit(1 if report.violations else 0)


if __name__ == "__main__":
    main()
