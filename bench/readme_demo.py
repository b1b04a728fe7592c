"""The README's memory demo, over many random facts: one fact memorized, then four help topics of the Python
reference (`class`, `for`, `if`, `while` from pydoc_data.topics: 6 KB) in four more requests, the session's state
going through snapshot bytes between requests, then the query, answered greedily. Recall is counted twice: with the
topics as they are (typographic quotes and dashes: bytes outside ASCII, which a model trained on ASCII alone may
not survive) and with those characters dropped.

    python bench/readme_demo.py                                   # the default model, 32 facts
    python bench/readme_demo.py --model other/model --facts 8
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import Engine, SamplingParams  # noqa: E402

TOPICS = ("class", "for", "if", "while")


def recall(engine: Engine, facts: list[tuple[str, str]], texts: list[str]) -> float:
    right = 0
    for key, value in facts:
        _, state = engine.forward(engine.tokenizer.encode(f"#{key}={value};"), engine.new_state())
        for text in texts:  # one request each: the state is saved and loaded back in between
            _, state = engine.forward(engine.tokenizer.encode(text), engine.load_state(state.to_bytes()))
        answer = engine.complete(engine.tokenizer.encode(f"#{key}="), engine.load_state(state.to_bytes()),
                                 SamplingParams(max_tokens=4, temperature=0)).text
        right += answer == value
    return right / len(facts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models/titans-mal-recall"))
    parser.add_argument("--facts", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench/results/readme_demo.json"))
    args = parser.parse_args()
    from pydoc_data.topics import topics

    engine = Engine.load(args.model, device="cpu")
    rng = random.Random(args.seed)
    letters, digits = "abcdefghijklmnopqrstuvwxyz", "0123456789"
    facts = [("".join(rng.choice(letters) for _ in range(4)), "".join(rng.choice(digits) for _ in range(4)))
             for _ in range(args.facts)]
    raw = [topics[t] for t in TOPICS]
    ascii_only = [t.encode("ascii", errors="ignore").decode() for t in raw]
    report = {"model": args.model, "facts": args.facts, "topics": TOPICS,
              "bytes_outside_ascii": sum(len(t.encode()) - len(a) for t, a in zip(raw, ascii_only)),
              "recall_as_is": recall(engine, facts, raw), "recall_ascii_only": recall(engine, facts, ascii_only)}
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
