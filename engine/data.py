"""Training data every machine has: synthetic long-range recall tasks and Python standard-library text.

Recall surface format (fixed, so that others can probe a model with it):
    fact  = "#" + key + "=" + value + ";"    key: 4 random lowercase ASCII letters, value: 4 random digits
    query = "#" + key + "="                  whose correct continuation is the 4 digits of that key's value
An example is  [facts] [filler of `distance` bytes] [queries, each followed by its answer and ";"]; for training,
the queries after the first may each follow `query_gap` bytes of filler of their own.

Text corpus: the *.py files at the top level of this interpreter's standard library (Python Software
Foundation License), split into train / held-out by a hash of the file name.
"""

from __future__ import annotations

import hashlib
import random
import string
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HELD_OUT_PERCENT = 5


@dataclass(frozen=True)
class RecallExample:
    text: str
    answer_spans: list[tuple[int, int]]  # character (= byte) ranges of the 4 answer digits, one per query
    distance: int  # bytes between the end of the last fact and the first query
    fact_of_query: list[int]  # which fact (its place in the block of facts) each query asks for, in query order


def fact_key(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(4))


def fact_value(rng: random.Random) -> str:
    return "".join(rng.choice(string.digits) for _ in range(4))


@cache
def stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(sorted(p for p in root.glob("*.py") if p.is_file()))


def is_held_out(path: Path) -> bool:
    return int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


@cache
def python_corpus(split: str = "train") -> str:
    """The standard library's top-level modules joined into one ASCII text ('train' or 'heldout')."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want_held_out = split == "heldout"
    parts = [p.read_text(encoding="utf-8", errors="ignore") for p in stdlib_files() if is_held_out(p) == want_held_out]
    text = "\n".join(parts).encode("ascii", errors="ignore").decode()
    if not text:
        raise RuntimeError("no standard-library sources found for the text corpus")
    return text


def text_window(rng: random.Random, length: int, split: str = "train") -> str:
    corpus = python_corpus(split)
    start = rng.randrange(0, len(corpus) - length)
    return corpus[start:start + length]


def filler(rng: random.Random, length: int, source: str, split: str = "train") -> str:
    """`length` bytes that carry no facts: pseudo-words, or Python source text (a harder distractor:
    it has '#', '=' and digits of its own). Words may end one byte short (the recipes' data stream was drawn
    this way; a fix would change every run's data)."""
    if source == "python":
        return text_window(rng, length, split)
    if source != "words":
        raise ValueError(f"filler source must be 'words' or 'python', got {source!r}")
    words: list[str] = []
    size = 0
    while size < length:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:length]


def recall_example(rng: random.Random, n_facts: int, distance: int, filler_source: str = "words",
                   split: str = "train", query_gap: int = 0) -> RecallExample:
    """query_gap > 0 puts that much filler before every query but the first: with a gap longer than the attention
    window, a query cannot lean on the query answered before it and must be read from the memory alone
    (bench/recall_context.py: after a query answered right in its window, the default model reads the next one
    far better than alone)."""
    keys: list[str] = []
    while len(keys) < n_facts:  # distinct keys
        key = fact_key(rng)
        if key not in keys:
            keys.append(key)
    values = [fact_value(rng) for _ in keys]
    facts = "".join(f"#{k}={v};" for k, v in zip(keys, values))
    text = facts + filler(rng, distance, filler_source, split)
    spans, order = [], rng.sample(range(n_facts), n_facts)
    for rank, i in enumerate(order):
        if rank and query_gap:
            text += filler(rng, query_gap - 1, filler_source, split).ljust(query_gap)
        text += f"#{keys[i]}="
        spans.append((len(text), len(text) + 4))
        text += values[i] + ";"
    return RecallExample(text, spans, distance, order)
