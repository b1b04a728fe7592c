"""The memory op on a pool of sessions' states (DESIGN §2.4, §2.5), as the engine serves it.

Every entry point runs the Triton kernels where they apply (dispatch.use_triton: fp32 pools of depth 1 or 2, tiles
that fit on chip, CUDA or TITANS_KERNELS=triton) and the PyTorch closed form of naive.py elsewhere, under one
contract: W and S pools [P, H, d_in, d_out], the B sessions' slots at `state_indices` [B] (None: slots 0..B-1 in
order, the engine's live batch), written in place.

    read(weights, q, eps)                          M*(q) at each session's weights: [B, H, T, d]
    update(weights, momentum, k, v, gates, ...)    apply one full chunk [B, H, b, d] to the sessions in `only`
    prefill(weights, momentum, q, k, v, gates, ...)  whole chunks of sessions that start at a chunk edge: each read
                                                   at its chunk-start weights, then applied; (read, surprise)

PyTorch's prefill may run each chunk through a compiled read_and_update (`chunk_step`, engine/compiled.py).
Training differentiates through naive.read_and_update / naive.chunks instead: a pool written in place cannot be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import naive
from .dispatch import dot_precision, use_triton


def read(weights: list[Tensor], q: Tensor, eps: float, state_indices: Tensor | None = None) -> Tensor:
    """M*(q) with each session's weights: q [B, H, T, d] -> [B, H, T, d] (fp32)."""
    if use_triton(weights, q, rows=q.shape[2]):
        from . import fused_chunk

        return fused_chunk.read(weights, _indices(state_indices, q), q, eps, dot_precision())
    return naive.memory_read(_slots(weights, state_indices, q.shape[0]), q, eps)


def update(weights: list[Tensor], momentum: list[Tensor], k: Tensor, v: Tensor, log_eta: Tensor, log_keep: Tensor,
           theta: Tensor, eps: float, grad_clip: float | None, only: Sequence[int] | Tensor | None = None,
           state_indices: Tensor | None = None) -> None:
    """Apply one full chunk (k, v [B, H, b, d]; gates [B, H, b]) to the sessions in `only`, in place: None for all
    B, indices the host knows (only those sessions pay for the update), or a [B] bool mask on the device (one
    shape whoever completes a chunk, no host sync: what a compiled step or a CUDA graph runs)."""
    B = k.shape[0]
    if use_triton(weights, k, rows=k.shape[2]):
        from . import fused_chunk

        mask = only if only is None or isinstance(only, Tensor) else _mask(only, B, k.device)
        fused_chunk.chunk_step(weights, momentum, _indices(state_indices, k), None, k, v, log_eta, log_keep, theta,
                               eps, grad_clip, mask, dot_precision())
        return
    if isinstance(only, Tensor):
        w, s = _slots(weights, state_indices, B), _slots(momentum, state_indices, B)
        new_w, new_s = naive.chunk_update(w, s, k, v, log_eta, log_keep, theta, eps, grad_clip)
        keep = only.view(B, 1, 1, 1)
        _store(weights, state_indices, w, [torch.where(keep, n, o) for n, o in zip(new_w, w)])
        _store(momentum, state_indices, s, [torch.where(keep, n, o) for n, o in zip(new_s, s)])
        return
    if only is not None and len(only) < B:
        rows = torch.tensor(list(only), dtype=torch.long, device=k.device)
        slots = rows if state_indices is None else state_indices.index_select(0, rows)
        w, s = ([x.index_select(0, slots) for x in pool] for pool in (weights, momentum))
        w, s = naive.chunk_update(w, s, *(x.index_select(0, rows) for x in (k, v, log_eta, log_keep, theta)), eps,
                                  grad_clip, in_place=True)
        for pool, new in ((weights, w), (momentum, s)):
            for x, n in zip(pool, new):
                x.index_copy_(0, slots, n)
        return
    w, s = _slots(weights, state_indices, B), _slots(momentum, state_indices, B)
    new_w, new_s = naive.chunk_update(w, s, k, v, log_eta, log_keep, theta, eps, grad_clip, in_place=True)
    _store(weights, state_indices, w, new_w)
    _store(momentum, state_indices, s, new_s)


def prefill(weights: list[Tensor], momentum: list[Tensor], q: Tensor, k: Tensor, v: Tensor, log_eta: Tensor,
            log_keep: Tensor, theta: Tensor, chunk_size: int, eps: float, grad_clip: float | None,
            state_indices: Tensor | None = None, chunk_step: Callable | None = None) -> tuple[Tensor, Tensor]:
    """Whole chunks of B sessions that each start at a chunk edge: q, k, v [B, H, n*b, d], gates [B, H, n*b].
    Each chunk is read at its start weights, then applied, in place. Returns (read [B, H, n*b, d], surprise
    [B, H, n*b]), fp32. chunk_step: a compiled naive.read_and_update for PyTorch's path."""
    B, H, R, d = q.shape
    if use_triton(weights, q, rows=chunk_size):
        from . import chunk

        def packed(x: Tensor) -> Tensor:  # [B, H, R, ...] -> [B * R, H, ...]: each session a packed sequence
            return x.transpose(1, 2).reshape(B * R, H, *x.shape[3:])

        cu_seqlens = torch.arange(B + 1, device=q.device) * R
        out, surprise = chunk.prefill(weights, momentum, _indices(state_indices, q), cu_seqlens, packed(q),
                                      packed(k), packed(v), packed(log_eta), packed(log_keep), packed(theta),
                                      chunk_size, eps, grad_clip, dot_precision())
        return out.view(B, R, H, d).transpose(1, 2), surprise.view(B, R, H).transpose(1, 2)
    w, s = _slots(weights, state_indices, B), _slots(momentum, state_indices, B)
    out, surprise, new_w, new_s = naive.chunks(w, s, q, k, v, log_eta, log_keep, theta, chunk_size, eps, grad_clip,
                                               in_place=True, chunk_step=chunk_step)
    _store(weights, state_indices, w, new_w)
    _store(momentum, state_indices, s, new_s)
    return out, surprise


def _indices(state_indices: Tensor | None, x: Tensor) -> Tensor:
    return torch.arange(x.shape[0], device=x.device) if state_indices is None else state_indices


def _mask(rows: Sequence[int], B: int, device: torch.device) -> Tensor:
    mask = torch.zeros(B, dtype=torch.bool, device=device)
    mask[list(rows)] = True
    return mask


def _slots(pool: list[Tensor], state_indices: Tensor | None, B: int) -> list[Tensor]:
    """The B sessions' tensors of a pool: views of slots 0..B-1, or copies gathered at state_indices."""
    return [x[:B] for x in pool] if state_indices is None else [x.index_select(0, state_indices) for x in pool]


def _store(pool: list[Tensor], state_indices: Tensor | None, slots: list[Tensor], new: list[Tensor]) -> None:
    """Write the B sessions' new tensors into the pool: `slots` came from _slots, and a view it holds that was
    updated in place (the new tensor is the view itself) needs nothing."""
    for x, view, n in zip(pool, slots, new):
        if state_indices is not None:
            x.index_copy_(0, state_indices, n)
        elif n is not view:
            view.copy_(n)
