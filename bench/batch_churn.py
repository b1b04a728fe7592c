"""Batched decode with sessions joining and leaving: the slot pool (engine.SessionBatch) against a batch that keeps
its sessions stacked and re-stacks them on every change (the engine's layout before the pool, kept here).

A running batch of N sessions decodes one token per session per step; every --every steps one session leaves
(its snapshot serialised, as a finished request's is) and a new one joins from a snapshot (as an admitted request
does). Both batches run the same model on the same sessions, interleaved step by step (each first every other
step), so the machine's noise falls on both. Per N: tokens/s; and per step, on average, the milliseconds of the
model's forward, of the snapshots (serialising the leaving session, parsing the joining one: the same work for both
layouts) and of the batch's state bookkeeping (the leave and the join), with the bookkeeping's share of the run.

    python bench/batch_churn.py                          # the default model, N = 4, 16, 64
    python bench/batch_churn.py --quick                  # smoke test: a tiny random model, N = 2, 4
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import Engine, ModelConfig, SessionState  # noqa: E402
from engine.state import flatten_state, nest_state  # noqa: E402


class RestackingBatch:
    """The running batch as the engine kept it before the slot pool: one stacked tensor per state tensor, the whole
    batch concatenated on every join, index-selected on every leave, flattened and nested again each time."""

    def __init__(self, engine: Engine, states: list[SessionState]):
        self.engine = engine
        self.positions = [s.tokens_seen for s in states]
        self.state = nest_state(self.stack(states))

    @staticmethod
    def stack(states: list[SessionState]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([s.tensors[k] for s in states]) for k in states[0].tensors}

    def forward(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        ids = self.engine.id_rows(token_ids)
        logits, self.state, _ = self.engine.model.forward_tokens(ids, self.state, self.positions, owned=True)
        self.positions = [p + 1 for p in self.positions]
        return logits

    def add(self, states: list[SessionState]) -> None:
        flat, new = flatten_state(self.state), self.stack(states)
        self.state = nest_state({k: torch.cat([flat[k], new[k]]) for k in flat})
        self.positions += [s.tokens_seen for s in states]

    def remove(self, indices: list[int]) -> list[int]:
        keep = [i for i in range(len(self.positions)) if i not in set(indices)]
        index = torch.tensor(keep)
        self.state = nest_state({k: v.index_select(0, index) for k, v in flatten_state(self.state).items()})
        self.positions = [self.positions[i] for i in keep]
        return keep

    def to_bytes(self, i: int) -> bytes:
        flat = flatten_state(self.state)
        return SessionState({k: v[i].clone() for k, v in flat.items()}, self.positions[i],
                            self.engine.fingerprint).to_bytes()


def churn(engine: Engine, sessions: int, steps: int, every: int, snapshots: list[bytes]) -> dict[str, dict]:
    """Both batches through the same run, step by step; returns {layout: {tokens_s, bookkeeping_ms_per_step}}."""
    start = [engine.load_state(snapshots[i % len(snapshots)]) for i in range(sessions)]
    batches = {"slot_pool": engine.batch(start), "restacking": RestackingBatch(engine, start)}
    spent = {name: {"forward": 0.0, "snapshots": 0.0, "bookkeeping": 0.0} for name in batches}
    token = [[7]] * sessions
    with torch.inference_mode():
        for step in range(steps):
            for name, batch in sorted(batches.items(), reverse=step % 2 == 1):  # each goes first every other step
                t0 = time.perf_counter()
                batch.forward(token)
                t1 = t2 = t3 = time.perf_counter()
                if step % every == every - 1:
                    leaving = step % sessions
                    batch.to_bytes(leaving)
                    joining = engine.load_state(snapshots[step % len(snapshots)])
                    t2 = time.perf_counter()
                    batch.remove([leaving])
                    batch.add([joining])
                    t3 = time.perf_counter()
                spent[name]["forward"] += t1 - t0
                spent[name]["snapshots"] += t2 - t1
                spent[name]["bookkeeping"] += t3 - t2
    return {name: {"tokens_s": round(sessions * steps / sum(t.values()), 1),
                   "forward_ms_per_step": round(1e3 * t["forward"] / steps, 3),
                   "snapshot_io_ms_per_step": round(1e3 * t["snapshots"] / steps, 4),
                   "bookkeeping_ms_per_step": round(1e3 * t["bookkeeping"] / steps, 4),
                   "bookkeeping_share": round(t["bookkeeping"] / sum(t.values()), 4)} for name, t in spent.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models/titans-mal-recall"))
    parser.add_argument("--sessions", default="4,16,64")
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--every", type=int, default=4, help="steps between one session leaving and one joining")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="a tiny random model, N = 2, 4, few steps")
    parser.add_argument("--out", default=str(ROOT / "bench/results/batch_churn.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        engine = Engine.from_config(ModelConfig.preset("tiny-mac"), device="cpu")
        sizes, steps = [2, 4], 16
    else:
        engine = Engine.load(args.model, device="cpu")
        sizes, steps = [int(n) for n in args.sessions.split(",")], args.steps
    prompts = [[(31 * s + 7 * i) % 200 + 32 for i in range(40 + 9 * s)] for s in range(8)]
    snapshots = [engine.forward(p, engine.new_state())[1].to_bytes() for p in prompts]
    results = {}
    for n in sizes:
        churn(engine, n, max(2, args.every), args.every, snapshots)  # warm-up
        results[str(n)] = churn(engine, n, steps, args.every, snapshots)
        pool, restack = results[str(n)]["slot_pool"], results[str(n)]["restacking"]
        results[str(n)]["tokens_s_ratio"] = round(pool["tokens_s"] / restack["tokens_s"], 3)
        print(f"N={n:>3}  slot pool {pool['tokens_s']:>8.1f} tok/s, bookkeeping {pool['bookkeeping_ms_per_step']:.3f}"
              f" ms/step | restacking {restack['tokens_s']:>8.1f} tok/s, bookkeeping "
              f"{restack['bookkeeping_ms_per_step']:.3f} ms/step | ratio {results[str(n)]['tokens_s_ratio']}")
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "model": "tiny-mac (random)" if args.quick else args.model, "steps": steps, "every": args.every,
              "sessions": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
