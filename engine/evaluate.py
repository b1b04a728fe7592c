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
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import recall_example, text_window
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


def recall_by_distance(engine: Engine, distances: list[int], n_facts: int = 8, examples: int = 32,
                       filler_source: str = "words", seed: int = 0) -> list[dict]:
    if engine.config.tokenizer != "byte":  # answer spans are byte offsets of the query text
        raise ValueError("recall evaluation needs a byte-level model")
    rows = []
    tok = engine.tokenizer
    span = engine.config.attention_span or engine.config.chunk_size  # lmm has no attention: count chunks
    for distance in distances:
        rng = random.Random(seed * 7919 + distance)
        hits, asked = {"carried": [], "reset": []}, []  # [queries, 4] per example; the fact each query asks for
        for _ in range(examples):
            ex = recall_example(rng, n_facts, distance, filler_source, split="heldout")
            split = len(ex.text) - n_facts * 11  # queries are the last n_facts * len("#abcd=1234;") bytes
            context, queries = ex.text[:split], ex.text[split:]
            _, state = engine.forward(tok.encode(context), engine.new_state())
            carried = engine.load_state(state.to_bytes())
            q_ids = torch.tensor(tok.encode(queries))
            for name, start in (("carried", carried), ("reset", engine.new_state())):
                logits, _ = engine.forward(q_ids, start)
                hits[name].append(answer_hits(logits, q_ids, [(a - split, b - split) for a, b in ex.answer_spans]))
            asked.append(ex.fact_of_query)
        rows.append({"distance": distance, "windows": distance / span, "queries": examples * n_facts,
                     **recall_summary(torch.stack(hits["carried"]), torch.stack(hits["reset"]), torch.tensor(asked))})
    return rows


def bits_per_byte(engine: Engine, windows: int = 8, length: int = 1024, seed: int = 0) -> float:
    rng = random.Random(seed)
    nats, n_bytes = 0.0, 0
    for _ in range(windows):
        text = text_window(rng, length, split="heldout")
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
    """Loss (all tokens, answers weighted) and teacher-forced recall over training, from train.py's metrics.jsonl;
    several files are stages of one training (init_from), drawn one after the other."""
    rows, offset = [], 0
    for stage in metrics if isinstance(metrics, list) else [metrics]:
        stage_rows = [json.loads(line) for line in Path(stage).read_text().splitlines() if line.strip()]
        rows += [{**r, "step": r["step"] + offset} for r in stage_rows]
        offset = rows[-1]["step"] + 1 if rows else offset
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats, answer digits weighted)")
    ax.set_ylim(0, min(6.0, max(r["loss"] for r in rows)))
    evals = [r for r in rows if "recall" in r]
    if evals:
        right = ax.twinx()
        right.plot([r["step"] for r in evals], [r["recall"]["exact"] for r in evals], "o-", color="C1", ms=3,
                   label="exact recall, current stage (held-out)")
        right.set_ylabel("exact recall")
        right.set_ylim(-0.02, 1.02)
        right.legend(loc="upper right")
    stages, last = [], None
    for r in rows:
        if r["stage"] != last:
            stages.append((r["step"], r["stage"]))
            last = r["stage"]
    for step, (low, high, facts) in stages:
        facts = "-".join(map(str, facts)) if isinstance(facts, list) else facts  # [fewest, most] drawn per example
        ax.axvline(step, color="grey", lw=0.5, ls=":")
        ax.text(step, 0.05, f" {facts} facts, {low}-{high} B", fontsize=7, va="bottom", color="grey", rotation=90)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_recall(rows: list[dict], path: str | Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    windows = [r["windows"] for r in rows]
    ax.plot(windows, [r["carried_exact"] for r in rows], "o-", label="memory carried (through to_bytes)")
    ax.plot(windows, [r["reset_exact"] for r in rows], "s--", label="memory reset")
    ax.set_xlabel("distance from the facts to the queries (attention windows; memory chunks for lmm)")
    ax.set_ylabel("exact recall (4 digits)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(engine: Engine, distances: list[int], n_facts: int, examples: int, filler_source: str,
             bpb_windows: int, seed: int = 0) -> dict:
    return {
        "fingerprint": engine.fingerprint, "config": engine.config.to_dict(), "n_facts": n_facts,
        "filler": filler_source, "attention_span": engine.config.attention_span,
        "recall": recall_by_distance(engine, distances, n_facts, examples, filler_source, seed),
        "bits_per_byte": bits_per_byte(engine, bpb_windows, seed=seed) if bpb_windows else None,
    }


def write_report(result: dict, out: str | Path, plot: str | Path | None) -> None:
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        plot_recall(result["recall"], plot, f"recall of {result['n_facts']} facts ({result['filler']} filler)")

