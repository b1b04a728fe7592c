"""The paper's model configs (configs/paper): the shapes of its architecture table, for every variant, with its
optimiser settings, and a small config of the same shape that trains here."""

import dataclasses
from pathlib import Path

import pytest
import torch

from engine.model import Titans
from engine.train import TrainConfig

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"
# NeurIPS Table 5 (blocks, width, heads, peak lr); the paper gives no row for 400M (v1 trains one): inferred
TABLE = {"170m": (12, 768, 16, 3e-3), "340m": (24, 1024, 16, 1.5e-3), "400m": (24, 1152, 16, 1.5e-3),
         "760m": (24, 1536, 16, 1.25e-3)}


@pytest.mark.parametrize("size", TABLE)
@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal"])
def test_each_paper_config_has_the_papers_shape_and_optimiser(size, variant, tmp_path):
    cfg = TrainConfig.load(PAPER / f"{size}-{variant}.json")
    layers, width, heads, lr = TABLE[size]
    spec = cfg.model
    assert (spec["variant"], spec["n_layers"], spec["dim"], spec["n_heads"]) == (variant, layers, width, heads)
    assert (spec["mem_depth"], spec["mem_expansion"], spec["chunk_size"], spec["n_persistent"]) == (2, 4, 16, 128)
    assert (spec["segment_size"], spec["window"], spec["conv_kernel"]) == (512, 2048, 4)
    assert cfg.lr == lr and cfg.weight_decay == 0.1 and cfg.seq_len == 4096
    assert cfg.batch_size * cfg.seq_len == 524_288  # 0.5M tokens a step
    assert cfg.steps * cfg.batch_size * cfg.seq_len >= (30e9 if size == "760m" else 15e9)
    model_cfg = dataclasses.replace(cfg, data=None, recall_fraction=0.0).model_config()
    model_cfg = dataclasses.replace(model_cfg, vocab_size=32000, tokenizer="tokenizers")
    with torch.device("meta"):
        params = sum(p.numel() for p in Titans(model_cfg).parameters())
    assert 0.5 < params / (int(size[:-1]) * 1e6) < 1.6


def test_the_small_config_has_the_same_options_but_sizes():
    tiny, big = TrainConfig.load(PAPER / "tiny.json"), TrainConfig.load(PAPER / "170m-mac.json")
    assert set(tiny.model) == set(big.model)
    assert (tiny.weight_decay, tiny.betas, tiny.min_lr_ratio) == (big.weight_decay, big.betas, big.min_lr_ratio)
