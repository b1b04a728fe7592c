"""Naive references for the engine tests: the paper's recurrence token by token, gradients from autograd."""

from __future__ import annotations

import math

import torch


def naive_memory(weights, x, eps):
    """M(x) written out from DESIGN.md §2.1 for one head: x [N, d], weights [d_in, d_out] each.

    Spelled out independently of kernels/memory/naive.py (explicit GELU and LayerNorm formulas).
    """
    if len(weights) == 1:
        return x @ weights[0]
    hidden = x
    for w in weights[:-1]:
        pre = hidden @ w
        hidden = 0.5 * pre * (1.0 + torch.erf(pre / math.sqrt(2.0)))
    z = hidden @ weights[-1]
    centered = z - z.mean(-1, keepdim=True)
    return x + centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + eps)


def naive_chunk_update(weights, momentum, k, v, eta, alpha, theta, eps, grad_clip=None):
    """One chunk for one head, token by token: every gradient taken at the chunk-start weights.

    weights, momentum: lists of [d_in, d_out]; k, v [b, d]; eta, alpha, theta [b] (plain gates).
    """
    anchor = [w.detach().clone().requires_grad_(True) for w in weights]
    w_cur = [w.clone() for w in weights]
    s_cur = [s.clone() for s in momentum]
    for t in range(k.shape[0]):
        loss = (naive_memory(anchor, k[t : t + 1], eps) - v[t : t + 1]).square().sum()
        grads = torch.autograd.grad(loss, anchor)
        lr = theta[t]
        if grad_clip is not None:
            norm = torch.sqrt(sum(g.square().sum() for g in grads))
            lr = lr * torch.clamp(grad_clip / norm, max=1.0)
        s_cur = [eta[t] * s - lr * g for s, g in zip(s_cur, grads)]
        w_cur = [(1 - alpha[t]) * w + s for w, s in zip(w_cur, s_cur)]
    return w_cur, s_cur
