"""Training step speed: one outer step (forward + backward through the memory updates) of a recipe's batches, by
the ways the trainer can run it, side by side in one process.

    .venv/bin/python bench/train_step.py                           # bench/train_step_batches.json's batches
    .venv/bin/python bench/train_step.py --config configs/titans-mal-recall.json --step 3800 --rounds 3

bench/train_step_batches.json is the default model's second stage as it was until 2026-11-28 (8 facts at
32-256 bytes, seed 1): the batches that the numbers in bench/RESULTS.md were timed on.

Modes, each on the same batches (make_batch of the config at --step and the steps after it):
    ragged     each sequence its own length (how the trainer fed the model before batches were padded): steps of
               sessions with different row counts stay within the attention window (16 rows for the default model)
    full-attn  padded to one length (long aligned steps of whole chunks), attention over the whole step's rows
    padded     the same with banded sliding-window attention (Attention.banded_window)
    compiled   the same with the memory's chunk step through torch.compile (TrainConfig.compile)
Rounds run the modes in a shuffled order; each mode's time is its median over rounds of the mean step time, and
the ratios are of those medians against ragged. The loss of every mode is printed: all equal up to rounding.
JSON in bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.compiled import compile_training_steps  # noqa: E402
from engine.model import Attention, Titans  # noqa: E402
from engine.tokenizer import load_tokenizer  # noqa: E402
from engine.train import TrainConfig, batch_loss, fresh_state, make_batch, sequence_lengths  # noqa: E402

MODES = ["ragged", "full-attn", "padded", "compiled"]


def ragged_loss(model: Titans, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """batch_loss with every sequence cut to its own length (the padding removed)."""
    lengths = sequence_lengths(weights)
    logits, _, _ = model.forward_tokens([t[:n] for t, n in zip(ids, lengths)], fresh_state(model, len(ids)),
                                        [0] * len(ids))
    total = sum((F.cross_entropy(lg[:-1].float(), t[1:n], reduction="none") * w[:n - 1]).sum()
                for lg, t, w, n in zip(logits, ids, weights, lengths))
    return total / weights.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "bench/train_step_batches.json"))
    parser.add_argument("--step", type=int, default=0, help="the curriculum step whose batches are timed")
    parser.add_argument("--batches", type=int, default=3, help="steps per mode and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/train_step.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig.load(args.config)
    torch.manual_seed(cfg.seed)
    eager = Titans(cfg.model_config()).train()
    compiled = Titans(cfg.model_config()).train()
    compiled.load_state_dict(eager.state_dict())
    compile_training_steps(compiled)
    tokenizer = load_tokenizer("byte", None)
    batches = [make_batch(cfg, s, random.Random(cfg.seed * 1_000_003 + s), tokenizer, eager.cfg.chunk_size)
               for s in range(args.step, args.step + args.batches)]
    banded = Attention.banded

    def run(mode: str) -> tuple[float, float]:
        """Mean seconds per step over the batches, and the first batch's loss."""
        Attention.banded = banded if mode != "full-attn" else (lambda self, ctx: False)
        model = compiled if mode == "compiled" else eager
        loss_of = ragged_loss if mode == "ragged" else batch_loss
        start, first = time.perf_counter(), None
        try:
            for ids, weights in batches:
                model.zero_grad(set_to_none=True)
                loss = loss_of(model, ids, weights)
                loss.backward()
                first = float(loss.detach()) if first is None else first
        finally:
            Attention.banded = banded
        return (time.perf_counter() - start) / len(batches), first

    t0 = time.perf_counter()
    losses = {mode: run(mode)[1] for mode in MODES}  # warm-up: compiles the chunk step
    shapes = [tuple(ids.shape) for ids, _ in batches]
    print(f"warm-up {time.perf_counter() - t0:.0f} s (torch.compile included); batches {shapes}")
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    order = random.Random(0)
    for _ in range(args.rounds):
        for mode in order.sample(MODES, len(MODES)):
            times[mode].append(run(mode)[0])
    median = {mode: statistics.median(t) for mode, t in times.items()}
    tokens = sum(sum(sequence_lengths(w)) for _, w in batches) / len(batches)  # real tokens per step
    print(f"{'mode':<10} {'s/step':>7} {'tok/s':>7} {'x ragged':>8}  loss")
    for mode in MODES:
        print(f"{mode:<10} {median[mode]:7.3f} {tokens / median[mode]:7.0f} {median['ragged'] / median[mode]:8.2f}"
              f"  {losses[mode]:.6f}")
    result = {"config": args.config, "step": args.step, "batch_shapes": shapes,
              "real_tokens_per_step": tokens, "threads": torch.get_num_threads(), "rounds": args.rounds,
              "seconds_per_step": median, "per_round": times, "loss": losses,
              "speedup_over_ragged": {m: median["ragged"] / median[m] for m in MODES}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
