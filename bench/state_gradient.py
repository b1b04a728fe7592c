"""How the gradient through the memory's state grows going back over the chunks of one training batch, with and
without state_grad_bound: the measurement behind "What limits training" in models/titans-mal-recall/README.md.

The batch is the one a config's training run draws at --step (batches are seeded by step), taken from the weights
the run starts from (init_from); the gradient reaching each chunk's new weights and momentum is recorded, then the
whole model's gradient norm.

    python bench/state_gradient.py --config configs/titans-mal-recall-stage7.json --step 12            # unbounded
    python bench/state_gradient.py --config configs/titans-mal-recall-stage7.json --step 12 --bound 0.01
(about 80 s each on one CPU thread; needs the run's init_from weights, e.g. runs/titans-mal-recall-stage6-weights)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernels.memory.naive as naive  # noqa: E402
from engine.model import Titans  # noqa: E402
from engine.tokenizer import load_tokenizer  # noqa: E402
from engine.train import TrainConfig, batch_loss, carried_bytes, make_batch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--step", type=int, default=12)
    parser.add_argument("--bound", type=float, default=None, help="state_grad_bound (default: none)")
    parser.add_argument("--every", type=int, default=50, help="report every this many chunk updates")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig.load(args.config)
    model = Titans(cfg.model_config()).train()
    model.load_state_dict(load_file(str(Path(cfg.init_from) / "model.safetensors")))
    for memory in model.memories():
        memory.state_grad_bound = args.bound
    rng = random.Random(cfg.seed * 1_000_003 + args.step)  # as engine/train.py draws a step's batch
    carried = carried_bytes(cfg, rng, model.cfg.chunk_size)
    ids, weights = make_batch(cfg, args.step, rng, load_tokenizer("byte", None), model.cfg.chunk_size, carried)
    norms: list[float] = []  # per chunk update, in forward order: the norm of the gradient reaching its new state
    step = naive.read_and_update

    def recorded(w, s, *rest, **options):
        out = step(w, s, *rest, **options)
        if torch.is_grad_enabled():
            index = len(norms)
            norms.append(0.0)
            for t in (*out[2], *out[3]):
                t.register_hook(lambda g, i=index: norms.__setitem__(i, max(norms[i], float(g.norm()))))
        return out

    naive.read_and_update = recorded
    loss = batch_loss(model, ids, weights, carried, cfg.write_prices())
    loss.backward()
    total = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in model.parameters()
                                                  if p.grad is not None]))
    report = {"config": args.config, "step": args.step, "bound": args.bound, "carried_bytes": carried,
              "trained_bytes": ids.shape[1] - carried, "chunk_updates": len(norms), "loss": float(loss.detach()),
              "state_gradient_norm_by_update": {i: norms[i] for i in range(0, len(norms), args.every)},
              "model_gradient_norm": float(total)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
