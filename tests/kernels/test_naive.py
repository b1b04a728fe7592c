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
