"""Why do the first queries of a block fail more often than the last? What a query's recall owes to the queries
answered before it, and whether that help lives in the memory or in the attention window.

    .venv/bin/python bench/recall_context.py                       # the default model; ~35 s on one thread
    .venv/bin/python bench/recall_context.py --model DIR --facts 8 --distance 128 --examples 96

For each example (fresh facts, `distance` bytes of filler, the state saved to bytes and loaded back, as
`titans eval` does), the last query of the block is read after different things, all from the same carried state:

    alone             nothing: the query right after the filler
    right             the block's other queries, answered right (what `titans eval` scores at the last rank)
    right, gap        the same, then filler longer than the attention window and the short convolution, so that
                      only the memory has seen the answered queries
    wrong             the other queries answered wrong (every digit + 5 mod 10): the memory wrote wrong values
    wrong, gap        the same, then the gap
    right, last wrong the other queries right but the one just before wrong
    wrong, last right the other queries wrong but the one just before right

plus "each alone": every query of the block read on its own (so each fact once, as the first query). Answers are
teacher-forced, as in `titans eval`; exact = all 4 digits right.

Then the memory's keys, from whole examples read in one go: for each memory layer and answer digit, the mean
cosine between the keys of different facts where they read that digit, and between the query where that digit
is predicted (the byte before it) and those keys, its own fact's against the others'. Keys that keep facts apart
are unlike each other, and a query finds its own fact's key more than the others'.
JSON to bench/results/recall_context.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import Engine  # noqa: E402
from engine.data import filler, recall_example  # noqa: E402
from engine.evaluate import answer_hits  # noqa: E402
from engine.model import NeuralMemory  # noqa: E402

QUERY = len("#abcd=1234;")
ANSWER = slice(len("#abcd="), len("#abcd=1234"))


def wrong(query: str) -> str:
    """The query with every answer digit replaced by (digit + 5) mod 10."""
    digits = "".join(str((int(c) + 5) % 10) for c in query[ANSWER])
    return query[:ANSWER.start] + digits + query[ANSWER.stop:]


def exact(engine: Engine, state: bytes, before: str, query: str) -> bool:
    """Whether the query after `before`, read from the saved state, gets all 4 digits right."""
    ids = torch.tensor(engine.tokenizer.encode(before + query))
    logits, _ = engine.forward(ids.tolist(), engine.load_state(state))
    start = len(before) + ANSWER.start
    return bool(answer_hits(logits, ids, [(start, start + 4)]).all())


@contextlib.contextmanager
def recorded_keys():
    """Every memory layer's q and k [1, H, T, d] of the forward passes run inside, by layer (calls in order)."""
    calls: list[tuple[NeuralMemory, torch.Tensor, torch.Tensor]] = []
    qkv = NeuralMemory.qkv

    def recording(self, projected):
        q, k, v = qkv(self, projected)
        calls.append((self, q, k))
        return q, k, v

    NeuralMemory.qkv = recording
    by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        yield by_layer
    finally:
        NeuralMemory.qkv = qkv
    layers = list(dict.fromkeys(memory for memory, _, _ in calls))
    for i, layer in enumerate(layers):
        by_layer[i] = tuple(torch.cat([c[j] for c in calls if c[0] is layer], 2) for j in (1, 2))


def key_similarity(engine: Engine, rng: random.Random, facts: int, distance: int, examples: int) -> list[dict]:
    """Mean cosines by memory layer and answer digit (see the module's doc), over heads and examples."""
    sums: dict[tuple[int, int], torch.Tensor] = {}
    for _ in range(examples):
        ex = recall_example(rng, facts, distance, "words", split="heldout")
        with recorded_keys() as layers:
            engine.forward(engine.tokenizer.encode(ex.text), engine.new_state())
        asked = torch.tensor(ex.fact_of_query)
        for layer, (q, k) in layers.items():
            for digit in range(4):
                # the query where digit is predicted (the byte before it) against the keys where each fact's digit
                # was read (the key there sees the cue bytes before it through the short convolution)
                queries = q[0][:, torch.tensor([a - 1 + digit for a, _ in ex.answer_spans])]  # [H, queries, d]
                keys = k[0][:, torch.arange(facts) * QUERY + ANSWER.start + digit]  # [H, facts, d]
                pairs = keys @ keys.transpose(-1, -2)  # [H, facts, facts]
                same = pairs.diagonal(dim1=-2, dim2=-1)
                key_key = (pairs.sum() - same.sum()) / (pairs.numel() - same.numel())
                found = queries @ keys.transpose(-1, -2)  # [H, query, fact]
                own = found[:, torch.arange(facts), asked]
                other = (found.sum() - own.sum()) / (found.numel() - own.numel())
                sums[layer, digit] = sums.get((layer, digit), 0) + torch.stack([key_key, own.mean(), other])
    return [{"layer": layer, "digit": digit + 1, "key_key_other_facts": float(v[0]) / examples,
             "query_own_key": float(v[1]) / examples, "query_other_keys": float(v[2]) / examples}
            for (layer, digit), v in sums.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "titans-mal-recall"))
    parser.add_argument("--facts", type=int, default=8)
    parser.add_argument("--distance", type=int, default=128)
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "recall_context.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model)
    if engine.config.tokenizer != "byte":
        raise SystemExit("recall probes need a byte-level model")
    gap_bytes = (engine.config.attention_span or 0) + engine.config.conv_kernel
    rng = random.Random(args.seed)
    hits: dict[str, list[bool]] = {}
    for _ in range(args.examples):
        ex = recall_example(rng, args.facts, args.distance, "words", split="heldout")
        split = len(ex.text) - args.facts * QUERY
        _, state = engine.forward(engine.tokenizer.encode(ex.text[:split]), engine.new_state())
        saved = state.to_bytes()
        queries = [ex.text[split + QUERY * i: split + QUERY * (i + 1)] for i in range(args.facts)]
        *earlier, last = queries
        gap = filler(rng, gap_bytes - 1, "words", "heldout").ljust(gap_bytes)
        right, wrongs = "".join(earlier), "".join(map(wrong, earlier))
        variants = {
            "alone": "",
            "right": right,
            "right, gap": right + gap,
            "wrong": wrongs,
            "wrong, gap": wrongs + gap,
            "right, last wrong": "".join(earlier[:-1]) + wrong(earlier[-1]) if earlier else "",
            "wrong, last right": "".join(map(wrong, earlier[:-1])) + earlier[-1] if earlier else "",
        }
        for name, before in variants.items():
            hits.setdefault(name, []).append(exact(engine, saved, before, last))
        hits.setdefault("each alone", []).extend(exact(engine, saved, "", q) for q in queries)
    rows = [{"before the last query": name, "exact": sum(h) / len(h), "queries": len(h)} for name, h in hits.items()]
    keys = key_similarity(engine, rng, args.facts, args.distance, max(1, args.examples // 4))
    result = {"model": args.model, "facts": args.facts, "distance": args.distance, "gap_bytes": gap_bytes,
              "examples": args.examples, "seed": args.seed, "rows": rows, "keys": keys}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{args.facts} facts, {args.distance} bytes of filler, gap {gap_bytes} bytes, {args.examples} examples")
    print("| before the last query | exact | queries |\n|---|---|---|")
    for row in rows:
        print(f"| {row['before the last query']} | {row['exact']:.3f} | {row['queries']} |")
    print("\nmean cosines of the memory's keys where facts' digits were read, and of the queries where they are asked")
    print("| memory layer | digit | key, another fact's key | query, its fact's key | query, other facts' keys |")
    print("|---|---|---|---|---|")
    for row in keys:
        print(f"| {row['layer']} | {row['digit']} | {row['key_key_other_facts']:.2f} | "
              f"{row['query_own_key']:.2f} | {row['query_other_keys']:.2f} |")


if __name__ == "__main__":
    main()
