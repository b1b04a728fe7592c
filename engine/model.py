"""The Titans model (LMM, MAC, MAG, MAL) as a step function over per-session state.

Legend: B sessions in the batch, R rows (new tokens) in this step, D model width, V vocabulary,
nh attention heads of width hd, H memory heads of width d, b memory chunk, C MAC segment, W window.

The model advances in *steps*. In one step every session reads at most the tokens that remain in its
current memory chunk (and so in its current MAC segment), so within a step:
  - every row of a session reads the memory with the same weights (the chunk-start weights: DESIGN §2.5),
  - MAC retrieval uses the weights at the segment start, kept in the state,
  - after the rows are appended to the chunk buffer, a session whose chunk is now full applies it.
Prefill over T tokens is ceil(T / b) steps of up to b rows; decode is the same step with one row. So
prefill and decode compute exactly the same function, and a batch of sessions at different positions
is the same as each session alone: all per-session bookkeeping is by position, with masks.

The session state is a flat dict of tensors with a leading batch dimension, fixed in size: memory
weights W, momentum S and the partial-chunk buffer per memory layer, conv tails, attention rings
(the last C or W positions' keys and values, slot = position mod span), MAC segment-start weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .memory import chunk_update, init_memory_weights, memory_read, memory_surprise

State = dict[str, Tensor]


# --- one step's bookkeeping, shared by all layers -----------------------------------------------

@dataclass
class StepContext:
    """Positions and masks of one step. pos[s] is the position of session s's first row."""

    pos: list[int]
    counts: list[int]  # valid rows per session (0 = session idle in this step)
    rows: int  # R = max(counts)
    config: ModelConfig
    device: torch.device
    mask_cache: dict | None = None  # shared across steps: masks depend on positions modulo the span
    _cache: dict = field(default_factory=dict)

    def __post_init__(self):
        dev, b = self.device, self.config.chunk_size
        valid = [(s, r) for s, c in enumerate(self.counts) for r in range(c)]
        self.valid_b = torch.tensor([s for s, _ in valid], dtype=torch.long, device=dev)  # [n]
        self.valid_r = torch.tensor([r for _, r in valid], dtype=torch.long, device=dev)  # [n]
        self._valid = valid
        self.full = [p % b + c == b for p, c in zip(self.pos, self.counts)]
        self.any_full = any(self.full)
        seg = self.config.segment_size
        self.segment_end = [c > 0 and (p + c) % seg == 0 for p, c in zip(self.pos, self.counts)]
        self.any_segment_end = any(self.segment_end)

    def flags(self, name: str) -> Tensor:
        """A per-session bool list ("full", "segment_end") as a tensor [B, 1, 1, 1] for torch.where."""
        key = ("flags", name)
        if key not in self._cache:
            self._cache[key] = torch.tensor(getattr(self, name), device=self.device)[:, None, None, None]
        return self._cache[key]

    def slot(self, span: int) -> Tensor:
        """Slot (position mod span) of each valid row, in valid_b/valid_r order: [n]."""
        key = ("slot", span)
        if key not in self._cache:
            self._cache[key] = torch.tensor([(self.pos[s] + r) % span for s, r in self._valid],
                                            dtype=torch.long, device=self.device)
        return self._cache[key]

    def rope(self, dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [B, 1, R, hd/2]; angles in float64 so that large positions keep their precision."""
        key = ("rope", dtype)
        if key not in self._cache:
            hd = self.config.head_dim
            inv_freq = self.config.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
            row_pos = torch.tensor(self.pos, dtype=torch.float64)[:, None] + torch.arange(self.rows)
            angles = (row_pos[..., None] * inv_freq).to(self.device)
            self._cache[key] = (angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None])
        return self._cache[key]

    def attention_mask(self, span: int, rule: str, rows_per_pos: int) -> Tensor:
        """Visibility [B, 1, R, N_p + m*span + m*R] over [persistent | ring | this step's rows].

        rule "window": key position q visible from p iff p - span < q <= p (sliding window of span)
        rule "segment": iff q <= p and q is in p's segment of size span (MAC)
        The ring slot j holds the newest position < pos that is j mod span.
        """
        cache = self.mask_cache if self.mask_cache is not None else self._cache
        # a session's mask depends only on (pos mod span, whether pos >= span, its row count)
        key = (span, rule, rows_per_pos, self.rows,
               tuple((p % span, p >= span, c) for p, c in zip(self.pos, self.counts)))
        if key in cache:
            return cache[key]
        m, R = rows_per_pos, self.rows
        pos = torch.tensor([p % span + (span if p >= span else 0) for p in self.pos])[:, None, None]  # [B,1,1]
        p = pos + torch.arange(R)[:, None]  # [B, R, 1]
        last = pos - 1
        ring_pos = last - torch.remainder(last - torch.arange(span), span)  # [B, 1, span]
        row_pos = pos + torch.arange(R)  # [B, 1, R]
        if rule == "window":
            ring_ok = (ring_pos >= 0) & (p - ring_pos < span)
            rows_ok = p - row_pos < span
        else:
            ring_ok = (ring_pos >= 0) & (ring_pos >= p - torch.remainder(p, span))
            rows_ok = torch.ones(1, 1, 1, dtype=torch.bool)
        valid = torch.arange(R) < torch.tensor(self.counts)[:, None, None]  # [B, 1, R]
        rows_ok = (rows_ok & (row_pos <= p) & valid) | torch.eye(R, dtype=torch.bool)
        persistent = torch.ones(len(self.pos), R, self.config.n_persistent, dtype=torch.bool)
        mask = torch.cat([persistent, ring_ok.expand(-1, R, -1).repeat(1, 1, m), rows_ok.repeat(1, 1, m)], -1)
        mask = mask[:, None].to(self.device)
        if len(cache) > 4096:
            cache.clear()
        cache[key] = mask
        return mask

    def tail_index(self, kernel: int) -> Tensor:
        """Index into [tail | rows] of the last kernel-1 inputs after this step: [B, kernel-1]."""
        key = ("tail", kernel)
        if key not in self._cache:
            self._cache[key] = (torch.tensor(self.counts)[:, None] + torch.arange(kernel - 1)).to(self.device)
        return self._cache[key]


def write_rows(store: Tensor, index: tuple, rows: Tensor) -> Tensor:
    """store[index] = rows. In place when no gradient is being recorded (the engine hands the model
    states it owns); on a copy under autograd, where the old values may be needed for backward."""
    if torch.is_grad_enabled():
        store = store.clone()
    store[index] = rows
    return store


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
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, -1)
        return self.w_out(F.silu(gate) * up)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, nh, R, hd]; rotates the two halves of the head dimension."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class ShortConv(nn.Module):
    """Causal depthwise conv (kernel K) whose last K-1 inputs live in the session state."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.randn(channels, kernel) / math.sqrt(kernel))  # [P, K]

    def forward(self, x: Tensor, tail: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """x [B, R, P], tail [B, K-1, P] -> y [B, R, P], new tail [B, K-1, P]."""
        ext = torch.cat([tail, x], 1)  # [B, K-1+R, P]
        # unfold + weighted sum: F.conv1d with groups=P is ~10x slower for the few rows of a step
        y = (ext.unfold(1, self.kernel, 1) * self.weight).sum(-1)
        index = ctx.tail_index(self.kernel)[..., None].expand(-1, -1, x.shape[-1])
        return y, ext.gather(1, index)


class NeuralMemory(nn.Module):
    """One memory layer's learned initial weights M_0, gates, and its read / write on session state.

    State: W{l}, S{l} [B, H, d_in, d_out] fp32; buf [B, H, b, 2d+3] fp32 holding the current chunk's
    keys, values and gates (log eta, log(1 - alpha), theta) for the rows already read.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.heads, self.head_dim = cfg.mem_heads, cfg.mem_head_dim
        self.init_weights = nn.ParameterList(
            nn.Parameter(w) for w in init_memory_weights(self.heads, cfg.mem_depth, self.head_dim, cfg.mem_expansion))
        self.gates = nn.Linear(cfg.dim, 3 * self.heads)
        nn.init.normal_(self.gates.weight, std=0.02)
        with torch.no_grad():
            self.gates.bias.copy_(torch.tensor([cfg.theta_bias_init, cfg.eta_bias_init, cfg.alpha_bias_init])
                                  .repeat_interleave(self.heads))

    def initial_state(self) -> State:
        d, b = self.head_dim, self.cfg.chunk_size
        state = {}
        for i, w in enumerate(self.init_weights):
            state[f"W{i}"] = w.float()
            state[f"S{i}"] = torch.zeros_like(w, dtype=torch.float32)
        state["buf"] = torch.zeros(self.heads, b, 2 * d + 3, device=w.device)
        return state

    def weights(self, state: State, prefix: str = "W") -> list[Tensor]:
        return [state[f"{prefix}{i}"] for i in range(len(self.init_weights))]

    def split_heads(self, x: Tensor) -> Tensor:
        """[B, R, H*d] -> [B, H, R, d] in fp32 (memory math is fp32)."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2).float()

    def merge_heads(self, x: Tensor, dtype) -> Tensor:
        return x.transpose(1, 2).flatten(2).to(dtype)

    def read(self, weights: list[Tensor], q: Tensor) -> Tensor:
        """q [B, H, R, d] -> M*(q) [B, H, R, d]."""
        return memory_read(weights, q, self.cfg.norm_eps)

    def gate_values(self, u: Tensor) -> Tensor:
        """u [B, R, D] -> [B, H, R, 3] = (log eta, log(1 - alpha), theta), fp32."""
        z = self.gates(u).float().unflatten(-1, (3, self.heads)).permute(0, 3, 1, 2)  # [B, H, R, 3]
        z_theta, z_eta, z_alpha = z.unbind(-1)
        return torch.stack([F.logsigmoid(z_eta), F.logsigmoid(-z_alpha),
                            self.cfg.theta_max * torch.sigmoid(z_theta)], -1)

    def surprise(self, state: State, k: Tensor, v: Tensor) -> Tensor:
        """||M(k) - v||^2 at the read weights, mean over heads: [B, R]."""
        return memory_surprise(self.weights(state), k, v, self.cfg.norm_eps).mean(1)

    def write(self, state: State, k: Tensor, v: Tensor, gates: Tensor, ctx: StepContext) -> State:
        """Append this step's rows to the chunk buffer; apply the chunk for sessions whose chunk is full."""
        d, b = self.head_dim, self.cfg.chunk_size
        rows = torch.cat([k, v, gates], -1)  # [B, H, R, 2d+3]
        vb = ctx.valid_b
        buf = write_rows(state["buf"], (vb, slice(None), ctx.slot(b)), rows[vb, :, ctx.valid_r])
        new = dict(state)
        if ctx.any_full:
            w, s = self.weights(state), self.weights(state, "S")
            log_eta, log_keep, theta = buf[..., 2 * d:].unbind(-1)
            w_new, s_new = chunk_update(w, s, buf[..., :d], buf[..., d:2 * d], log_eta, log_keep, theta,
                                        self.cfg.norm_eps, self.cfg.mem_grad_clip)
            full = ctx.flags("full")
            for i in range(len(w)):
                new[f"W{i}"] = torch.where(full, w_new[i], w[i])
                new[f"S{i}"] = torch.where(full, s_new[i], s[i])
            buf = buf.masked_fill(full, 0.0)  # a completed chunk leaves an empty buffer
        new["buf"] = buf
        return new


class Attention(nn.Module):
    """Multi-head attention over [persistent rows | ring of past positions | this step's rows].

    rule "window" (MAG/MAL, span W) or "segment" (MAC, span C). With rows_per_pos = 2 (MAC), each
    position contributes two key/value rows: its memory retrieval h and its token x. The ring state
    is ring [B, 2 (k|v), nh, m, span, hd] holding RoPE-rotated keys.
    """

    def __init__(self, cfg: ModelConfig, span: int, rule: str, rows_per_pos: int):
        super().__init__()
        self.cfg, self.span, self.rule, self.m = cfg, span, rule, rows_per_pos
        self.nh, self.hd = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wkv = nn.Linear(cfg.dim, 2 * cfg.dim, bias=False)
        self.persistent = nn.Parameter(torch.randn(2, self.nh, cfg.n_persistent, self.hd) * 0.02)

    def initial_state(self) -> State:
        return {"ring": torch.zeros(2, self.nh, self.m, self.span, self.hd, device=self.persistent.device)}

    def heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.nh, self.hd)).transpose(1, 2)  # [B, R, D] -> [B, nh, R, hd]

    def forward(self, x: Tensor, sources: list[Tensor], state: State, ctx: StepContext) -> tuple[Tensor, State]:
        """x [B, R, D] queries; sources: m tensors [B, R, D] giving each position's key/value rows.

        Returns the head outputs [B, R, D] (before any output projection) and the new ring.
        Scores are computed per key block, so the ring is read in place, never concatenated.
        """
        cos, sin = ctx.rope(x.dtype)
        q = apply_rope(self.heads(self.wq(x)), cos, sin) * self.hd ** -0.5
        kv = torch.stack([self.wkv(src) for src in sources], 2)  # [B, R, m, 2D]
        k, v = kv.unflatten(-1, (2, self.nh, self.hd)).permute(3, 0, 4, 2, 1, 5)  # [B, nh, m, R, hd] each
        k = apply_rope(k, cos[:, :, None], sin[:, :, None])
        ring = state["ring"]  # [B, 2, nh, m, span, hd]
        ring_k, ring_v = ring[:, 0].flatten(2, 3), ring[:, 1].flatten(2, 3)  # [B, nh, m*span, hd]
        new_k, new_v = k.flatten(2, 3), v.flatten(2, 3)  # [B, nh, m*R, hd]
        p_k, p_v = self.persistent
        scores = torch.cat([q @ p_k.transpose(-1, -2), q @ ring_k.transpose(-1, -2), q @ new_k.transpose(-1, -2)], -1)
        mask = ctx.attention_mask(self.span, self.rule, self.m)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        n_p, n_ring = p_k.shape[1], ring_k.shape[2]
        out = (probs[..., :n_p] @ p_v + probs[..., n_p:n_p + n_ring] @ ring_v
               + probs[..., n_p + n_ring:] @ new_v)  # [B, nh, R, hd]
        vb, vr, slot = ctx.valid_b, ctx.valid_r, ctx.slot(self.span)
        rows = torch.stack([k, v], 1)[vb, :, :, :, vr]  # [n, 2, nh, m, hd]
        ring = write_rows(ring, (vb, slice(None), slice(None), slice(None), slot), rows)
        return out.transpose(1, 2).flatten(2), {"ring": ring}


# --- the four mixers ---------------------------------------------------------------------------------

class MemoryMixer(nn.Module):
    """LMM mixer (also MAL's memory layer and MAG's memory branch).

    q, k, v = l2/silu(conv(u W)), y = M*(q) with chunk-start weights, output W_o(norm(y) * silu(u W_g)).
    """

    def __init__(self, cfg: ModelConfig, gated_output: bool = True):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.memory = NeuralMemory(cfg)
        self.gated_output = gated_output
        self.w_in = nn.Linear(D, (4 if gated_output else 3) * D, bias=False)
        self.conv = ShortConv(3 * D, cfg.conv_kernel)
        if gated_output:
            self.out_norm = RMSNorm(D, cfg.norm_eps)
            self.w_out = nn.Linear(D, D, bias=False)

    def initial_state(self) -> State:
        return {**self.memory.initial_state(),
                "conv": torch.zeros(self.cfg.conv_kernel - 1, 3 * self.cfg.dim, device=self.w_in.weight.device)}

    def retrieve(self, u: Tensor, state: State, ctx: StepContext, want_surprise: bool):
        """Read then write the memory for this step's rows. Returns (y [B, R, D], gate input, state, surprise)."""
        mem, D = self.memory, self.cfg.dim
        proj = self.w_in(u)
        qkv, tail = self.conv(proj[..., :3 * D], state["conv"], ctx)
        q, k, v = (mem.split_heads(t) for t in F.silu(qkv).split(D, -1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        y = mem.merge_heads(mem.read(mem.weights(state), q), u.dtype)
        surprise = mem.surprise(state, k, v) if want_surprise else None
        new = mem.write(state, k, v, mem.gate_values(u), ctx)
        new["conv"] = tail
        return y, proj[..., 3 * D:], new, surprise

    def forward(self, u: Tensor, state: State, ctx: StepContext, want_surprise: bool):
        y, gate, new, surprise = self.retrieve(u, state, ctx, want_surprise)
        return self.w_out(self.out_norm(y) * F.silu(gate)), new, surprise


class MAGMixer(nn.Module):
    """Sliding-window attention and the memory in parallel: o = W_o(norm(y) g1 * sigmoid(norm(m) g2))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg, cfg.window, "window", 1)
        self.mem = MemoryMixer(cfg, gated_output=False)
        self.norm_attn = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm_mem = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w_out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def initial_state(self) -> State:
        return {**{f"attn.{k}": v for k, v in self.attn.initial_state().items()},
                **{f"mem.{k}": v for k, v in self.mem.initial_state().items()}}

    def forward(self, u: Tensor, state: State, ctx: StepContext, want_surprise: bool):
        y, ring = self.attn(u, [u], sub(state, "attn"), ctx)
        m, _, mem_state, surprise = self.mem.retrieve(u, sub(state, "mem"), ctx, want_surprise)
        o = self.w_out(self.norm_attn(y) * torch.sigmoid(self.norm_mem(m)))
        return o, {**prefixed(ring, "attn"), **prefixed(mem_state, "mem")}, surprise


class SWAMixer(nn.Module):
    """MAL's attention layer: sliding-window attention with persistent rows, then W_o."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg, cfg.window, "window", 1)
        self.w_out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def initial_state(self) -> State:
        return self.attn.initial_state()

    def forward(self, u: Tensor, state: State, ctx: StepContext, want_surprise: bool):
        y, ring = self.attn(u, [u], state, ctx)
        return self.w_out(y), ring, None


class MACMixer(nn.Module):
    """Memory as context (DESIGN §2.6).

    h_j = M*(q_j) with the segment-start weights; attention of x_i over [persistent | (h_j, x_j), j <= i in
    the segment]; the attention output y is written to memory; o = W_o(y * sigmoid(norm(M*(y)))) with
    chunk-start weights. Extra state: Wseg{l} (segment-start weights), conv tails for x and y projections.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.memory = NeuralMemory(cfg)
        self.w_qh = nn.Linear(D, D, bias=False)
        self.conv_x = ShortConv(D, cfg.conv_kernel)
        self.h_norm = RMSNorm(D, cfg.norm_eps)
        self.attn = Attention(cfg, cfg.segment_size, "segment", 2)
        self.w_attn_out = nn.Linear(D, D, bias=False)
        self.w_mem_in = nn.Linear(D, 3 * D, bias=False)
        self.conv_y = ShortConv(3 * D, cfg.conv_kernel)
        self.r_norm = RMSNorm(D, cfg.norm_eps)
        self.w_out = nn.Linear(D, D, bias=False)

    def initial_state(self) -> State:
        dev, K, D = self.w_qh.weight.device, self.cfg.conv_kernel, self.cfg.dim
        mem = self.memory.initial_state()
        seg = {f"Wseg{i}": w.float() for i, w in enumerate(self.memory.init_weights)}
        return {**mem, **seg, **prefixed(self.attn.initial_state(), "attn"),
                "conv_x": torch.zeros(K - 1, D, device=dev), "conv_y": torch.zeros(K - 1, 3 * D, device=dev)}

    def forward(self, u: Tensor, state: State, ctx: StepContext, want_surprise: bool):
        mem, D = self.memory, self.cfg.dim
        qh, tail_x = self.conv_x(self.w_qh(u), state["conv_x"], ctx)
        qh = F.normalize(mem.split_heads(F.silu(qh)), dim=-1)
        h = mem.merge_heads(mem.read(mem.weights(state, "Wseg"), qh), u.dtype)
        y, ring = self.attn(u, [self.h_norm(h), u], sub(state, "attn"), ctx)
        y = self.w_attn_out(y)
        qkv, tail_y = self.conv_y(self.w_mem_in(y), state["conv_y"], ctx)
        q, k, v = (mem.split_heads(t) for t in F.silu(qkv).split(D, -1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        r = mem.merge_heads(mem.read(mem.weights(state), q), u.dtype)
        surprise = mem.surprise(state, k, v) if want_surprise else None
        new = mem.write(state, k, v, mem.gate_values(u), ctx)
        if ctx.any_segment_end:  # the next step starts a segment: remember the weights it starts with
            end = ctx.flags("segment_end")
            for i in range(len(mem.init_weights)):
                new[f"Wseg{i}"] = torch.where(end, new[f"W{i}"], state[f"Wseg{i}"])
        new.update(prefixed(ring, "attn"), conv_x=tail_x, conv_y=tail_y)
        return self.w_out(y * torch.sigmoid(self.r_norm(r))), new, surprise


def sub(state: State, prefix: str) -> State:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def prefixed(state: State, prefix: str) -> State:
    return {f"{prefix}.{k}": v for k, v in state.items()}


class Block(nn.Module):
    """Pre-RMSNorm residual block: mixer(s) then SwiGLU. MAL has a memory layer and an SWA layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        mixers = {"lmm": [MemoryMixer], "mac": [MACMixer], "mag": [MAGMixer], "mal": [MemoryMixer, SWAMixer]}
        self.mixers = nn.ModuleList(m(cfg) for m in mixers[cfg.variant])
        self.mixer_norms = nn.ModuleList(RMSNorm(cfg.dim, cfg.norm_eps) for _ in self.mixers)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def initial_state(self) -> State:
        return {k: v for i, m in enumerate(self.mixers) for k, v in prefixed(m.initial_state(), f"m{i}").items()}

    def forward(self, x: Tensor, state: State, ctx: StepContext, want_surprise: bool):
        new, surprises = {}, []
        for i, (norm, mixer) in enumerate(zip(self.mixer_norms, self.mixers)):
            out, mixer_state, surprise = mixer(norm(x), sub(state, f"m{i}"), ctx, want_surprise)
            x = x + out
            new.update(prefixed(mixer_state, f"m{i}"))
            if surprise is not None:
                surprises.append(surprise)
        return x + self.mlp(self.mlp_norm(x)), new, surprises


class Titans(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._mask_cache: dict = {}
        self._init_weights()

    def _init_weights(self):
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("gates"):
                nn.init.normal_(module.weight, std=0.02)
                if name.endswith(("w_out", "w_attn_out")):  # residual projections, GPT-2 style
                    module.weight.data.mul_(1.0 / math.sqrt(2 * self.cfg.n_layers))
        nn.init.normal_(self.embed.weight, std=0.02)

    def initial_state(self) -> State:
        """A fresh session (unbatched tensors). Differentiable w.r.t. M_0 for outer-loop training."""
        return {k: v for i, layer in enumerate(self.layers)
                for k, v in prefixed(layer.initial_state(), f"layers.{i}").items()}

    def step(self, tokens: Tensor, state: State, ctx: StepContext, want_surprise: bool = False):
        """tokens [B, R] -> logits [B, R, V], new state, surprise [B, R] (or None).

        Rows beyond ctx.counts[s] are padding: their outputs are meaningless and they leave no trace.
        """
        x = self.embed(tokens)
        new, surprises = {}, []
        for i, layer in enumerate(self.layers):
            x, layer_state, layer_surprises = layer(x, sub(state, f"layers.{i}"), ctx, want_surprise)
            new.update(prefixed(layer_state, f"layers.{i}"))
            surprises += layer_surprises
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
        surprise = torch.stack(surprises).mean(0) if surprises else None
        return logits, new, surprise

    def forward_tokens(self, tokens: list[Tensor], state: State, pos: list[int], want_surprise: bool = False):
        """Run each session s over tokens[s] (1-D) from position pos[s], in steps that end at chunk edges.

        state: batched [B, ...]. Returns per-session logits [T_s, V], the new state, per-session
        surprise [T_s] (or None).
        """
        b, dev = self.cfg.chunk_size, self.embed.weight.device
        lengths = [len(t) for t in tokens]
        padded = torch.zeros(len(tokens), max(lengths, default=0) + 1, dtype=torch.long, device=dev)
        for s, t in enumerate(tokens):
            padded[s, : len(t)] = t
        done = [0] * len(tokens)
        pos = list(pos)
        logits_parts, surprise_parts = [[] for _ in tokens], [[] for _ in tokens]
        while any(d < n for d, n in zip(done, lengths)):
            counts = [min(n - d, b - p % b) for d, n, p in zip(done, lengths, pos)]
            rows = max(counts)
            ctx = StepContext(pos, counts, rows, self.cfg, dev, self._mask_cache)
            index = torch.tensor(done, device=dev)[:, None] + torch.arange(rows, device=dev)
            step_tokens = padded.gather(1, index.clamp(max=padded.shape[1] - 1))
            logits, state, surprise = self.step(step_tokens, state, ctx, want_surprise)
            for s, c in enumerate(counts):
                if c:
                    logits_parts[s].append(logits[s, :c])
                    if surprise is not None:
                        surprise_parts[s].append(surprise[s, :c])
            done = [d + c for d, c in zip(done, counts)]
            pos = [p + c for p, c in zip(pos, counts)]
        V = self.cfg.vocab_size
        logits_out = [torch.cat(p) if p else torch.zeros(0, V, device=dev) for p in logits_parts]
        surprise_out = None
        if want_surprise:
            surprise_out = [torch.cat(p) if p else torch.zeros(0, device=dev) for p in surprise_parts]
        return logits_out, state, surprise_out
