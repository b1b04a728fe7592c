"""Triton kernel for prefill: many chunks of many variable-length sequences in one launch.

Sequences are packed (flash-attention's varlen layout): sequence s is rows cu_seqlens[s]:cu_seqlens[s + 1] of
q, k, v [N, H, d] and of the gates [N, H], it starts at a memory-chunk boundary, and its memory lives in pool
slot state_indices[s]. One program per (sequence, head) walks the sequence chunk by chunk (read every row at its
chunk-start weights, then apply the chunk: fused_chunk's _chunk), updating the head's weights and momentum in
their slot block by block, so any expansion fits on chip. A partial last chunk is read, its surprise taken, and
not applied: the caller keeps its rows in the session's chunk buffer (DESIGN §2.4), as the engine does.

Against one fused_chunk.chunk_step launch per chunk this saves the launches (a head's state, rewritten after each
chunk, stays in L2 between them); the result is the same function (tests compare it with kernels/memory/naive.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import check_precision, padded
from .fused_chunk import _check_pool, _chunk, _hidden_tile, _read, _second_layer, _warps


@triton.jit
def _prefill_kernel(W1, W2, S1, S2, IDX, CU, Q, K, V, LOG_ETA, LOG_KEEP, THETA, READ, SURPRISE,
                    H, D, F, CHUNK, eps, clip,
                    DEPTH: tl.constexpr, HAS_CLIP: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr, BFB: tl.constexpr, DOT: tl.constexpr):
    seq, h = tl.program_id(0), tl.program_id(1)
    head = tl.load(IDX + seq).to(tl.int64) * H + h
    base1, base2 = head * D * F, head * F * D
    start = tl.load(CU + seq).to(tl.int64)
    end = tl.load(CU + seq + 1).to(tl.int64)
    t, i = tl.arange(0, BT), tl.arange(0, BD)
    md = i < D
    for first in range(start, end, CHUNK):
        tl.debug_barrier()  # the previous chunk's update is written before this chunk reads the weights
        mt = (t < CHUNK) & (t < end - first)
        mx = mt[:, None] & md[None, :]
        token = first + t  # [BT] rows of the packed sequence
        gate_off = token * H + h
        x_off = gate_off[:, None] * D + i[None, :]
        q = tl.load(Q + x_off, mask=mx, other=0.0).to(tl.float32)  # chunk-lagged: the chunk-start weights
        tl.store(READ + x_off, _read(q, W1, W2, i, md, base1, base2, D, F, eps, DEPTH, BT, BD, BFB, DOT), mask=mx)
        k = tl.load(K + x_off, mask=mx, other=0.0).to(tl.float32)
        v = tl.load(V + x_off, mask=mx, other=0.0).to(tl.float32)
        whole = end - first >= CHUNK  # a partial last chunk stays in the caller's buffer
        surprise = _chunk(W1, W2, S1, S2, base1, base2, k, v, t, mt, i, md, gate_off, whole, LOG_ETA, LOG_KEEP,
                          THETA, D, F, eps, clip, DEPTH, HAS_CLIP, BT, BD, BFB, DOT)
        tl.store(SURPRISE + gate_off, surprise, mask=mt)


def prefill(weights: list[Tensor], momentum: list[Tensor], state_indices: Tensor, cu_seqlens: Tensor, q: Tensor,
            k: Tensor, v: Tensor, log_eta: Tensor, log_keep: Tensor, theta: Tensor, chunk_size: int, eps: float,
            grad_clip: float | None, precision: str = "ieee") -> tuple[Tensor, Tensor]:
    """Read and apply the chunks of packed sequences, updating the pool in place at state_indices.

    weights/momentum: [P, H, d_in, d_out] fp32 pools; state_indices [S]; cu_seqlens [S + 1] (0, ..., N);
    q, k, v [N, H, d]; log_eta, log_keep, theta [N, H]. Every sequence starts at a chunk boundary.
    precision: the products' inputs (fused_chunk._dot); accumulation and state stay fp32.
    Returns (read [N, H, d], surprise [N, H]), fp32.
    """
    H, D, F = _check_pool(weights, momentum)
    check_precision(precision)
    N = q.shape[0]
    read = torch.empty(N, H, D, device=q.device, dtype=torch.float32)
    surprise = torch.empty(N, H, device=q.device, dtype=torch.float32)
    sequences = state_indices.numel()
    if cu_seqlens.numel() != sequences + 1:
        raise ValueError(f"cu_seqlens has {cu_seqlens.numel()} entries for {sequences} sequences")
    if sequences == 0 or N == 0:
        return read, surprise
    depth = len(weights)
    w2, s2 = _second_layer(weights), _second_layer(momentum)
    gates = [g.contiguous().float() for g in (log_eta, log_keep, theta)]
    _prefill_kernel[(sequences, H)](
        weights[0], w2, momentum[0], s2, state_indices.contiguous(), cu_seqlens.contiguous(), q.contiguous(),
        k.contiguous(), v.contiguous(), *gates, read, surprise, H, D, F, chunk_size, eps, float(grad_clip or 0.0),
        DEPTH=depth, HAS_CLIP=grad_clip is not None, BT=padded(chunk_size), BD=padded(D), BFB=_hidden_tile(D, F),
        DOT=precision,
        num_warps=_warps(padded(chunk_size), padded(D)),
        num_stages=1)  # no software pipelining of the chunk loop: it held every stage's tiles in shared memory
    return read, surprise
