"""The shipped default model really carries facts through its memory (model card: models/titans-mal-recall).

Facts are placed at least 4 attention windows before the queries, so attention cannot see them; the session
state goes through to_bytes/load_state in between (as between two requests). The thresholds sit well below the
numbers measured for the model card and well above what a broken memory path gives (reset: chance, ~0)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine import Engine
from engine.evaluate import recall_by_distance
from server.settings import DEFAULT_MODEL
from titans.cli import main

# exact recall (4 digits), by number of facts, at the distances (in attention windows) checked below; the measured
# values are in the model card ("Evaluation": one fact at 8-16 bytes and beyond, 8 facts at 64-128 bytes). The
# long-context stages took 8 facts at short distances down (issue 23 tracks getting them back), so the bar for 8
# facts is lower than for one. A broken memory path gives ~0 (the reset control)
CARRIED_AT_LEAST = {1: 0.85, 8: 0.6}
WINDOWS = {1: (8, 16), 8: (4, 8)}
RESET_AT_MOST = 0.05
FAR_AT_LEAST = 0.4  # 8 facts after 16 KB of held-out prose (the card's 16 KB row)


@pytest.fixture(scope="module")
def shipped():
    return Engine.load(DEFAULT_MODEL)


def test_the_shipped_model_is_what_the_card_says(shipped):
    cfg = shipped.config
    assert (cfg.variant, cfg.window, cfg.tokenizer) == ("mal", 16, "byte")
    assert sum(p.numel() for p in shipped.model.parameters()) < 50e6 / 4  # the 50 MB budget, fp32
    assert (DEFAULT_MODEL / "README.md").exists() and (DEFAULT_MODEL / "loss.png").exists()


@pytest.mark.parametrize("n_facts", [1, 8])
def test_recall_beyond_attention_comes_from_the_memory(shipped, n_facts):
    window = shipped.config.window
    rows = recall_by_distance(shipped, [w * window for w in WINDOWS[n_facts]], n_facts=n_facts,
                              examples=12 if n_facts == 8 else 24, seed=11)
    for row in rows:
        assert row["windows"] >= 4
        assert row["carried_exact"] >= CARRIED_AT_LEAST[n_facts], row
        assert row["reset_exact"] <= RESET_AT_MOST, row


def test_a_fact_told_just_before_its_query_is_recalled(shipped):
    # half a window to a window of filler: the fact's digits are just past attention, and the memory has only
    # written them a chunk or two ago (a model trained on 16+ bytes only got 0.03 and 0.19 here)
    rows = recall_by_distance(shipped, [8, 16], n_facts=1, examples=24, seed=11)
    for row in rows:
        assert row["carried_exact"] >= CARRIED_AT_LEAST[1], row
        assert row["reset_exact"] <= RESET_AT_MOST, row


def test_facts_outlast_16_kb_of_other_text(shipped):
    # far past what a sliding window or a forgetting memory keeps: the model before the long-context stages
    # recalled 0.00-0.02 of 8 facts here, any filler kind
    rows = recall_by_distance(shipped, [16384], n_facts=8, examples=8, filler_source="prose", seed=11)
    assert rows[0]["carried_exact"] >= FAR_AT_LEAST, rows[0]
    assert rows[0]["reset_exact"] <= RESET_AT_MOST, rows[0]


def test_two_requests_give_the_logits_of_one_to_fp32_rounding(shipped):
    # the README's promise: memorize(A) then memorize(B) is memorize(A + B). Exact in float64 (test_invariants);
    # in fp32 the sums of other pieces round otherwise, far below this bound
    from engine.data import filler

    ids = shipped.tokenizer.encode(filler(random.Random(3), 3000, "prose", "heldout"))
    probe = shipped.tokenizer.encode("#abcd=")
    _, whole = shipped.forward(ids, shipped.new_state())
    _, first = shipped.forward(ids[:1503], shipped.new_state())
    _, both = shipped.forward(ids[1503:], shipped.load_state(first.to_bytes()))
    assert both.tokens_seen == whole.tokens_seen
    torch.testing.assert_close(shipped.forward(probe, both)[0], shipped.forward(probe, whole)[0], atol=1e-4, rtol=0)


def test_titans_eval_runs_on_the_shipped_model(tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(DEFAULT_MODEL), "--distances", "64", "--facts", "2", "--examples", "4",
                 "--bpb-windows", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["recall"][0]["windows"] == 4.0 and result["bits_per_byte"] < 6.0
