"""Paired probes behind two engine choices, each measured side by side in one run (medians of --repeats rounds).

  1. fp16 dense layers on a CPU (Linear.UPCAST_ROWS): one projection of small-mac's shape (256 -> 1048) over
     1024 rows as a half GEMM and as a float GEMM on the upcast weight; then small-mac with fp16 weights decoding
     a running batch of 4 and 16 sessions with the upcast from 4 rows against from 64 rows (the default).
  2. Staggered batches (NeuralMemory.write): a running batch of 32 sessions at different positions on the
     default model, one token per step, with the update computed only for the sessions that complete a memory
     chunk (the default) against the masked update of every session (what a step without host positions does),
     next to one session and to 32 aligned sessions.

    .venv/bin/python bench/engine_probes.py        # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import Engine, ModelConfig  # noqa: E402
from engine.model import Linear, StepContext  # noqa: E402


def per_call_ms(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def running_batch(engine: Engine, sessions: int, staggered: bool, gen: torch.Generator):
    states = [engine.forward(torch.randint(0, 256, (68 + (s if staggered else 0),), generator=gen),
                             engine.new_state())[1] for s in range(sessions)]
    batch = engine.batch(states)
    return lambda: batch.forward([[7]] * sessions)


def median_rounds(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved: every case once per round
        for name, case in cases.items():
            samples[name].append(case())
    return {name: statistics.median(values) for name, values in samples.items()}


def fp16_probe(repeats: int) -> dict[str, float]:
    x = torch.randn(1024, 256)
    w, b = torch.randn(1048, 256).half(), torch.randn(1048).half()
    engine = Engine.from_config(ModelConfig.preset("small-mac"), device="cpu", weight_dtype=torch.float16)
    gen = torch.Generator().manual_seed(0)
    cases: dict[str, Callable[[], float]] = {
        "linear_1024_rows_half_ms": lambda: per_call_ms(lambda: F.linear(x.half(), w, b).float(), 10),
        "linear_1024_rows_upcast_ms": lambda: per_call_ms(
            lambda: F.linear(x.half().float(), w.float(), b.float()).half().float(), 10)}
    for sessions in (4, 16):
        step = running_batch(engine, sessions, staggered=True, gen=gen)
        for upcast_rows in (4, 64):
            def case(step=step, sessions=sessions, upcast_rows=upcast_rows) -> float:
                Linear.UPCAST_ROWS = upcast_rows
                try:
                    return sessions * 1e3 / per_call_ms(step, 16)
                finally:
                    Linear.UPCAST_ROWS = 64
            cases[f"decode_{sessions}_sessions_upcast_from_{upcast_rows}_tok_s"] = case
    return median_rounds(cases, repeats)


def staggered_probe(repeats: int, model: Path) -> dict[str, float]:
    engine = Engine.load(model, device="cpu")
    gen = torch.Generator().manual_seed(0)
    masked_full_sessions = StepContext.full_sessions

    def masked(step: Callable[[], object]) -> float:
        StepContext.full_sessions = lambda ctx: None  # every session pays, as in a step without host positions
        try:
            return per_call_ms(step, 32)
        finally:
            StepContext.full_sessions = masked_full_sessions

    one = running_batch(engine, 1, staggered=False, gen=gen)
    aligned = running_batch(engine, 32, staggered=False, gen=gen)
    staggered = running_batch(engine, 32, staggered=True, gen=gen)
    return median_rounds({
        "one_session_ms_per_step": lambda: per_call_ms(one, 32),
        "32_aligned_ms_per_step": lambda: per_call_ms(aligned, 32),
        "32_staggered_ms_per_step": lambda: per_call_ms(staggered, 32),
        "32_staggered_masked_update_ms_per_step": lambda: masked(staggered),
    }, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=str(ROOT / "models/titans-mal-recall"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        results = {**fp16_probe(args.repeats), **staggered_probe(args.repeats, Path(args.model))}
    for name, value in results.items():
        print(f"{name:<48} {value:10.2f}")


if __name__ == "__main__":
    main()
