"""Compiled steps (compiled.compile_steps: torch.compile of the one-row decode step and of prefill's whole-chunk
memory step) compute the eager steps' function.

In float64, so that the comparison is tight; every variant's attention rule, chunk ends and MAC segment ends are
crossed, by one session and by a running batch at different positions with an idle session.
"""

from __future__ import annotations

import pytest
import torch

from engine.compiled import AotDecode, compile_steps
from engine.quant import Linear

from .helpers import VARIANTS, assert_close, assert_states_close, engine_for, tiny, tokens

pytestmark = pytest.mark.slow  # compiling takes seconds per graph


def decode_both(eager, compiled, prompts: list[torch.Tensor], steps: int, generator: torch.Generator):
    batches = [e.batch([e.new_state()] * len(prompts)) for e in (eager, compiled)]
    for batch in batches:
        batch.forward(prompts)
    for step in range(steps):
        ids = tokens(len(prompts), generator).tolist()
        # one session idles now and then (count 0): it must come out untouched
        step_ids = [[] if len(prompts) > 1 and step % 5 == 4 and s == 1 else [t] for s, t in enumerate(ids)]
        (a, b) = (batch.forward(step_ids) for batch in batches)
        for (logits_a, _), (logits_b, _) in zip(a, b):
            assert_close(logits_a, logits_b, tol=1e-8)
    return [batch.states() for batch in batches]


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_decode_equals_eager(variant):
    cfg = tiny(variant)
    eager = engine_for(cfg, dtype=torch.float64)
    compiled = engine_for(cfg, dtype=torch.float64)
    compile_steps(compiled.model)
    g = torch.Generator().manual_seed(0)
    steps = 2 * max(cfg.segment_size, cfg.window) + cfg.chunk_size + 1  # several chunk and segment ends
    for prompts in ([tokens(3, g)], [tokens(5, g), tokens(9, g), tokens(2, g)]):
        states_eager, states_compiled = decode_both(eager, compiled, prompts, steps, g)
        for a, b in zip(states_eager, states_compiled):
            assert a.tokens_seen == b.tokens_seen
            assert_states_close(a, b, tol=1e-8)


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_prefill_equals_eager(variant):
    """Prefill over many whole memory chunks, for one session and for an aligned batch (whose size differs, so
    the chunk step's batch dimension goes dynamic), from fresh states and from a session mid-chunk."""
    from torch._dynamo.utils import counters

    cfg = tiny(variant)
    eager = engine_for(cfg, dtype=torch.float64)
    compiled = engine_for(cfg, dtype=torch.float64)
    compile_steps(compiled.model)
    g = torch.Generator().manual_seed(3)
    graphs = counters["stats"]["unique_graphs"]
    for prompts in ([tokens(9 * cfg.chunk_size + 3, g)], [tokens(6 * cfg.chunk_size, g)] * 3):
        fresh = eager.new_state().to_bytes()
        mid_chunk = eager.forward(tokens(cfg.chunk_size // 2, g), eager.new_state())[1].to_bytes()
        for starts in ([fresh] * len(prompts), [mid_chunk] + [fresh] * (len(prompts) - 1)):
            (a, b) = (e.forward_batch(prompts, [e.load_state(blob) for blob in starts]) for e in (eager, compiled))
            for (logits_a, state_a), (logits_b, state_b) in zip(a, b):
                assert_close(logits_a, logits_b, tol=1e-8)
                assert_states_close(state_a, state_b, tol=1e-8)
    assert counters["stats"]["unique_graphs"] > graphs  # the chunk step did compile


def test_compiled_models_never_share_a_graph():
    """Two models whose tensors all have the same shapes but whose config differs (theta_max is a constant
    inside the graph): each compiled model must still compute its own function."""
    g = torch.Generator().manual_seed(1)
    prompt = [tokens(6, g)]
    for theta_max in (1.0, 0.25):
        cfg = tiny("mal", theta_max=theta_max)
        eager, compiled = engine_for(cfg, dtype=torch.float64), engine_for(cfg, dtype=torch.float64)
        compile_steps(compiled.model)
        states_eager, states_compiled = decode_both(eager, compiled, prompt, 2 * cfg.chunk_size, g)
        assert_states_close(states_eager[0], states_compiled[0], tol=1e-8)


def test_after_warm_up_decoding_compiles_nothing_new():
    """Engine.warm_up compiles every graph a server needs (one session, batches of any size, prefills of any
    length, chunk and segment ends, any position, states fresh or loaded from snapshots), so no request waits
    for a compile."""
    from torch._dynamo.utils import counters

    cfg = tiny("mac")
    engine = engine_for(cfg, weight_dtype=torch.float16)  # fp16 dense layers switch GEMMs at UPCAST_ROWS rows
    compile_steps(engine.model)
    engine.warm_up()
    compiled = counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(2)
    for sessions in (1, 3, Linear.UPCAST_ROWS + 1):
        states = [engine.forward(tokens(7 * (s % 5) + 5, g), engine.new_state())[1] for s in range(sessions)]
        engine.forward_batch([tokens(9 * cfg.chunk_size + 1, g)] * sessions, [engine.new_state()] * sessions)
        batch = engine.batch([engine.load_state(s.to_bytes()) for s in states])  # as a server gets them
        for _ in range(2 * cfg.segment_size + 3):
            batch.forward([[int(t)] for t in tokens(sessions, g)])
    assert counters["stats"]["unique_graphs"] == compiled


def test_ahead_of_time_decode_equals_eager(tmp_path):
    """compiled.AotDecode: one session's steps that end no chunk run the AOTInductor package,
    the others the usual path; together the eager function, across MAC chunk and segment ends."""
    cfg = tiny("mac")
    eager, aot = (engine_for(cfg, dtype=torch.float64) for _ in range(2))
    traced = aot.batch([aot.new_state()])
    traced.forward([tokens(5)])
    aot.model.aot_decode = AotDecode(aot.model, traced.live_state(), str(tmp_path))
    runner, calls = aot.model.aot_decode.runner, []
    aot.model.aot_decode.runner = lambda *args: calls.append(1) or runner(*args)
    g = torch.Generator().manual_seed(0)
    steps = 2 * cfg.segment_size + 3
    states_eager, states_aot = decode_both(eager, aot, [tokens(cfg.chunk_size + 3, g)], steps, g)
    assert_states_close(states_aot[0], states_eager[0])
    assert steps // 2 < len(calls) < steps  # the package ran, and not for the steps that end a chunk
