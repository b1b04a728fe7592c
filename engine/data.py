"""Training data every machine has: synthetic long-range recall tasks, Python standard-library text and prose.

Recall surface format (fixed, so that others can probe a model with it):
    fact  = "#" + key + "=" + value + ";"    key: 4 random lowercase ASCII letters, value: 4 random digits
    query = "#" + key + "="                  whose correct continuation is the 4 digits of that key's value
An example is  [facts] [filler of `distance` bytes] [queries, each followed by its answer and ";"]; for training,
the queries after the first may each follow `query_gap` bytes of filler of their own. Variants: each fact followed
by filler of its own (`spread`: facts told in separate requests), and facts told again with new values part-way
through the filler (`updates`: the later value is the answer).

Filler kinds, each split into train / held-out so that evaluation reads text training never saw:
    words   random pseudo-words (held-out: other draws)
    code    the *.py files at the top level of this interpreter's standard library (Python Software Foundation
            License), split by a hash of the file name; "python" is its older name
    prose   the English help texts of the Python reference (pydoc_data/topics.py in the standard library, Python
            Software Foundation License), split by a hash of each paragraph
    logs    JSON log lines drawn from a small grammar; held-out lines use disjoint services, routes and messages
"""

from __future__ import annotations

import hashlib
import random
import re
import string
import sysconfig
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch

HELD_OUT_PERCENT = 5
PROSE_HELD_OUT_PERCENT = 25  # the prose corpus is small (~0.46 MB): a quarter keeps ~100 KB apart for evaluation
FILLER_KINDS = ("words", "prose", "code", "logs")
FACT_BYTES = len("#abcd=1234;")


@dataclass(frozen=True)
class RecallExample:
    text: str
    answer_spans: list[tuple[int, int]]  # character ranges of the 4 answer digits, one per query (bytes if ASCII)
    distance: int  # bytes between the end of the last fact and the first query
    fact_of_query: list[int]  # which fact (its place in the block of facts) each query asks for, in query order
    updated: list[bool] = field(default_factory=list)  # per query: its fact was told again with a new value
    requests: list[int] = field(default_factory=list)  # with spread: where each fact's request ends (offsets)

    @property
    def queries_start(self) -> int:
        """Where the first query ("#abcd=") begins."""
        return self.answer_spans[0][0] - len("#abcd=")


def fact_key(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(4))


def fact_value(rng: random.Random) -> str:
    return "".join(rng.choice(string.digits) for _ in range(4))


FACT_PATTERN = re.compile(rb"#[a-z]{4}=(?:[0-9]{4};)?")  # a fact, or a query with its answer, or a bare query


def fact_mask(ids: torch.Tensor) -> torch.Tensor:
    """byte ids [B, T] -> bool [B, T]: the bytes of facts and queries (FACT_PATTERN); the rest is other text."""
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for row, seq in enumerate(ids.tolist()):
        for match in FACT_PATTERN.finditer(bytes(b & 0xFF for b in seq)):
            mask[row, match.start():match.end()] = True
    return mask


@cache
def stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(sorted(p for p in root.glob("*.py") if p.is_file()))


def is_held_out(path: Path) -> bool:
    return _in_hundredths(path.name, HELD_OUT_PERCENT)


def _in_hundredths(name: str, percent: int) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < percent


def _check_split(split: str) -> None:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


@cache
def python_corpus(split: str = "train") -> str:
    """The standard library's top-level modules joined into one ASCII text ('train' or 'heldout')."""
    _check_split(split)
    want_held_out = split == "heldout"
    parts = [p.read_text(encoding="utf-8", errors="ignore") for p in stdlib_files() if is_held_out(p) == want_held_out]
    text = "\n".join(parts).encode("ascii", errors="ignore").decode()
    if not text:
        raise RuntimeError("no standard-library sources found for the text corpus")
    return text


@cache
def prose_corpus(split: str = "train") -> str:
    """The Python reference's help topics (English prose with some code) as one ASCII text. Topics repeat each other's
    sections, so the split is by paragraph: a paragraph's hash puts it, and every copy of it, on one side."""
    from pydoc_data.topics import topics

    _check_split(split)
    want_held_out = split == "heldout"
    paragraphs = dict.fromkeys(p.strip("\n") for text in topics.values() for p in text.split("\n\n"))
    parts = [p for p in paragraphs if p.strip() and _in_hundredths(p, PROSE_HELD_OUT_PERCENT) == want_held_out]
    return "\n\n".join(parts).encode("ascii", errors="ignore").decode()


def text_window(rng: random.Random, length: int, split: str = "train") -> str:
    return _window(python_corpus(split), rng, length)


def _window(corpus: str, rng: random.Random, length: int) -> str:
    """A random window of the corpus; one longer than half the corpus is made of several such windows."""
    piece = len(corpus) // 2
    if length <= piece:
        start = rng.randrange(0, len(corpus) - length)
        return corpus[start:start + length]
    return "".join(_window(corpus, rng, min(piece, length - done)) for done in range(0, length, piece))


# the log grammar's vocabularies: training draws from the first half of each list, held-out text from the second
_LOG_SERVICES = ("billing", "auth", "search", "gateway", "mailer", "ledger", "catalog", "profile",
                 "cart", "notify", "quota", "export", "render", "ingest", "backup", "reports")
_LOG_ROUTES = ("/v1/items", "/v1/orders", "/api/users", "/login", "/v2/cart", "/health", "/v1/files", "/admin/jobs",
               "/v1/invoices", "/api/teams", "/oauth/token", "/v2/search", "/v1/tags", "/metrics", "/v1/uploads",
               "/api/events")
_LOG_MESSAGES = ("request served", "cache miss", "retrying upstream call", "token refreshed", "slow query",
                 "connection reset by peer", "job finished", "rate limit close", "config reloaded",
                 "payload validated", "session expired", "queue drained", "disk usage high",
                 "worker restarted", "index rebuilt", "lock acquired", "deadline exceeded", "batch flushed")
_LOG_LEVELS = ("DEBUG", "INFO", "INFO", "INFO", "WARN", "ERROR")


def log_lines(rng: random.Random, length: int, split: str = "train") -> str:
    """JSON log lines (timestamps, levels, services, routes, statuses, latencies), `length` bytes."""
    _check_split(split)

    def half(words: tuple[str, ...]) -> tuple[str, ...]:
        middle = len(words) // 2
        return words[:middle] if split == "train" else words[middle:]

    services, routes, messages = half(_LOG_SERVICES), half(_LOG_ROUTES), half(_LOG_MESSAGES)
    lines: list[str] = []
    size = 0
    while size < length:
        line = (f'{{"ts":"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:'
                f'{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.{rng.randrange(1000):03d}Z",'
                f'"level":"{rng.choice(_LOG_LEVELS)}","svc":"{rng.choice(services)}",'
                f'"msg":"{rng.choice(messages)}","route":"{rng.choice(routes)}/{rng.randrange(100000)}",'
                f'"status":{rng.choice((200, 200, 200, 201, 204, 301, 400, 404, 409, 429, 500, 503))},'
                f'"ms":{rng.randrange(2000)}}}\n')
        lines.append(line)
        size += len(line)
    return "".join(lines)[:length]


# characters outside ASCII that users' text is full of, 2 to 4 bytes of UTF-8 each: accented letters, typographic
# punctuation, Greek and Cyrillic, CJK, emoji
UNICODE_BLOCKS = ((0xC0, 0x17F), (0x2010, 0x2026), (0x391, 0x3C9), (0x410, 0x44F), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F))


def sprinkle(rng: random.Random, text: str, rate: float) -> str:
    """text with each character replaced, with probability rate, by one from UNICODE_BLOCKS (the text gets longer in
    bytes: a replaced character is 2-4 bytes). rate 0 draws nothing."""
    if not rate:
        return text
    chars = list(text)
    for i in range(len(chars)):
        if rng.random() < rate:
            low, high = rng.choice(UNICODE_BLOCKS)
            chars[i] = chr(rng.randint(low, high))
    return "".join(chars)


def filler(rng: random.Random, length: int, source: str, split: str = "train", unicode_rate: float = 0.0) -> str:
    """`length` bytes that carry no facts, of one of FILLER_KINDS (see the module docstring). Code, prose and logs
    are harder distractors than words: they have '#', '=', ';' and digits of their own. Words may end one byte
    short (the recipes' data stream was drawn this way; a fix would change every run's data). unicode_rate: see
    sprinkle."""
    if unicode_rate:
        return sprinkle(rng, filler(rng, length, source, split), unicode_rate)
    if source in ("python", "code"):
        return text_window(rng, length, split)
    if source == "prose":
        return _window(prose_corpus(split), rng, length)
    if source == "logs":
        return log_lines(rng, length, split)
    if source != "words":
        raise ValueError(f"filler kind must be one of {', '.join(FILLER_KINDS)} (or 'python'), got {source!r}")
    words: list[str] = []
    size = 0
    while size < length:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:length]


def recall_example(rng: random.Random, n_facts: int, distance: int, filler_source: str | list[str] = "words",
                   split: str = "train", query_gap: int = 0, updates: int = 0, update_at: int = 0,
                   spread: tuple[int, int] | list[int] | None = None, lead: int = 0,
                   unicode_rate: float = 0.0) -> RecallExample:
    """query_gap > 0 puts that much filler before every query but the first: with a gap longer than the attention
    window, a query cannot lean on the query answered before it and must be read from the memory alone
    (bench/recall_context.py: after a query answered right in its window, the default model reads the next one
    far better than alone).

    filler_source: a kind, or a list of kinds to draw one from for the whole example. updates > 0: that many facts
    are told again with new values after `update_at` of the `distance` bytes of filler (the block of updates is
    not counted in `distance`); their queries answer the new values. spread (low, high): each fact is followed by
    low..high bytes of filler of its own (a request of its own: `requests` holds where each ends), then come the
    `distance` bytes; a list gives each fact's filler length instead. lead > 0: that many bytes of filler come
    before the first fact (a memory already written by other text when the facts arrive). unicode_rate: the filler
    sprinkled with characters outside ASCII (sprinkle; answer_spans stay character offsets). With all five off,
    nothing more is drawn than the plain layout draws (recipes' data stay as they were)."""
    if not isinstance(filler_source, str):
        filler_source = rng.choice(filler_source)
    if not 0 <= updates <= n_facts or not 0 <= update_at <= distance:
        raise ValueError(f"updates must be 0..n_facts and update_at 0..distance, got {updates}, {update_at}")
    keys: list[str] = []
    while len(keys) < n_facts:  # distinct keys
        key = fact_key(rng)
        if key not in keys:
            keys.append(key)
    values = [fact_value(rng) for _ in keys]
    requests: list[int] = []
    text = filler(rng, lead, filler_source, split, unicode_rate).ljust(lead)[:lead] if lead else ""
    own_filler = 0  # bytes of filler told after the last fact, in its request
    for i, (k, v) in enumerate(zip(keys, values)):
        text += f"#{k}={v};"
        if spread is not None:
            length = spread[i] if isinstance(spread, list) else rng.randint(*spread)
            own = filler(rng, length, filler_source, split, unicode_rate).ljust(length)
            text, own_filler = text + own, len(own)
            requests.append(len(text))
    updated = [False] * n_facts
    if updates:
        text += filler(rng, update_at, filler_source, split, unicode_rate)
        for i in rng.sample(range(n_facts), updates):
            new = fact_value(rng)
            while new == values[i]:
                new = fact_value(rng)
            values[i], updated[i] = new, True
            text += f"#{keys[i]}={new};"
        own_filler, distance = 0, distance - update_at
    text += filler(rng, distance, filler_source, split, unicode_rate)
    spans, order = [], rng.sample(range(n_facts), n_facts)
    for rank, i in enumerate(order):
        if rank and query_gap:
            text += filler(rng, query_gap - 1, filler_source, split, unicode_rate).ljust(query_gap)
        text += f"#{keys[i]}="
        spans.append((len(text), len(text) + 4))
        text += values[i] + ";"
    return RecallExample(text, spans, own_filler + distance, order, [updated[i] for i in order], requests)
