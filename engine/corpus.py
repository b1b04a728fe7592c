"""Corpora for training: text files, JSONL or Parquet -> tokenized, shuffled, sharded token files, and the fixed
order in which the ranks of a run read them.

A prepared corpus is a directory:

    index.json              tokenizer, vocabulary, end-of-text id, token dtype, and per split its shards
    train-00000.bin ...     token ids (uint16, or uint32 past 65,536), documents packed, each ended by end-of-text
    heldout-00000.bin ...   the documents set aside for evaluation (a share drawn per document)
    *.mask                  chat corpora: one byte per token, 1 where the loss counts (the assistant's turns)
    tokenizer.json, chat_template.json   what the corpus was tokenized with; training copies them into the model

Training reads a split as one stream of tokens cut into windows of seq_len + 1 that overlap by one token, so every
token after the first is a target exactly once per epoch; each epoch visits the windows in an order drawn from the
run's seed and the epoch. Global batch slot j of step s is window number s * global_batch + j of that order, and
rank r of W reads the slots [r * G / W, (r + 1) * G / W): the same windows for the same step whatever the number of
processes, none read twice or skipped, and resuming needs nothing but the step.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .distributed import rank_rows
from .tokenizer import ByteTokenizer, ChatTemplate, Tokenizer, load_tokenizer

END_OF_TEXT = "<|endoftext|>"
# the default chat template's turn markers ("<|user|>" ...) as single tokens: a turn's end is one token to learn
CHAT_SPECIAL_TOKENS = (END_OF_TEXT, "<|system|>", "<|user|>", "<|assistant|>")
BYTE_END_OF_TEXT = 0  # byte corpora end documents with NUL, a byte text does not hold
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".html", ".c", ".h", ".toml", ".cfg", ".ini", ".yaml")
SHARD_TOKENS = 1 << 24


def iter_files(sources: list[str | Path], suffixes: tuple[str, ...] | None = None) -> Iterator[Path]:
    """Files named, and the files under folders named (sorted, recursively; hidden ones skipped). suffixes: the file
    endings to take from folders (files named directly are always taken)."""
    for source in map(Path, sources):
        if source.is_dir():
            for path in sorted(source.rglob("*")):
                parts = path.relative_to(source).parts
                if (path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in parts)
                        and (suffixes is None or path.name.endswith(suffixes))):
                    yield path
        elif source.is_file():
            yield source
        else:
            raise FileNotFoundError(f"corpus source {source} does not exist")


def iter_documents(path: Path, text_key: str = "text", chat: bool = False) -> Iterator:
    """A file's documents: each JSONL line's text_key (or, chat, its "messages"), each Parquet row's text_key, or
    the whole of any other file as one text."""
    key = "messages" if chat else text_key
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    if key not in record:
                        raise ValueError(f"{path}:{number}: no {key!r} field")
                    yield record[key]
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise RuntimeError(f"{path} is Parquet: pip install pyarrow (the 'train' extra)") from e
        for batch in pq.ParquetFile(path).iter_batches(columns=[key]):
            yield from batch.column(0).to_pylist()
    elif chat:
        raise ValueError(f"{path}: a chat corpus is JSONL with a 'messages' list per line")
    else:
        data = path.read_bytes()
        if b"\0" not in data[:8192]:  # binary files are not text
            yield data.decode("utf-8", errors="replace")


def shuffled(items: Iterator, rng: random.Random, buffer: int) -> Iterator:
    """A stream in a seeded order, holding at most `buffer` items: each one out is drawn from those held."""
    held: list = []
    for item in items:
        held.append(item)
        if len(held) >= buffer:
            pick = rng.randrange(len(held))
            held[pick], held[-1] = held[-1], held[pick]
            yield held.pop()
    rng.shuffle(held)
    yield from held


def load_corpus_tokenizer(directory: str | Path | None) -> Tokenizer:
    """The tokenizer.json in directory, or bytes when there is none (or no directory)."""
    has_file = directory is not None and (Path(directory) / "tokenizer.json").exists()
    return load_tokenizer("tokenizers" if has_file else "byte", directory)


def end_of_text_id(tokenizer: Tokenizer) -> int:
    if isinstance(tokenizer, ByteTokenizer):
        return BYTE_END_OF_TEXT
    token = tokenizer.token_id(END_OF_TEXT)
    if token is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT} token to end documents with "
                         "(titans tokenizer train adds it)")
    return token


def chat_tokens(messages: list[dict], tokenizer: Tokenizer, template: ChatTemplate, eot: int
                ) -> tuple[list[int], list[int]]:
    """A conversation rendered with the template -> (ids, loss mask): 1 on each assistant message's content and the
    template's text after it, and on the token that follows (the next turn's marker, or end-of-text after the
    last): what the model must write to answer and then end its turn."""
    head, tail = template.message.split("{content}", 1) if "{content}" in template.message else (
        template.message, "")
    ids: list[int] = []
    mask: list[int] = []
    ends_turn = False
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ValueError(f"message {number}: expected {{'role': ..., 'content': ...}}, got {message!r}")
        opening = tokenizer.encode(head.format(role=message["role"]))
        ids += opening
        mask += [int(ends_turn)] + [0] * (len(opening) - 1) if opening else []
        body = tokenizer.encode(message["content"] + tail.format(role=message["role"]))
        ends_turn = message["role"] == "assistant"
        ids += body
        mask += [int(ends_turn)] * len(body)
    ids.append(eot)
    mask.append(int(ends_turn))
    return ids, mask


@dataclass(frozen=True)
class CorpusIndex:
    tokenizer: str  # "byte" or "tokenizers" (tokenizer.json beside the index)
    vocab_size: int
    end_of_text: int
    dtype: str
    chat: bool
    splits: dict  # split -> {"shards": [file names], "tokens": n, "documents": n}
    sources: list

    @classmethod
    def load(cls, directory: str | Path) -> CorpusIndex:
        path = Path(directory) / "index.json"
        if not path.exists():
            raise FileNotFoundError(f"{directory} is not a prepared corpus (no index.json): run titans corpus prepare")
        return cls(**json.loads(path.read_text()))


class ShardWriter:
    """Appends documents' tokens (and masks) to numbered shards of about SHARD_TOKENS tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, chat: bool, shard_tokens: int):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.chat, self.shard_tokens = chat, shard_tokens
        self.shards: list[str] = []
        self.tokens = self.documents = 0
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.pending = 0

    def add(self, ids: list[int], mask: list[int] | None) -> None:
        self.ids.append(np.asarray(ids, dtype=self.dtype))
        if self.chat:
            self.masks.append(np.asarray(mask, dtype=np.uint8))
        self.pending += len(ids)
        self.tokens += len(ids)
        self.documents += 1
        if self.pending >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.split}-{len(self.shards):05d}.bin"
        np.concatenate(self.ids).tofile(self.directory / name)
        if self.chat:
            np.concatenate(self.masks).tofile(self.directory / name.replace(".bin", ".mask"))
        self.shards.append(name)
        self.ids, self.masks, self.pending = [], [], 0

    def summary(self) -> dict:
        self.flush()
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents}


def prepare(sources: list[str | Path], out_dir: str | Path, tokenizer_dir: str | Path | None = None,
            heldout: float = 0.01, seed: int = 0, chat: bool = False, text_key: str = "text",
            suffixes: tuple[str, ...] | None = TEXT_SUFFIXES, shuffle_buffer: int = 8192,
            shard_tokens: int = SHARD_TOKENS, log=print) -> CorpusIndex:
    """Tokenize the documents of sources (files or folders) into a prepared corpus at out_dir (see the module
    docstring), with tokenizer_dir's tokenizer.json (and chat_template.json), or bytes without one. Documents are
    shuffled (a seeded buffer of shuffle_buffer) and each goes to the held-out split with probability `heldout`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.bin"), *out.glob("*.mask")]:
        stale.unlink()
    tokenizer = load_corpus_tokenizer(tokenizer_dir)
    for name in ("tokenizer.json", "chat_template.json"):
        source = Path(tokenizer_dir) / name if tokenizer_dir is not None else None
        if source is not None and source.exists() and source.resolve() != (out / name).resolve():
            shutil.copyfile(source, out / name)
    template = ChatTemplate.load(tokenizer_dir)
    eot = end_of_text_id(tokenizer)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    writers = {split: ShardWriter(out, split, dtype, chat, shard_tokens) for split in ("train", "heldout")}
    files = list(iter_files(sources, suffixes))
    if not files:
        raise ValueError(f"no files in {[str(s) for s in sources]} (taking {suffixes})")
    documents = (doc for path in files for doc in iter_documents(path, text_key, chat))
    rng = random.Random(seed)
    for number, doc in enumerate(shuffled(documents, random.Random(seed + 1), shuffle_buffer)):
        if chat:
            ids, mask = chat_tokens(doc, tokenizer, template, eot)
        else:
            ids, mask = tokenizer.encode(doc) + [eot], None
        writers["heldout" if rng.random() < heldout else "train"].add(ids, mask)
        if log and number and number % 10_000 == 0:
            log(f"{number:,} documents, {sum(w.tokens for w in writers.values()):,} tokens")
    index = CorpusIndex(tokenizer="byte" if isinstance(tokenizer, ByteTokenizer) else "tokenizers",
                        vocab_size=tokenizer.vocab_size, end_of_text=eot, dtype=np.dtype(dtype).name, chat=chat,
                        splits={split: w.summary() for split, w in writers.items()},
                        sources=[str(s) for s in sources])
    (out / "index.json").write_text(json.dumps(index.__dict__, indent=2) + "\n")
    return index


class TokenSplit:
    """One split of a prepared corpus as a single memory-mapped stream of tokens (and loss masks)."""

    def __init__(self, directory: str | Path, split: str):
        self.directory = Path(directory)
        self.index = CorpusIndex.load(directory)
        if split not in self.index.splits or not self.index.splits[split]["tokens"]:
            raise ValueError(f"{directory}: the {split} split holds no tokens")
        names = self.index.splits[split]["shards"]
        self.shards = [np.memmap(self.directory / n, dtype=self.index.dtype, mode="r") for n in names]
        self.masks = ([np.memmap(self.directory / n.replace(".bin", ".mask"), dtype=np.uint8, mode="r")
                       for n in names] if self.index.chat else None)
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.tokens = int(self.starts[-1])

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, start + length) as int64 and their loss mask (1 where the loss counts; 0 past the end)."""
        ids = np.full(length, self.index.end_of_text, dtype=np.int64)
        mask = np.zeros(length, dtype=np.float32)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        at = start
        for shard in range(first, len(self.shards)):
            if at >= start + length:
                break
            lo = at - int(self.starts[shard])
            n = min(len(self.shards[shard]) - lo, start + length - at)
            ids[at - start:at - start + n] = self.shards[shard][lo:lo + n]
            mask[at - start:at - start + n] = self.masks[shard][lo:lo + n] if self.masks else 1.0
            at += n
        return ids, mask


class WindowOrder:
    """Which windows of a split each (step, rank) reads: see the module docstring."""

    def __init__(self, tokens: int, seq_len: int, global_batch: int, seed: int):
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.windows = max(1, math.ceil((tokens - 1) / seq_len))
        self._epoch: tuple[int, torch.Tensor] | None = None

    def slots(self, step: int, rank: int, world: int) -> range:
        rows = rank_rows(self.global_batch, rank, world)
        return range(step * self.global_batch + rows.start, step * self.global_batch + rows.stop)

    def window(self, slot: int) -> int:
        epoch, at = divmod(slot, self.windows)
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch = (epoch, torch.randperm(self.windows, generator=generator))
        return int(self._epoch[1][at])

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.windows


def window_batch(split: TokenSplit, windows: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, seq_len + 1] and weights [B, seq_len] (weights[s, i] weighs predicting ids[s, i + 1]) of windows."""
    rows = [split.read(w * seq_len, seq_len + 1) for w in windows]
    ids = torch.from_numpy(np.stack([r[0] for r in rows]))
    weights = torch.from_numpy(np.stack([r[1][1:] for r in rows]))
    return ids, weights


def train_tokenizer(sources: list[str | Path], out_dir: str | Path, vocab_size: int,
                    suffixes: tuple[str, ...] | None = TEXT_SUFFIXES, text_key: str = "text",
                    special: tuple[str, ...] = CHAT_SPECIAL_TOKENS, min_frequency: int = 2) -> Path:
    """A byte-level BPE tokenizer.json learnt from sources' documents, with the special tokens (end-of-text and the
    default chat template's turn markers) as single ids, and the default chat_template.json beside it."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HF(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    documents = (doc for path in iter_files(sources, suffixes) for doc in iter_documents(path, text_key))
    tokenizer.train_from_iterator(documents, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    template = ChatTemplate()
    (out / "chat_template.json").write_text(json.dumps(
        {"message": template.message, "reply": template.reply, "stop": list(template.stop)}, indent=2) + "\n")
    return out / "tokenizer.json"
