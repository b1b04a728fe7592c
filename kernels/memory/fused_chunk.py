"""Triton kernels for the memory of DESIGN §2: one chunk's read + update, and a read with fixed weights.

One program per (session, head) keeps that head's weights, momentum, the chunk's q/k/v and its gates on chip:
    forward  z1 = k W1, a = gelu(z1), z2 = a W2, out = k + LN(z2)       (depth 2; depth 1: out = k W)
    backward d2 = LN'(2 (out - v)), d1 = (d2 W2^T) * gelu'(z1)          (the hand-written backward)
    update   W <- beta W + gamma S - X^T (c_m * D),  S <- p S - X^T (c_s * D)   per matrix (X = k or a)
with the momentum/decay coefficients computed in-kernel from cumulative sums of the log-gates, exactly the
closed form of engine/memory.py. Sessions live in a state pool: program b reads and writes slot
state_indices[b] in place, so a scheduler's batch can sit in any slots. Reads at the chunk-start weights
("chunk-lagged") come out of the same program, so prefill = decode holds by construction.

Shapes: pool W/S [P, H, d_in, d_out] fp32; q, k, v [B, H, T, d] (T <= the chunk, padded to a power of two
of at least 16, as tl.dot wants); gates [B, H, T]. Plain pointer arithmetic only (the CPU interpreter of
TRITON_INTERPRET=1 lacks block pointers on triton 3.9).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# constexpr: a jitted function may read no other globals (the CPU interpreter lets plain floats through; a GPU
# compile refuses them)
INV_SQRT2 = tl.constexpr(0.7071067811865476)
INV_SQRT2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * INV_SQRT2))


@triton.jit
def _gelu_grad(z):
    return 0.5 * (1.0 + tl.math.erf(z * INV_SQRT2)) + z * tl.exp(-0.5 * z * z) * INV_SQRT2PI


@triton.jit
def _mlp_out(x, w1, w2, md, D, eps, DEPTH: tl.constexpr):
    """M(x) rows and what the backward needs: (out, z1, a, zhat, rstd); depth 1 uses w1 only."""
    z1 = tl.dot(x, w1, input_precision="ieee")
    if DEPTH == 1:
        return z1, z1, z1, z1, tl.sum(z1, 1)
    a = _gelu(z1)
    z2 = tl.dot(a, w2, input_precision="ieee")
    mean = tl.sum(z2, 1) / D
    centred = tl.where(md[None, :], z2 - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / D + eps)
    zhat = centred * rstd[:, None]
    return x + zhat, z1, a, zhat, rstd


@triton.jit
def _weight_offsets(head, i, j, md, mf, D, F, DEPTH: tl.constexpr):
    """Offsets and masks of one head's W1 and W2 in the pool (depth 1: W [d, d], both point at it)."""
    if DEPTH == 1:
        w1_off = head * D * D + i[:, None] * D + i[None, :]
        mw1 = md[:, None] & md[None, :]
        return w1_off, mw1, w1_off, mw1
    w1_off = head * D * F + i[:, None] * F + j[None, :]
    w2_off = head * F * D + j[:, None] * D + i[None, :]
    return w1_off, md[:, None] & mf[None, :], w2_off, mf[:, None] & md[None, :]


@triton.jit
def _program_tile(IDX, H, T, D, F, DEPTH: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    """What program (b, h) works on: its rows of q/k/v ([T, D] at x_off) and its head's weights in pool slot
    IDX[b]. Returns (row, t, mt, md, mf, x_off, mx, w1_off, mw1, w2_off, mw2)."""
    pid, h = tl.program_id(0), tl.program_id(1)
    slot = tl.load(IDX + pid).to(tl.int64)
    t, i, j = tl.arange(0, BT), tl.arange(0, BD), tl.arange(0, BF)
    mt, md, mf = t < T, i < D, j < F
    row = (pid * H + h).to(tl.int64)
    x_off = row * T * D + t[:, None] * D + i[None, :]
    mx = mt[:, None] & md[None, :]
    w1_off, mw1, w2_off, mw2 = _weight_offsets(slot * H + h, i, j, md, mf, D, F, DEPTH)
    return row, t, mt, md, mf, x_off, mx, w1_off, mw1, w2_off, mw2


@triton.jit
def _apply_chunk(w1, w2, s1, s2, k, v, LOG_ETA, LOG_KEEP, THETA, gate_off, t, mt, md, mf, D, eps, clip,
                 DEPTH: tl.constexpr, HAS_CLIP: tl.constexpr):
    """One chunk's rows k, v [BT, BD] (rows beyond mt are padding) at the chunk-start weights, gates at
    gate_off: (surprise [BT], new w1, w2, s1, s2). Depth 1 returns w2/s2 as new w1/s1 (unused)."""
    mx = mt[:, None] & md[None, :]
    out, z1, a, zhat, rstd = _mlp_out(k, w1, w2, md, D, eps, DEPTH)
    err = tl.where(mx, out - v, 0.0)
    surprise = tl.sum(err * err, 1)
    g = 2.0 * err
    if DEPTH == 1:
        d1 = g
        d2 = g
        norm_sq = tl.sum(k * k, 1) * tl.sum(d1 * d1, 1)
    else:
        d2 = rstd[:, None] * (g - (tl.sum(g, 1) / D)[:, None] - zhat * (tl.sum(g * zhat, 1) / D)[:, None])
        d2 = tl.where(mx, d2, 0.0)
        d1 = tl.dot(d2, tl.trans(w2), input_precision="ieee") * _gelu_grad(z1)
        d1 = tl.where(mt[:, None] & mf[None, :], d1, 0.0)
        norm_sq = tl.sum(k * k, 1) * tl.sum(d1 * d1, 1) + tl.sum(a * a, 1) * tl.sum(d2 * d2, 1)

    theta = tl.load(THETA + gate_off, mask=mt, other=0.0).to(tl.float32)
    if HAS_CLIP:  # per-token bound on the inner gradient's norm
        theta = theta * tl.minimum(clip / tl.sqrt(norm_sq + 1e-12), 1.0)
    log_eta = tl.load(LOG_ETA + gate_off, mask=mt, other=0.0).to(tl.float32)
    log_keep = tl.load(LOG_KEEP + gate_off, mask=mt, other=0.0).to(tl.float32)
    lp = tl.cumsum(log_eta, 0)  # log prod eta up to t
    lb = tl.cumsum(log_keep, 0)  # log prod (1 - alpha) up to t
    lp_end = tl.sum(log_eta, 0)
    lb_end = tl.sum(log_keep, 0)
    a_s = lb_end - lb + lp  # [s]
    later = (t[:, None] >= t[None, :]) & mt[:, None] & mt[None, :]  # [s, i]: s >= i
    decay_m = tl.sum(tl.exp(tl.where(later, a_s[:, None] - lp[None, :], float("-inf"))), 0)
    decay_s = tl.exp(lp_end - lp)
    gamma = tl.sum(tl.where(mt, tl.exp(a_s), 0.0), 0)
    beta = tl.exp(lb_end)
    p_end = tl.exp(lp_end)
    c_m = tl.where(mt, theta * decay_m, 0.0)
    c_s = tl.where(mt, theta * decay_s, 0.0)

    kt = tl.trans(k)
    new_w1 = beta * w1 + gamma * s1 - tl.dot(kt, d1 * c_m[:, None], input_precision="ieee")
    new_s1 = p_end * s1 - tl.dot(kt, d1 * c_s[:, None], input_precision="ieee")
    new_w2 = new_w1
    new_s2 = new_s1
    if DEPTH == 2:
        at = tl.trans(a)
        new_w2 = beta * w2 + gamma * s2 - tl.dot(at, d2 * c_m[:, None], input_precision="ieee")
        new_s2 = p_end * s2 - tl.dot(at, d2 * c_s[:, None], input_precision="ieee")
    return surprise, new_w1, new_w2, new_s1, new_s2


@triton.jit
def _load_weights(W1, W2, S1, S2, w1_off, mw1, w2_off, mw2, DEPTH: tl.constexpr):
    w1 = tl.load(W1 + w1_off, mask=mw1, other=0.0)
    s1 = tl.load(S1 + w1_off, mask=mw1, other=0.0)
    w2 = w1
    s2 = s1
    if DEPTH == 2:
        w2 = tl.load(W2 + w2_off, mask=mw2, other=0.0)
        s2 = tl.load(S2 + w2_off, mask=mw2, other=0.0)
    return w1, w2, s1, s2


@triton.jit
def _store_weights(W1, W2, S1, S2, w1_off, mw1, w2_off, mw2, w1, w2, s1, s2, DEPTH: tl.constexpr):
    tl.store(W1 + w1_off, w1, mask=mw1)
    tl.store(S1 + w1_off, s1, mask=mw1)
    if DEPTH == 2:
        tl.store(W2 + w2_off, w2, mask=mw2)
        tl.store(S2 + w2_off, s2, mask=mw2)


@triton.jit
def _chunk_step_kernel(W1, W2, S1, S2, IDX, ONLY, Q, K, V, LOG_ETA, LOG_KEEP, THETA, READ, SURPRISE,
                       H, T, D, F, eps, clip,
                       DEPTH: tl.constexpr, HAS_CLIP: tl.constexpr, DO_READ: tl.constexpr, HAS_ONLY: tl.constexpr,
                       BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    if HAS_ONLY:  # noqa: SIM102 (a constexpr test, resolved when compiling; the load only where it is true)
        if tl.load(ONLY + tl.program_id(0)) == 0:  # this session's chunk is not complete: leave it
            return
    row, t, mt, md, mf, x_off, mx, w1_off, mw1, w2_off, mw2 = _program_tile(IDX, H, T, D, F, DEPTH, BT, BD, BF)
    k = tl.load(K + x_off, mask=mx, other=0.0).to(tl.float32)
    v = tl.load(V + x_off, mask=mx, other=0.0).to(tl.float32)
    w1, w2, s1, s2 = _load_weights(W1, W2, S1, S2, w1_off, mw1, w2_off, mw2, DEPTH)
    if DO_READ:  # chunk-lagged read: the chunk-start weights
        q = tl.load(Q + x_off, mask=mx, other=0.0).to(tl.float32)
        read, _, _, _, _ = _mlp_out(q, w1, w2, md, D, eps, DEPTH)
        tl.store(READ + x_off, read, mask=mx)
    surprise, w1, w2, s1, s2 = _apply_chunk(w1, w2, s1, s2, k, v, LOG_ETA, LOG_KEEP, THETA, row * T + t, t, mt, md,
                                            mf, D, eps, clip, DEPTH, HAS_CLIP)
    tl.store(SURPRISE + row * T + t, surprise, mask=mt)
    _store_weights(W1, W2, S1, S2, w1_off, mw1, w2_off, mw2, w1, w2, s1, s2, DEPTH)


@triton.jit
def _read_kernel(W1, W2, IDX, Q, READ, H, T, D, F, eps,
                 DEPTH: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    _, _, _, md, _, x_off, mx, w1_off, mw1, w2_off, mw2 = _program_tile(IDX, H, T, D, F, DEPTH, BT, BD, BF)
    w1 = tl.load(W1 + w1_off, mask=mw1, other=0.0)
    w2 = tl.load(W2 + w2_off, mask=mw2, other=0.0)  # depth 1: the same matrix again (unused)
    q = tl.load(Q + x_off, mask=mx, other=0.0).to(tl.float32)
    read, _, _, _, _ = _mlp_out(q, w1, w2, md, D, eps, DEPTH)
    tl.store(READ + x_off, read, mask=mx)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _check_pool(weights: list[Tensor], momentum: list[Tensor] | None) -> tuple[int, int, int]:
    if len(weights) not in (1, 2):
        raise NotImplementedError("the Triton kernels cover memory depth 1 and 2")
    for t in weights + (momentum or []):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError("the state pool must be contiguous fp32")
    _, H, D, F = weights[0].shape
    return H, D, F


def _check_indices(state_indices: Tensor, rows: int) -> None:
    """Program b works on rows b of the activations and on pool slot state_indices[b]: one slot per row."""
    if state_indices.shape != (rows,):
        raise ValueError(f"state_indices has shape {tuple(state_indices.shape)}, the activations {rows} sessions")


def chunk_step(weights: list[Tensor], momentum: list[Tensor], state_indices: Tensor, q: Tensor | None, k: Tensor,
               v: Tensor, log_eta: Tensor, log_keep: Tensor, theta: Tensor, eps: float,
               grad_clip: float | None, only: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
    """Read (if q is given) and apply one chunk for B sessions, updating the pool in place at state_indices.

    only: [B] bool, the sessions to apply (the others' slots, read and surprise are left untouched): a decode
    batch whose sessions complete their chunks at different steps runs one launch of a fixed shape, with no
    host sync (what a CUDA graph captures).
    Returns (read [B, H, T, d] fp32 or None, surprise [B, H, T] fp32)."""
    H, D, F = _check_pool(weights, momentum)
    B, _, T, _ = k.shape
    _check_indices(state_indices, B)
    k, v = k.contiguous(), v.contiguous()
    gates = [g.contiguous().float() for g in (log_eta, log_keep, theta)]
    read = torch.empty(B, H, T, D, device=k.device, dtype=torch.float32) if q is not None else None
    surprise = torch.empty(B, H, T, device=k.device, dtype=torch.float32)
    if B == 0:
        return read, surprise
    depth = len(weights)
    w2, s2 = (weights[1], momentum[1]) if depth == 2 else (weights[0], momentum[0])
    if only is not None and only.shape != (B,):
        raise ValueError(f"only has shape {tuple(only.shape)}, the activations {B} sessions")
    _chunk_step_kernel[(B, H)](
        weights[0], w2, momentum[0], s2, state_indices.contiguous(), only.contiguous() if only is not None else
        state_indices, q.contiguous() if q is not None else k, k, v,
        *gates, read if read is not None else surprise, surprise, H, T, D, F, eps,
        float(grad_clip or 0.0), DEPTH=depth, HAS_CLIP=grad_clip is not None, DO_READ=q is not None,
        HAS_ONLY=only is not None, BT=_block(T), BD=_block(D), BF=_block(F))
    return read, surprise


def read(weights: list[Tensor], state_indices: Tensor, q: Tensor, eps: float) -> Tensor:
    """M*(q) with each session's weights from the pool: q [B, H, T, d] -> [B, H, T, d] fp32."""
    H, D, F = _check_pool(weights, None)
    B, _, T, _ = q.shape
    _check_indices(state_indices, B)
    out = torch.empty(B, H, T, D, device=q.device, dtype=torch.float32)
    if B and T:
        w2 = weights[1] if len(weights) == 2 else weights[0]
        _read_kernel[(B, H)](weights[0], w2, state_indices.contiguous(), q.contiguous(), out, H, T, D, F, eps,
                             DEPTH=len(weights), BT=_block(T), BD=_block(D), BF=_block(F),
                             num_warps=8)  # a head's W1, W2 in registers: 4 warps spill them (d 64, e 4)
    return out
