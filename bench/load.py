"""Load: N clients for M minutes of mixed traffic against a real server on Redis (completions, streams, memorize,
fork, reset, export and import), reporting latency percentiles per kind, the error rate, the API and engine
processes' resident memory over time (it must not grow), and Redis memory per session.

    .venv/bin/python bench/load.py --clients 16 --minutes 5            # bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.redis_server import RedisServer  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Client(threading.Thread):
    def __init__(self, url: str, seed: int, until: float, results: dict, lock: threading.Lock):
        super().__init__(daemon=True)
        self.url, self.rng, self.until, self.results, self.lock = url, random.Random(seed), until, results, lock

    def timed(self, kind: str, call) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            r = call()
            ok = r.status_code < 400
        except httpx.HTTPError:
            r, ok = None, False
        with self.lock:
            self.results[kind].append((time.perf_counter() - started, ok, r.status_code if r is not None else 0))
        return r

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as c:
            sid = c.post("/v1/sessions").json()["id"]
            while time.monotonic() < self.until:
                kind = self.rng.choices(["complete", "stream", "memorize", "fork", "reset", "export_import"],
                                        [5, 5, 3, 1, 1, 1])[0]
                if kind == "complete":
                    self.timed(kind, lambda: c.post("/v1/completions", json={
                        "prompt": "hello " * self.rng.randint(1, 50), "session_id": sid, "max_tokens": 32}))
                elif kind == "stream":
                    def stream():
                        with c.stream("POST", "/v1/completions", json={"prompt": "tell me ", "session_id": sid,
                                                                       "max_tokens": 32, "stream": True}) as r:
                            for _ in r.iter_lines():
                                pass
                        return r
                    self.timed(kind, stream)
                elif kind == "memorize":
                    self.timed(kind, lambda: c.post(f"/v1/sessions/{sid}/memorize",
                                                    json={"text": "a note to keep. " * self.rng.randint(1, 100)}))
                elif kind == "fork":
                    r = self.timed(kind, lambda: c.post(f"/v1/sessions/{sid}/fork"))
                    if r is not None and r.status_code == 201:
                        c.delete(f"/v1/sessions/{r.json()['id']}")
                elif kind == "reset":
                    self.timed(kind, lambda: c.post(f"/v1/sessions/{sid}/reset"))
                else:
                    def export_import():
                        blob = c.get(f"/v1/sessions/{sid}/snapshot").content
                        r = c.post("/v1/sessions/import", content=blob)
                        if r.status_code == 201:
                            c.delete(f"/v1/sessions/{r.json()['id']}")
                        return r
                    self.timed(kind, export_import)


def cached_bytes(url: str) -> float:
    """titans_snapshot_cache_bytes from the server's /metrics."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("titans_snapshot_cache_bytes{"):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError("/metrics has no titans_snapshot_cache_bytes")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--model", default=None, help="a model directory (default: a tiny random MAL model)")
    parser.add_argument("--blob-cache-mib", type=int, default=256,
                        help="the API process's snapshot cache (the server's default: 256)")
    parser.add_argument("--out", default="bench/results/load.json")
    args = parser.parse_args()
    from engine import Engine
    from tests.engine.helpers import tiny

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else Path(tmp) / "tiny-mal"
        if not args.model:
            Engine.from_config(tiny("mal"), seed=3).save(model_dir)
        store = RedisServer(Path(tmp) / "redis").start()
        admin = redis.Redis.from_url(store.url)
        try:
            with ServerProcess(model_dir, store.url, "--blob-cache-bytes", str(args.blob_cache_mib * 2**20)) as srv:
                baseline_redis = admin.info("memory")["used_memory"]
                results, lock = defaultdict(list), threading.Lock()
                until = time.monotonic() + args.minutes * 60
                clients = [Client(srv.url, i, until, results, lock) for i in range(args.clients)]
                for client in clients:
                    client.start()
                memory = []
                started = time.monotonic()
                while any(c.is_alive() for c in clients):
                    memory.append({"t_s": round(time.monotonic() - started, 1),
                                   "api_mib": round(rss_mib(srv.process.pid), 1),
                                   "engine_mib": round(rss_mib(srv.engine_pid()), 1),
                                   "api_cache_mib": round(cached_bytes(srv.url) / 2**20, 1),
                                   "redis_mib": round(admin.info("memory")["used_memory"] / 2**20, 2)})
                    time.sleep(5)
                sessions = len(admin.keys("*:meta"))
                per_session = (admin.info("memory")["used_memory"] - baseline_redis) / max(1, sessions)
        finally:
            admin.close()
            store.stop()
    kinds = {}
    for kind, rows in sorted(results.items()):
        seconds = [s for s, _, _ in rows]
        statuses = defaultdict(int)
        for _, _, status in rows:
            statuses[status] += 1
        kinds[kind] = {"requests": len(rows), "errors": sum(1 for _, ok, _ in rows if not ok),
                       "p50_ms": round(1000 * statistics.median(seconds), 1),
                       "p99_ms": round(1000 * percentile(seconds, 0.99), 1), "statuses": dict(statuses)}
    total = sum(k["requests"] for k in kinds.values())
    third = max(1, len(memory) // 3)
    report = {"clients": args.clients, "minutes": args.minutes, "requests": total,
              "error_rate": sum(k["errors"] for k in kinds.values()) / max(1, total), "kinds": kinds,
              "rss_first_third_mib": {p: round(statistics.mean(m[p] for m in memory[:third]), 1)
                                      for p in ("api_mib", "api_cache_mib", "engine_mib")},
              "rss_last_third_mib": {p: round(statistics.mean(m[p] for m in memory[-third:]), 1)
                                     for p in ("api_mib", "api_cache_mib", "engine_mib")},
              "blob_cache_mib": args.blob_cache_mib,
              "sessions": sessions, "redis_bytes_per_session": round(per_session), "memory": memory}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "memory"}, indent=2))


if __name__ == "__main__":
    main()
