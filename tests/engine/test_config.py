from __future__ import annotations

import json

import pytest

from engine import ConfigError, Engine, ModelConfig
from engine.config import PRESETS


def test_round_trip_through_config_json(tmp_path):
    cfg = ModelConfig.from_dict({**PRESETS["tiny-mag"], "qk_silu": False})
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path) == cfg
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets(name):
    cfg = ModelConfig.preset(name)
    params = sum(p.numel() for p in Engine.from_config(cfg, device="cpu").model.parameters())
    if name.startswith("tiny-"):
        assert params < 1_000_000
        assert cfg.mem_depth == 2
        assert cfg.chunk_size <= 8 and cfg.attention_span <= 32  # a few hundred tokens cross several of each
    else:
        assert 6_000_000 < params < 10_000_000
        assert (cfg.dim, cfg.n_layers, cfg.mem_depth, cfg.mem_expansion, cfg.chunk_size, cfg.segment_size) == (
            256, 4, 2, 4, 16, 128)


@pytest.mark.parametrize("bad, message", [
    (dict(variant="gpt"), "variant"),
    (dict(dim=65), "n_heads"),
    (dict(mem_heads=3), "mem_heads"),
    (dict(segment_size=18), "multiple of chunk_size"),
    (dict(mem_depth=0), "mem_depth"),
    (dict(chunk_size=-1), "chunk_size"),
    (dict(theta_max=0), "theta_max"),
    (dict(vocab_size=100), "byte tokenizer"),
    (dict(eos_token_id=300), "eos_token_id"),
    (dict(tokenizer="sentencepiece"), "tokenizer"),
    (dict(qk_silu="no"), "qk_silu"),
])
def test_invalid_configs_are_rejected_with_a_clear_error(bad, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**PRESETS["tiny-mac"], **bad})


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no model config"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**PRESETS["tiny-mac"], "flash": True}))
    with pytest.raises(ConfigError, match="unknown model config keys: flash"):
        ModelConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("huge")


def test_qk_silu_off_leaves_keys_signed():
    # qk_silu False (NeurIPS §3.3): q and k are the l2-normalised projections themselves; with the SiLU (v1 §4.4)
    # keys of unrelated inputs share a positive part (mean cosine ~0.1 for random projections), without it ~0;
    # v keeps its SiLU either way
    import torch

    from engine.model import NeuralMemory

    torch.manual_seed(0)
    projected = torch.randn(1, 64, 3 * 32)
    for silu in (True, False):
        memory = NeuralMemory(ModelConfig.from_dict({**PRESETS["tiny-lmm"], "dim": 32, "qk_silu": silu}))
        q, k, v = memory.qkv(projected)
        parts = memory.heads_of(projected, 3)
        torch.testing.assert_close(v, torch.nn.functional.silu(parts[2]))
        expected = torch.nn.functional.normalize(torch.nn.functional.silu(parts[:2]) if silu else parts[:2], dim=-1)
        torch.testing.assert_close(torch.stack([q, k]), expected)
        cosines = k @ k.transpose(-1, -2)  # [1, H, 64, 64]
        shared = float((cosines.sum() - cosines.diagonal(dim1=-2, dim2=-1).sum()) / (cosines.numel() - 64 * k.shape[1]))
        assert (shared > 0.06) if silu else (abs(shared) < 0.03), shared
