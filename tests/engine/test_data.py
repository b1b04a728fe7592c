"""Recall examples and filler: every filler kind, held-out sources kept apart, updates and facts told apart."""

from __future__ import annotations

import random

import pytest

from engine.data import FACT_BYTES, FILLER_KINDS, filler, log_lines, prose_corpus, python_corpus, recall_example


@pytest.mark.parametrize("kind", FILLER_KINDS)
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_filler_kind_gives_its_length(kind, split):
    for length in (0, 1, 37, 5000):
        text = filler(random.Random(length), length, kind, split)
        assert length - 1 <= len(text) <= length and text.isascii()  # words may end one byte short
    with pytest.raises(ValueError, match="filler kind"):
        filler(random.Random(0), 8, "poetry")


def test_a_filler_longer_than_its_corpus_is_made_of_windows():
    held_out = prose_corpus("heldout")
    text = filler(random.Random(0), 3 * len(held_out), "prose", "heldout")
    assert len(text) == 3 * len(held_out)


def test_held_out_text_is_not_training_text():
    for corpus in (prose_corpus, python_corpus):
        train, held_out = corpus("train"), corpus("heldout")
        assert len(held_out) > 65536  # enough for a 64 KB point without repeating a window
        probes = [held_out[i:i + 200] for i in range(0, len(held_out) - 200, len(held_out) // 20)]
        assert sum(p in train for p in probes) <= 2, corpus  # short shared passages (licence lines) at most
    train_logs, held_logs = log_lines(random.Random(0), 20000, "train"), log_lines(random.Random(0), 20000, "heldout")
    services = lambda text: {line.split('"svc":"')[1].split('"')[0] for line in text.splitlines()[:-1]}  # noqa: E731
    assert services(train_logs).isdisjoint(services(held_logs))


def test_a_fact_told_again_answers_its_new_value():
    ex = recall_example(random.Random(4), n_facts=4, distance=100, filler_source="code", updates=3, update_at=40)
    assert sum(ex.updated) == 3 and ex.distance == 60
    for (a, b), updated in zip(ex.answer_spans, ex.updated):
        key, value = ex.text[a - 5:a - 1], ex.text[a:b]
        told = [i for i in range(len(ex.text)) if ex.text.startswith(f"#{key}=", i)][:-1]  # not the query itself
        assert len(told) == (2 if updated else 1)
        assert ex.text[told[-1] + 6:told[-1] + 10] == value  # the last value told is the answer
        if updated:
            assert ex.text[told[0] + 6:told[0] + 10] != value and 4 * FACT_BYTES + 40 <= told[1] < 7 * FACT_BYTES + 40
    plain = recall_example(random.Random(4), n_facts=4, distance=100, filler_source="code")
    assert plain.updated == [False] * 4 and plain.requests == []


def test_facts_told_in_separate_requests():
    ex = recall_example(random.Random(1), n_facts=3, distance=20, filler_source="logs", spread=[300, 500, 700])
    assert ex.requests == [311, 311 + 511, 311 + 511 + 711]
    for start in [0] + ex.requests[:-1]:
        assert ex.text[start] == "#" and ex.text[start + FACT_BYTES - 1] == ";"
    assert ex.distance == 700 + 20
    first_query = ex.answer_spans[0][0] - 6
    assert first_query == ex.requests[-1] + 20
    drawn = recall_example(random.Random(1), n_facts=3, distance=20, spread=(10, 30))
    assert all(10 + FACT_BYTES <= b - a <= 30 + FACT_BYTES for a, b in zip([0] + drawn.requests, drawn.requests))


def test_a_list_of_kinds_draws_one_per_example():
    kinds = {recall_example(random.Random(seed), 1, 400, ["words", "logs"]).text[11:13] for seed in range(12)}
    assert '{"' in kinds and len(kinds) > 1  # some examples got logs, others words
