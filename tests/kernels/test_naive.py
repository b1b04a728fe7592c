"""The closed-form chunk update equals the paper's recurrence run token by token with autograd gradients."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from kernels.memory.naive import chunk_coefficients, chunk_update, memory_read, memory_surprise, read_and_update

from .recurrence import naive_chunk_update, naive_memory


def random_memory_weights(heads: int, depth: int, d: int, expansion: int) -> list[torch.Tensor]:
    """[H, d_in, d_out] per layer of a depth-`depth` memory MLP (the engine's shapes, made here so that the kernels'
    tests stand alone)."""
    widths = [d, d] if depth == 1 else [d] + [expansion * d] * (depth - 1) + [d]
    return [torch.randn(heads, a, b) / a**0.5 for a, b in zip(widths, widths[1:])]


def _random_chunk(rng: random.Random, depth: int, dtype=torch.float64):
    B, H, b, d, e = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 9), rng.choice([2, 4, 8]), rng.randint(1, 4)
    weights = [(w + 0.1 * torch.randn_like(w)).unsqueeze(0).repeat(B, 1, 1, 1).to(dtype)
               for w in random_memory_weights(H, depth, d, e)]
    weights = [w + 0.05 * torch.randn_like(w) for w in weights]  # sessions differ
    momentum = [0.1 * torch.randn_like(w) for w in weights]
    k = F.normalize(torch.randn(B, H, b, d, dtype=dtype), dim=-1)
    v = torch.randn(B, H, b, d, dtype=dtype)
    z = torch.randn(3, B, H, b, dtype=dtype) * 2
    return weights, momentum, k, v, z


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("clip", [None, 0.3])
@pytest.mark.parametrize("seed", range(4))
def test_chunk_update_equals_autograd_loop(depth, clip, seed):
    rng = random.Random(seed)
    weights, momentum, k, v, (z_eta, z_alpha, z_theta) = _random_chunk(rng, depth)
    eta, alpha, theta = torch.sigmoid(z_eta), torch.sigmoid(z_alpha), torch.sigmoid(z_theta)
    eps = 1e-5
    new_w, new_s = chunk_update(weights, momentum, k, v, F.logsigmoid(z_eta), F.logsigmoid(-z_alpha), theta,
                                eps, clip)
    for bi in range(k.shape[0]):
        for h in range(k.shape[1]):
            ref_w, ref_s = naive_chunk_update([w[bi, h] for w in weights], [s[bi, h] for s in momentum],
                                              k[bi, h], v[bi, h], eta[bi, h], alpha[bi, h], theta[bi, h], eps, clip)
            for ours, ref in zip(new_w + new_s, ref_w + ref_s):
                torch.testing.assert_close(ours[bi, h], ref, atol=1e-10, rtol=1e-10)
    # the update did something: a chunk with theta > 0 moves the weights
    assert max((a - b).abs().max() for a, b in zip(new_w, weights)) > 1e-3


def test_read_and_surprise_match_naive_memory():
    rng = random.Random(0)
    weights, _, k, v, _ = _random_chunk(rng, depth=2)
    out = memory_read(weights, k, 1e-5)
    surprise = memory_surprise(weights, k, v, 1e-5)
    for bi in range(k.shape[0]):
        for h in range(k.shape[1]):
            ref = naive_memory([w[bi, h] for w in weights], k[bi, h], 1e-5)
            torch.testing.assert_close(out[bi, h], ref)
            torch.testing.assert_close(surprise[bi, h], (ref - v[bi, h]).square().sum(-1))


def test_coefficients_stay_finite_for_extreme_gates():
    # eta -> 0 and alpha -> 1 would make P_i or beta_i underflow; the log-space form never divides by them
    b = 16
    log_eta = F.logsigmoid(torch.full((b,), -60.0, dtype=torch.float32))
    log_keep = F.logsigmoid(-torch.full((b,), 60.0, dtype=torch.float32))
    theta = torch.full((b,), 0.5)
    for c in chunk_coefficients(log_eta, log_keep):
        assert torch.isfinite(c).all()
    assert theta.shape == (b,)


def test_update_is_differentiable_for_outer_training():
    rng = random.Random(3)
    weights, momentum, k, v, (z_eta, z_alpha, z_theta) = _random_chunk(rng, depth=2, dtype=torch.float32)
    weights = [w.requires_grad_(True) for w in weights]
    z_theta.requires_grad_(True)
    new_w, _ = chunk_update(weights, momentum, k, v, F.logsigmoid(z_eta), F.logsigmoid(-z_alpha),
                            torch.sigmoid(z_theta), 1e-5, None)
    memory_read(new_w, k, 1e-5).square().sum().backward()
    assert z_theta.grad is not None and z_theta.grad.abs().sum() > 0
    assert all(w.grad is not None and torch.isfinite(w.grad).all() for w in weights)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_fused_read_and_update_equals_separate_steps(depth):
    rng = random.Random(depth)
    weights, momentum, k, v, (z_eta, z_alpha, z_theta) = _random_chunk(rng, depth)
    q = F.normalize(torch.randn_like(k), dim=-1)
    theta, log_eta, log_keep = torch.sigmoid(z_theta), F.logsigmoid(z_eta), F.logsigmoid(-z_alpha)
    read, surprise, new_w, new_s = read_and_update(weights, momentum, q, k, v, theta,
                                                   chunk_coefficients(log_eta, log_keep), 1e-5, 0.5)
    ref_w, ref_s = chunk_update(weights, momentum, k, v, log_eta, log_keep, theta, 1e-5, 0.5)
    torch.testing.assert_close(read, memory_read(weights, q, 1e-5))
    torch.testing.assert_close(surprise, memory_surprise(weights, k, v, 1e-5))
    for ours, ref in zip(new_w + new_s, ref_w + ref_s):
        torch.testing.assert_close(ours, ref)


def test_a_bounded_state_gradient_caps_each_slice_and_leaves_small_ones():
    from kernels.memory.naive import bound_gradient

    x = torch.randn(3, 2, 4, 5, requires_grad=True)
    (y,) = bound_gradient([x], 1.0)
    assert torch.equal(y, x)
    upstream = torch.randn(3, 2, 4, 5)
    upstream[0, 0] *= 100  # one session's head: far above the bound; the others' norms are ~4.5
    upstream[1] *= 0.01  # below it: untouched
    y.backward(upstream)
    norms = torch.linalg.vector_norm(x.grad, dim=(-2, -1))
    assert torch.allclose(norms[0, 0], torch.tensor(1.0)) and torch.allclose(norms[2], torch.ones(2))
    assert torch.equal(x.grad[1], upstream[1])
    torch.testing.assert_close(x.grad[0, 0] / norms[0, 0], upstream[0, 0] / upstream[0, 0].norm())  # same direction
    assert bound_gradient([x], None)[0] is x


def test_the_bound_through_chunks_changes_gradients_only_where_it_bites():
    from kernels.memory.naive import chunks

    torch.manual_seed(0)
    B, H, n, b, d = 2, 2, 6, 4, 8
    weights = [(torch.randn(B, H, d, 2 * d) / d**0.5), (torch.randn(B, H, 2 * d, d) / d**0.5)]
    momentum = [torch.zeros_like(w) for w in weights]
    q, k, v = (torch.nn.functional.normalize(torch.randn(B, H, n * b, d), dim=-1) for _ in range(3))
    log_eta = torch.nn.functional.logsigmoid(torch.randn(B, H, n * b) + 2)
    log_keep = torch.nn.functional.logsigmoid(torch.randn(B, H, n * b) + 4)

    def theta_gradient(bound):
        theta = torch.full((B, H, n * b), 0.5, requires_grad=True)
        read, *_ = chunks(weights, momentum, q, k, v, log_eta, log_keep, theta, b, 1e-5, 1.0, state_grad_bound=bound)
        read[:, :, -b:].square().sum().backward()  # a loss on the last chunk's reads alone
        return theta.grad

    free, loose, tight = theta_gradient(None), theta_gradient(1e6), theta_gradient(1e-4)
    assert torch.equal(free, loose)
    assert not torch.allclose(free, tight)
    # the chunk before the loss reaches it directly: its gradient passes through one bounded state, the earlier
    # chunks' through more, so the bound shrinks them
    assert tight[..., : -2 * b].abs().sum() < free[..., : -2 * b].abs().sum()


def test_a_bounded_gradient_stays_bounded_when_it_overflows():
    from kernels.memory.naive import bound_gradient

    x = torch.randn(2, 1, 3, 3, requires_grad=True)
    (y,) = bound_gradient([x], 0.5)
    upstream = torch.randn(2, 1, 3, 3)
    upstream[0, 0, 0, 0] = float("inf")  # what an exploding backward reaches
    upstream[1] *= 1e30  # finite, but its fp32 sum of squares overflows
    y.backward(upstream)
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(torch.linalg.vector_norm(x.grad, dim=(-2, -1)), torch.full((2, 1), 0.5))
