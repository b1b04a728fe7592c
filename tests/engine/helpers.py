"""Shared builders for the engine tests: small models of every variant and random configs."""

from __future__ import annotations

import random

import torch

from engine import Engine, ModelConfig
from engine.model import Titans

VARIANTS = ["lmm", "mac", "mag", "mal"]


def tiny(variant: str, mem_depth: int = 2, **overrides) -> ModelConfig:
    base = ModelConfig.preset(f"tiny-{variant}").to_dict()
    base.update(mem_depth=mem_depth, **overrides)
    return ModelConfig.from_dict(base)


def random_config(rng: random.Random) -> ModelConfig:
    """A random small model: chunk, segment, window, heads and memory shape all drawn at random."""
    variant = rng.choice(VARIANTS)
    chunk = rng.randint(1, 5)
    n_heads = rng.choice([1, 2, 4])
    mem_heads = rng.choice([1, 2, 4])
    return ModelConfig(
        variant=variant, vocab_size=256, dim=16 * rng.choice([1, 2]), n_layers=rng.randint(1, 2),
        n_heads=n_heads, ffn_hidden=rng.choice([16, 48]), mem_heads=mem_heads, mem_depth=rng.randint(1, 3),
        mem_expansion=rng.randint(1, 3), chunk_size=chunk, segment_size=chunk * rng.randint(1, 3),
        window=chunk + rng.randint(0, 6), n_persistent=rng.randint(0, 3), conv_kernel=rng.randint(1, 4),
        theta_max=rng.choice([0.5, 1.0]), mem_grad_clip=rng.choice([None, 1.0]), qk_silu=rng.random() < 0.5,
    )


def engine_for(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
               weight_dtype: torch.dtype | None = None, decode_graphs: str = "auto") -> Engine:
    """An engine whose gates differ per head and write strongly, so memory effects show in the logits.

    dtype=torch.float64 runs everything (memory included) in double precision: the invariants are then
    checked to 1e-8 instead of fp32 rounding, which the memory's learning amplifies over many chunks.
    """
    torch.manual_seed(seed)
    model = Titans(cfg).to(dtype)
    gates = 3 * cfg.mem_heads  # the gate logits are the last 3H outputs of each memory input projection
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("w_in.bias", "w_x.bias")):
                p[-gates:] += 0.5 * torch.randn(gates)
    return Engine(model, device=torch.device("cpu"), weight_dtype=weight_dtype, decode_graphs=decode_graphs)


def tokens(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=generator)


def assert_close(a, b, tol=2e-4):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def assert_states_close(a, b, tol=1e-8):
    """State tensors can be large (memory weights grow as they learn): compare relative to their scale."""
    assert a.tokens_seen == b.tokens_seen
    assert a.tensors.keys() == b.tensors.keys()
    for name, x in b.tensors.items():
        scale = max(1.0, float(x.abs().max())) if x.numel() else 1.0
        diff = float((a.tensors[name] - x).abs().max()) if x.numel() else 0.0
        assert diff <= tol * scale, f"{name}: max diff {diff:.3g} at scale {scale:.3g}"
