"""The PyTorch reference the kernels are tested against: the engine's own chunk step (DESIGN §2.4, §2.5).

chunk_step_ref reads one chunk at the chunk-start weights and applies the chunk's update, for a batch of
sessions whose states sit in a pool at `state_indices`; it returns the new weights instead of writing them.
prefill_ref does the same for packed variable-length sequences, chunk after chunk (chunk.prefill's contract).
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.memory import chunk_coefficients, memory_read, memory_surprise, read_and_update


def chunk_step_ref(weights: list[Tensor], momentum: list[Tensor], state_indices: Tensor, q: Tensor, k: Tensor,
                   v: Tensor, log_eta: Tensor, log_keep: Tensor, theta: Tensor, eps: float,
                   grad_clip: float | None):
    """weights/momentum [P, H, d_in, d_out] pools; q, k, v [B, H, b, d]; gates [B, H, b].
    Returns (read [B, H, b, d], surprise [B, H, b], new weights, new momentum) for the B sessions."""
    w = [x[state_indices].float() for x in weights]
    s = [x[state_indices].float() for x in momentum]
    coefficients = chunk_coefficients(log_eta.float(), log_keep.float())
    return read_and_update(w, s, q.float(), k.float(), v.float(), theta.float(), coefficients, eps, grad_clip)


def read_ref(weights: list[Tensor], state_indices: Tensor, q: Tensor, eps: float) -> Tensor:
    """M*(q) with each session's weights: q [B, H, n, d] -> [B, H, n, d]."""
    return memory_read([x[state_indices].float() for x in weights], q.float(), eps)


def prefill_ref(weights: list[Tensor], momentum: list[Tensor], state_indices: Tensor, cu_seqlens: Tensor, q: Tensor,
                k: Tensor, v: Tensor, log_eta: Tensor, log_keep: Tensor, theta: Tensor, chunk_size: int, eps: float,
                grad_clip: float | None):
    """Packed sequences (q, k, v [N, H, d], gates [N, H]; sequence s = rows cu_seqlens[s]:cu_seqlens[s+1]) one
    chunk at a time; a partial last chunk is read and not applied. Returns (read [N, H, d], surprise [N, H],
    new weights, new momentum [S, H, d_in, d_out])."""
    reads, surprises, new_w, new_s = [], [], [], []
    bounds = cu_seqlens.tolist()
    for s, (start, end) in enumerate(zip(bounds, bounds[1:])):
        w = [x[state_indices[s]][None].float() for x in weights]
        m = [x[state_indices[s]][None].float() for x in momentum]
        for first in range(start, end, chunk_size):
            rows = slice(first, min(first + chunk_size, end))
            qc, kc, vc = (x[rows].transpose(0, 1)[None].float() for x in (q, k, v))  # [1, H, b, d]
            if rows.stop - rows.start < chunk_size:
                reads.append(memory_read(w, qc, eps)[0].transpose(0, 1))
                surprises.append(memory_surprise(w, kc, vc, eps)[0].T)
                continue
            gates = [x[rows].T[None].float() for x in (log_eta, log_keep, theta)]  # [1, H, b]
            read, surprise, w, m = read_and_update(w, m, qc, kc, vc, gates[2], chunk_coefficients(*gates[:2]), eps,
                                                   grad_clip)
            reads.append(read[0].transpose(0, 1))
            surprises.append(surprise[0].T)
        new_w.append(w)
        new_s.append(m)
    stack = [torch.cat(layer) for layer in zip(*new_w)], [torch.cat(layer) for layer in zip(*new_s)]
    return torch.cat(reads), torch.cat(surprises), *stack
