"""Session-store benchmark: commit + load latency by snapshot size, fork latency, concurrent commit throughput.

    .venv/bin/python bench/store.py                 # starts its own redis-server; ~1 minute
    .venv/bin/python bench/store.py --redis-url redis://host:6379/0 --sizes 1 8 --iters 20

Both stores run in the same process, one after the other, on the same snapshot bytes; JSON goes to
bench/results/store.json and a table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.store import SessionStore, StoreOptions, open_store  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

MB = 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"p50_ms": percentile(ms, 0.5), "p99_ms": percentile(ms, 0.99), "mean_ms": statistics.fmean(ms),
            "n": len(ms)}


async def commit_and_load(store: SessionStore, size_mb: int, iters: int, cold: SessionStore | None = None) -> dict:
    """A request's store work on one replica: commit, then the next request's load (which the Redis store serves
    from its BlobCache). `cold`: a second client without a cache on the same store, which loads every version
    over the wire, as a replica that has never seen the session does."""
    snapshot = os.urandom(size_mb * MB)
    rec = await store.create("bench", "fp", snapshot)
    version = rec.version
    commits, loads, both, cold_loads = [], [], [], []
    for i in range(iters + 2):  # the first two warm the connection / page cache
        snapshot = snapshot[1:] + bytes([i % 256])  # every version has its own bytes
        t0 = time.perf_counter()
        version = (await store.commit("bench", rec.id, version, snapshot, 0)).version
        t1 = time.perf_counter()
        _, data = await store.load("bench", rec.id)
        t2 = time.perf_counter()
        assert data == snapshot
        commits.append(t1 - t0)
        loads.append(t2 - t1)
        both.append(t2 - t0)
        if cold is not None:
            t0 = time.perf_counter()
            _, data = await cold.load("bench", rec.id)
            cold_loads.append(time.perf_counter() - t0)
            assert data == snapshot
    forks = []
    for _ in range(iters + 2):
        t0 = time.perf_counter()
        child = await store.fork("bench", rec.id)
        forks.append(time.perf_counter() - t0)
        await store.delete("bench", child.id)
    await store.delete("bench", rec.id)
    result = {"commit_plus_load": summary(both[2:]), "commit": summary(commits[2:]), "load": summary(loads[2:]),
              "fork": summary(forks[2:])}
    if cold_loads:
        result["load_cold"] = summary(cold_loads[2:])
    if hasattr(store, "redis"):  # the floor: the same bytes through the same client as a plain SET then GET
        raw = []
        for _ in range(iters + 2):
            t0 = time.perf_counter()
            await store.redis.set("bench:raw", snapshot)
            await store.redis.get("bench:raw")
            raw.append(time.perf_counter() - t0)
        await store.redis.delete("bench:raw")
        result["raw_set_plus_get"] = summary(raw[2:])
    return result


async def concurrent_commits(store: SessionStore, writers: int, size_mb: int, seconds: float) -> dict:
    snapshot = os.urandom(size_mb * MB)
    recs = [await store.create("bench", "fp", snapshot) for _ in range(writers)]
    deadline = time.perf_counter() + seconds
    counts = [0] * writers

    async def writer(i: int):
        version = recs[i].version
        while time.perf_counter() < deadline:
            version = (await store.commit("bench", recs[i].id, version, snapshot, 0)).version
            counts[i] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(writer(i) for i in range(writers)))
    elapsed = time.perf_counter() - t0
    for rec in recs:
        await store.delete("bench", rec.id)
    return {"writers": writers, "snapshot_mb": size_mb, "commits_per_s": sum(counts) / elapsed}


async def run(args) -> dict:
    results: dict = {"sizes_mb": args.sizes, "iters": args.iters, "stores": {}}
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.redis_url
        if url is None:
            server = RedisServer(Path(tmp) / "redis").start()  # no persistence: measures the store, not the disk
            url = server.url
        try:
            for name, store_url in (("redis", url), ("sqlite", f"sqlite:///{tmp}/sessions.db")):
                store = open_store(store_url)
                cold = open_store(store_url, StoreOptions(cache_bytes=0)) if name == "redis" else None
                try:
                    per_size = {str(size): await commit_and_load(store, size, args.iters, cold)
                                for size in args.sizes}
                    concurrent = await concurrent_commits(store, 16, 1, args.seconds)
                finally:
                    await store.close()
                    if cold is not None:
                        await cold.close()
                results["stores"][name] = {"by_size_mb": per_size, "concurrent": concurrent}
        finally:
            if server:
                server.stop()
    return results


def table(results: dict) -> str:
    lines = ["| store | snapshot | commit + load p50 / p99 (ms) | commit p50 | load p50 | load p50, another replica "
             "| fork p50 / p99 (ms) | plain SET + GET p50 (ms) |", "|---|---|---|---|---|---|---|---|"]
    for name, res in results["stores"].items():
        for size, r in res["by_size_mb"].items():
            lines.append(f"| {name} | {size} MB | {r['commit_plus_load']['p50_ms']:.1f} / "
                         f"{r['commit_plus_load']['p99_ms']:.1f} | {r['commit']['p50_ms']:.1f} | "
                         f"{r['load']['p50_ms']:.1f} | "
                         + (f"{r['load_cold']['p50_ms']:.1f} | " if "load_cold" in r else "— | ")
                         + f"{r['fork']['p50_ms']:.2f} / {r['fork']['p99_ms']:.2f} | "
                         + (f"{r['raw_set_plus_get']['p50_ms']:.1f} |" if "raw_set_plus_get" in r else "— |"))
    lines.append("")
    lines.append("| store | commits/s, 16 concurrent writers on distinct sessions (1 MB snapshots) |")
    lines.append("|---|---|")
    for name, res in results["stores"].items():
        lines.append(f"| {name} | {res['concurrent']['commits_per_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32], help="snapshot sizes in MB")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of the concurrent-writer run")
    parser.add_argument("--redis-url", default=None, help="default: start a temporary redis-server")
    parser.add_argument("--out", default=str(ROOT / "bench/results/store.json"))
    args = parser.parse_args()
    results = asyncio.run(run(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
