"""Steps: how the model advances sessions over their tokens (DESIGN §2.5).

The model advances in *steps*; a step is a span of rows per session that never crosses a MAC segment edge.
Inside a step, projections, attention and MLPs run once over all rows, and only the memory walks the step chunk
by chunk (NeuralMemory.scan):
  - every row reads the memory with its chunk-start weights (chunk-lagged reads, DESIGN §2.5),
  - MAC retrieval reads with the segment-start weights, kept in the state,
  - rows are appended to the chunk buffer, and a chunk that fills is applied in closed form.
Sessions at the same position take long steps (up to a MAC segment, or MAX_SPAN rows; within the attention
window when some of them have fewer rows than others); a batch of sessions at different positions takes steps
that end at each session's chunk edge; decode is a step of one row. All of these compute exactly the same
function: per-session bookkeeping is by position, with masks (StepContext).

forward_tokens plans the steps of a call and runs each through the model (Titans.step), or through its compiled
decode step (engine/compiled.py) where one applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig
from .state import ModelState

if TYPE_CHECKING:
    from .model import Titans

MAX_SPAN = 256  # rows of one single-session step outside MAC (attention cost grows with span * (window + span))


@dataclass(eq=False)
class StepContext:
    """Positions of one step as tensors, so that a compiled step specialises on shapes only.

    pos[s] is the position of session s's first row, count[s] its valid rows (0 = idle this step).
    Two host-side flags say whether any session completes a memory chunk / a MAC segment in this step
    (the update is skipped entirely when none does). Derived tensors are built once per step.
    """

    pos: Tensor  # [B] long
    count: Tensor  # [B] long
    rows: int  # R = max(count)
    any_full: bool
    any_segment_end: bool  # MAC only
    config: ModelConfig
    host: tuple[list[int], list[int]] | None  # pos and count as the host knows them (no device reads)
    owned: bool = False  # the caller owns the state tensors: rows may be written in place
    _cache: dict = field(default_factory=dict)

    @classmethod
    def build(cls, pos: list[int], counts: list[int], cfg: ModelConfig, device: torch.device,
              owned: bool = False) -> StepContext:
        b, seg = cfg.chunk_size, cfg.segment_size
        return cls(torch.tensor(pos, device=device), torch.tensor(counts, device=device), max(counts),
                   any(p % b + c == b for p, c in zip(pos, counts)),
                   cfg.variant == "mac" and any(c > 0 and (p + c) % seg == 0 for p, c in zip(pos, counts)), cfg,
                   (pos, counts), owned)

    def chunk_pieces(self) -> list[tuple[int, int, StepContext]]:
        """Row ranges [a, b) of this step that lie in one memory chunk, each with its own context.

        Sessions at different positions take steps inside one chunk (one piece). When all sessions
        start at the same position (one session, or a batch of aligned ones) a step may span many
        chunks: the memory then reads and updates piece by piece, and everything else runs once.
        """
        b = self.config.chunk_size
        if self.rows <= 1:  # a decode step (its host positions may be unknown: see compiled.compile_steps)
            return [(0, self.rows, self)]
        pos, counts = self.host
        if all(p % b + c <= b for p, c in zip(pos, counts)):
            return [(0, self.rows, self)]
        assert len(set(pos)) == 1, "a step over sessions at different positions stays inside one chunk"
        cuts = [0, *range(b - pos[0] % b, self.rows, b), self.rows]
        return [(a, e, StepContext.build([pos[0] + a] * len(pos), [min(max(c - a, 0), e - a) for c in counts],
                                         self.config, self.pos.device, self.owned))
                for a, e in zip(cuts, cuts[1:])]

    def full_sessions(self) -> list[int] | None:
        """Indices of the sessions that complete their memory chunk in this step; None without host positions."""
        if self.host is None:
            return None
        b = self.config.chunk_size
        return [i for i, (p, c) in enumerate(zip(*self.host)) if p % b + c == b]

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def row_pos(self) -> Tensor:
        """Position of every row [B, R] (padding rows included)."""
        return self._cached("row_pos", lambda: self.pos[:, None] + torch.arange(self.rows, device=self.pos.device))

    @property
    def valid(self) -> Tensor:
        """Which rows are real tokens [B, R]."""
        return self._cached("valid", lambda: torch.arange(self.rows, device=self.pos.device) < self.count[:, None])

    def flag(self, name: str) -> Tensor:
        """Per-session "full" (completes its chunk) or "segment_end" (completes its MAC segment): [B, 1, 1, 1]."""
        def make():
            cfg, end = self.config, self.pos + self.count
            if name == "full":
                flag = (self.pos % cfg.chunk_size + self.count) == cfg.chunk_size
            else:
                flag = (self.count > 0) & (end % cfg.segment_size == 0)
            return flag[:, None, None, None]
        return self._cached(("flag", name), make)

    def rope(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [B, R, 1, 1, hd] for rotate-half RoPE; angles in float64 so that large positions keep
        their precision."""
        def make():
            hd = self.config.head_dim
            inv_freq = self.config.rope_base ** (
                -torch.arange(0, hd, 2, dtype=torch.float64, device=self.pos.device) / hd)
            angles = self.row_pos.to(torch.float64)[..., None] * inv_freq
            angles = torch.cat([angles, angles], -1)[:, :, None, None]
            return angles.cos().to(dtype), angles.sin().to(dtype)
        return self._cached(("rope", dtype), make)

    def attention_mask(self, span: int, rule: str, rows_per_pos: int) -> Tensor:
        """Visibility [B, 1, R, m*span + N_p + m*R] over [ring | persistent | this step's rows], or for a
        one-row step, which writes its row into the ring before reading it, [B, 1, 1, m*span + N_p].

        rule "window": key position q visible from p iff p - span < q <= p (sliding window of span)
        rule "segment": iff q <= p and q is in p's segment of size span (MAC)
        Ring slot j holds the newest position < pos (<= pos for one row) that is j mod span (negative:
        never written).
        """
        def make_one_row():
            p = self.pos[:, None]  # [B, 1]
            ring_pos = p - torch.remainder(p - torch.arange(span, device=p.device), span)  # [B, span], > p - span
            ok = ring_pos >= 0 if rule == "window" else ring_pos >= p - torch.remainder(p, span)
            persistent = torch.ones(p.shape[0], self.config.n_persistent, dtype=torch.bool, device=p.device)
            return torch.cat([ok.repeat(1, rows_per_pos), persistent], -1)[:, None, None]

        def make():
            m, R, dev = rows_per_pos, self.rows, self.pos.device
            p = self.row_pos[:, :, None]  # [B, R, 1]
            last = self.pos[:, None, None] - 1
            ring_pos = last - torch.remainder(last - torch.arange(span, device=dev), span)  # [B, 1, span]
            row_pos = self.row_pos[:, None, :]  # [B, 1, R]
            if rule == "window":
                ring_ok = (ring_pos >= 0) & (p - ring_pos < span)
                rows_ok = p - row_pos < span
            else:
                ring_ok = (ring_pos >= 0) & (ring_pos >= p - torch.remainder(p, span))
                rows_ok = torch.ones(1, 1, 1, dtype=torch.bool, device=dev)
            rows_ok = (rows_ok & (row_pos <= p) & self.valid[:, None, :]) | torch.eye(R, dtype=torch.bool, device=dev)
            persistent = torch.ones(p.shape[0], R, self.config.n_persistent, dtype=torch.bool, device=dev)
            mask = torch.cat([ring_ok.expand(-1, R, -1).repeat(1, 1, m), persistent, rows_ok.repeat(1, 1, m)], -1)
            return mask[:, None]
        return self._cached(("mask", span, rule, rows_per_pos), make_one_row if self.rows == 1 else make)

    def tail_index(self, kernel: int) -> Tensor:
        """Index into [tail | rows] of the last kernel-1 inputs after this step: [B, kernel-1]."""
        return self._cached(("tail", kernel),
                            lambda: self.count[:, None] + torch.arange(kernel - 1, device=self.pos.device))

    def write(self, store: Tensor, slot_dim: int, span: int, rows: Tensor) -> Tensor:
        """Write each valid row r of session s at slot (pos[s] + r) mod span along slot_dim of store.

        store [B, ..., span, ...] (slot_dim counts the batch dim); rows [B, R, ...] shaped like
        store[b, ..., slot, ...]. Padding rows write back the old value, so every (session, slot) pair
        is written exactly once and the shapes never depend on the row counts. In place only when the
        caller owns the state (a SessionBatch's stacked copy) and no gradient is recorded; otherwise on a
        copy (a caller's tensors, expanded views, or values autograd still needs).
        """
        first = max(0, self.rows - span)  # more rows than slots (a long single-session step): keep the last span
        if first:
            assert all(c == self.rows for c in self.host[1]), "a padded step never has more rows than ring slots"
            rows = rows[:, first:]

        def make_index():
            slot = torch.remainder(self.row_pos[:, first:], span)  # [B, R']
            batch = torch.arange(slot.shape[0], device=slot.device)[:, None].expand_as(slot)
            return (batch,) + (slice(None),) * (slot_dim - 1) + (slot,)
        index = self._cached(("write", slot_dim, span), make_index)
        if not self.owned or torch.is_grad_enabled():
            store = store.clone()
        if self.unpadded:  # every row is a token (decode, aligned prefill): no old values to keep
            store[index] = rows
        else:
            valid = self.valid[:, first:]
            store[index] = torch.where(valid.view(*valid.shape, *([1] * (rows.dim() - 2))), rows, store[index])
        return store

    @property
    def unpadded(self) -> bool:
        """Whether every session has all R rows in this step, as the host knows (False when it does not)."""
        return self._cached("unpadded", lambda: self.host is not None and all(c == self.rows for c in self.host[1]))


def step_limit(cfg: ModelConfig, pos: int, aligned: bool, ragged: bool) -> int:
    """Most rows one step may take for a session at pos. Sessions at different positions step inside
    one memory chunk; otherwise a step runs up to MAX_SPAN rows and never crosses a MAC segment edge; a
    step in which some session has fewer rows than others (padding) stays within the attention window:
    a ring keeps a step's last `window` rows, which are then every session's last rows only without
    padding."""
    if not aligned:
        return cfg.chunk_size - pos % cfg.chunk_size
    if cfg.variant == "mac":
        return cfg.segment_size - pos % cfg.segment_size
    if ragged and cfg.variant != "lmm":
        return min(MAX_SPAN, cfg.window)
    return MAX_SPAN


def forward_tokens(model: Titans, tokens: list[Tensor] | Tensor, state: ModelState, pos: list[int],
                   want_surprise: bool = False, owned: bool = False):
    """Run each session s over tokens[s] (1-D; a [B, T] tensor: as many for every session) from position
    pos[s], in steps (see the module docstring).

    state: nested, batched [B, ...]. owned=True lets the model write rows into it in place (the caller
    holds the only reference, as SessionBatch does). Returns per-session logits [T_s, V], the new
    state, per-session surprise [T_s] (or None).
    """
    dev = model.embed.weight.device
    if isinstance(tokens, Tensor):
        lengths = [tokens.shape[1]] * tokens.shape[0]
        padded = F.pad(tokens.to(dev, torch.long), (0, 1))
    elif len(set(lengths := [len(t) for t in tokens])) == 1:  # the same rows for all: one stack, no copy each
        padded = F.pad(torch.stack(tokens).to(dev, torch.long), (0, 1))
    else:
        padded = torch.zeros(len(tokens), max(lengths, default=0) + 1, dtype=torch.long, device=dev)
        for s, t in enumerate(tokens):
            padded[s, : len(t)] = t
    done = [0] * len(tokens)
    pos = list(pos)
    steps: list[tuple[list[int], Tensor, Tensor | None]] = []  # (counts, logits [B, R, V], surprise [B, R])
    while any(d < n for d, n in zip(done, lengths)):
        aligned, remaining = len(set(pos)) == 1, [n - d for d, n in zip(done, lengths)]
        ragged = len(set(remaining)) > 1  # e.g. prompts of different lengths, or one decoding beside them
        counts = [min(r, step_limit(model.cfg, p, aligned, ragged)) for r, p in zip(remaining, pos)]
        rows = max(counts)
        ctx = StepContext.build(pos, counts, model.cfg, dev, owned)
        if len(tokens) == 1:
            step_tokens = padded[:, done[0]:done[0] + rows]
        else:
            index = torch.tensor(done, device=dev)[:, None] + torch.arange(rows, device=dev)
            step_tokens = padded.gather(1, index.clamp(max=padded.shape[1] - 1))
        # compiled: in place, on the caller's own state; surprise requests stay eager (half the graphs)
        compiled = rows == 1 and owned and not want_surprise
        if (compiled and model.aot_decode is not None and len(tokens) == 1 and not ctx.any_full
                and not ctx.any_segment_end):
            logits, surprise = model.aot_decode(step_tokens, state, ctx), None
        elif compiled and model.decode_step is not None:
            logits, surprise = model.decode_step(step_tokens, state, ctx.pos, ctx.count,
                                                 ctx.rope(model.embed.weight.dtype), ctx.any_full,
                                                 ctx.any_segment_end), None
        else:
            logits, state, surprise = model.step(step_tokens, state, ctx, want_surprise)
        steps.append((counts, logits, surprise))
        done = [d + c for d, c in zip(done, counts)]
        pos = [p + c for p, c in zip(pos, counts)]
    logits_out, surprise_out = _per_session(steps, len(tokens), model.cfg.vocab_size, want_surprise, dev)
    return logits_out, state, surprise_out


def _per_session(steps: list[tuple[list[int], Tensor, Tensor | None]], sessions: int, vocab_size: int,
                 want_surprise: bool, dev: torch.device) -> tuple[list[Tensor], list[Tensor] | None]:
    """Each session's logits [T_s, V] (and surprise [T_s]) from the steps' batched outputs."""
    if steps and all(min(counts) == max(counts) == lg.shape[1] for counts, lg, _ in steps):
        # every row a token (training batches, aligned prompts): one cat, then views; a slice per session and
        # step would cost a training backward a zero-filled gradient of the whole step's logits each
        def whole(parts: list[Tensor]) -> list[Tensor]:
            return list((parts[0] if len(parts) == 1 else torch.cat(parts, 1)).unbind(0))
        return whole([lg for _, lg, _ in steps]), whole([sp for _, _, sp in steps]) if want_surprise else None
    logits, surprise = [[] for _ in range(sessions)], [[] for _ in range(sessions)]
    for counts, lg, sp in steps:
        for s, c in enumerate(counts):
            if c:
                logits[s].append(lg[s, :c])
                if sp is not None:
                    surprise[s].append(sp[s, :c])
    logits_out = [(p[0] if len(p) == 1 else torch.cat(p)) if p else torch.zeros(0, vocab_size, device=dev)
                  for p in logits]
    if not want_surprise:
        return logits_out, None
    return logits_out, [torch.cat(p) if p else torch.zeros(0, device=dev) for p in surprise]
