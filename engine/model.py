"""The Titans model (LMM, MAC, MAG, MAL): its layers and one step over per-session state.

Legend: B sessions in the batch, R rows (new tokens) in this step, D model width, V vocabulary,
nh attention heads of width hd, H memory heads of width d, b memory chunk, C MAC segment, W window.

Titans.step advances B sessions by R rows each (a step: engine/step.py plans them and says which rows are real);
the memory walks the step chunk by chunk, reading with chunk-start weights and applying each full chunk in closed
form (kernels/memory). Equation numbers refer to the paper (Behrouz et al., arXiv 2501.00663).

Session state, fixed in size: per mixer a dict of tensors with a leading batch dimension: memory
weights W{l}, momentum S{l} and the partial-chunk buffer, conv tails, the attention ring (keys and
values of the last C or W positions, slot = position mod span), MAC segment-start weights Wseg{l}.
The model works on the nested form layers[i][j] = dict of mixer j of block i (engine/state.py).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import kernels.memory as memory_op
from kernels.memory.naive import chunk_update, chunks, memory_surprise

from . import step as steps
from .config import ModelConfig
from .quant import Linear
from .state import ModelState, State
from .step import StepContext


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Memory math runs in fp32, or wider when the model itself is (float64 in the exactness tests)."""
    return torch.promote_types(dtype, torch.float32)


# --- building blocks -----------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_in = Linear(dim, 2 * hidden, bias=False)
        self.w_out = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, -1)
        return self.w_out(F.silu(gate) * up)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on the last dim; cos, sin broadcastable to x."""
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class ShortConv(nn.Module):
    """Causal depthwise conv (kernel K) whose last K-1 inputs live in the session state."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.randn(channels, kernel) / math.sqrt(kernel))  # [P, K]

    def forward(self, x: Tensor, tail: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """x [B, R, P], tail [B, K-1, P] -> y [B, R, P], new tail [B, K-1, P]."""
        ext = torch.cat([tail, x], 1)  # [B, K-1+R, P]
        # tap by tap: F.conv1d with groups=P, and the unfolded product (strided, then a sum over K), are slower for
        # the few rows of a step than these K contiguous products (bench/engine_probes.py). Serving adds them in place;
        # training keeps each product for autograd. The same products summed in the same order: the same bits.
        rows, taps = x.shape[1], self.weight.t().contiguous()  # taps [K, P], each a contiguous row
        y = ext[:, :rows] * taps[0]
        for k in range(1, self.kernel):
            product = ext[:, k:k + rows] * taps[k]
            y = y + product if torch.is_grad_enabled() else y.add_(product)
        index = ctx.tail_index(self.kernel)[..., None].expand(-1, -1, x.shape[-1])
        return y, ext.gather(1, index)


def memory_shapes(depth: int, head_dim: int, expansion: int) -> list[tuple[int, int]]:
    """(d_in, d_out) of each weight matrix of one head's memory MLP."""
    if depth == 1:
        return [(head_dim, head_dim)]
    hidden = expansion * head_dim
    return [(head_dim, hidden)] + [(hidden, hidden)] * (depth - 2) + [(hidden, head_dim)]


def init_memory_weights(heads: int, depth: int, head_dim: int, expansion: int, generator=None) -> list[Tensor]:
    """Initial weights M_0 (learned outer parameters): [H, d_in, d_out] per layer."""
    weights = []
    for d_in, d_out in memory_shapes(depth, head_dim, expansion):
        std = 0.02 if depth == 1 else 1.0 / math.sqrt(d_in)
        weights.append(torch.randn(heads, d_in, d_out, generator=generator) * std)
    return weights


# gate logits (theta, eta, alpha) -> log sigmoid(z_theta), log eta, log(1 - alpha) = log sigmoid(-z_alpha)
_GATE_SIGNS = (1.0, 1.0, -1.0)


class NeuralMemory(nn.Module):
    """One memory layer: learned initial weights M_0 and the read / write rules on session state.

    The owning mixer projects q, k, v (conv, SiLU, l2 on q and k) and the gate logits (theta, eta,
    alpha) per head. State: W{l}, S{l} [B, H, d_in, d_out] fp32; buf [B, H, b, 2d+3] fp32 holding the
    current chunk's keys, values and log-gates (log sigmoid(z_theta), log eta, log(1 - alpha)).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.heads, self.head_dim = cfg.mem_heads, cfg.mem_head_dim
        self.init_weights = nn.ParameterList(
            nn.Parameter(w) for w in init_memory_weights(self.heads, cfg.mem_depth, self.head_dim, cfg.mem_expansion))
        self.register_buffer("gate_signs", torch.tensor(_GATE_SIGNS).repeat_interleave(self.heads), persistent=False)
        self.compiled_chunk_step = None  # read_and_update through torch.compile, set by compiled.compile_steps
        self.compiled_training_step = None  # the same, differentiated through: set by compiled.compile_training_steps
        self.state_grad_bound: float | None = None  # training: naive.bound_gradient between chunks
        self.seen_gates: list[Tensor] | None = None  # log-gates of each gates() call while Titans.watching_gates

    def gate_bias(self) -> Tensor:
        """Initial bias of the 3H gate logits: small theta, eta ~ 0.9, alpha ~ 0 (DESIGN §2.3)."""
        c = self.cfg
        return torch.tensor([c.theta_bias_init, c.eta_bias_init, c.alpha_bias_init]).repeat_interleave(self.heads)

    def initial_state(self) -> State:
        state, dtype = {}, self.dtype
        for i, w in enumerate(self.init_weights):
            state[f"W{i}"] = w.to(dtype)
            state[f"S{i}"] = torch.zeros_like(w, dtype=dtype)
        state["buf"] = torch.zeros(self.heads, self.cfg.chunk_size, 2 * self.head_dim + 3, device=w.device, dtype=dtype)
        return state

    @property
    def dtype(self) -> torch.dtype:
        return state_dtype(self.init_weights[0].dtype)

    def weights(self, state: State, prefix: str = "W") -> list[Tensor]:
        return [state[f"{prefix}{i}"] for i in range(len(self.init_weights))]

    def heads_of(self, x: Tensor, parts: int) -> Tensor:
        """[B, R, parts*H*d] -> [parts, B, H, R, d] in the memory dtype (fp32 or wider)."""
        B, R, _ = x.shape
        return x.to(self.dtype).view(B, R, parts, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def qkv(self, projected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Post-conv projections [B, R, 3D] -> q, k (SiLU unless cfg.qk_silu is off, l2-normalised), v (SiLU):
        [B, H, R, d] each."""
        silu_all = self.cfg.qk_silu  # one SiLU over q, k and v, before the cast to the memory's dtype
        x = self.heads_of(F.silu(projected) if silu_all else projected, 3)
        qk = F.normalize(x[:2], dim=-1)
        return qk[0], qk[1], x[2] if silu_all else F.silu(x[2])

    def gates(self, logits: Tensor) -> Tensor:
        """Gate logits [B, R, 3H] (theta, eta, alpha) -> log-gates [B, H, R, 3] for the chunk buffer."""
        B, R, _ = logits.shape
        log_gates = F.logsigmoid(logits.to(self.dtype) * self.gate_signs).view(B, R, 3, self.heads).permute(0, 3, 1, 2)
        if self.seen_gates is not None:
            self.seen_gates.append(log_gates)
        return log_gates

    def theta(self, log_sigmoid_theta: Tensor) -> Tensor:
        """Inner learning rate theta_max * sigmoid(z_theta), from the log-gate the chunk buffer keeps."""
        return self.cfg.theta_max * log_sigmoid_theta.exp()

    def read(self, weights: list[Tensor], q: Tensor, dtype) -> Tensor:
        """M*(q), retrieval without update (Eq. 15): q [B, H, R, d] -> [B, R, H*d] in the activation dtype."""
        return memory_op.read(weights, q, self.cfg.norm_eps).transpose(1, 2).flatten(2).to(dtype)

    def pool(self, state: State, owned: bool) -> tuple[list[Tensor], list[Tensor]]:
        """The W/S that serving updates in place: the state's own tensors when the caller owns them (a batch's
        slots), else contiguous copies (a caller's states are never written)."""
        def mine(x: Tensor) -> Tensor:
            return x if owned and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)

        return [mine(x) for x in self.weights(state)], [mine(x) for x in self.weights(state, "S")]

    @staticmethod
    def with_memory(state: State, weights: list[Tensor], momentum: list[Tensor]) -> State:
        return {**state, **{f"W{i}": w for i, w in enumerate(weights)}, **{f"S{i}": s for i, s in enumerate(momentum)}}

    def surprise(self, state: State, k: Tensor, v: Tensor) -> Tensor:
        """||M(k) - v||^2 at the read weights, mean over heads: [B, R]."""
        return memory_surprise(self.weights(state), k, v, self.cfg.norm_eps).mean(1)

    def scan(self, state: State, q: Tensor, k: Tensor, v: Tensor, log_gates: Tensor, ctx: StepContext,
             want_surprise: bool, dtype) -> tuple[Tensor, State, Tensor | None]:
        """Read M*(q) with each row's chunk-start weights M_{t'}, t' = t - mod(t, b) (Eq. 16), writing the rows
        chunk by chunk.

        q, k, v [B, H, R, d], log_gates [B, H, R, 3] -> (y [B, R, H*d], new state, surprise [B, R] or None).
        """
        pieces = ctx.chunk_pieces()
        if len(pieces) == 1:  # the common case (decode, batched steps): no slicing
            y = self.read(self.weights(state), q, dtype)
            surprise = self.surprise(state, k, v) if want_surprise else None
            return y, self.write(state, k, v, log_gates, ctx), surprise
        # Chunks that every session covers whole skip the buffer: one forward serves read, surprise and gradients
        # (naive.read_and_update, or the kernels' prefill).
        b = self.cfg.chunk_size
        whole = [i for i, (_, _, p) in enumerate(pieces) if all(x % b == 0 and c == b for x, c in zip(*p.host))]
        ys, surprises = [], []
        for i, (a, e, piece) in enumerate(pieces):
            if i in whole:
                if i == whole[0]:
                    e = pieces[whole[-1]][1]
                    y, surprise, state = self.whole_chunks(state, q[:, :, a:e], k[:, :, a:e], v[:, :, a:e],
                                                           log_gates[:, :, a:e], dtype, ctx.owned)
                    ys.append(y)
                    surprises.append(surprise)
                continue
            ys.append(self.read(self.weights(state), q[:, :, a:e], dtype))
            if want_surprise:
                surprises.append(self.surprise(state, k[:, :, a:e], v[:, :, a:e]))
            state = self.write(state, k[:, :, a:e], v[:, :, a:e], log_gates[:, :, a:e], piece)
        surprise = torch.cat(surprises, 1) if want_surprise else None
        return torch.cat(ys, 1), state, surprise

    def whole_chunks(self, state: State, q: Tensor, k: Tensor, v: Tensor, log_gates: Tensor, dtype,
                     owned: bool) -> tuple[Tensor, Tensor, State]:
        """Chunks that every session reads whole, from a chunk edge: q, k, v [B, H, n*b, d] -> (y [B, n*b, H*d],
        surprise [B, n*b], new state). Serving updates the pool in place (kernels/memory: Triton or PyTorch, each
        chunk through the compiled step when there is one); training differentiates through naive.chunks."""
        log_theta, log_eta, log_keep = log_gates.unbind(-1)
        args = (q, k, v, log_eta, log_keep, self.theta(log_theta), self.cfg.chunk_size, self.cfg.norm_eps,
                self.cfg.mem_grad_clip)
        if torch.is_grad_enabled():
            read, surprise, w, s = chunks(self.weights(state), self.weights(state, "S"), *args,
                                          chunk_step=self.compiled_training_step,
                                          state_grad_bound=self.state_grad_bound)
        else:
            w, s = self.pool(state, owned)
            read, surprise = memory_op.prefill(w, s, *args, chunk_step=self.compiled_chunk_step)
        return read.transpose(1, 2).flatten(2).to(dtype), surprise.mean(1), self.with_memory(state, w, s)

    def write(self, state: State, k: Tensor, v: Tensor, log_gates: Tensor, ctx: StepContext) -> State:
        """Append this step's rows to the chunk buffer; for the sessions whose chunk is full, apply it (the loss of
        Eq. 12, momentum Eq. 10/14 and decay Eq. 13 over a chunk, in the closed form of Eqs. 16-18), then empty their
        buffer."""
        d, b = self.head_dim, self.cfg.chunk_size
        rows = torch.cat([k, v, log_gates], -1)  # [B, H, R, 2d+3]
        buf = ctx.write(state["buf"], 2, b, rows.transpose(1, 2))
        new = dict(state)
        if ctx.any_full:
            full = ctx.flag("full")
            log_theta, log_eta, log_keep = buf[..., 2 * d:].unbind(-1)
            args = (buf[..., :d], buf[..., d:2 * d], log_eta, log_keep, self.theta(log_theta), self.cfg.norm_eps,
                    self.cfg.mem_grad_clip)
            some = ctx.full_sessions()  # None in a compiled step, which knows no host positions: a mask then
            if torch.is_grad_enabled():  # training: differentiated through
                w, s = self.weights(state), self.weights(state, "S")
                w_new, s_new = chunk_update(w, s, *args)
                if some is None or len(some) < len(w[0]):
                    w_new = [torch.where(full, n, o) for n, o in zip(w_new, w)]
                    s_new = [torch.where(full, n, o) for n, o in zip(s_new, s)]
            else:
                w_new, s_new = self.pool(state, ctx.owned)
                memory_op.update(w_new, s_new, *args, only=full.flatten() if some is None else some)
            new = self.with_memory(new, w_new, s_new)
            buf = buf.masked_fill(full, 0.0)
        new["buf"] = buf
        return new


class Attention(nn.Module):
    """Multi-head attention over [ring of past positions | persistent rows | this step's rows].

    rule "window" (MAG/MAL, span W) or "segment" (MAC, span C). With rows_per_pos = 2 (MAC), each
    position contributes two key/value rows: its memory retrieval h and its token x. State: ring
    [B, 2 (k|v), nh, m, span, hd] with RoPE-rotated keys, read in place (never concatenated).
    """

    def __init__(self, cfg: ModelConfig, span: int, rule: str, rows_per_pos: int):
        super().__init__()
        self.cfg, self.span, self.rule, self.m = cfg, span, rule, rows_per_pos
        self.nh, self.hd = cfg.n_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.dim, bias=False)
        self.wkv = Linear(cfg.dim, 2 * cfg.dim, bias=False)
        # persistent memory (Eqs. 19-20): key and value rows that every query sees
        self.persistent = nn.Parameter(torch.randn(2, self.nh, cfg.n_persistent, self.hd) * 0.02)

    def initial_state(self) -> State:
        p = self.persistent
        return {"ring": torch.zeros(2, self.nh, self.m, self.span, self.hd, device=p.device, dtype=p.dtype)}

    def forward(self, x: Tensor, sources: list[Tensor], state: State, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """x [B, R, D] queries; sources: m tensors [B, R, D] giving each position's key/value rows.

        Returns the head outputs [B, R, D] (before any output projection) and the new ring.
        """
        B, R, _ = x.shape
        nh, hd, m = self.nh, self.hd, self.m
        kv = torch.stack([self.wkv(src) for src in sources], 2).view(B, R, m, 2, nh, hd)
        qk = apply_rope(torch.cat([self.wq(x).view(B, R, 1, nh, hd), kv[:, :, :, 0]], 2), *ctx.rope(x.dtype))
        q = qk[:, :, 0].transpose(1, 2) * hd ** -0.5  # [B, nh, R, hd]
        k, v = qk[:, :, 1:], kv[:, :, :, 1]  # [B, R, m, nh, hd]
        ring, rows = state["ring"], torch.stack([k, v], 2).transpose(3, 4)  # rows [B, R, 2, nh, m, hd]
        if self.banded(ctx):
            out = self.banded_window(q, k[:, :, 0].transpose(1, 2), v[:, :, 0].transpose(1, 2), ring, ctx)
            return out.transpose(1, 2).flatten(2), ctx.write(ring, 4, self.span, rows)
        # One row (decode) goes into the ring first, over a slot no longer visible, and is read from there:
        # no concatenation, and a compiled step updates the ring in place.
        if R == 1:
            ring = ctx.write(ring, 4, self.span, rows)
        ring_k, ring_v = ring[:, 0].flatten(2, 3), ring[:, 1].flatten(2, 3)  # [B, nh, m*span, hd]
        step_k, step_v = (t.expand(B, -1, -1, -1) for t in self.persistent)  # [B, nh, N_p, hd]
        if R > 1:
            step_k = torch.cat([step_k, k.permute(0, 3, 2, 1, 4).reshape(B, nh, m * R, hd)], 2)
            step_v = torch.cat([step_v, v.permute(0, 3, 2, 1, 4).reshape(B, nh, m * R, hd)], 2)
        scores = torch.cat([q @ ring_k.transpose(-1, -2), q @ step_k.transpose(-1, -2)], -1)
        mask = ctx.attention_mask(self.span, self.rule, m)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        n_ring = ring_k.shape[2]
        out = probs[..., :n_ring] @ ring_v + probs[..., n_ring:] @ step_v  # [B, nh, R, hd]
        if R > 1:
            ring = ctx.write(ring, 4, self.span, rows)
        return out.transpose(1, 2).flatten(2), ring

    def banded(self, ctx: StepContext) -> bool:
        """Whether a step takes the banded path: a window step of at least 2W rows of aligned sessions, every row a
        token, each session at a multiple of the window (so ring slot j holds position pos - W + j) — a prompt or
        a training batch. The full product scores every row against every row of the step, R / (2W) times the
        work of the band. Steps are at most MAX_SPAN rows, so a window that
        does not divide MAX_SPAN is banded in a sequence's first step only."""
        if self.rule != "window" or self.m != 1 or ctx.rows < 2 * self.span or not ctx.unpadded:
            return False
        return all(p % self.span == 0 for p in ctx.host[0])

    def banded_window(self, q: Tensor, k: Tensor, v: Tensor, ring: Tensor, ctx: StepContext) -> Tensor:
        """Sliding-window attention by blocks of W rows, each block against [previous W | its own W | persistent].

        q, k, v [B, nh, R, hd] (q scaled, q and k rotated); ring [B, 2, nh, 1, W, hd] in position order.
        Returns [B, nh, R, hd]. Rows past R (padding up to a multiple of W) are after every real row: never seen.
        """
        B, nh, R, hd = q.shape
        W = self.span
        n = -(-R // W)
        pad = (0, 0, 0, n * W - R)
        keys = torch.cat([ring[:, 0, :, 0], F.pad(k, pad)], 2)  # [B, nh, (n+1) W, hd]
        values = torch.cat([ring[:, 1, :, 0], F.pad(v, pad)], 2)
        key_blocks = keys.unfold(2, 2 * W, W)  # [B, nh, n, hd, 2W]: block j's keys are positions of rows jW-W..jW+W-1
        value_blocks = values.unfold(2, 2 * W, W).transpose(-1, -2)  # [B, nh, n, 2W, hd]
        q_blocks = F.pad(q, pad).view(B, nh, n, W, hd)
        persistent_k, persistent_v = self.persistent[0][:, None], self.persistent[1][:, None]  # [nh, 1, N_p, hd]
        scores = torch.cat([q_blocks @ key_blocks, q_blocks @ persistent_k.transpose(-1, -2)], -1)
        probs = scores.masked_fill(~self.band_mask(ctx, n), float("-inf")).softmax(-1)
        out = probs[..., :2 * W] @ value_blocks + probs[..., 2 * W:] @ persistent_v  # [B, nh, n, W, hd]
        return out.flatten(2, 3)[:, :, :R]

    def band_mask(self, ctx: StepContext, blocks: int) -> Tensor:
        """[B, 1, n, W, 2W + N_p]: row a of a block sees key c of its 2W iff a < c <= a + W (the last W positions,
        itself included), and a ring key only once written (position >= 0); persistent rows always."""
        def make():
            W, dev = self.span, ctx.pos.device
            a, c = torch.arange(W, device=dev)[:, None], torch.arange(2 * W, device=dev)
            local = (a < c) & (c <= a + W)  # [W, 2W]
            written = torch.ones(ctx.pos.shape[0], blocks, 1, 2 * W, dtype=torch.bool, device=dev)
            written[:, 0, :, :W] = (ctx.pos >= W)[:, None, None]  # block 0's first W keys come from the ring
            persistent = torch.ones(ctx.pos.shape[0], blocks, W, self.cfg.n_persistent, dtype=torch.bool, device=dev)
            return torch.cat([local & written, persistent], -1)[:, None]
        return ctx._cached(("band", self.span, blocks), make)


# --- the four mixers ---------------------------------------------------------------------------------

class MemoryMixer(nn.Module):
    """LMM mixer (also MAL's memory layer and MAG's memory branch).

    One projection of the block input u gives q, k, v (conv, SiLU, l2 on q and k), the output gate and
    the gate logits; y = M*(q) with the chunk-start weights; output W_o(norm(y) * silu(u W_g)).
    """

    def __init__(self, cfg: ModelConfig, gated_output: bool = True):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.memory = NeuralMemory(cfg)
        self.gated_output = gated_output
        self.w_in = Linear(D, (4 if gated_output else 3) * D + 3 * cfg.mem_heads)  # [qkv | gate | gate logits]
        self.conv = ShortConv(3 * D, cfg.conv_kernel)
        if gated_output:
            self.out_norm = RMSNorm(D, cfg.norm_eps)
            self.w_out = Linear(D, D, bias=False)

    def initial_state(self) -> State:
        w = self.conv.weight
        return {**self.memory.initial_state(),
                "conv": torch.zeros(self.cfg.conv_kernel - 1, 3 * self.cfg.dim, device=w.device, dtype=w.dtype)}

    def retrieve(self, u: Tensor, state: State, ctx: StepContext, want_surprise: bool):
        """Read then write the memory for this step's rows. Returns (y [B, R, D], out gate, state, surprise)."""
        mem, D = self.memory, self.cfg.dim
        # split, not slices: each slice's backward would zero-fill and copy a gradient of the whole projection
        qkv, gate, gate_logits = self.w_in(u).split([3 * D, self.w_in.out_features - 3 * D - 3 * mem.heads,
                                                     3 * mem.heads], -1)
        qkv, tail = self.conv(qkv, state["conv"], ctx)
        q, k, v = mem.qkv(qkv)
        y, new, surprise = mem.scan(state, q, k, v, mem.gates(gate_logits), ctx, want_surprise, u.dtype)
        new["conv"] = tail
        return y, gate, new, surprise

    def forward(self, u: Tensor, state: State, ctx: StepContext, want_surprise: bool):
        y, gate, new, surprise = self.retrieve(u, state, ctx, want_surprise)
        return self.w_out(self.out_norm(y) * F.silu(gate)), new, surprise


class MAGMixer(nn.Module):
    """Sliding-window attention and the memory in parallel (Eqs. 26-28): o = W_o(norm(y) g1 * sigmoid(norm(m) g2))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg, cfg.window, "window", 1)
        self.mem = MemoryMixer(cfg, gated_output=False)
        self.norm_attn = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm_mem = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w_out = Linear(cfg.dim, cfg.dim, bias=False)

    def initial_state(self) -> State:
        return {**self.attn.initial_state(), **self.mem.initial_state()}

    def forward(self, u: Tensor, state: State, ctx: StepContext, want_surprise: bool):
        y, ring = self.attn(u, [u], state, ctx)
        m, _, new, surprise = self.mem.retrieve(u, state, ctx, want_surprise)
        new["ring"] = ring
        return self.w_out(self.norm_attn(y) * torch.sigmoid(self.norm_mem(m))), new, surprise


class SWAMixer(nn.Module):
    """MAL's attention layer, after its memory layer (Eqs. 29-31): sliding-window attention with persistent rows,
    then W_o."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg, cfg.window, "window", 1)
        self.w_out = Linear(cfg.dim, cfg.dim, bias=False)

    def initial_state(self) -> State:
        return self.attn.initial_state()

    def forward(self, u: Tensor, state: State, ctx: StepContext, want_surprise: bool):
        y, ring = self.attn(u, [u], state, ctx)
        return self.w_out(y), {"ring": ring}, None


class MACMixer(nn.Module):
    """Memory as context (Eqs. 21-25; DESIGN §2.9).

    h_j = M*(q_j) with the segment-start weights; attention of x_i over [persistent | (h_j, x_j), j <= i in
    the segment]; the attention output y (projected, RMS-normalised) is written to memory;
    o = W_o(y * sigmoid(norm(M*(y)))) with chunk-start weights. Extra state: Wseg{l} (segment-start
    weights), conv tails of the x and y projections.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.memory = NeuralMemory(cfg)
        self.w_x = Linear(D, D + 3 * cfg.mem_heads)  # [retrieval query | gate logits]
        self.conv_x = ShortConv(D, cfg.conv_kernel)
        self.h_norm = RMSNorm(D, cfg.norm_eps)
        self.attn = Attention(cfg, cfg.segment_size, "segment", 2)
        self.w_attn_out = Linear(D, D, bias=False)
        self.y_norm = RMSNorm(D, cfg.norm_eps)  # y feeds the memory and the gate: keep it at unit scale
        self.w_y = Linear(D, 3 * D, bias=False)  # q, k, v of the memory write and output read
        self.conv_y = ShortConv(3 * D, cfg.conv_kernel)
        self.r_norm = RMSNorm(D, cfg.norm_eps)
        self.w_out = Linear(D, D, bias=False)

    def initial_state(self) -> State:
        K, D, like = self.cfg.conv_kernel, self.cfg.dim, self.conv_x.weight
        seg = {f"Wseg{i}": w.to(self.memory.dtype) for i, w in enumerate(self.memory.init_weights)}
        return {**self.memory.initial_state(), **seg, **self.attn.initial_state(),
                "conv_x": like.new_zeros(K - 1, D), "conv_y": like.new_zeros(K - 1, 3 * D)}

    def forward(self, u: Tensor, state: State, ctx: StepContext, want_surprise: bool):
        mem, D = self.memory, self.cfg.dim
        proj = self.w_x(u)
        qh, tail_x = self.conv_x(proj[..., :D], state["conv_x"], ctx)
        qh = F.normalize(mem.heads_of(F.silu(qh) if self.cfg.qk_silu else qh, 1)[0], dim=-1)
        h = mem.read(mem.weights(state, "Wseg"), qh, u.dtype)
        y, ring = self.attn(u, [self.h_norm(h), u], state, ctx)
        y = self.y_norm(self.w_attn_out(y))
        qkv, tail_y = self.conv_y(self.w_y(y), state["conv_y"], ctx)
        q, k, v = mem.qkv(qkv)
        r, new, surprise = mem.scan(state, q, k, v, mem.gates(proj[..., D:]), ctx, want_surprise, u.dtype)
        if ctx.any_segment_end:  # the next step starts a segment: remember the weights it starts with
            end = ctx.flag("segment_end")
            for i in range(len(mem.init_weights)):
                new[f"Wseg{i}"] = torch.where(end, new[f"W{i}"], state[f"Wseg{i}"])
        new.update(ring=ring, conv_x=tail_x, conv_y=tail_y)
        return self.w_out(y * torch.sigmoid(self.r_norm(r))), new, surprise


def batched(state: State, sessions: int) -> State:
    """One session's state as a batch of `sessions` identical ones (views: the model never writes into them)."""
    return {k: v.unsqueeze(0).expand(sessions, *v.shape) for k, v in state.items()}


class Block(nn.Module):
    """Pre-RMSNorm residual block: mixer(s) then SwiGLU. MAL has a memory layer and an SWA layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        mixers = {"lmm": [MemoryMixer], "mac": [MACMixer], "mag": [MAGMixer], "mal": [MemoryMixer, SWAMixer]}
        self.mixers = nn.ModuleList(m(cfg) for m in mixers[cfg.variant])
        self.mixer_norms = nn.ModuleList(RMSNorm(cfg.dim, cfg.norm_eps) for _ in self.mixers)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: Tensor, states: list[State] | None, ctx: StepContext, want_surprise: bool):
        """states None: every row a fresh session, its state built here, where a sharded (FSDP) block's
        parameters, the memory's initial weights among them, are whole."""
        if states is None:
            states = [batched(mixer.initial_state(), x.shape[0]) for mixer in self.mixers]
        new, surprises = [], []
        for norm, mixer, state in zip(self.mixer_norms, self.mixers, states):
            out, mixer_state, surprise = mixer(norm(x), state, ctx, want_surprise)
            x = x + out
            new.append(mixer_state)
            if surprise is not None:
                surprises.append(surprise)
        return x + self.mlp(self.mlp_norm(x)), new, surprises


class Titans(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.decode_step = None  # compiled.compile_steps
        self.checkpoint_blocks = False  # training: recompute each block's activations in backward
        self.aot_decode = None  # compiled.AotDecode
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self):
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if name.endswith("w_out"):  # projections into the residual stream, GPT-2 style
                    module.weight.data.mul_(1.0 / math.sqrt(2 * self.cfg.n_layers))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():  # the gate logits are the last 3H outputs of the input projection
            if isinstance(module, (MemoryMixer, MACMixer)):
                w_in = module.w_in if isinstance(module, MemoryMixer) else module.w_x
                w_in.bias.data[-3 * self.cfg.mem_heads:] = module.memory.gate_bias()
        nn.init.normal_(self.embed.weight, std=0.02)

    def initial_state(self) -> ModelState:
        """A fresh session (unbatched tensors). Differentiable w.r.t. M_0 for outer-loop training."""
        return [[mixer.initial_state() for mixer in layer.mixers] for layer in self.layers]

    def step(self, tokens: Tensor, state: ModelState | None, ctx: StepContext, want_surprise: bool = False):
        """tokens [B, R] -> logits [B, R, V], new state, surprise [B, R] (or None). state None: fresh sessions.

        Rows beyond ctx.counts[s] are padding: their outputs are meaningless and they leave no trace.
        """
        x = self.embed(tokens)
        new, surprises = [], []
        for layer, layer_state in zip(self.layers, state or [None] * len(self.layers)):
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x, layer_new, layer_surprises = checkpoint(layer, x, layer_state, ctx, want_surprise,
                                                           use_reentrant=False)
            else:
                x, layer_new, layer_surprises = layer(x, layer_state, ctx, want_surprise)
            new.append(layer_new)
            surprises += layer_surprises
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
        surprise = torch.stack(surprises).mean(0) if surprises else None
        return logits, new, surprise

    def memories(self) -> list[NeuralMemory]:
        return [m for m in self.modules() if isinstance(m, NeuralMemory)]

    @contextmanager
    def watching_gates(self):
        """Yields one list per memory (layer order) that collects the log-gates [B, H, R, 3] of every call made
        inside the block, with their gradients: what training prices (train.write_price)."""
        memories = self.memories()
        for memory in memories:
            memory.seen_gates = []
        try:
            yield [memory.seen_gates for memory in memories]
        finally:
            for memory in memories:
                memory.seen_gates = None

    def forward(self, tokens: Tensor, state: ModelState | None = None, pos: int = 0) -> tuple[Tensor, ModelState]:
        """Training's entry, the call DDP and FSDP wrap: tokens [B, T], every row from position pos of its state
        (None: fresh sessions) -> logits [B, T, V] and the new state."""
        logits, state, _ = self.forward_tokens(tokens, state, [pos] * tokens.shape[0])
        return torch.stack(logits), state

    def forward_tokens(self, tokens: list[Tensor] | Tensor, state: ModelState | None, pos: list[int],
                       want_surprise: bool = False, owned: bool = False):
        """Each session s over tokens[s] from position pos[s], in steps: engine.step.forward_tokens."""
        return steps.forward_tokens(self, tokens, state, pos, want_surprise, owned)
