"""The training data pipeline: prepared corpora hold every document once, and the ranks of a run read every window
of an epoch once between them, the same windows for a step whatever their number, from the step alone (resume)."""

import json
from pathlib import Path

import numpy as np
import pytest

from engine.corpus import (
    CHAT_SPECIAL_TOKENS,
    TokenSplit,
    WindowOrder,
    chat_tokens,
    load_corpus_tokenizer,
    prepare,
    train_tokenizer,
    window_batch,
)
from engine.tokenizer import ByteTokenizer, ChatTemplate

STDLIB_JSON = Path(json.__file__).parent


def documents(tmp_path: Path, n: int = 60) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(n):
        (folder / f"doc{i:03d}.txt").write_text(f"document {i}: " + "word " * (i % 17 + 1))
    return folder


def split_documents(directory: Path, split: str) -> list[str]:
    data = TokenSplit(directory, split)
    ids, _ = data.read(0, data.tokens)
    return [bytes(part.astype(np.uint8)).decode() for part in np.split(ids, np.flatnonzero(ids == 0) + 1)[:-1]]


def test_a_prepared_corpus_holds_every_document_once_shuffled_by_its_seed(tmp_path):
    source = documents(tmp_path)
    first = prepare([source], tmp_path / "a", heldout=0.2, seed=1, shuffle_buffer=8, shard_tokens=200, log=None)
    assert len(first.splits["train"]["shards"]) > 2  # documents cross shard boundaries
    train, heldout = split_documents(tmp_path / "a", "train"), split_documents(tmp_path / "a", "heldout")
    originals = sorted(p.read_text() + "\0" for p in source.iterdir())
    assert sorted(train + heldout) == originals
    assert heldout and train
    assert first.splits["train"]["documents"] == len(train)
    prepare([source], tmp_path / "b", heldout=0.2, seed=1, shuffle_buffer=8, shard_tokens=200, log=None)
    assert split_documents(tmp_path / "b", "train") == train  # deterministic
    prepare([source], tmp_path / "c", heldout=0.2, seed=2, shuffle_buffer=8, shard_tokens=200, log=None)
    assert split_documents(tmp_path / "c", "train") != train
    assert train != sorted(train)  # shuffled, not in file order


@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_ranks_read_each_window_of_an_epoch_once_and_the_same_windows_as_one_process(world):
    windows, batch = 37, 8
    order = WindowOrder(tokens=windows * 16 + 1, seq_len=16, global_batch=batch, seed=5)
    assert order.windows == windows
    alone = WindowOrder(tokens=windows * 16 + 1, seq_len=16, global_batch=batch, seed=5)
    read = []
    for step in range(windows // batch):
        per_rank = [[order.window(s) for s in order.slots(step, rank, world)] for rank in range(world)]
        assert sum(per_rank, []) == [alone.window(s) for s in alone.slots(step, 0, 1)]
        read += sum(per_rank, [])
    assert len(set(read)) == len(read)  # nothing twice within the epoch
    epoch = [order.window(s) for s in range(windows)]
    assert sorted(epoch) == list(range(windows))  # and everything once
    assert [order.window(s) for s in range(windows, 2 * windows)] != epoch  # each epoch its own order


def test_a_resumed_run_reads_what_the_uninterrupted_one_would():
    going = WindowOrder(tokens=1000, seq_len=16, global_batch=4, seed=0)
    seen = {step: [going.window(s) for s in going.slots(step, 1, 2)] for step in range(40)}  # crosses epochs
    resumed = WindowOrder(tokens=1000, seq_len=16, global_batch=4, seed=0)
    assert all([resumed.window(s) for s in resumed.slots(step, 1, 2)] == seen[step] for step in range(25, 40))


def test_windows_cover_the_stream_every_token_a_target_once(tmp_path):
    prepare([documents(tmp_path)], tmp_path / "c", heldout=0.0, shard_tokens=100, log=None)
    split = TokenSplit(tmp_path / "c", "train")
    order = WindowOrder(split.tokens, seq_len=24, global_batch=1, seed=0)
    ids, weights = window_batch(split, list(range(order.windows)), 24)
    targets = ids[:, 1:][weights > 0]
    stream, _ = split.read(0, split.tokens)
    assert targets.tolist() == stream[1:].tolist()
    assert weights.sum() == split.tokens - 1  # the last window's tail past the end is padding, weighted 0


def test_jsonl_and_parquet_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(5)) + "\n")
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(4)]}), tmp_path / "b.parquet")
    prepare([tmp_path / "a.jsonl", tmp_path / "b.parquet"], tmp_path / "out", heldout=0.0, log=None)
    assert sorted(split_documents(tmp_path / "out", "train")) == sorted(
        [f"line {i}\0" for i in range(5)] + [f"row {i}\0" for i in range(4)])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: no 'text' field"):
        prepare([tmp_path / "bad.jsonl"], tmp_path / "bad", log=None)


def test_a_bpe_tokenizer_learnt_from_a_corpus_keeps_its_markers_whole(tmp_path):
    path = train_tokenizer([STDLIB_JSON], tmp_path / "tok", vocab_size=600)
    tokenizer = load_corpus_tokenizer(path.parent)
    assert tokenizer.vocab_size == 600
    text = "<|user|>\nWhat does json.dumps do?\n<|assistant|>\nSerialize obj to a JSON formatted str.<|endoftext|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    for marker in CHAT_SPECIAL_TOKENS:
        assert tokenizer.encode(marker) == [tokenizer.token_id(marker)]
    assert len(ids) < len(text.encode()) / 2  # merges learnt from the corpus
    assert ChatTemplate.load(path.parent) == ChatTemplate()


def test_a_chat_corpus_counts_the_loss_on_the_assistants_turns_and_their_ends(tmp_path):
    tok = ByteTokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "ok"}]
    ids, mask = chat_tokens(messages, tok, ChatTemplate(), eot=0)
    text = bytes(ids[:-1]).decode()
    template = ChatTemplate()
    assert text == template.render([(m["role"], m["content"]) for m in messages]).removesuffix(template.reply)
    learnt = "".join(chr(i) if i else "<EOT>" for i, m in zip(ids, mask) if m)
    assert learnt == "yo\n<ok\n<EOT>"  # each answer, its newline, and the first token of what ends the turn
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    prepare([tmp_path / "chat.jsonl"], tmp_path / "out", heldout=0.0, chat=True, log=None)
    split = TokenSplit(tmp_path / "out", "train")
    stored, stored_mask = split.read(0, split.tokens)
    assert stored.tolist() == ids and stored_mask.tolist() == mask
