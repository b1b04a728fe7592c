"""kernel = reference = engine path (DESIGN §4), on the CPU under TRITON_INTERPRET=1 at tiny shapes."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from engine import Engine
from engine.engine import SessionBatch
from kernels.memory import chunk, fused_chunk
from kernels.memory.naive import chunk_step_ref, prefill_ref, read_ref
from tests.engine.helpers import VARIANTS, tiny, tokens

EPS = 1e-5


def random_case(rng: random.Random, depth: int, dtype=torch.float32):
    D = rng.choice([16, 32])
    e = rng.randint(1, 4) if depth == 2 else 1
    P, H, B, T = rng.randint(4, 7), rng.randint(1, 2), rng.randint(1, 3), rng.choice([3, 8, 13, 16])
    shapes = [(D, e * D), (e * D, D)] if depth == 2 else [(D, D)]
    weights = [torch.randn(P, H, a, b) / a**0.5 for a, b in shapes]
    momentum = [torch.randn_like(w) * 0.1 for w in weights]
    slots = torch.tensor(rng.sample(range(P), B))  # distinct, non-contiguous, unordered
    q, k, v = (F.normalize(torch.randn(B, H, T, D), dim=-1).to(dtype) for _ in range(3))
    log_eta = F.logsigmoid(torch.randn(B, H, T) + 2)
    log_keep = F.logsigmoid(torch.randn(B, H, T) + 4)
    theta = torch.rand(B, H, T)
    return weights, momentum, slots, q, k, v, log_eta, log_keep, theta


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_chunk_step_matches_the_reference(seed, depth, clip):
    weights, momentum, slots, q, k, v, log_eta, log_keep, theta = random_case(random.Random(seed * 10 + depth), depth)
    ref_read, ref_surprise, ref_w, ref_s = chunk_step_ref(weights, momentum, slots, q, k, v, log_eta, log_keep,
                                                          theta, EPS, clip)
    pool_w, pool_s = [w.clone() for w in weights], [s.clone() for s in momentum]
    read, surprise = fused_chunk.chunk_step(pool_w, pool_s, slots, q, k, v, log_eta, log_keep, theta, EPS, clip)
    torch.testing.assert_close(read, ref_read, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(surprise, ref_surprise, rtol=1e-4, atol=1e-4)
    assert_pool_updated(pool_w, pool_s, weights, momentum, slots, ref_w, ref_s)


@pytest.mark.parametrize("depth", [1, 2])
def test_chunk_step_applies_only_the_flagged_sessions(depth):
    """`only`: one launch over the whole batch, the unflagged sessions' slots untouched (a decode batch whose
    sessions complete their chunks at different steps)."""
    weights, momentum, slots, q, k, v, log_eta, log_keep, theta = random_case(random.Random(7 + depth), depth)
    B = len(slots)
    only = torch.arange(B) % 2 == 0  # sessions 0, 2, ...
    chosen = only.nonzero().flatten()
    _, _, ref_w, ref_s = chunk_step_ref(weights, momentum, slots[chosen], q[chosen], k[chosen], v[chosen],
                                        log_eta[chosen], log_keep[chosen], theta[chosen], EPS, 0.5)
    pool_w, pool_s = [w.clone() for w in weights], [s.clone() for s in momentum]
    fused_chunk.chunk_step(pool_w, pool_s, slots, None, k, v, log_eta, log_keep, theta, EPS, 0.5, only)
    assert_pool_updated(pool_w, pool_s, weights, momentum, slots[chosen], ref_w, ref_s)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tile", [256, 512])
def test_kernels_walking_the_hidden_width_in_several_blocks_match_the_reference(seed, tile, monkeypatch):
    """At the tests' tiny widths one block holds the whole hidden layer; with blocks of 16 or 32 columns every
    kernel walks several (hidden widths 48 and 64 here; 48 in blocks of 32 ends on a partial one): the path
    wide memories take on a GPU."""
    monkeypatch.setattr(fused_chunk, "HIDDEN_TILE_ELEMENTS", tile)
    rng = random.Random(100 + seed)
    weights, momentum, slots, q, k, v, log_eta, log_keep, theta = random_case(rng, 2)
    ref_read, ref_surprise, ref_w, ref_s = chunk_step_ref(weights, momentum, slots, q, k, v, log_eta, log_keep,
                                                          theta, EPS, 0.5)
    pool_w, pool_s = [w.clone() for w in weights], [s.clone() for s in momentum]
    read, surprise = fused_chunk.chunk_step(pool_w, pool_s, slots, q, k, v, log_eta, log_keep, theta, EPS, 0.5)
    torch.testing.assert_close(read, ref_read, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(surprise, ref_surprise, rtol=1e-4, atol=1e-4)
    assert_pool_updated(pool_w, pool_s, weights, momentum, slots, ref_w, ref_s)
    torch.testing.assert_close(fused_chunk.read(weights, slots, q, EPS), read_ref(weights, slots, q, EPS),
                               rtol=1e-5, atol=1e-5)
    case = packed_case(rng, 2, 4, [9, 4, 6])
    ref = prefill_ref(*case[:3], case[3], *case[4:], 4, EPS, 0.5)
    pool_w, pool_s = [w.clone() for w in case[0]], [s.clone() for s in case[1]]
    read, surprise = chunk.prefill(pool_w, pool_s, *case[2:], 4, EPS, 0.5)
    torch.testing.assert_close(read, ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(surprise, ref[1], rtol=1e-4, atol=1e-4)
    assert_pool_updated(pool_w, pool_s, case[0], case[1], case[2], ref[2], ref[3])


def assert_pool_updated(pool_w, pool_s, weights, momentum, slots, ref_w, ref_s):
    """The pool's slots hold the reference's new weights and momentum; every other slot is untouched."""
    for layer in range(len(weights)):
        torch.testing.assert_close(pool_w[layer][slots], ref_w[layer], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pool_s[layer][slots], ref_s[layer], rtol=1e-4, atol=1e-4)
        others = [i for i in range(pool_w[layer].shape[0]) if i not in slots.tolist()]
        assert torch.equal(pool_w[layer][others], weights[layer][others])
        assert torch.equal(pool_s[layer][others], momentum[layer][others])


@pytest.mark.parametrize("depth", [1, 2])
def test_bf16_activations(depth):
    weights, momentum, slots, q, k, v, log_eta, log_keep, theta = random_case(random.Random(7), depth, torch.bfloat16)
    ref = chunk_step_ref(weights, momentum, slots, q, k, v, log_eta, log_keep, theta, EPS, None)
    pool_w, pool_s = [w.clone() for w in weights], [s.clone() for s in momentum]
    read, _ = fused_chunk.chunk_step(pool_w, pool_s, slots, q, k, v, log_eta, log_keep, theta, EPS, None)
    torch.testing.assert_close(read, ref[0], rtol=1e-3, atol=1e-3)  # same bf16 inputs, fp32 math on both sides
    for layer in range(depth):
        torch.testing.assert_close(pool_w[layer][slots], ref[2][layer], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("depth", [1, 2])
def test_read_matches_the_reference(depth):
    weights, _, slots, q, *_ = random_case(random.Random(3), depth)
    torch.testing.assert_close(fused_chunk.read(weights, slots, q, EPS), read_ref(weights, slots, q, EPS),
                               rtol=1e-5, atol=1e-5)


def test_update_only_leaves_read_out():
    weights, momentum, slots, q, k, v, log_eta, log_keep, theta = random_case(random.Random(5), 2)
    a = [w.clone() for w in weights], [s.clone() for s in momentum]
    b = [w.clone() for w in weights], [s.clone() for s in momentum]
    read, _ = fused_chunk.chunk_step(*a, slots, None, k, v, log_eta, log_keep, theta, EPS, None)
    fused_chunk.chunk_step(*b, slots, q, k, v, log_eta, log_keep, theta, EPS, None)
    assert read is None and all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_with_triton_kernels_equals_torch(variant, monkeypatch):
    """Prefill (whole chunks + a partial one) and then decode across chunk boundaries, both backends."""
    engine = Engine.from_config(tiny(variant, chunk_size=4), seed=1)
    prompt, steps = tokens(23), tokens(7)

    def run():
        logits, state = engine.forward(prompt, engine.new_state())
        out = [logits]
        for token in steps.tolist():
            step_logits, state = engine.forward([token], state)
            out.append(step_logits)
        # an aligned batch prefills its whole chunks in one varlen launch
        out += [logits for logits, _ in engine.forward_batch([prompt, steps.repeat(3), prompt.flip(0)],
                                                              [engine.new_state()] * 3)]
        return torch.cat(out), state

    monkeypatch.setenv("TITANS_KERNELS", "torch")
    ref_logits, ref_state = run()
    monkeypatch.setenv("TITANS_KERNELS", "triton")
    logits, state = run()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for key in ref_state.tensors:
        torch.testing.assert_close(state.tensors[key], ref_state.tensors[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["lmm", "mal"])
def test_a_staggered_batch_with_triton_kernels_equals_torch(variant, monkeypatch):
    """Sessions at different positions in one decode batch, as a server's are: a step completes the chunk of
    some sessions only, and the kernel must update exactly those (it once ran every batch row against the
    listed sessions' slots: out of bounds, and the wrong session's keys). Through forward_batch (copies) and a
    SessionBatch (the batch's own weights, updated in place)."""
    engine = Engine.from_config(tiny(variant, chunk_size=4), seed=1)
    prompts = [tokens(1), tokens(3), tokens(6)]  # positions 1, 3, 6: each step completes someone's chunk

    def run():
        states = [engine.forward(p, engine.new_state())[1] for p in prompts]
        out = []
        for _ in range(3):
            pairs = engine.forward_batch([tokens(1) for _ in states], states)
            out += [logits for logits, _ in pairs]
            states = [state for _, state in pairs]
        batch = SessionBatch(engine, states)
        for _ in range(3):
            out += [logits for logits, _ in batch.forward([tokens(1) for _ in states])]
        return torch.cat(out), batch.states()

    torch.manual_seed(5)
    monkeypatch.setenv("TITANS_KERNELS", "torch")
    ref_logits, ref_states = run()
    torch.manual_seed(5)
    monkeypatch.setenv("TITANS_KERNELS", "triton")
    logits, states = run()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for state, ref in zip(states, ref_states):
        for key in ref.tensors:
            torch.testing.assert_close(state.tensors[key], ref.tensors[key], rtol=1e-4, atol=1e-4)


def test_kernels_refuse_a_slot_list_that_does_not_match_the_rows():
    weights, momentum, slots, q, k, v, log_eta, log_keep, theta = random_case(random.Random(0), 2)
    with pytest.raises(ValueError, match="state_indices"):
        fused_chunk.chunk_step(weights, momentum, slots.repeat(2), q, k, v, log_eta, log_keep, theta, EPS, None)
    with pytest.raises(ValueError, match="state_indices"):
        fused_chunk.read(weights, slots.repeat(2), q, EPS)


def packed_case(rng: random.Random, depth: int, chunk: int, lengths: list[int]):
    weights, momentum, *_ = random_case(rng, depth)
    P, H, D = weights[0].shape[0], weights[0].shape[1], weights[0].shape[2]
    slots = torch.tensor(rng.sample(range(P), len(lengths)))
    N = sum(lengths)
    q, k = (F.normalize(torch.randn(N, H, D), dim=-1) for _ in range(2))
    v = torch.randn(N, H, D) * 0.5
    log_eta = F.logsigmoid(torch.randn(N, H) + 2)
    log_keep = F.logsigmoid(torch.randn(N, H) + 4)
    theta = torch.rand(N, H)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return weights, momentum, slots, cu_seqlens, q, k, v, log_eta, log_keep, theta


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("depth", [1, 2])
def test_varlen_prefill_matches_the_reference(seed, depth):
    """Ragged sequences (whole chunks, a partial last chunk, shorter than one chunk, empty) in non-contiguous pool
    slots: one launch equals the chunk-by-chunk reference, and slots of other sessions stay untouched."""
    rng = random.Random(100 + seed * 10 + depth)
    b = rng.choice([4, 8, 16])
    lengths = [3 * b, 2 * b + rng.randint(1, b - 1), rng.randint(1, b - 1), 0][: rng.randint(2, 4)]
    rng.shuffle(lengths)
    weights, momentum, slots, cu, q, k, v, log_eta, log_keep, theta = packed_case(rng, depth, b, lengths)
    clip = rng.choice([None, 0.5])
    ref_read, ref_surprise, ref_w, ref_s = prefill_ref(weights, momentum, slots, cu, q, k, v, log_eta, log_keep,
                                                       theta, b, EPS, clip)
    pool_w, pool_s = [w.clone() for w in weights], [s.clone() for s in momentum]
    read, surprise = chunk.prefill(pool_w, pool_s, slots, cu, q, k, v, log_eta, log_keep, theta, b, EPS, clip)
    torch.testing.assert_close(read, ref_read, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(surprise, ref_surprise, rtol=1e-4, atol=1e-4)
    assert_pool_updated(pool_w, pool_s, weights, momentum, slots, ref_w, ref_s)
    assert any(not torch.equal(pool_w[0][s], weights[0][s]) for s in slots.tolist())  # some memory did change


def test_heads_and_chunks_too_large_for_the_kernels_take_the_torch_path(monkeypatch):
    from kernels.memory.dispatch import use_triton

    monkeypatch.setenv("TITANS_KERNELS", "triton")
    with torch.no_grad():
        assert use_triton([torch.zeros(1, 1, 128, 512), torch.zeros(1, 1, 512, 128)], rows=64)  # d 128, e 4
        assert use_triton([torch.zeros(1, 1, 128, 128)], rows=64)  # d 128, depth 1
        assert not use_triton([torch.zeros(1, 1, 128, 128)], rows=128)  # chunk 128 at d 128: 272 KB
        assert not use_triton([torch.zeros(1, 1, 256, 256)], rows=16)


@pytest.mark.parametrize("depth", [1, 2])
def test_no_tensor_reaches_a_kernel_twice(depth, monkeypatch):
    """torch.compile functionalises a kernel launch per argument: an aliased argument's update is lost (depth 1
    once passed its W as both W1 and W2). Every launch's tensors must be distinct storages."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append([a for a in args if isinstance(a, torch.Tensor)])
                return self.kernel[grid](*args, **kwargs)
            return launch

    kernels = (fused_chunk, "_chunk_step_kernel"), (fused_chunk, "_read_kernel"), (chunk, "_prefill_kernel")
    for module, name in kernels:
        monkeypatch.setattr(module, name, Recorder(getattr(module, name)))
    weights, momentum, slots, q, k, v, log_eta, log_keep, theta = random_case(random.Random(3), depth)
    fused_chunk.chunk_step(weights, momentum, slots, None, k, v, log_eta, log_keep, theta, EPS, None)
    fused_chunk.chunk_step(weights, momentum, slots, q, k, v, log_eta, log_keep, theta, EPS, 0.5,
                           torch.ones(len(slots), dtype=torch.bool))
    fused_chunk.read(weights, slots, q, EPS)
    case = packed_case(random.Random(4), depth, 4, [8, 5])
    chunk.prefill(*case, 4, EPS, None)
    assert len(launches) == 4
    for tensors in launches:
        pointers = [t.untyped_storage().data_ptr() for t in tensors]
        assert len(set(pointers)) == len(pointers)
