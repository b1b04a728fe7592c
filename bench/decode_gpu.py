"""Batched decode through the engine on a GPU: µs per step at N = 1 ... 1,024 sessions, CUDA graphs against the plain
step in the same run, and the share of the card's copy bandwidth the step's state traffic reaches.

A SessionBatch of N sessions (each prefilled with one memory chunk of tokens) decodes one token per session per
step; both engines (Engine decode_graphs "cuda" and "off") load the same model and run the same tokens, in blocks
taken in turn (graphs, plain, graphs, ...) so the card's noise falls on both; a block is a whole number of MAC
segments and memory chunks (so each pays its chunk and segment ends), and the median block is reported. Per step
the memory's weights of every session are read once (and its momentum too, at the step that ends a chunk), so
state bytes / step time is the achieved stream, set against a large device-to-device copy measured in the same run.

    python bench/decode_gpu.py --out $OUT/decode_gpu.json          # the default model and small-mac, on CUDA
    python bench/decode_gpu.py --dry-run                            # the whole script, tiny, on the CPU
        (graphs are then not captured: the static-buffer step, Engine decode_graphs "static")
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.kernels_gpu import copy_gb_s  # noqa: E402  (the same ceiling the kernels are set against)
from engine import Engine, ModelConfig  # noqa: E402
from engine.engine import SessionBatch  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decoder(engine: Engine, sessions: int):
    """A running batch of `sessions`, prefilled one chunk; calling it times `steps` decode steps (seconds each)."""
    batch = SessionBatch(engine, [engine.new_state()] * sessions, capacity=sessions)
    batch.forward([list(range(engine.config.chunk_size))] * sessions)
    token = [[7]] * sessions

    def block(steps: int) -> float:
        synchronize(engine.device)
        start = time.perf_counter()
        for _ in range(steps):
            batch.forward(token)
        synchronize(engine.device)
        return (time.perf_counter() - start) / steps

    return block


def load(name: str, device: torch.device, decode_graphs: str) -> Engine:
    """A model directory, or a preset with random weights."""
    if Path(name).is_dir():
        return Engine.load(name, device=device, decode_graphs=decode_graphs)
    return Engine.from_config(ModelConfig.preset(name), device=device, decode_graphs=decode_graphs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=f"{ROOT / 'models/titans-mal-recall'},small-mac",
                        help="model directories or presets (a preset gets random weights)")
    parser.add_argument("--sessions", default="1,16,128,256,1024")
    parser.add_argument("--steps", type=int, default=32, help="steps per timed block (a multiple of the chunk)")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench/results/decode_gpu.json"))
    args = parser.parse_args()
    if args.dry_run:
        device, graphs, sessions, models = torch.device("cpu"), "static", [1, 2], ["tiny-mal"]
        args.steps, args.blocks = 4, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run on a CPU")
        device, graphs = torch.device("cuda"), "cuda"
        sessions, models = [int(n) for n in args.sessions.split(",")], args.models.split(",")
    results = {"device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
               "copy_gb_s": copy_gb_s(device, args.dry_run), "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in models:
        engines = {"graphs": load(name, device, graphs), "plain": load(name, device, "off")}
        state_bytes = sum(t.numel() * t.element_size() for t in engines["plain"].state_template.values())
        memory_bytes = sum(t.numel() * t.element_size() for k, t in engines["plain"].state_template.items()
                           if k.rsplit(".", 1)[-1].startswith("W"))
        cfg = engines["plain"].config
        period = max(cfg.chunk_size, cfg.segment_size if cfg.variant == "mac" else 1)
        steps = max(1, args.steps // period) * period
        for n in sessions:
            blocks = {mode: decoder(engine, n) for mode, engine in engines.items()}
            times = {mode: [] for mode in blocks}
            for turn in range(args.blocks + 1):  # the first turn warms up (compiles, captures)
                for mode, block in blocks.items():
                    seconds = block(steps)
                    if turn:
                        times[mode].append(seconds)
            best = {mode: statistics.median(t) for mode, t in times.items()}
            results["rows"].append({
                "model": Path(name).name, "sessions": n, "state_bytes_per_session": state_bytes,
                "graphs_us": 1e6 * best["graphs"], "plain_us": 1e6 * best["plain"],
                "graphs_speedup": best["plain"] / best["graphs"],
                "graphs_tok_s": n / best["graphs"],
                "memory_read_gb_s": n * memory_bytes / best["graphs"] / 1e9,
                "fraction_of_copy": n * memory_bytes / best["graphs"] / 1e9 / results["copy_gb_s"]})
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps(results["rows"][-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
