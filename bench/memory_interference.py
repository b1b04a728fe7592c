"""What the filler does to the facts in the memory: which layer's drift costs recall, and what is left of the facts'
write at the queries' keys.

    .venv/bin/python bench/memory_interference.py                        # the default model; ~10 min on one thread
    .venv/bin/python bench/memory_interference.py --model DIR --distances 4096,65536 --examples 8 --filler prose

Held-out examples of 8 facts, then `distance` bytes of filler, then the queries (as `titans eval`). Every example is
read three ways: the facts alone (state F), the facts then the filler (FX), the filler alone from a fresh state (X);
0 is the fresh state.

Recall (exact, teacher-forced) of the queries answered from FX with one part of it swapped:
    carried          FX as it is
    mem0 = F         the first block's memory weights as after the facts, all else (its momentum too) from FX:
                     recall if the filler had not touched that memory
    mem1 = F         the same for the second block's memory
    mem0 = F landed  the same with the facts' momentum landed first: F then LANDING bytes of filler read with
                     theta 0 (eta and alpha as the gates set them), so the weights hold all the facts' write will be
    mem0 = X+F-0     the first memory as the filler alone left it plus the facts' write (F - 0): recall if the facts'
                     write and the filler's added up without interfering
    unwritten        FX as it is, the queries read with both memories' writes off (theta and eta 0, alpha 0): recall
                     if answering a query (which writes its fact again) did not disturb the facts asked after it

At the queries' keys (the first memory's q on the answer digits' rows), per head, with R(W) the memory's read:
    signal           |R(F) - R(0)|: what the facts wrote, as read at their queries
    left             cos and norm ratio of R(FX) - R(X) against R(F) - R(0): how much of the facts' write the
                     filler left in place (1 and 1: untouched)
    offset           |R(X) - R(0)| / signal: how far the filler alone moved the read at those keys

JSON to bench/results/memory_interference.json (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import Engine  # noqa: E402
from engine.data import FACT_BYTES, FILLER_KINDS, recall_example  # noqa: E402
from engine.data import filler as filler_text  # noqa: E402
from engine.evaluate import answer_hits, read_requests  # noqa: E402
from engine.model import NeuralMemory  # noqa: E402
from kernels.memory.naive import memory_read  # noqa: E402

LANDING = 1024  # bytes over which the facts' momentum lands: at eta 0.98, 1e-9 of it is left after them


def memory_keys(state, layer: int) -> list[str]:
    """The names of a block's memory weights in a session state (W0, W1, ...); the momentum stays: the facts'
    momentum right after them would go on writing them through the queries."""
    prefix = f"layers.{layer}.m0."
    return [name for name in state.tensors if name.startswith(prefix) and name[len(prefix)] == "W"]


def swapped(state, layer: int, source: dict):
    """state with the block's memory tensors taken from `source` (name -> tensor)."""
    return dataclasses.replace(state, tensors={**state.tensors, **{k: source[k] for k in memory_keys(state, layer)}})


def superposed(x, f, zero, layer: int) -> dict:
    """X + (F - 0) for the block's memory tensors: the filler's state plus the facts' write."""
    return {k: x.tensors[k] + f.tensors[k] - zero.tensors[k] for k in memory_keys(x, layer)}


def forward_with_query_keys(engine: Engine, memory: NeuralMemory, ids: torch.Tensor,
                            state) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [T, V], the memory's q [H, T, d]) of ids read from state (q depends on the conv tail, not on W)."""
    seen = []
    plain = NeuralMemory.qkv

    def recording(self, projected):
        out = plain(self, projected)
        if self is memory:
            seen.append(out[0][0])
        return out

    NeuralMemory.qkv = recording
    try:
        logits = engine.forward_batch([ids], [state])[0][0]
    finally:
        NeuralMemory.qkv = plain
    return logits, torch.cat(seen, 1)


@contextmanager
def memories_unwritten(momentum_lands: bool = False):
    """While inside, every memory's gates write nothing new (theta 0); with momentum_lands its momentum goes on
    landing as the gates decide (eta and alpha as read), else nothing moves (eta 0, alpha 0)."""
    plain = NeuralMemory.gates

    def frozen(self, logits):
        log_gates = plain(self, logits).clone()
        log_gates[..., 0] = -30.0
        if not momentum_lands:
            log_gates[..., 1] = -30.0
            log_gates[..., 2] = 0.0
        return log_gates

    NeuralMemory.gates = frozen
    try:
        yield
    finally:
        NeuralMemory.gates = plain


def weights_of(state, layer: int, n: int) -> list[torch.Tensor]:
    return [state.tensors[f"layers.{layer}.m0.W{i}"][None].float() for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "titans-mal-recall"))
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--facts", type=int, default=8)
    parser.add_argument("--distances", default="4096,16384,65536")
    parser.add_argument("--filler", default="all", help="a kind, several joined by commas, or all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_interference.json"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    engine = Engine.load(args.model, device="cpu")
    kinds = list(FILLER_KINDS) if args.filler == "all" else args.filler.split(",")
    distances = [int(d) for d in args.distances.split(",")]
    memory = engine.model.memories()[0]
    depth, eps = len(memory.init_weights), engine.config.norm_eps
    tok = engine.tokenizer
    facts_end = args.facts * FACT_BYTES
    result = {"model": args.model, "fingerprint": engine.fingerprint, "facts": args.facts, "examples": args.examples,
              "rows": []}
    variants = ("carried", "mem0 = F", "mem0 = F landed", "mem1 = F", "mem0 = X+F-0", "unwritten")
    print(f"{args.model}: {args.facts} facts, {args.examples} examples a cell; exact recall, then the first memory "
          "at the queries' keys per head")
    print(f"{'filler':>6} {'distance':>8} " + " ".join(f"{v:>15}" for v in variants)
          + "   signal / left cos / left norm / offset")
    for kind in kinds:
        for distance in distances:
            rng = random.Random(args.seed * 7919 + distance)
            drawn = [recall_example(rng, args.facts, distance, kind, "heldout") for _ in range(args.examples)]
            facts = [ex.text[:facts_end] for ex in drawn]
            filler = [ex.text[facts_end:ex.queries_start] for ex in drawn]
            zero = engine.new_state()
            f = read_requests(engine, [[t] for t in facts])
            fx = read_requests(engine, [[t] for t in filler], states=f)
            x = read_requests(engine, [[t] for t in filler])
            with memories_unwritten(momentum_lands=True):
                landed = read_requests(engine, [[filler_text(rng, LANDING, kind, "heldout")] for _ in drawn],
                                       states=f)
            answered = {v: [] for v in variants}
            heads = {"signal": [], "cos": [], "norm": [], "offset": []}
            for i, ex in enumerate(drawn):
                ids = torch.tensor(tok.encode(ex.text[ex.queries_start:]))
                spans = [(a - ex.queries_start, b - ex.queries_start) for a, b in ex.answer_spans]
                logits, q = forward_with_query_keys(engine, memory, ids, fx[i])
                answered["carried"].append(answer_hits(logits, ids, spans).all(1).float())
                starts = {"mem0 = F": swapped(fx[i], 0, f[i].tensors), "mem1 = F": swapped(fx[i], 1, f[i].tensors),
                          "mem0 = F landed": swapped(fx[i], 0, landed[i].tensors),
                          "mem0 = X+F-0": swapped(fx[i], 0, superposed(x[i], f[i], zero, 0))}
                for name, start in starts.items():
                    logits = engine.forward_batch([ids], [start])[0][0]
                    answered[name].append(answer_hits(logits, ids, spans).all(1).float())
                with memories_unwritten():
                    logits = engine.forward_batch([ids], [fx[i]])[0][0]
                answered["unwritten"].append(answer_hits(logits, ids, spans).all(1).float())
                rows = torch.tensor([p for a, b in spans for p in range(a - 1, b - 1)])
                q = q[:, rows][None]  # [1, H, n, d]
                read = {name: memory_read(weights_of(s, 0, depth), q, eps)[0]
                        for name, s in (("0", zero), ("F", f[i]), ("X", x[i]), ("FX", fx[i]))}
                wrote, left = read["F"] - read["0"], read["FX"] - read["X"]  # [H, n, d]
                signal = wrote.norm(dim=-1)
                heads["signal"].append(signal.mean(1))
                heads["cos"].append(F.cosine_similarity(left, wrote, dim=-1).mean(1))
                heads["norm"].append((left.norm(dim=-1) / signal).mean(1))
                heads["offset"].append(((read["X"] - read["0"]).norm(dim=-1) / signal).mean(1))
            row = {"filler": kind, "distance": distance, "queries": args.examples * args.facts,
                   "exact": {v: torch.cat(answered[v]).mean().item() for v in variants},
                   "exact_by_query_rank": {v: torch.stack(answered[v]).mean(0).tolist() for v in variants},
                   "heads": {k: torch.stack(v).mean(0).tolist() for k, v in heads.items()}}
            result["rows"].append(row)
            by_head = " | ".join(f"{s:.2f} {c:.2f} {n:.2f} {o:.2f}" for s, c, n, o in zip(*row["heads"].values()))
            print(f"{kind:>6} {distance:>8} " + " ".join(f"{row['exact'][v]:>15.3f}" for v in variants)
                  + f"   {by_head}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
