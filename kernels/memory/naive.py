"""The memory op in PyTorch: the memory MLP's read and its chunked update in closed form (DESIGN.md §2.1, §2.4).

The reference the Triton kernels (fused_chunk.py, chunk.py) are tested against, and the path the engine takes
wherever they do not apply (autograd, CPUs without the compiled kernels).

Shapes (one memory layer):
    B sessions, H memory heads, N tokens, d = mem_head_dim, e*d = hidden width, b = chunk size
    weights W[l]: [B, H, d_in(l), d_out(l)], fp32     (row convention: layer l maps a -> a @ W[l])
    momentum S[l]: same shapes as W[l]
    keys/values/queries: [B, H, N, d]; gates log_eta, log_keep, theta: [B, H, b]

The memory is M(x) = x + LN(W_L . gelu(... gelu(W_1 . x))) for depth L >= 2 (LN without affine
parameters, so the fast weights are only the matrices) and M(x) = x . W_1 for depth 1.

The update of one chunk, all gradients taken at the chunk-start weights M_0 (the "anchor"), with
u_i = grad of ||M_0(k_i) - v_i||^2 and per-token gates:
    S_t = eta_t S_{t-1} - theta_t u_t,   M_t = (1 - alpha_t) M_{t-1} + S_t
has the closed form at the chunk end (P_t = prod eta, beta_t = prod (1 - alpha), within the chunk)
    S_b = P_b S_0 - sum_i theta_i (P_b / P_i) u_i
    M_b = beta_b M_0 + gamma S_0 - sum_i theta_i c_i u_i,
    gamma = sum_s (beta_b / beta_s) P_s,   c_i = sum_{s>=i} (beta_b / beta_s) (P_s / P_i)
and because every u_i is a sum of outer products a_i^T delta_i (one per MLP layer), each weighted
sum over the chunk is one GEMM: A^T diag(coef) Delta. The gradients are written out by hand (no
autograd), so serving runs the update under inference_mode; outer training differentiates through it.

chunk_step_ref, read_ref and prefill_ref take the Triton kernels' arguments (a pool of sessions' weights at
`state_indices`; packed sequences at `cu_seqlens`) and return the new weights instead of writing them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_grad(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(z * _INV_SQRT2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT2PI


def memory_read(weights: list[Tensor], x: Tensor, eps: float) -> Tensor:
    """M*(x): the memory's forward pass without update. x [B, H, N, d] -> [B, H, N, d]."""
    if len(weights) == 1:
        return x @ weights[0]
    a = x
    for w in weights[:-1]:
        a = F.gelu(a @ w)
    z = a @ weights[-1]
    return x + F.layer_norm(z, z.shape[-1:], eps=eps)


def memory_forward(weights: list[Tensor], x: Tensor, eps: float) -> tuple[Tensor, tuple]:
    """M(x) and what the hand-written backward needs: inputs a_{l-1}, pre-activations z_l, LN stats."""
    inputs, pre = [], []
    a = x
    for w in weights:
        inputs.append(a)
        z = a @ w
        pre.append(z)
        a = F.gelu(z)
    if len(weights) == 1:
        return pre[-1], (inputs, pre, None)
    z = pre[-1]
    centred = z - z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)  # not z.var: much slower on a CPU at these widths
    zhat = centred * rstd
    return x + zhat, (inputs, pre, (zhat, rstd))


def memory_surprise(weights: list[Tensor], k: Tensor, v: Tensor, eps: float) -> Tensor:
    """Per-token loss ||M(k) - v||^2 (sum over features) at the given weights: [B, H, N]."""
    return (memory_read(weights, k, eps) - v).square().sum(-1)


def memory_backward(weights: list[Tensor], out: Tensor, v: Tensor, saved: tuple):
    """Per-token gradients of ||M(k) - v||^2 in factored form, from memory_forward(k)'s output and saved.

    Returns (inputs, deltas): for each layer l, the token gradient of W[l] is inputs[l]^T deltas[l]
    (an outer product per token); inputs[l] [B, H, N, d_in], deltas[l] [B, H, N, d_out].
    """
    inputs, pre, ln = saved
    grad = 2.0 * (out - v)
    if ln is not None:  # back through x + LN(z_L)
        zhat, rstd = ln
        grad = rstd * (grad - grad.mean(-1, keepdim=True) - zhat * (grad * zhat).mean(-1, keepdim=True))
    deltas = [grad]
    for layer in range(len(weights) - 1, 0, -1):
        grad = (grad @ weights[layer].transpose(-1, -2)) * _gelu_grad(pre[layer - 1])
        deltas.append(grad)
    return inputs, deltas[::-1]


def memory_grads(weights: list[Tensor], k: Tensor, v: Tensor, eps: float):
    """(inputs, deltas) of the per-token gradients at k, v; see memory_backward."""
    out, saved = memory_forward(weights, k, eps)
    return memory_backward(weights, out, v, saved)


def chunk_coefficients(log_eta: Tensor, log_keep: Tensor):
    """Closed-form coefficients of a chunk's momentum + decay scan. Log-gates [..., b] ->

    beta [...]:   prod(1 - alpha) over the chunk, multiplies M_0
    gamma [...]:  coefficient of S_0 in M_b
    p_end [...]:  prod(eta) over the chunk, multiplies S_0 in S_b
    decay_m [..., b], decay_s [..., b]: weight of theta_i u_i in M_b and in S_b
    Computed from log-gates, so nothing divides by a vanishing product; independent of the memory
    weights, so the coefficients of many chunks can be computed at once ([..., n_chunks, b]).
    """
    lp = torch.cumsum(log_eta, -1)  # log P_t
    lb = torch.cumsum(log_keep, -1)  # log beta_t
    lp_end, lb_end = lp[..., -1:], lb[..., -1:]
    # exponent[s, i] = log(beta_b / beta_s) + log(P_s / P_i), for s >= i
    b = log_eta.shape[-1]
    upper = torch.ones(b, b, dtype=torch.bool, device=log_eta.device).tril()  # [s, i]: s >= i
    expo = (lb_end - lb + lp).unsqueeze(-1) - lp.unsqueeze(-2)
    decay_m = torch.exp(expo.masked_fill(~upper, float("-inf"))).sum(-2)
    decay_s = torch.exp(lp_end - lp)
    gamma = torch.exp(lb_end - lb + lp).sum(-1)
    return lb_end.exp().squeeze(-1), gamma, lp_end.exp().squeeze(-1), decay_m, decay_s


def apply_chunk(weights: list[Tensor], momentum: list[Tensor], inputs: list[Tensor], deltas: list[Tensor],
                theta: Tensor, coefficients: tuple, grad_clip: float | None, in_place: bool = False):
    """New (W, S) after a chunk whose per-token gradients are inputs[l]^T deltas[l] (all at W).

    theta [B, H, b]; coefficients from chunk_coefficients for this chunk. in_place: W and S are written over
    (only for a caller that owns them, with no autograd): at 32 sessions the weights are megabytes, which
    fresh outputs stream through memory twice more.
    """
    if grad_clip is not None:  # ||a^T delta||_F = ||a|| ||delta||, summed over the layers
        norm_sq = sum(a.square().sum(-1) * d.square().sum(-1) for a, d in zip(inputs, deltas))
        theta = theta * torch.clamp(grad_clip * torch.rsqrt(norm_sq + 1e-12), max=1.0)
    beta, gamma, p_end, decay_m, decay_s = coefficients
    coef_m, coef_s = (decay_m * theta).unsqueeze(-1), (decay_s * theta).unsqueeze(-1)  # [B, H, b, 1]
    beta, gamma, p_end = (c[..., None, None] for c in (beta, gamma, p_end))
    new_w, new_s = [], []
    for w, s, a, d in zip(weights, momentum, inputs, deltas):
        # each weighted sum is one GEMM that accumulates into the decayed weights: A^T diag(coef) Delta; the
        # weights are the big tensors here (sessions x heads x d_in x d_out), so each is read and written as few
        # times as possible (otherwise in place only on tensors made here: autograd needs none of them)
        a_t = a.transpose(-1, -2)
        decayed_w = w.mul_(beta) if in_place else beta * w  # W's update reads the old S: W first
        new_w.append(_minus_matmul(decayed_w.addcmul_(gamma, s), a_t, d * coef_m))
        new_s.append(_minus_matmul(s.mul_(p_end) if in_place else p_end * s, a_t, d * coef_s))
    return new_w, new_s


def _minus_matmul(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x - a @ b over any leading dims, written into x (a contiguous tensor its caller made for this), in one
    baddbmm_: the out-of-place baddbmm first copies x into a new tensor, which for the weights cost as much as
    the products themselves. x [..., m, n], a [..., m, k], b [..., k, n]."""
    lead = x.shape[:-2]
    a, b = a.expand(*lead, *a.shape[-2:]), b.expand(*lead, *b.shape[-2:])
    x.view(-1, *x.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), alpha=-1.0)
    return x


def chunk_update(weights: list[Tensor], momentum: list[Tensor], k: Tensor, v: Tensor, log_eta: Tensor,
                 log_keep: Tensor, theta: Tensor, eps: float, grad_clip: float | None, in_place: bool = False):
    """Apply one full chunk to (W, S). k, v [B, H, b, d]; gates [B, H, b]. Returns new (W, S) lists (the given
    ones, written over, if in_place)."""
    inputs, deltas = memory_grads(weights, k, v, eps)
    return apply_chunk(weights, momentum, inputs, deltas, theta, chunk_coefficients(log_eta, log_keep), grad_clip,
                       in_place)


def read_and_update(weights: list[Tensor], momentum: list[Tensor], q: Tensor, k: Tensor, v: Tensor,
                    theta: Tensor, coefficients: tuple, eps: float, grad_clip: float | None, in_place: bool = False):
    """A full chunk in one pass: read M*(q) and the surprise at the chunk-start weights, then apply the chunk.

    q, k, v [B, H, b, d]; one forward over [q | k] serves both the read and the gradients.
    Returns (read [B, H, b, d], surprise [B, H, b], new W, new S); in_place as for apply_chunk.
    """
    b = q.shape[2]
    out, (inputs, pre, ln) = memory_forward(weights, torch.cat([q, k], 2), eps)
    half = [t[:, :, b:] for t in inputs], [t[:, :, b:] for t in pre], None if ln is None else (
        ln[0][:, :, b:], ln[1][:, :, b:])
    out_k = out[:, :, b:]
    new_w, new_s = apply_chunk(weights, momentum, *memory_backward(weights, out_k, v, half), theta, coefficients,
                               grad_clip, in_place)
    return out[:, :, :b], (out_k - v).square().sum(-1), new_w, new_s


class _BoundedGradient(torch.autograd.Function):
    """Identity forward; backward scales each [d_in, d_out] slice of the gradient down to norm at most `bound`."""

    @staticmethod
    def forward(ctx, x: Tensor, bound: float) -> Tensor:
        ctx.bound = bound
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # the norm in float64: an exploding gradient's fp32 sum of squares overflows; an infinite element is first
        # clamped to the largest finite value, a NaN to zero
        big = torch.finfo(grad.dtype).max
        grad = torch.nan_to_num(grad, nan=0.0, posinf=big, neginf=-big)
        norm = torch.linalg.vector_norm(grad.double(), dim=(-2, -1), keepdim=True)
        return grad * (ctx.bound / norm.clamp_min(ctx.bound)).to(grad.dtype), None


def bound_gradient(state: list[Tensor], bound: float | None) -> list[Tensor]:
    """The state as it is, with the gradient that flows back through it bounded per session, head and matrix.
    Backpropagating through many chunk updates can grow a state's gradient geometrically, once a memory has read
    tens of KB (measured in models/titans-mal-recall/README.md, "What limits the horizon"): bounding it at every
    chunk keeps the chunks near the loss in the gradient and caps what the far ones add, where a whole-model clip
    would rescale the near ones to nothing. None: unbounded."""
    return state if bound is None else [_BoundedGradient.apply(x, bound) for x in state]


def chunks(weights: list[Tensor], momentum: list[Tensor], q: Tensor, k: Tensor, v: Tensor, log_eta: Tensor,
           log_keep: Tensor, theta: Tensor, chunk_size: int, eps: float, grad_clip: float | None,
           in_place: bool = False, chunk_step=None, state_grad_bound: float | None = None):
    """Whole chunks one after the other: q, k, v [B, H, n*b, d], gates [B, H, n*b]; each chunk read at its start
    weights, then applied (read_and_update), its scan coefficients computed for all chunks at once (they depend on
    the gates alone). chunk_step: read_and_update's stand-in (a compiled copy of it). state_grad_bound: see
    bound_gradient (training). Returns (read [B, H, n*b, d], surprise [B, H, n*b], new W, new S); in_place as
    for apply_chunk."""
    B, H, R, d = q.shape
    n, b = R // chunk_size, chunk_size
    coefficients = chunk_coefficients(log_eta.unflatten(2, (n, b)), log_keep.unflatten(2, (n, b)))  # [B, H, n, ...]
    thetas = theta.unflatten(2, (n, b))
    step = chunk_step or read_and_update
    reads, surprises = [], []
    for j in range(n):
        rows = slice(j * b, (j + 1) * b)
        out, surprise, weights, momentum = step(weights, momentum, q[:, :, rows], k[:, :, rows], v[:, :, rows],
                                                thetas[:, :, j], tuple(c[:, :, j] for c in coefficients), eps,
                                                grad_clip, in_place)
        weights, momentum = bound_gradient(weights, state_grad_bound), bound_gradient(momentum, state_grad_bound)
        reads.append(out)
        surprises.append(surprise)
    return torch.cat(reads, 2), torch.cat(surprises, 2), weights, momentum


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
