"""Sampling parameters and next-token selection for one session."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

GREEDY_BELOW = 1e-5  # temperatures under this are treated as 0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends once the decoded text contains one of these

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        """Temperatures under GREEDY_BELOW pick the argmax: sampling would be greedy up to float rounding anyway."""
        return self.temperature < GREEDY_BELOW


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [V] -> one token id."""
    if params.greedy:
        return int(logits.argmax())
    logits = (logits.float() - logits.max().float()) / params.temperature  # max 0: no overflow to inf
    if params.top_k:  # exactly k tokens, ties broken by index
        keep = torch.topk(logits, min(params.top_k, logits.numel())).indices
        logits = torch.full_like(logits, float("-inf")).scatter(0, keep, logits[keep])
    if params.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
