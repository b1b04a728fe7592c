"""Triton kernel for prefill: many chunks of many variable-length sequences in one launch.

Sequences are packed (flash-attention's varlen layout): sequence s is rows cu_seqlens[s]:cu_seqlens[s + 1] of
q, k, v [N, H, d] and of the gates [N, H], it starts at a memory-chunk boundary, and its memory lives in pool
slot state_indices[s]. One program per (sequence, head) loads that head's weights and momentum once, walks the
sequence chunk by chunk with them on chip (read every row at its chunk-start weights, then apply the chunk:
fused_chunk's _apply_chunk), and writes them back once. A partial last chunk is read, its surprise taken, and
not applied: the caller keeps its rows in the session's chunk buffer (DESIGN §2.4), as the engine does.

Against one fused_chunk.chunk_step launch per chunk this saves the launches and the round trips of the state
through memory between chunks; the result is the same function (tests compare it with kernels/memory/naive.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fused_chunk import _apply_chunk, _block, _check_pool, _load_weights, _mlp_out, _store_weights, _weight_offsets


@triton.jit
def _prefill_kernel(W1, W2, S1, S2, IDX, CU, Q, K, V, LOG_ETA, LOG_KEEP, THETA, READ, SURPRISE,
                    H, D, F, CHUNK, eps, clip,
                    DEPTH: tl.constexpr, HAS_CLIP: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    seq, h = tl.program_id(0), tl.program_id(1)
    slot = tl.load(IDX + seq).to(tl.int64)
    start = tl.load(CU + seq).to(tl.int64)
    end = tl.load(CU + seq + 1).to(tl.int64)
    t, i, j = tl.arange(0, BT), tl.arange(0, BD), tl.arange(0, BF)
    md, mf = i < D, j < F
    w1_off, mw1, w2_off, mw2 = _weight_offsets(slot * H + h, i, j, md, mf, D, F, DEPTH)
    w1, w2, s1, s2 = _load_weights(W1, W2, S1, S2, w1_off, mw1, w2_off, mw2, DEPTH)
    for first in range(start, end, CHUNK):
        mt = (t < CHUNK) & (t < end - first)
        mx = mt[:, None] & md[None, :]
        token = first + t  # [BT] rows of the packed sequence
        gate_off = token * H + h
        x_off = gate_off[:, None] * D + i[None, :]
        q = tl.load(Q + x_off, mask=mx, other=0.0).to(tl.float32)
        read, _, _, _, _ = _mlp_out(q, w1, w2, md, D, eps, DEPTH)  # chunk-lagged: the chunk-start weights
        tl.store(READ + x_off, read, mask=mx)
        k = tl.load(K + x_off, mask=mx, other=0.0).to(tl.float32)
        v = tl.load(V + x_off, mask=mx, other=0.0).to(tl.float32)
        surprise, n_w1, n_w2, n_s1, n_s2 = _apply_chunk(w1, w2, s1, s2, k, v, LOG_ETA, LOG_KEEP, THETA, gate_off, t,
                                                        mt, md, mf, D, eps, clip, DEPTH, HAS_CLIP)
        tl.store(SURPRISE + gate_off, surprise, mask=mt)
        whole = end - first >= CHUNK  # a partial last chunk stays in the caller's buffer
        w1 = tl.where(whole, n_w1, w1)
        w2 = tl.where(whole, n_w2, w2)
        s1 = tl.where(whole, n_s1, s1)
        s2 = tl.where(whole, n_s2, s2)
    _store_weights(W1, W2, S1, S2, w1_off, mw1, w2_off, mw2, w1, w2, s1, s2, DEPTH)


def prefill(weights: list[Tensor], momentum: list[Tensor], state_indices: Tensor, cu_seqlens: Tensor, q: Tensor,
            k: Tensor, v: Tensor, log_eta: Tensor, log_keep: Tensor, theta: Tensor, chunk_size: int, eps: float,
            grad_clip: float | None) -> tuple[Tensor, Tensor]:
    """Read and apply the chunks of packed sequences, updating the pool in place at state_indices.

    weights/momentum: [P, H, d_in, d_out] fp32 pools; state_indices [S]; cu_seqlens [S + 1] (0, ..., N);
    q, k, v [N, H, d]; log_eta, log_keep, theta [N, H]. Every sequence starts at a chunk boundary.
    Returns (read [N, H, d], surprise [N, H]), fp32.
    """
    H, D, F = _check_pool(weights, momentum)
    N = q.shape[0]
    read = torch.empty(N, H, D, device=q.device, dtype=torch.float32)
    surprise = torch.empty(N, H, device=q.device, dtype=torch.float32)
    sequences = state_indices.numel()
    if cu_seqlens.numel() != sequences + 1:
        raise ValueError(f"cu_seqlens has {cu_seqlens.numel()} entries for {sequences} sequences")
    if sequences == 0 or N == 0:
        return read, surprise
    depth = len(weights)
    w2, s2 = (weights[1], momentum[1]) if depth == 2 else (weights[0], momentum[0])
    gates = [g.contiguous().float() for g in (log_eta, log_keep, theta)]
    _prefill_kernel[(sequences, H)](
        weights[0], w2, momentum[0], s2, state_indices.contiguous(), cu_seqlens.contiguous(), q.contiguous(),
        k.contiguous(), v.contiguous(), *gates, read, surprise, H, D, F, chunk_size, eps, float(grad_clip or 0.0),
        DEPTH=depth, HAS_CLIP=grad_clip is not None, BT=_block(chunk_size), BD=_block(D), BF=_block(F),
        num_stages=1)  # pipelining the chunk loop doubles its shared memory (d 64, e 4, chunk 64: 243 -> 162 KB)
    return read, surprise
