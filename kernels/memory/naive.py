"""The PyTorch reference the kernels are tested against: the engine's own chunk step (DESIGN §2.4, §2.5).

chunk_step_ref reads one chunk at the chunk-start weights and applies the chunk's update, for a batch of
sessions whose states sit in a pool at `state_indices`; it returns the new weights instead of writing them.
"""

from __future__ import annotations

from torch import Tensor

from engine.memory import chunk_coefficients, memory_read, read_and_update


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
