"""Many sessions on one server: far more sessions than the engine's running batch holds, each told text in every
round, more requests in flight than the batch runs; then every session is checked: none lost, none torn.

The engine's pool holds only the sessions of running requests (--max-running); requests past it wait in the queue
(--max-waiting, their snapshots in host memory), and every idle session lives in the store (and the API process's
snapshot cache). A request past all of them gets 429 with Retry-After, which this client honours and counts. At the
end each session must have read exactly rounds x text bytes and been committed once a round (version rounds + 1).

    python bench/many_sessions.py --sessions 1024 --concurrency 256        # on a GPU machine (bench/gpu_suite.sh)
    python bench/many_sessions.py --sessions 64 --concurrency 16 --text-bytes 64   # a CPU rehearsal
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.settings import DEFAULT_MODEL  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402


async def with_retries(call, counts: dict) -> httpx.Response:
    """call() until it is not 429 (waiting Retry-After each time)."""
    while True:
        response = await call()
        if response.status_code != 429:
            return response
        counts["429"] += 1
        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))


async def run(url: str, sessions: int, rounds: int, concurrency: int, text_bytes: int) -> dict:
    rng = random.Random(0)
    counts = {"429": 0, "requests": 0, "failed": 0, "failures": {}}

    def failed(what: str, response: httpx.Response | BaseException) -> None:
        """A request that did not succeed, counted by kind and status (or exception) instead of ending the run."""
        key = f"{what} {getattr(response, 'status_code', type(response).__name__)}"
        counts["failed"] += 1
        counts["failures"][key] = counts["failures"].get(key, 0) + 1
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 8)) as client:
        async def create(i: int) -> str | None:
            async with gate:
                try:
                    response = await with_retries(
                        lambda: client.post("/v1/sessions", json={"name": f"many-{i}"}), counts)
                except httpx.HTTPError as e:
                    return failed("create", e)
                if response.status_code != 201:
                    return failed("create", response)
                return response.json()["id"]

        ids = [sid for sid in await asyncio.gather(*(create(i) for i in range(sessions))) if sid]
        texts = ["".join(rng.choice(string.ascii_lowercase + " ") for _ in range(text_bytes)) for _ in range(8)]
        started = time.perf_counter()

        async def tell(sid: str, text: str) -> None:
            async with gate:
                counts["requests"] += 1
                try:
                    response = await with_retries(
                        lambda: client.post(f"/v1/sessions/{sid}/memorize", json={"text": text}), counts)
                except httpx.HTTPError as e:
                    return failed("memorize", e)
                if response.status_code != 200:
                    failed("memorize", response)

        for r in range(rounds):
            await asyncio.gather(*(tell(sid, texts[(i + r) % len(texts)]) for i, sid in enumerate(ids)))
        elapsed = time.perf_counter() - started

        async def check(sid: str) -> bool:
            async with gate:
                session = (await client.get(f"/v1/sessions/{sid}")).json()
                return session["tokens_seen"] == rounds * text_bytes and session["version"] == rounds + 1

        intact = sum(await asyncio.gather(*(check(sid) for sid in ids)))
    return {"sessions": sessions, "rounds": rounds, "concurrency": concurrency, "text_bytes": text_bytes,
            "requests": counts["requests"], "failed": counts["failed"], "failures": counts["failures"],
            "answered_429": counts["429"],
            "seconds": elapsed, "requests_per_s": counts["requests"] / elapsed, "sessions_intact": intact,
            "sessions_lost_or_torn": sessions - intact}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--sessions", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight at once")
    parser.add_argument("--text-bytes", type=int, default=256)
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--max-waiting", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench/results/many_sessions.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, \
            ServerProcess(args.model, f"sqlite:///{tmp}/sessions.db", "--max-running", str(args.max_running),
                          "--max-waiting", str(args.max_waiting)) as server:
        result = asyncio.run(run(server.url, args.sessions, args.rounds, args.concurrency, args.text_bytes))
    result.update(max_running=args.max_running, max_waiting=args.max_waiting)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0 if result["sessions_lost_or_torn"] == 0 and result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
