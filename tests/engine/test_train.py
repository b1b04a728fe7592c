"""Training: a short CPU run lowers the loss by a real margin; resume is exact; the result loads in Engine."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from engine import Engine, ModelConfig
from engine.compiled import compile_training_steps
from engine.data import recall_example
from engine.train import TrainConfig, lr_at, train

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path, **overrides) -> TrainConfig:
    base = dict(model={"preset": "tiny-lmm"}, out_dir=str(tmp_path / "run"), steps=40, batch_size=8, seq_len=96,
                lr=3e-3, warmup=5, n_facts=2, curriculum=[[0, 0, 8]], log_every=1, eval_every=0,
                checkpoint_every=0)
    return TrainConfig(**{**base, **overrides})


def test_short_training_lowers_the_loss(tmp_path):
    cfg = _config(tmp_path)
    train(cfg, resume=False, log=lambda _: None)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 5.0  # ~ln(256) at initialisation
    assert last < first - 1.5, (first, last)  # measured: ~5.5 -> ~3.0
    eng = Engine.load(tmp_path / "run", device="cpu")
    assert eng.complete([35, 97], eng.new_state()).finish_reason == "length"


def test_resume_continues_exactly(tmp_path):
    straight = _config(tmp_path / "a", steps=6, threads=1)
    train(straight, resume=False, log=lambda _: None)
    first_half = _config(tmp_path / "b", steps=3, threads=1)
    train(first_half, resume=False, log=lambda _: None)
    train(_config(tmp_path / "b", steps=6, threads=1), resume=True, log=lambda _: None)
    a = load_file(str(tmp_path / "a" / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)  # to the bit
    # a changed recipe does not silently continue (or count as done) the run its out_dir holds
    with pytest.raises(ValueError, match="another training config .*'lr'"):
        train(_config(tmp_path / "b", steps=6, threads=1, lr=1e-4), resume=True, log=lambda _: None)
    with pytest.raises(ValueError, match="another training config .*'model'"):
        train(_config(tmp_path / "b", steps=6, threads=1, model={"preset": "tiny-lmm", "window": 8}),
              log=lambda _: None)
    # the same model spelt otherwise (its preset's value written out) is the same run
    train(_config(tmp_path / "b", steps=6, threads=1, model={"preset": "tiny-lmm", "chunk_size": 4}),
          log=lambda _: None)
    train(_config(tmp_path / "b", steps=6, threads=1, lr=1e-4), resume=False, log=lambda _: None)  # --restart



def test_steps_with_an_exploding_gradient_are_skipped(tmp_path):
    from engine.model import Titans

    # a bound no gradient is under: every step is skipped, so the weights stay the initialisation's, and the
    # count survives a resume
    skip_all = dict(steps=4, threads=1, skip_grad_norm_above=1e-12, checkpoint_every=2)
    train(_config(tmp_path, **{**skip_all, "steps": 2}), resume=False, log=lambda _: None)
    cfg = _config(tmp_path, **skip_all)
    train(cfg, resume=True, log=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [1, 2, 3, 4]
    torch.manual_seed(cfg.seed)
    initial = Titans(cfg.model_config()).state_dict()
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(initial[name], trained[name]) for name in trained)
    # a bound every gradient is under changes nothing: the same run as without one, to the bit
    train(_config(tmp_path / "a", steps=3, threads=1, skip_grad_norm_above=1e12), resume=False, log=lambda _: None)
    train(_config(tmp_path / "b", steps=3, threads=1), resume=False, log=lambda _: None)
    a = load_file(str(tmp_path / "a" / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_state_gradient_bound_reaches_the_memories(tmp_path):
    def weights_after(name, **options):
        train(_config(tmp_path / name, steps=2, threads=1, **options), resume=False, log=lambda _: None)
        return load_file(str(tmp_path / name / "run" / "model.safetensors"))

    free, loose, tight = weights_after("free"), weights_after("loose", state_grad_bound=1e12), \
        weights_after("tight", state_grad_bound=1e-9)
    assert all(torch.equal(free[name], loose[name]) for name in free)
    assert not all(torch.equal(free[name], tight[name]) for name in free)


def _stages(run_dir) -> list[tuple[int, list, int | None]]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["stage"], r.get("held")) for r in rows]


def test_a_stage_goes_on_until_learnt(tmp_path, monkeypatch):
    import engine.train as train_module

    # advance_at: a stage ends only once held-out recall reached it; later stages move back by the steps held
    plan = dict(model={"preset": "tiny-mal"}, steps=8, n_facts=1, recall_fraction=1.0, curriculum=[
        [0, 8, 8], [3, 16, 16], [5, 24, 24]], eval_every=2, eval_examples=2, checkpoint_every=4, threads=1)
    train(_config(tmp_path / "fixed", **plan), resume=False, log=lambda _: None)
    assert [s for _, s, _ in _stages(tmp_path / "fixed" / "run")] == [[8, 8, 1]] * 3 + [[16, 16, 1]] * 2 + [
        [24, 24, 1]] * 3
    # a bar no recall reaches (exact <= 1): the first stage never ends, and says how long it was held
    never = _config(tmp_path / "never", advance_at=1.01, **plan)
    train(never, resume=False, log=lambda _: None)
    assert _stages(tmp_path / "never" / "run") == [(i, [8, 8, 1], max(0, i - 2)) for i in range(8)]
    # evals that read 0, 0.5, 0.9, 0.9 (steps 0, 2, 4, 6; 7) against a bar of 0.8: the first stage, due to end at
    # step 3, goes on until the eval of step 4 passes; the second starts at step 5 and ends as planned, 2 steps on
    # (its own eval, at step 6, passed). A tiny random model's recall cannot be steered, so these evals are given
    evals = iter([0.0, 0.5, 0.9, 0.9, 0.9])  # and the last step's
    monkeypatch.setattr(train_module, "recall_accuracy", lambda *_: {"exact": next(evals), "digit": 0.0})
    train(_config(tmp_path / "scripted", advance_at=0.8, **plan), resume=False, log=lambda _: None)
    assert _stages(tmp_path / "scripted" / "run") == [
        (0, [8, 8, 1], 0), (1, [8, 8, 1], 0), (2, [8, 8, 1], 0), (3, [8, 8, 1], 1), (4, [8, 8, 1], 2),
        (5, [16, 16, 1], 2), (6, [16, 16, 1], 2), (7, [24, 24, 1], 2)]
    monkeypatch.undo()
    # stopped at step 4 (a checkpoint) and resumed: the same run, held steps included
    train(_config(tmp_path / "resumed", advance_at=1.01, **{**plan, "steps": 4}), resume=False, log=lambda _: None)
    train(_config(tmp_path / "resumed", advance_at=1.01, **plan), resume=True, log=lambda _: None)
    assert _stages(tmp_path / "resumed" / "run") == _stages(tmp_path / "never" / "run")
    a = load_file(str(tmp_path / "never" / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "run" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)

def test_threads_hold_for_the_run_only(tmp_path):
    before = torch.get_num_threads()
    during = []
    train(_config(tmp_path, steps=2, threads=1), resume=False, log=lambda _: during.append(torch.get_num_threads()))
    assert during and set(during) == {1} and torch.get_num_threads() == before


def test_a_later_stage_starts_from_init_from(tmp_path):
    first = _config(tmp_path / "a", steps=3)
    train(first, resume=False, log=lambda _: None)
    # lr 0: a stage that starts from the first stage's weights ends with them
    frozen = _config(tmp_path / "b", steps=2, lr=0.0, seed=5, init_from=first.out_dir)
    train(frozen, log=lambda _: None)
    a = load_file(str(Path(first.out_dir) / "model.safetensors"))
    b = load_file(str(Path(frozen.out_dir) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    moving = _config(tmp_path / "c", steps=2, init_from=first.out_dir)
    train(moving, log=lambda _: None)
    c = load_file(str(Path(moving.out_dir) / "model.safetensors"))
    assert not all(torch.equal(a[name], c[name]) for name in a)
    with pytest.raises(ValueError, match="model config differs"):
        train(_config(tmp_path / "d", model={"preset": "tiny-mal"}, init_from=first.out_dir), log=lambda _: None)


def test_schedule_and_recall_format():
    cfg = TrainConfig(model={"preset": "tiny-mac"}, steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == 0.1 and lr_at(cfg, 9) == 1.0
    assert abs(lr_at(cfg, 99) - 0.1) < 1e-3 and lr_at(cfg, 50) < lr_at(cfg, 20)
    staged = TrainConfig(model={"preset": "tiny-lmm"}, n_facts=8, curriculum=[[0, 0, 0], [10, 8, 24, 1], [20, 8, 64]])
    assert [staged.stage(s) for s in (0, 9, 10, 19, 20, 99)] == [
        (0, 0, 8), (0, 0, 8), (8, 24, 1), (8, 24, 1), (8, 64, 8), (8, 64, 8)]
    ex = recall_example(random.Random(0), n_facts=3, distance=50)
    facts = ex.text[:33]
    assert facts.count("#") == 3 and facts.count(";") == 3
    assert sorted(ex.fact_of_query) == [0, 1, 2]
    for (a, b), fact in zip(ex.answer_spans, ex.fact_of_query):
        key = ex.text[a - 5:a - 1]
        assert ex.text[a - 6] == "#" and ex.text[a - 1] == "=" and ex.text[a:b].isdigit()
        assert facts[11 * fact:11 * (fact + 1)] == f"#{key}={ex.text[a:b]};"  # the value stored for that key
    assert ex.distance == 50 and len(ex.text) == 33 + 50 + 3 * 11



def test_query_gaps():
    # training may put filler before every query but the first, so that no query sees another answered in the
    # attention window; the answers stay where the spans say, and a config without gaps draws what it always drew
    from engine.tokenizer import load_tokenizer
    from engine.train import make_batch

    ex = recall_example(random.Random(0), n_facts=3, distance=50, query_gap=24)
    queries = ex.text[33 + 50:]
    assert len(queries) == 3 * 11 + 2 * 24
    for rank, ((a, b), fact) in enumerate(zip(ex.answer_spans, ex.fact_of_query)):
        assert a - 6 == 33 + 50 + rank * (11 + 24) and ex.text[a - 6] == "#"
        assert ex.text[11 * fact:11 * (fact + 1)] == ex.text[a - 6:b + 1]  # the stored fact, asked
        if rank:
            assert not any(c in "#=;" or c.isdigit() for c in ex.text[a - 30:a - 6])  # filler only
    plain = recall_example(random.Random(0), n_facts=3, distance=50)
    assert plain.text == recall_example(random.Random(0), n_facts=3, distance=50, query_gap=0).text
    tok = load_tokenizer("byte", None)
    base = TrainConfig(model={"preset": "tiny-mal"}, batch_size=8, recall_fraction=1.0, n_facts=3,
                       curriculum=[[0, 16, 32]])
    off, on = make_batch(base, 0, random.Random(2), tok), make_batch(
        dataclasses.replace(base, query_gap=24, query_gap_share=0.5), 0, random.Random(2), tok)
    assert torch.equal(make_batch(dataclasses.replace(base, query_gap_share=0.5), 0, random.Random(2), tok)[0], off[0])
    assert on[0].shape[1] > off[0].shape[1]  # some rows gapped
    assert all(float(w.sum()) == 3 * 4 * base.answer_weight + float((w == 1).sum()) for w in on[1])


def test_a_stage_may_draw_its_fact_count():
    # [fewest, most] facts per example: every count in the range comes up, each row holds that many facts and
    # answers; a malformed stage is refused when the config is made
    from engine.tokenizer import load_tokenizer
    from engine.train import make_batch

    tok = load_tokenizer("byte", None)
    cfg = TrainConfig(model={"preset": "tiny-mal"}, batch_size=32, recall_fraction=1.0, curriculum=[[0, 0, 4, [1, 3]]])
    assert cfg.stage(0) == (0, 4, [1, 3])
    ids, weights = make_batch(cfg, 0, random.Random(0), tok)
    counts = []
    for row, w in zip(ids, weights):
        text = bytes(row[row > 0].tolist()).decode()
        answers = int((w == cfg.answer_weight).sum()) // 4
        counts.append(answers)
        assert text.count(";") == 2 * answers  # each fact, and each answered query, ends in ';'
    assert set(counts) == {1, 2, 3}
    for bad in ([[0, 0, 4, [3, 1]]], [[0, 0, 4, 0]], [[0, 8, 4]], [[0, 0, 4, [1, 2, 3]]], [[0, 4]]):
        with pytest.raises(ValueError, match="curriculum stage"):
            TrainConfig(model={"preset": "tiny-mal"}, curriculum=bad)


def test_config_files_json_and_yaml(tmp_path):
    import yaml

    spec = {"model": {"preset": "tiny-lmm"}, "steps": 3, "curriculum": [[0, 8, 16, 1]], "n_facts": 2}
    (tmp_path / "c.json").write_text(json.dumps(spec))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    assert TrainConfig.load(tmp_path / "c.json") == TrainConfig.load(tmp_path / "c.yaml")
    (tmp_path / "bad.json").write_text(json.dumps({**spec, "stpes": 5}))
    with pytest.raises(ValueError, match="stpes"):
        TrainConfig.load(tmp_path / "bad.json")
    # every checked-in recipe loads and builds its model; a corpus recipe's corpus is made by a script and absent on
    # a fresh checkout, so it builds on a small prepared corpus in its place
    from engine.corpus import prepare
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("the memory learns while it reads. " * 40)
    corpus = prepare([tmp_path / "docs"], tmp_path / "corpus", heldout=0.0, log=lambda *_: None)
    for shipped in (ROOT / "configs").glob("*.json"):
        recipe = TrainConfig.load(shipped)
        if recipe.data:
            recipe = dataclasses.replace(recipe, data=str(tmp_path / "corpus"))
        assert recipe.model_config().vocab_size >= corpus.vocab_size


def test_padded_batch_is_the_loss_of_each_sequence_alone():
    # make_batch pads every sequence (id 0, weight 0) to one length, so that training runs long aligned steps;
    # padding after a sequence's end must change nothing: the same weighted loss as each sequence run alone
    from engine.model import Titans
    from engine.tokenizer import load_tokenizer
    from engine.train import batch_loss, fresh_state, make_batch, sequence_lengths

    cfg = TrainConfig(model={"preset": "tiny-mal"}, batch_size=6, seq_len=40, recall_fraction=0.5, n_facts=2,
                      curriculum=[[0, 8, 70]], answer_weight=4.0)
    torch.manual_seed(0)
    model = Titans(cfg.model_config())
    chunk = model.cfg.chunk_size
    ids, weights = make_batch(cfg, 0, random.Random(3), load_tokenizer("byte", None), chunk)
    lengths = sequence_lengths(weights)
    model.requires_grad_(False)
    assert ids.shape[1] % chunk == 0 and len(set(lengths)) > 1 and max(lengths) > ids.shape[1] - chunk
    total = norm = 0.0
    for seq, w, n in zip(ids, weights, lengths):
        assert not seq[n:].any()
        logits = model.forward_tokens([seq[:n]], fresh_state(model, 1), [0])[0][0]  # [n, V], this sequence alone
        total += float((F.cross_entropy(logits[:-1], seq[1:n], reduction="none") * w[:n - 1]).sum())
        norm += float(w.sum())
    torch.testing.assert_close(float(batch_loss(model, ids, weights)), total / norm, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    # compiled.compile_training_steps: the memory's chunk step through torch.compile, differentiated through;
    # same loss and gradients as eager, and the compiled graph is really the one used. In float64: in fp32 the
    # memory's dynamics amplify the two paths' different rounding to ~1e-3 of upstream gradients (both paths
    # agree with each other to ~2e-12 in float64, so that is rounding, not a different gradient)
    from engine.model import Titans
    from engine.tokenizer import load_tokenizer
    from engine.train import batch_loss, make_batch

    cfg = TrainConfig(model={"preset": "tiny-mal"}, batch_size=4, seq_len=64, recall_fraction=0.5, n_facts=2,
                      curriculum=[[0, 16, 48]])
    torch.manual_seed(0)
    eager = Titans(cfg.model_config()).double()
    compiled = Titans(cfg.model_config()).double()
    compiled.load_state_dict(eager.state_dict())
    compile_training_steps(compiled)
    calls = []
    for memory in compiled.memories():
        step = memory.compiled_training_step
        memory.compiled_training_step = lambda *a, _step=step, **k: calls.append(1) or _step(*a, **k)
    ids, weights = make_batch(cfg, 0, random.Random(1), load_tokenizer("byte", None), eager.cfg.chunk_size)
    losses = []
    for model in (eager, compiled):
        loss = batch_loss(model, ids, weights.double())
        loss.backward()
        losses.append(float(loss.detach()))
    assert calls
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        error = float((b.grad - a.grad).norm() / a.grad.norm())  # per tensor, relative to its norm
        assert error < 1e-9, (name, error)


def test_a_carried_prefix_changes_no_value_only_where_gradients_flow():
    # truncated backprop: the prefix is read without gradients and its state carried on; the loss of the trained
    # part is the loss a full forward gives there, to rounding, and only the trained part's ids are weighted
    from engine.model import Titans
    from engine.tokenizer import load_tokenizer
    from engine.train import batch_loss, carried_bytes, make_batch

    cfg = TrainConfig(model={"preset": "tiny-mal"}, batch_size=4, seq_len=40, recall_fraction=0.5, n_facts=2,
                      filler=["words", "logs"], updates_share=0.5, carry_share=1.0, carry_bytes=[64, 64],
                      carry_graded=24)
    tok = load_tokenizer("byte", None)
    rng = random.Random(5)
    carried = carried_bytes(cfg, rng, 8)
    assert carried == 64
    ids, weights = make_batch(cfg, 0, rng, tok, 8, carried)
    assert ids.shape[1] % 8 == 0 and ids.shape[1] > carried
    assert float(weights[:, :carried].abs().sum()) == 0.0 and all(float(w[carried:].sum()) > 0 for w in weights)
    for row in ids:  # a recall row's prefix has its facts and no query: every query is in the trained part
        text = tok.decode(row.tolist()).rstrip("\0")
        if text.startswith("#"):
            assert text[:carried].count("#") in (2, 3, 4) and text[carried:].count("=") >= 2
    torch.manual_seed(0)
    model = Titans(cfg.model_config())
    with torch.no_grad():
        full = batch_loss(model, ids, torch.cat([torch.zeros(4, carried), weights[:, carried:]], 1))
    loss = batch_loss(model, ids, weights, carried)
    assert torch.allclose(loss, full, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "init_weights" not in n)
    assert carried_bytes(dataclasses.replace(cfg, carry_share=0.0), random.Random(5), 8) == 0


def test_near_queries_and_updates_in_training_batches():
    from engine.tokenizer import load_tokenizer
    from engine.train import make_batch

    tok = load_tokenizer("byte", None)
    base = TrainConfig(model={"preset": "tiny-mal"}, batch_size=16, recall_fraction=1.0, n_facts=1,
                       curriculum=[[0, 40, 40]])
    near = make_batch(dataclasses.replace(base, near_share=1.0), 0, random.Random(1), tok)[0]
    assert all(tok.decode(row[11:15].tolist()) == tok.decode(row[:4].tolist()) for row in near)  # queried at once
    updated = make_batch(dataclasses.replace(base, updates_share=1.0), 0, random.Random(1), tok)[0]
    texts = [tok.decode(row.tolist()).rstrip("\0") for row in updated]
    assert all(t.count(t[:6]) == 3 and t[-5:-1] == t[t.rindex(t[:6], 0, len(t) - 11) + 6:][:4] for t in texts)


def test_facts_told_apart_in_training_batches():
    # spread_share: each fact followed by filler of its own; in a carried batch, inside the prefix (the queries
    # stay in the trained part)
    from engine.tokenizer import load_tokenizer
    from engine.train import make_batch

    tok = load_tokenizer("byte", None)
    cfg = TrainConfig(model={"preset": "tiny-mal"}, batch_size=8, recall_fraction=1.0, n_facts=3, filler="logs",
                      curriculum=[[0, 20, 20]], spread_share=1.0, spread_bytes=[30, 30], carry_graded=24)
    short = [tok.decode(r.tolist()).rstrip("\0") for r in make_batch(cfg, 0, random.Random(3), tok)[0]]
    assert all(t[0] == "#" and t[41] == "#" and t[82] == "#" and t[11:41].startswith('{"ts"') for t in short)
    ids, weights = make_batch(cfg, 0, random.Random(3), tok, 8, 512)
    for row in ids:
        text = tok.decode(row.tolist()).rstrip("\0")
        starts = [i for i in range(len(text)) if text.startswith("#", i)]
        assert len(starts) == 6 and starts[2] < 512 <= starts[3]  # 3 facts in the prefix, 3 queries after it
        assert starts[1] - starts[0] >= 11 and starts[3] - starts[2] >= 11 + 24
    assert make_batch(dataclasses.replace(cfg, spread_share=0.0), 0, random.Random(3), tok)[0].shape[1] < 128


def test_facts_after_a_filled_memory_and_late_updates_in_carried_batches():
    # lead_share: the prefix is filler alone and the facts come in the trained part; late_updates_share: the new
    # values come in the trained part, the old ones in the prefix
    from engine.tokenizer import load_tokenizer
    from engine.train import make_batch

    tok = load_tokenizer("byte", None)
    cfg = TrainConfig(model={"preset": "tiny-mal"}, batch_size=8, recall_fraction=1.0, n_facts=3, filler="words",
                      carry_graded=64, lead_share=1.0)
    carried = 256
    ids, weights = make_batch(cfg, 0, random.Random(4), tok, 8, carried)
    for row in ids:
        text = tok.decode(row.tolist()).rstrip("\0")
        assert "#" not in text[:carried] and text[carried] == "#" and text.count("#") == 6
    assert float(weights[:, :carried].abs().sum()) == 0.0
    late = dataclasses.replace(cfg, lead_share=0.0, updates_share=1.0, late_updates_share=1.0)
    for row in make_batch(late, 0, random.Random(4), tok, 8, carried)[0]:
        text = tok.decode(row.tolist()).rstrip("\0")
        told = [i for i in range(len(text) - 6) if text[i] == "#" and text[i + 6] != ";"]
        facts = [i for i in told if text[i + 10] == ";"]  # a fact (#abcd=1234;), not a query (#abcd=)
        assert all(i < carried for i in facts[:3]) and all(i >= carried for i in facts[3:]) and len(facts) > 3
    for row in make_batch(dataclasses.replace(late, late_updates_share=0.0), 0, random.Random(4), tok, 8,
                          carried)[0]:
        text = tok.decode(row.tolist()).rstrip("\0")
        assert text[carried:].count(";") == 3  # every fact and update in the prefix: only the 3 answers after it


def test_write_cost_prices_theta_by_how_long_a_head_keeps_its_writes():
    from engine.model import Titans
    from engine.train import WRITE_HORIZON, write_cost

    model = Titans(TrainConfig(model={"preset": "tiny-mal"}).model_config())
    memories = model.memories()
    heads = memories[0].heads
    theta = torch.full((2, heads, 6), 0.1)
    keep = torch.ones(2, heads, 6)
    keep[:, 0] = 0.99  # head 0 forgets: 0.99 ** 65536 of a write is left
    log_gates = [[torch.stack([theta.log(), torch.zeros_like(theta), keep.log()], -1)] for _ in memories]
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False  # padding: neither priced nor counted
    expected = 0.1 * memories[0].cfg.theta_max * (heads - 1 + 0.99 ** WRITE_HORIZON) / heads
    assert abs(float(write_cost(model, log_gates, mask)) - expected) < 1e-6
    log_gates[0][0][1, :, 3:, 0] = 0.0  # theta 1 on padding changes nothing
    assert abs(float(write_cost(model, log_gates, mask)) - expected) < 1e-6


def test_a_momentum_priced_write_counts_its_echoes_and_lowers_eta():
    from engine.model import Titans
    from engine.train import write_cost

    model = Titans(TrainConfig(model={"preset": "tiny-mal"}).model_config())
    memories = model.memories()
    heads = memories[0].heads
    theta = torch.full((1, heads, 4), 0.1)
    eta = torch.full((1, heads, 4), 0.5)
    eta[:, 1] = 0.9  # head 1's writes echo through its momentum for ~10 chunks
    log_eta = eta.log().requires_grad_()
    log_gates = [[torch.stack([theta.log(), log_eta, torch.zeros_like(theta)], -1)] for _ in memories]
    mask = torch.ones(1, 4, dtype=torch.bool)
    theta_max = memories[0].cfg.theta_max
    assert abs(float(write_cost(model, log_gates, mask).detach()) - 0.1 * theta_max) < 1e-6  # theta alone
    cost = write_cost(model, log_gates, mask, momentum=True)
    expected = 0.1 * theta_max * ((heads - 1) / 0.5 + 1 / 0.1) / heads
    assert abs(float(cost) - expected) < 1e-5
    cost.backward()
    assert (log_eta.grad > 0).all() and log_eta.grad[:, 1].min() > log_eta.grad[:, 0].max()  # the price lowers eta


def test_a_write_price_adds_its_cost_and_lowers_theta():
    from engine.model import Titans
    from engine.tokenizer import load_tokenizer
    from engine.train import WritePrices, batch_loss, make_batch

    # alpha ~ 1e-6: heads that keep ~94% of a write for WRITE_HORIZON tokens (a fresh model's forget them)
    cfg = TrainConfig(model={"preset": "tiny-mal", "alpha_bias_init": -14.0}, batch_size=4, seq_len=48,
                      recall_fraction=0.5, n_facts=2, curriculum=[[0, 16, 32]])
    ids, weights = make_batch(cfg, 0, random.Random(3), load_tokenizer("byte", None))
    torch.manual_seed(0)
    model = Titans(cfg.model_config())
    parts = {}
    plain = batch_loss(model, ids, weights, parts=parts)
    assert float(plain.detach()) == parts["nll"] and parts["write_cost"] > 0
    priced = batch_loss(model, ids, weights, prices=WritePrices(write=3.0))
    assert abs(float(priced) - (parts["nll"] + 3.0 * parts["write_cost"])) < 1e-5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):  # the price's gradient reaches the gates that write
        optimizer.zero_grad()
        batch_loss(model, ids, weights, prices=WritePrices(write=100.0)).backward()
        optimizer.step()
    after = {}
    batch_loss(model, ids, weights, parts=after)
    assert after["write_cost"] < 0.9 * parts["write_cost"]


def test_a_filler_price_charges_only_the_writes_of_other_text():
    from engine.data import fact_mask
    from engine.model import Titans
    from engine.tokenizer import load_tokenizer
    from engine.train import WritePrices, batch_loss, make_batch, write_cost

    text = b"some text #abcd=1234; more = 5; #wxyz=0042;filler #abcd=12"
    mask = fact_mask(torch.tensor([list(text)]))[0]
    marked = bytes(b for b, m in zip(text, mask.tolist()) if m)
    assert marked == b"#abcd=1234;#wxyz=0042;#abcd="  # facts and the query; not "= 5;" nor the answer cut short
    cfg = TrainConfig(model={"preset": "tiny-mal", "alpha_bias_init": -14.0}, batch_size=4, seq_len=48,
                      recall_fraction=1.0, n_facts=2, curriculum=[[0, 16, 32]])
    ids, weights = make_batch(cfg, 0, random.Random(3), load_tokenizer("byte", None))
    torch.manual_seed(0)
    model = Titans(cfg.model_config())
    parts = {}
    priced = batch_loss(model, ids, weights, prices=WritePrices(filler=2.0), parts=parts)
    with model.watching_gates() as gates:
        model(ids)
    real = torch.cat([torch.ones_like(weights[:, :1], dtype=torch.bool), weights > 0], 1)
    filler_cost = float(write_cost(model, gates, real & ~fact_mask(ids)))
    assert abs(parts["filler_cost"] - filler_cost) < 1e-6 and filler_cost != parts["write_cost"]
    assert abs(float(priced) - (parts["nll"] + 2.0 * filler_cost)) < 1e-5


@pytest.mark.parametrize("carried", [0, 300])
def test_filler_weight_weighs_only_the_filler_of_recall_rows(carried):
    from engine.data import fact_mask
    from engine.tokenizer import load_tokenizer
    from engine.train import make_batch

    cfg = TrainConfig(model={"preset": "tiny-mal"}, batch_size=6, seq_len=64, recall_fraction=0.5, n_facts=2,
                      answer_weight=10.0, curriculum=[[0, 16, 48]], carry_graded=64)
    tok = load_tokenizer("byte", None)
    ids, full = make_batch(cfg, 0, random.Random(3), tok, carried=carried)
    same_ids, light = make_batch(dataclasses.replace(cfg, filler_weight=0.25), 0, random.Random(3), tok,
                                 carried=carried)
    assert torch.equal(ids, same_ids)  # the weight draws nothing: the same examples
    targets = fact_mask(ids)[:, 1:]  # [B, T - 1]: weights[s, i] weighs predicting ids[s, i + 1]
    recall_rows = targets.any(1)
    assert 0 < int(recall_rows.sum()) < len(ids)
    filler = recall_rows[:, None] & ~targets & (full == 1)  # trained filler of recall rows (not prefix, padding)
    assert filler.any()
    assert torch.all(light[filler] == 0.25)
    assert torch.equal(light[~filler], full[~filler])  # facts, queries, answers, text rows, prefix, padding
    assert (light[targets] == 10.0).any()  # the answers keep their weight
    with pytest.raises(ValueError, match="filler_weight"):
        dataclasses.replace(cfg, filler_weight=0.0)


@pytest.mark.parametrize("carried", [0, 300])
def test_unicode_filler_keeps_the_answer_weights_on_the_digits(carried):
    # sprinkled characters are 2-4 bytes each: the answers' character offsets must become byte offsets
    from engine.tokenizer import load_tokenizer
    from engine.train import make_batch

    cfg = TrainConfig(model={"preset": "tiny-mal"}, batch_size=6, seq_len=64, recall_fraction=1.0, n_facts=2,
                      answer_weight=10.0, curriculum=[[0, 16, 48]], unicode_rate=0.2, carry_graded=64)
    ids, weights = make_batch(cfg, 0, random.Random(3), load_tokenizer("byte", None), carried=carried)
    for row, w in zip(ids.tolist(), weights):
        assert any(b >= 0x80 for b in row)  # the filler holds bytes outside ASCII
        answers = [i + 1 for i in (w == cfg.answer_weight).nonzero().flatten().tolist()]
        assert len(answers) == 4 * cfg.n_facts
        assert all(chr(row[i]).isdigit() and bytes(row[i - 6 - j:i - j]).startswith(b"#") for i, j in
                   zip(answers, [0, 1, 2, 3] * cfg.n_facts))


@pytest.mark.parametrize("variant", ["mac", "mal"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(variant):
    from engine.model import Titans
    from engine.tokenizer import load_tokenizer
    from engine.train import batch_loss, make_batch

    torch.manual_seed(0)
    model = Titans(ModelConfig.preset(f"tiny-{variant}")).double()
    cfg = TrainConfig(model={"preset": f"tiny-{variant}"}, batch_size=3, seq_len=48, n_facts=2,
                      curriculum=[[0, 0, 16]])
    ids, weights = make_batch(cfg, 0, random.Random(0), load_tokenizer("byte", None), model.cfg.chunk_size)
    results = []
    for checkpointed in (False, True):
        model.zero_grad()
        model.checkpoint_blocks = checkpointed
        loss = batch_loss(model, ids, weights.double())
        loss.backward()
        results.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    assert plain == recomputed
    for name, grad in plain_grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
