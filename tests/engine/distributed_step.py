"""One training step's gradients, written by rank 0: run alone or under torchrun by tests/engine/test_distributed.py.

usage: distributed_step.py CONFIG OUT.safetensors [STEP]
"""

import sys

import torch
from safetensors.torch import save_file

from engine import distributed
from engine.model import Titans
from engine.tokenizer import load_tokenizer
from engine.train import CorpusBatches, SyntheticBatches, TrainConfig, accumulate_gradients


def main(config: str, out: str, step: int = 0) -> None:
    cfg = TrainConfig.load(config)
    torch.set_num_threads(1)
    world, device = distributed.join("cpu")
    torch.manual_seed(cfg.seed)
    model = Titans(cfg.model_config()).train()
    wrapped = distributed.wrap(model, world, cfg.parallel, device)
    tokenizer = load_tokenizer(model.cfg.tokenizer, cfg.tokenizer_dir or cfg.data)
    batches = CorpusBatches(cfg) if cfg.data else SyntheticBatches(cfg, tokenizer, model.cfg.chunk_size)
    ids, weights, carried, _ = batches.rows(step, step, world)
    loss = accumulate_gradients(cfg, model, wrapped, ids, weights, carried, world, device)
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for name, p in model.named_parameters() if p.grad is not None}
    if world.main:
        save_file(grads, out, metadata={"loss": repr(loss), "world": str(world.size)})
    distributed.leave(world)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
