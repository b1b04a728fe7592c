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
teacher-forced, as in `titans eval`; exact = all 4 digits right. JSON to bench/results/recall_context.json.
"""

from __future__ import annotations

import argparse
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
    result = {"model": args.model, "facts": args.facts, "distance": args.distance, "gap_bytes": gap_bytes,
              "examples": args.examples, "seed": args.seed, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{args.facts} facts, {args.distance} bytes of filler, gap {gap_bytes} bytes, {args.examples} examples")
    print("| before the last query | exact | queries |\n|---|---|---|")
    for row in rows:
        print(f"| {row['before the last query']} | {row['exact']:.3f} | {row['queries']} |")


if __name__ == "__main__":
    main()
