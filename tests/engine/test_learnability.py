"""The attention paths can learn: a copy that only attention can make is picked up within a few hundred CPU steps.

Equivalence tests cannot see a path that is mathematically right but functionally dead. This caught one: MAC's
attention output once reached the residual stream through two stacked small-initialised projections, so earlier
tokens barely moved the logits.

The task: random digits, and every other position from the 7th on repeats the digit 7 positions back. Nothing but
attention can copy it: the short convolution sees 3 tokens back, and the memory is keyed by content, which never
repeats here, not by position. Learnt, it is copied every time, whatever the seed or the CPU's rounding; with the
attention output zeroed, the same run stays at chance (0.1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.model import Titans
from engine.train import fresh_state

MODEL = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_hidden=128, mem_heads=4, mem_depth=2,
             mem_expansion=2, chunk_size=8, segment_size=64, window=64, n_persistent=2)
LENGTH, OFFSET = 64, 7
COPIES = torch.arange(OFFSET, LENGTH, 2)  # positions whose digit repeats the one OFFSET back


def digits(batch: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.randint(ord("0"), ord("9") + 1, (batch, LENGTH), generator=generator)
    for p in COPIES.tolist():
        ids[:, p] = ids[:, p - OFFSET]
    return ids


def copied_logits(model: Titans, ids: torch.Tensor) -> torch.Tensor:
    logits = torch.stack(model.forward_tokens(ids, fresh_state(model, len(ids)), [0] * len(ids))[0])
    return logits[:, COPIES - 1]  # the predictions of the copied digits


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mac", "mag"])
def test_attention_learns_a_copy_nothing_else_can_make(variant):
    torch.manual_seed(0)
    model = Titans(ModelConfig(**MODEL, variant=variant))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        ids = digits(16, generator)
        loss = F.cross_entropy(copied_logits(model, ids).flatten(0, 1), ids[:, COPIES].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        ids = digits(64, torch.Generator().manual_seed(1))
        accuracy = (copied_logits(model, ids).argmax(-1) == ids[:, COPIES]).float().mean().item()
    assert accuracy > 0.5, accuracy  # chance is 0.1
