"""Parameter counts of the paper's model configs (configs/paper/{size}-{variant}.json) as this implementation builds
them, with the paper's 32K vocabulary: the table in configs/paper/README.md. Built on the meta device (no memory).

usage: python bench/paper_sizes.py
"""

import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.model import Titans  # noqa: E402
from engine.train import TrainConfig  # noqa: E402

VOCAB = 32000


def parameters(size: str, variant: str) -> int:
    cfg = TrainConfig.load(ROOT / "configs" / "paper" / f"{size}-{variant}.json")
    model_cfg = dataclasses.replace(dataclasses.replace(cfg, data=None, recall_fraction=0.0).model_config(),
                                    vocab_size=VOCAB)
    with torch.device("meta"):
        return sum(p.numel() for p in Titans(model_cfg).parameters())


if __name__ == "__main__":
    print("size  LMM / MAC / MAG / MAL")
    for size in ("170m", "340m", "400m", "760m"):
        print(size, " / ".join(f"{parameters(size, v) / 1e6:.0f}M" for v in ("lmm", "mac", "mag", "mal")))
