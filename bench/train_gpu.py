"""Training throughput on one GPU: the paper's 170M MAC (configs/paper/170m-mac.json) at its training length, bf16
autocast, tokens/s and model FLOPs utilisation, against titans-pytorch's MemoryAsContextTransformer of the same
width, depth, heads, segment and sequence length, timed in the same process (bench/gpu_suite.sh runs it).

Both train on random tokens (throughput does not depend on the text): forward, backward and an AdamW step, timed
after --warmup steps. A batch that does not fit is halved until it does (the JSON says which rows ran).

    python bench/train_gpu.py [--config configs/paper/170m-mac.json] [--rows 4] [--steps 3] [--out FILE]
    python bench/train_gpu.py --dry-run      # the tiny config, a short sequence, on this CPU
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.model import Titans  # noqa: E402
from engine.train import TrainConfig, batch_loss, flops_per_token, peak_flops  # noqa: E402

VOCAB = 32000  # the paper's (Llama-2) vocabulary


def timed_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step, the mean over `steps` after `warmup`."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def ours(cfg: TrainConfig, rows: int, seq_len: int, device: torch.device, steps: int, warmup: int) -> dict:
    model_cfg = dataclasses.replace(dataclasses.replace(cfg, data=None, recall_fraction=0.0).model_config(),
                                    vocab_size=VOCAB)
    model = Titans(model_cfg).to(device).train()
    model.checkpoint_blocks = cfg.activation_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.1)
    ids = torch.randint(0, VOCAB, (rows, seq_len + 1), device=device)
    weights = torch.ones(rows, seq_len, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = batch_loss(model, ids, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed_steps(step, steps, warmup, device)
    rate = rows * seq_len / seconds
    peak = peak_flops(device)
    return {"parameters": sum(p.numel() for p in model.parameters()), "tokens_per_s": rate,
            "flops_per_token": flops_per_token(model, seq_len),
            "mfu": rate * flops_per_token(model, seq_len) / peak if peak else None}


def titans_pytorch(cfg: TrainConfig, rows: int, seq_len: int, device: torch.device, steps: int, warmup: int) -> dict:
    from titans_pytorch import MemoryAsContextTransformer

    spec = cfg.model
    model = MemoryAsContextTransformer(
        num_tokens=VOCAB, dim=spec["dim"], depth=spec["n_layers"], heads=spec["n_heads"],
        segment_len=spec["segment_size"], num_persist_mem_tokens=spec["n_persistent"], num_longterm_mem_tokens=16,
        neural_memory_layers=tuple(range(1, spec["n_layers"] + 1)),
        neural_memory_segment_len=spec["chunk_size"]).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.1)
    ids = torch.randint(0, VOCAB, (rows, seq_len + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(ids, return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed_steps(step, steps, warmup, device)
    return {"parameters": sum(p.numel() for p in model.parameters()), "tokens_per_s": rows * seq_len / seconds}


def fitting(measure, rows: int, device: torch.device, *args) -> dict:
    """measure at `rows`, halving the rows while the GPU runs out of memory."""
    while True:
        try:
            return {"rows": rows, **measure(rows, *args)}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if rows == 1:
                return {"rows": 0, "error": "out of memory at one row"}
            rows //= 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/paper/170m-mac.json")
    parser.add_argument("--rows", type=int, default=4, help="sequences per step (halved until they fit)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the config's")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="configs/paper/tiny.json, 128 tokens, 1 step, CPU")
    parser.add_argument("--out", default="bench/results/train_gpu.json")
    args = parser.parse_args()
    if args.dry_run:
        args.config, args.rows, args.seq_len, args.steps, args.warmup = "configs/paper/tiny.json", 2, 128, 1, 1
    cfg = TrainConfig.load(ROOT / args.config)
    seq_len = args.seq_len or cfg.seq_len
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"config": args.config, "seq_len": seq_len, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "bf16": device.type == "cuda"}
    result["ours"] = fitting(lambda r: ours(cfg, r, seq_len, device, args.steps, args.warmup), args.rows, device)
    print("ours:", result["ours"], flush=True)
    if not args.no_baseline:
        try:
            result["titans_pytorch"] = fitting(
                lambda r: titans_pytorch(cfg, r, seq_len, device, args.steps, args.warmup), args.rows, device)
        except ImportError as e:
            result["titans_pytorch"] = {"error": f"not installed: {e}"}
        print("titans-pytorch:", result["titans_pytorch"], flush=True)
        if "tokens_per_s" in result["titans_pytorch"] and "tokens_per_s" in result["ours"]:
            result["ratio"] = result["ours"]["tokens_per_s"] / result["titans_pytorch"]["tokens_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
