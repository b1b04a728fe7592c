"""Evaluation: does the model carry facts across requests through its memory? And how well does it model text?

Recall: for each distance, fresh random facts are read, then `distance` bytes of filler; the session state is
saved to bytes and loaded back (as between two requests of a session), and the queries are read with teacher
forcing. "carried" keeps that state; "reset" answers the same queries from a fresh state. Exact = all 4
digits right (what greedy decoding would produce); chance is 1e-4 exact, 0.1 per digit.
Bits per byte: mean negative log-likelihood on held-out standard-library text, in bits per UTF-8 byte.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import FACT_BYTES, RecallExample, filler, recall_example
from .engine import Engine


def answer_hits(logits: torch.Tensor, ids: torch.Tensor, spans) -> torch.Tensor:
    """[queries, 4] bool, each answer digit right or not under teacher forcing: logits[i] predicts ids[i + 1], so
    an answer at ids[a:b] is read off logits[a - 1:b - 1]; a row all right equals greedy decoding getting it right."""
    if not spans:
        return torch.zeros(0, 4, dtype=torch.bool)
    return torch.stack([logits[a - 1:b - 1].argmax(-1).cpu() == ids[a:b] for a, b in spans])


def score_answers(logits: torch.Tensor, ids: torch.Tensor, spans) -> tuple[int, int]:
    """(queries with all 4 digits right, digits right)."""
    hits = answer_hits(logits, ids, spans)
    return int(hits.all(1).sum()), int(hits.sum())


def recall_summary(carried: torch.Tensor, reset: torch.Tensor, asked: torch.Tensor) -> dict:
    """Rates from answer_hits stacked over examples: carried, reset [examples, queries, 4] bool; asked [examples,
    queries], the fact (its place in the block of facts) each query asks for."""
    carried, reset = carried.float(), reset.float()
    carried_exact = carried.prod(-1)  # [examples, queries]
    return {"carried_exact": carried_exact.mean().item(), "reset_exact": reset.prod(-1).mean().item(),
            "carried_digit": carried.mean().item(), "reset_digit": reset.mean().item(),
            # diagnoses of the read-out: which digit of an answer fails; by the query's rank (a later query comes
            # after others asked and answered); by the fact's place in its block (does the memory forget the
            # first ones?)
            "carried_digit_by_position": carried.mean((0, 1)).tolist(),
            "carried_exact_by_query_rank": carried_exact.mean(0).tolist(),
            "carried_exact_by_fact": torch.zeros_like(carried_exact).scatter_(1, asked, carried_exact).mean(0).tolist()}


MODES = ("block", "separate", "updates")
PIECE = 2048  # bytes of context read per call: only that many positions' logits exist at a time
SEPARATE_FILLER = (2048, 8192)  # separate requests: each fact is followed by this much other text, in its request


def _example(rng: random.Random, mode: str, n_facts: int, distance: int, kind: str,
             spread: list[int]) -> tuple[RecallExample, list[str]]:
    """A held-out example of the mode and the requests that read its context (the queries come after them).

    block: the facts, then `distance` bytes of filler, in one request. separate: each fact in a request of its own
    followed by `spread` bytes of filler (2-8 KB, drawn once for all examples of a distance: their requests then
    have one length, and read as one aligned batch), then `distance` bytes more in a last request. updates: every
    fact is told again with a new value after half the distance (`#abcd=1111; ... #abcd=2222; ... #abcd=` answers
    2222)."""
    if mode == "separate":
        ex = recall_example(rng, n_facts, distance, kind, "heldout", spread=spread)
    elif mode == "updates":
        ex = recall_example(rng, n_facts, distance, kind, "heldout", updates=n_facts, update_at=distance // 2)
    else:
        ex = recall_example(rng, n_facts, distance, kind, "heldout")
    start = ex.queries_start
    bounds = [0] + ex.requests + ([start] if not ex.requests or ex.requests[-1] < start else [])
    return ex, [ex.text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


class Progress:
    """A one-line progress bar with ETA on stderr (the work is counted in bytes read)."""

    def __init__(self, total: int, out=None, every_s: float = 1.0):
        self.total, self.done, self.out, self.every_s = max(1, total), 0, out or sys.stderr, every_s
        self.start = self.shown = time.perf_counter()
        self.label = ""

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.shown >= self.every_s or self.done >= self.total:
            self.shown = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = max(0.0, self.total - self.done) / max(rate, 1e-9)
            self.out.write(f"\r{self.label}  {100 * min(1.0, self.done / self.total):5.1f}%  "
                           f"{self.done / 1e6:.2f}/{self.total / 1e6:.2f} MB  {rate / 1e3:.1f} KB/s  "
                           f"ETA {_clock(eta)}  ")
            self.out.flush()

    def close(self) -> None:
        elapsed = _clock(time.perf_counter() - self.start)
        self.out.write(f"\rdone: {self.done / 1e6:.2f} MB in {elapsed}" + " " * 40 + "\n")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def expected_bytes(distances: list[int], n_facts: int, examples: int, mode: str, kinds: int = 1) -> int:
    """What recall_by_distance will read, for its progress bar."""
    per_example = n_facts * FACT_BYTES * (3 if mode == "updates" else 2) + (  # facts, updates, queries twice
        n_facts * sum(SEPARATE_FILLER) // 2 if mode == "separate" else 0)
    return kinds * examples * sum(d + per_example for d in distances)


def read_requests(engine: Engine, requests: list[list[str]], progress: Progress | None = None,
                  states: list | None = None) -> list:
    """Each session reads its requests in turn (from its state in `states`, fresh without), all sessions in one
    batch, each request in pieces of PIECE bytes; after every request the states are saved to bytes and loaded back
    (as between two requests of a session)."""
    states = states or [engine.new_state() for _ in requests]
    for r in range(max(len(reqs) for reqs in requests)):
        batch = engine.batch(states)
        ids = [engine.tokenizer.encode(reqs[r]) if r < len(reqs) else [] for reqs in requests]
        for start in range(0, max(map(len, ids)), PIECE):
            pieces = [i[start:start + PIECE] for i in ids]
            batch.forward(pieces)
            if progress:
                progress.advance(sum(map(len, pieces)))
        states = [engine.load_state(state.to_bytes()) for state in batch.states()]
    return states


def recall_by_distance(engine: Engine, distances: list[int], n_facts: int = 8, examples: int = 32,
                       filler_source: str = "words", seed: int = 0, mode: str = "block",
                       progress: Progress | None = None) -> list[dict]:
    """Recall rows, one per distance: the examples of a distance are read as one batch of sessions."""
    if engine.config.tokenizer != "byte":  # answer spans are byte offsets of the query text
        raise ValueError("recall evaluation needs a byte-level model")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rows = []
    tok = engine.tokenizer
    span = engine.config.attention_span or engine.config.chunk_size  # lmm has no attention: count chunks
    for distance in distances:
        if progress:
            progress.label = f"{filler_source} {mode} {distance:,} B"
        rng = random.Random(seed * 7919 + distance)
        spread = [rng.randint(*SEPARATE_FILLER) for _ in range(n_facts)] if mode == "separate" else []
        drawn = [_example(rng, mode, n_facts, distance, filler_source, spread) for _ in range(examples)]
        carried = read_requests(engine, [requests for _, requests in drawn], progress)
        q_ids = [torch.tensor(tok.encode(ex.text[ex.queries_start:])) for ex, _ in drawn]
        hits = {}
        for name, starts in (("carried", carried), ("reset", [engine.new_state() for _ in drawn])):
            out = engine.forward_batch(q_ids, starts)
            hits[name] = torch.stack([
                answer_hits(logits, ids, [(a - ex.queries_start, b - ex.queries_start) for a, b in ex.answer_spans])
                for (logits, _), ids, (ex, _) in zip(out, q_ids, drawn)])
            if progress:
                progress.advance(sum(map(len, q_ids)))
        asked = torch.tensor([ex.fact_of_query for ex, _ in drawn])
        row = {"filler": filler_source, "mode": mode, "distance": distance, "windows": distance / span,
               "queries": examples * n_facts,
               **recall_summary(hits["carried"], hits["reset"], asked)}
        if mode == "separate":  # bytes from the first fact told to the first query
            row["first_fact_distance"] = sum(ex.queries_start - FACT_BYTES for ex, _ in drawn) / examples
        if mode == "updates":  # every fact was told again: its exact recall is how often the new value wins
            row["updated_exact"] = row["carried_exact"]
        rows.append(row)
    return rows


def bits_per_byte(engine: Engine, windows: int = 8, length: int = 1024, seed: int = 0, kind: str = "code") -> float:
    """On held-out text of a filler kind with text of its own: code (standard-library source) or prose."""
    rng = random.Random(seed)
    nats, n_bytes = 0.0, 0
    for _ in range(windows):
        text = filler(rng, length, kind, split="heldout")
        ids = torch.tensor(engine.tokenizer.encode(text))
        logits, _ = engine.forward(ids, engine.new_state())
        nats += float(F.cross_entropy(logits[:-1].float(), ids[1:].to(logits.device), reduction="sum"))
        n_bytes += len(engine.tokenizer.decode_bytes(ids[1:].tolist()))
    return nats / n_bytes / math.log(2)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(metrics: str | Path | list[str | Path], path: str | Path) -> None:
    """Loss (all tokens, answers weighted), held-out loss (corpus runs) and teacher-forced recall over training,
    from train.py's metrics.jsonl; several files are stages of one training (init_from), drawn one after the
    other."""
    rows, offset = [], 0
    for file, stage in enumerate(metrics if isinstance(metrics, list) else [metrics]):
        stage_rows = [json.loads(line) for line in Path(stage).read_text().splitlines() if line.strip()]
        rows += [{**r, "step": r["step"] + offset, "file": file} for r in stage_rows]
        offset = rows[-1]["step"] + 1 if rows else offset
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="training loss")
    held_out = [r for r in rows if "heldout" in r]  # corpus runs
    if held_out:
        ax.plot([r["step"] for r in held_out], [r["heldout"]["loss"] for r in held_out], "s-", ms=3, color="C2",
                label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats" + (")" if held_out else ", answer digits weighted)"))
    top = max(r["loss"] for r in rows)
    ax.set_ylim(0, top if held_out else min(6.0, top))
    evals = [r for r in rows if "recall" in r]
    if evals:
        right = ax.twinx()
        right.plot([r["step"] for r in evals], [r["recall"]["exact"] for r in evals], "o-", color="C1", ms=3,
                   label="exact recall, current stage (held-out)")
        right.set_ylabel("exact recall")
        right.set_ylim(-0.02, 1.02)
        right.legend(loc="upper right")
    stages, last = [], None
    for r in rows:  # a new curriculum stage, or a new file (training stage) with the same curriculum
        if (r["file"], r["stage"]) != last:
            stages.append((r["step"], r["stage"]))
            last = (r["file"], r["stage"])
    for step, (low, high, facts) in stages if not held_out else []:  # a corpus run has no curriculum
        facts = "-".join(map(str, facts)) if isinstance(facts, list) else facts  # [fewest, most] drawn per example
        ax.axvline(step, color="grey", lw=0.5, ls=":")
        ax.text(step, 0.05, f" {facts} facts, {low}-{high} B", fontsize=7, va="bottom", color="grey", rotation=90)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_recall(rows: list[dict], path: str | Path, title: str) -> None:
    """Exact recall vs distance in bytes (log scale past the first window), one curve per filler kind: memory carried
    (solid), memory reset (dashed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    kinds = list(dict.fromkeys(r["filler"] for r in rows))
    for i, kind in enumerate(kinds):
        mine = [r for r in rows if r["filler"] == kind]
        x = [r["distance"] for r in mine]
        ax.plot(x, [r["carried_exact"] for r in mine], "o-", color=f"C{i}", ms=3, label=f"{kind}: memory carried")
        ax.plot(x, [r["reset_exact"] for r in mine], "--", color=f"C{i}", lw=0.8, alpha=0.7, label=f"{kind}: reset")
    ax.set_xscale("symlog", linthresh=16)
    ax.set_xlabel("filler between the facts and the queries (bytes)")
    ax.set_ylabel("exact recall (4 digits)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(engine: Engine, distances: list[int], n_facts: int, examples: int, filler_kinds: str | list[str],
             bpb_windows: int, seed: int = 0, mode: str = "block", progress: Progress | None = None) -> dict:
    """Recall rows for every filler kind and distance; bits per byte on held-out code and prose."""
    kinds = [filler_kinds] if isinstance(filler_kinds, str) else list(filler_kinds)
    rows = [row for kind in kinds
            for row in recall_by_distance(engine, distances, n_facts, examples, kind, seed, mode, progress)]
    return {
        "fingerprint": engine.fingerprint, "config": engine.config.to_dict(), "n_facts": n_facts,
        "filler": kinds, "mode": mode, "examples": examples, "attention_span": engine.config.attention_span,
        "recall": rows,
        "bits_per_byte": bits_per_byte(engine, bpb_windows, seed=seed) if bpb_windows else None,
        "bits_per_byte_prose": bits_per_byte(engine, bpb_windows, seed=seed, kind="prose") if bpb_windows else None,
    }


def write_report(result: dict, out: str | Path, plot: str | Path | None) -> None:
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        what = {"block": "", "separate": ", each fact in its own request", "updates": ", every fact updated halfway"}
        plot_recall(result["recall"], plot, f"recall of {result['n_facts']} facts{what[result['mode']]}")
