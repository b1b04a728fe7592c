"""`titans eval`: recall by distance with the memory carried through snapshot bytes vs reset, bits per byte."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine import Engine
from engine.evaluate import recall_by_distance, recall_summary
from titans.cli import main

from .helpers import tiny


def test_eval_cli_on_a_model_directory(tmp_path, capsys):
    Engine.from_config(tiny("mac"), seed=0, device="cpu").save(tmp_path / "model")
    out, plot = tmp_path / "eval.json", tmp_path / "recall.png"
    assert main(["eval", "--model", str(tmp_path / "model"), "--distances", "0,40", "--facts", "2",
                 "--examples", "3", "--bpb-windows", "1", "--out", str(out), "--plot", str(plot)]) == 0
    result = json.loads(out.read_text())
    assert [r["distance"] for r in result["recall"]] == [0, 40]
    for row in result["recall"]:
        assert row["queries"] == 6 and row["windows"] == row["distance"] / 16
        for key in ("carried_exact", "reset_exact", "carried_digit", "reset_digit"):
            assert 0.0 <= row[key] <= 1.0
        assert row["reset_exact"] == 0.0  # an untrained model answers 4 random digits: chance is 1e-4
    # an untrained byte model is close to uniform over 256 bytes: ~8 bits per byte
    assert 6.0 < result["bits_per_byte"] < 10.0 and math.isfinite(result["bits_per_byte"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bits per byte" in capsys.readouterr().out


def test_recall_is_deterministic_per_seed():
    eng = Engine.from_config(tiny("lmm"), seed=0, device="cpu")
    a = recall_by_distance(eng, [8], n_facts=2, examples=2, seed=3)
    b = recall_by_distance(eng, [8], n_facts=2, examples=2, seed=3)
    assert a == b


def test_plot_training_cli(tmp_path):
    rows = [{"step": s, "loss": 3.0 - s / 100, "stage": [8, 16, 1 if s < 50 else [1, 8]]} for s in range(0, 100, 10)]
    rows[3]["recall"] = {"exact": 0.25, "digit": 0.5}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "loss.png"
    stage = str(tmp_path / "metrics.jsonl")
    assert main(["plot-training", "--metrics", stage, stage, "--out", str(out)]) == 0  # two stages
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recall_summary_breaks_hits_down_by_digit_rank_and_fact():
    # two examples of 3 queries; only the query asking for fact 2 is right, in full, and one more digit
    asked = torch.tensor([[2, 0, 1], [1, 2, 0]])
    carried = torch.zeros(2, 3, 4, dtype=torch.bool)
    carried[0, 0] = carried[1, 1] = True
    carried[0, 1, 3] = True
    row = recall_summary(carried, torch.zeros_like(carried), asked)
    assert row["carried_exact"] == pytest.approx(2 / 6) and row["carried_digit"] == pytest.approx(9 / 24)
    assert row["carried_exact_by_fact"] == [0.0, 0.0, 1.0]
    assert row["carried_exact_by_query_rank"] == [0.5, 0.5, 0.0]
    assert row["carried_digit_by_position"] == pytest.approx([2 / 6, 2 / 6, 2 / 6, 3 / 6])
    assert row["reset_exact"] == row["reset_digit"] == 0.0


def test_recall_breakdowns_add_up_to_the_totals():
    eng = Engine.from_config(tiny("mal"), seed=0, device="cpu")
    for row in recall_by_distance(eng, [8, 24], n_facts=3, examples=4, seed=1):
        places = row["carried_digit_by_position"]
        assert len(places) == 4 and all(0.0 <= p <= 1.0 for p in places)
        assert sum(places) / 4 == pytest.approx(row["carried_digit"])
        for breakdown in ("carried_exact_by_query_rank", "carried_exact_by_fact"):
            assert len(row[breakdown]) == 3 and sum(row[breakdown]) / 3 == pytest.approx(row["carried_exact"])


@pytest.mark.parametrize("mode", ["block", "separate", "updates"])
def test_batched_recall_equals_each_session_read_alone(mode, monkeypatch):
    # recall_by_distance reads the examples of a distance as one batch, in pieces, with a snapshot round trip
    # after every request: the hits must be those of each example read alone, in one call per request
    import random

    import engine.evaluate as evaluate

    monkeypatch.setattr(evaluate, "PIECE", 48)  # several pieces per request
    monkeypatch.setattr(evaluate, "SEPARATE_FILLER", (20, 70))
    eng = Engine.from_config(tiny("mal"), seed=1, device="cpu")
    rows = recall_by_distance(eng, [0, 100], n_facts=3, examples=3, filler_source="logs", seed=2, mode=mode)
    for row in rows:
        rng = random.Random(2 * 7919 + row["distance"])
        spread = [rng.randint(20, 70) for _ in range(3)] if mode == "separate" else []
        carried, reset, asked = [], [], []
        for _ in range(3):
            ex, requests = evaluate._example(rng, mode, 3, row["distance"], "logs", spread)
            assert len(requests) == (3 + (row["distance"] > 0) if mode == "separate" else 1)
            state = eng.new_state()
            for request in requests:
                state = eng.load_state(eng.forward(eng.tokenizer.encode(request), state)[1].to_bytes())
            q = torch.tensor(eng.tokenizer.encode(ex.text[sum(map(len, requests)):]))
            spans = [(a - len(ex.text) + len(q), b - len(ex.text) + len(q)) for a, b in ex.answer_spans]
            carried.append(evaluate.answer_hits(eng.forward(q, state)[0], q, spans))
            reset.append(evaluate.answer_hits(eng.forward(q, eng.new_state())[0], q, spans))
            asked.append(ex.fact_of_query)
        expected = recall_summary(torch.stack(carried), torch.stack(reset), torch.tensor(asked))
        assert {k: row[k] for k in expected} == expected
        assert row["mode"] == mode and row["filler"] == "logs"


def test_eval_cli_over_filler_kinds_with_progress(tmp_path, capsys):
    Engine.from_config(tiny("mal"), seed=0, device="cpu").save(tmp_path / "model")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "model"), "--distances", "0,1K", "--facts", "2", "--examples",
                 "2", "--filler", "all", "--updates", "--bpb-windows", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "updates" and result["filler"] == ["words", "prose", "code", "logs"]
    assert [(r["filler"], r["distance"]) for r in result["recall"]] == [
        (kind, d) for kind in result["filler"] for d in (0, 1024)]
    assert all("updated_exact" in r for r in result["recall"]) and result["bits_per_byte_prose"] > 4.0
    printed = capsys.readouterr()
    assert "ETA" in printed.err and "done:" in printed.err
    assert "prose" in printed.out and "updates" in printed.out
    with pytest.raises(SystemExit, match="unknown filler"):
        main(["eval", "--model", str(tmp_path / "model"), "--filler", "poetry", "--out", str(out)])
