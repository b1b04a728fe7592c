"""Naive references for the engine tests: the paper's recurrence token by token, gradients from autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_memory(weights, x, eps):
    """M(x) written directly from DESIGN.md §2.1 for one head: x [N, d], weights [d_in, d_out] each."""
    if len(weights) == 1:
        return x @ weights[0]
    a = x
    for w in weights[:-1]:
        a = F.gelu(a @ w)
    z = a @ weights[-1]
    return x + F.layer_norm(z, z.shape[-1:], eps=eps)


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
