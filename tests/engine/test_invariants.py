"""DESIGN.md §5 invariants for every variant, memory depth 1 and 2, random configs and split points."""

from __future__ import annotations

import random

import pytest
import torch

from engine.state import nest_state

from .helpers import VARIANTS, assert_close, assert_states_close, engine_for, random_config, tiny, tokens


def assert_exact(a, b, tol=1e-8):
    assert_close(a, b, tol=tol)


CASES = [(v, d) for v in VARIANTS for d in (1, 2)]
LENGTH = 70  # crosses several chunks (4), segments (16) and windows (16) of the tiny presets


@pytest.fixture(scope="module", params=CASES, ids=[f"{v}-depth{d}" for v, d in CASES])
def engine(request):
    variant, depth = request.param
    return engine_for(tiny(variant, mem_depth=depth), dtype=torch.float64)


def test_causality(engine):
    ids = tokens(LENGTH)
    logits, _ = engine.forward(ids, engine.new_state())
    for cut in random.Random(0).sample(range(1, LENGTH), 4):
        changed = torch.cat([ids[:cut], tokens(LENGTH - cut)])
        other, _ = engine.forward(changed, engine.new_state())
        assert_exact(other[:cut], logits[:cut], tol=1e-12)
        assert not torch.allclose(other[cut:], logits[cut:])  # the test can fail: later logits do change


def test_split_invariance_through_bytes(engine):
    ids = tokens(LENGTH)
    full, full_state = engine.forward(ids, engine.new_state())
    rng = random.Random(1)
    for _ in range(4):
        cuts = sorted(rng.sample(range(1, LENGTH), rng.randint(1, 3)))
        state, parts = engine.new_state(), []
        for a, b in zip([0, *cuts], [*cuts, LENGTH]):
            out, state = engine.forward(ids[a:b], engine.load_state(state.to_bytes()))
            parts.append(out)
        assert_exact(torch.cat(parts), full)
        assert state.tokens_seen == full_state.tokens_seen == LENGTH
        assert_states_close(state, full_state)


def test_prefill_equals_decode(engine):
    ids = tokens(LENGTH)
    prefill, prefill_state = engine.forward(ids, engine.new_state())
    state, steps = engine.new_state(), []
    for t in ids.tolist():
        out, state = engine.forward([t], state)
        steps.append(out)
    assert_exact(torch.cat(steps), prefill)
    assert_states_close(state, prefill_state)


def test_batched_equals_alone(engine):
    # sessions at different positions (mid-chunk, mid-segment) with ragged lengths, one of them empty
    gen = torch.Generator().manual_seed(5)
    starts = [engine.forward(tokens(n, gen), engine.new_state())[1] for n in (0, 3, 17, 30)]
    batch = [tokens(n, gen) for n in (25, 1, 0, 9)]
    results = engine.forward_batch(batch, starts, return_surprise=True)
    for ids, start, (logits, state, surprise) in zip(batch, starts, results):
        alone_logits, alone_state, alone_surprise = engine.forward(ids, start, return_surprise=True)
        assert_exact(logits, alone_logits)
        assert_exact(surprise, alone_surprise)
        assert state.tokens_seen == start.tokens_seen + len(ids)
        assert_states_close(state, alone_state)


def test_aligned_batch_equals_alone(engine):
    # sessions at the same position take multi-chunk steps together: with ragged lengths (steps within the
    # attention window), and with equal lengths longer than the window (steps of many windows, no padding)
    gen = torch.Generator().manual_seed(6)
    for start_len, lengths in [(0, (40, 25, 0, 33)), (6, (40, 25, 0, 33)), (0, (45, 45, 45)), (6, (70, 70))]:
        starts = [engine.forward(tokens(start_len, gen), engine.new_state())[1] for _ in lengths]
        batch = [tokens(n, gen) for n in lengths]
        for ids, start, (logits, state) in zip(batch, starts, engine.forward_batch(batch, starts)):
            alone_logits, alone_state = engine.forward(ids, start)
            assert_exact(logits, alone_logits)
            assert_states_close(state, alone_state)


def test_running_batch_across_calls_equals_alone(engine):
    # a scheduler's running batch: sessions stay stacked while they decode, prefill and idle
    gen = torch.Generator().manual_seed(7)
    starts = [engine.forward(tokens(n, gen), engine.new_state())[1] for n in (2, 9, 0)]
    batch = engine.batch(starts)
    alone = list(starts)
    for lengths in [(1, 1, 1), (5, 0, 12), (1, 1, 1), (0, 3, 1)]:
        ids = [tokens(n, gen) for n in lengths]
        for i, ((logits, surprise), t) in enumerate(zip(batch.forward(ids, return_surprise=True), ids)):
            expected, alone[i], expected_surprise = engine.forward(t, alone[i], return_surprise=True)
            assert_exact(logits, expected)
            assert_exact(surprise, expected_surprise)
    for state, expected in zip(batch.states(), alone):
        assert_states_close(state, expected)


def test_serving_updates_in_place_as_the_model_does_on_states_it_does_not_own(engine):
    # a serving batch owns its stacked states, so its chunk updates write over their weights (decode steps that
    # complete chunks together, and prompts of whole chunks); the model run on states it does not own never
    # writes in place: both must give the same logits, and the states a batch was built from stay untouched
    gen = torch.Generator().manual_seed(8)
    starts = [engine.forward(tokens(5, gen), engine.new_state())[1] for _ in range(3)]
    before = [s.to_bytes() for s in starts]
    batch = engine.batch(starts)
    prompt = [tokens(3 * engine.config.chunk_size, gen) for _ in starts]
    steps = [prompt] + [[tokens(1, gen) for _ in starts] for _ in range(2 * engine.config.chunk_size + 1)]
    logits = [[lg for lg, _ in batch.forward(ids)] for ids in steps]
    stacked = nest_state({k: torch.stack([s.tensors[k] for s in starts]) for k in starts[0].tensors})
    with torch.no_grad():
        expected, _, _ = engine.model.forward_tokens([torch.cat([ids[i] for ids in steps]) for i in range(3)],
                                                     stacked, [5] * 3)
    for i in range(3):
        assert_exact(torch.cat([row[i] for row in logits]), expected[i])
    assert [s.to_bytes() for s in starts] == before


def test_sessions_join_and_leave_a_running_batch(engine):
    # continuous batching: a session's results do not depend on who joins or leaves around it
    gen = torch.Generator().manual_seed(11)
    a, b, c = (engine.forward(tokens(n, gen), engine.new_state())[1] for n in (3, 0, 8))
    batch = engine.batch([a])
    alone = {"a": a}
    order = ["a"]
    for step, (join, leave) in enumerate([(["b"], []), (["c"], ["a"]), ([], ["b"]), (["a2"], [])]):
        if leave:
            kept = batch.remove([order.index(name) for name in leave])  # the last sessions move into the holes
            order = [order[i] for i in kept]
        fresh = {"b": b, "c": c, "a2": alone.get("a", a)}
        batch.add([fresh[name] for name in join])
        for name in join:
            alone[name] = fresh[name]
        order += join
        ids = [tokens(1 + (step + i) % 4, gen) for i in range(len(order))]
        for name, t, (logits, _) in zip(order, ids, batch.forward(ids)):
            expected, alone[name] = engine.forward(t, alone[name])
            assert_exact(logits, expected)
    assert len(batch) == len(order)
    for i, name in enumerate(order):
        assert_states_close(batch.state(i), alone[name])


def test_forward_leaves_input_state_untouched(engine):
    state = engine.forward(tokens(10), engine.new_state())[1]
    before = {k: v.clone() for k, v in state.tensors.items()}
    engine.forward(tokens(23), state)
    engine.forward_batch([tokens(5), tokens(7)], [state, state])
    list(engine.generate(tokens(3), state))
    for name, t in before.items():
        assert torch.equal(state.tensors[name], t), name


def test_memory_carries_information_across_attention_span(engine):
    """Beyond the attention span only the memory connects past and present: changing an early token
    must still change later logits (and resetting the memory must change them too)."""
    cfg = engine.config
    span = max(cfg.attention_span, cfg.chunk_size) + 2 * cfg.chunk_size + cfg.conv_kernel
    ids = tokens(span + 8)
    base, _ = engine.forward(ids, engine.new_state())
    changed = ids.clone()
    changed[0] = (changed[0] + 1) % 256
    other, _ = engine.forward(changed, engine.new_state())
    assert (other[-4:] - base[-4:]).abs().max() > 1e-6


@pytest.mark.parametrize("seed", range(24))
def test_random_configs(seed):
    rng = random.Random(seed)
    cfg = random_config(rng)
    engine = engine_for(cfg, seed=seed, dtype=torch.float64)
    n = rng.randint(5, 40)
    ids = tokens(n)
    full, full_state = engine.forward(ids, engine.new_state(), return_surprise=False)
    # split invariance at random points, through bytes
    cut = rng.randint(1, n - 1)
    a, mid = engine.forward(ids[:cut], engine.new_state())
    b, _ = engine.forward(ids[cut:], engine.load_state(mid.to_bytes()))
    assert_exact(torch.cat([a, b]), full)
    # prefill = decode
    state, steps = engine.new_state(), []
    for t in ids.tolist():
        out, state = engine.forward([t], state)
        steps.append(out)
    assert_exact(torch.cat(steps), full)
    # batched = alone, from different positions
    other = tokens(rng.randint(0, 12))
    res = engine.forward_batch([ids[cut:], other, ids], [engine.load_state(mid.to_bytes()), full_state,
                                                         engine.new_state()])
    assert_exact(res[0][0], b)
    assert_exact(res[1][0], engine.forward(other, full_state)[0])
    assert_exact(res[2][0], full)
    # causality
    changed = torch.cat([ids[:cut], tokens(n - cut)])
    assert_exact(engine.forward(changed, engine.new_state())[0][:cut], full[:cut], tol=1e-12)


@pytest.mark.parametrize("variant", ["mal", "mag"])
def test_banded_window_attention_is_the_full_attention(variant, monkeypatch):
    # Attention.banded_window (long aligned steps: prompts, training batches) against the product over all of the
    # step's rows: outputs, the ring written after the step, and gradients; at the start of a sequence (the ring
    # never written: its random contents must stay invisible), after it (a full ring), with rows that are not a
    # multiple of the window
    from engine.model import Attention
    from engine.step import StepContext

    cfg = tiny(variant)
    W, nh, hd = cfg.window, cfg.n_heads, cfg.head_dim
    torch.manual_seed(0)
    attention = Attention(cfg, W, "window", 1).double()
    banded = Attention.banded
    for pos, rows in ((0, 2 * W), (0, 3 * W - 5), (W, 2 * W + 1), (2 * W, 70)):
        x = torch.randn(2, rows, cfg.dim, dtype=torch.float64)
        state = {"ring": torch.randn(2, 2, nh, 1, W, hd, dtype=torch.float64)}
        ctx = StepContext.build([pos, pos], [rows, rows], cfg, torch.device("cpu"))
        assert banded(attention, ctx)
        results = []
        for path in (banded, lambda self, ctx: False):
            monkeypatch.setattr(Attention, "banded", path)
            attention.zero_grad()
            xs = x.clone().requires_grad_()
            out, ring = attention(xs, [xs], state, ctx)
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            results.append([out, ring, xs.grad] + [p.grad.clone() for p in attention.parameters()])
        for got, want in zip(*results):
            assert_close(got, want, tol=1e-10)
    monkeypatch.setattr(Attention, "banded", banded)
    short = StepContext.build([0], [2 * W - 1], cfg, torch.device("cpu"))
    odd = StepContext.build([W + 1], [3 * W], cfg, torch.device("cpu"))
    padded = StepContext.build([0, 0], [3 * W, 2 * W], cfg, torch.device("cpu"))
    assert not any(attention.banded(c) for c in (short, odd, padded))  # these keep the full product
