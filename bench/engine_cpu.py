"""CPU benchmark of the engine, side by side with titans-pytorch==0.5.5 in the same process.

Measures, for the small-mac preset (~7.5M parameters: dim 256, 4 layers, memory depth 2 x4, chunk 16,
segment 128):
  - model prefill tokens/s (one session, and 4 sessions batched),
  - single-session decode tokens/s (after a 256-token prompt), and 256 new tokens including the prefill
    (the definition of titans-pytorch's `sample` timing), and batched decode throughput,
  - memory-layer prefill tokens/s against titans-pytorch's NeuralMemory at equal dim/heads/chunk/depth,
  - titans-pytorch's MemoryAsContextTransformer forward and `sample(use_cache=True)`.
Every number is the median of --repeats timed runs after one warm-up. Writes JSON, prints a table.

    python bench/engine_cpu.py                      # full run (~4 minutes on 2 cores)
    python bench/engine_cpu.py --quick --no-baseline  # smoke test at tiny sizes
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from engine import Engine, ModelConfig, SamplingParams
from engine.model import MAX_SPAN, MemoryMixer, StepContext

DTYPES = {"fp32": None, "fp16": torch.float16}


def timed(fn, warmup: int, repeats: int) -> float:
    """Median seconds of fn() over repeats, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours_model(cfg: ModelConfig, args, results: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    for name, dtype in DTYPES.items():
        measure_engine(Engine.from_config(cfg, seed=0, device="cpu", weight_dtype=dtype), name, gen, args, results)


def measure_engine(eng: Engine, name: str, gen: torch.Generator, args, results: dict) -> None:
    prompt_len, new_tokens, prefill_len = args.prompt, args.new_tokens, args.prefill
    fresh = eng.new_state()
    ids = torch.randint(0, 256, (prefill_len,), generator=gen)
    t = timed(lambda: eng.forward(ids, fresh), args.warmup, args.repeats)
    results[f"ours_{name}_prefill_b1_tok_s"] = prefill_len / t
    batch = [torch.randint(0, 256, (prefill_len,), generator=gen) for _ in range(4)]
    t = timed(lambda: eng.forward_batch(batch, [fresh] * 4), args.warmup, args.repeats)
    results[f"ours_{name}_prefill_b4_tok_s"] = 4 * prefill_len / t

    prompt = torch.randint(0, 256, (prompt_len,), generator=gen)
    params = SamplingParams(max_tokens=new_tokens, temperature=0)
    decode, total = [], []
    for r in range(args.warmup + args.repeats):
        start = time.perf_counter()
        for i, _ in enumerate(eng.generate(prompt, fresh, params)):
            if i == 0:
                first = time.perf_counter()
        end = time.perf_counter()
        if r >= args.warmup:
            decode.append((new_tokens - 1) / (end - first))
            total.append(new_tokens / (end - start))
    results[f"ours_{name}_decode_tok_s"] = statistics.median(decode)
    results[f"ours_{name}_sample_incl_prefill_tok_s"] = statistics.median(total)

    for sessions in args.sessions:
        states = [eng.forward(torch.randint(0, 256, (prompt_len,), generator=gen), fresh)[1]
                  for _ in range(sessions)]

        def batched_decode(states=states):  # a running batch: sessions stay stacked between steps
            batch = eng.batch(states)
            for _ in range(args.batched_steps):
                batch.forward([[7]] * len(states))

        t = timed(batched_decode, args.warmup, args.repeats)
        results[f"ours_{name}_decode_{sessions}sessions_tok_s"] = sessions * args.batched_steps / t


def ours_memory_layer(cfg: ModelConfig, batch: int, length: int, args) -> float:
    """Our memory layer (LMM mixer: projections, conv, read, chunk updates, output) over [B, T, D]."""
    mixer = MemoryMixer(cfg).eval()
    x = torch.randn(batch, length, cfg.dim)

    @torch.inference_mode()
    def run():  # the engine's steps for aligned sessions: MAX_SPAN rows, memory chunk by chunk inside
        state = {k: v.unsqueeze(0).repeat(batch, *[1] * v.dim()) for k, v in mixer.initial_state().items()}
        for start in range(0, length, MAX_SPAN):
            rows = min(MAX_SPAN, length - start)
            ctx = StepContext.build([start] * batch, [rows] * batch, cfg, x.device)
            _, state, _ = mixer(x[:, start:start + rows], state, ctx, False)

    return batch * length / timed(run, args.warmup, args.repeats)


def baseline_memory_layer(cfg: ModelConfig, batch: int, length: int, args, anchor_per_chunk: bool) -> float:
    """titans-pytorch NeuralMemory at equal dim/heads/chunk/depth. Its default (batch_size=None) takes every
    gradient at M_0; batch_size=chunk re-anchors the gradients at each chunk start, as the paper and we do."""
    from titans_pytorch import NeuralMemory

    mem = NeuralMemory(dim=cfg.dim, chunk_size=cfg.chunk_size, heads=cfg.mem_heads, dim_head=cfg.mem_head_dim,
                       batch_size=cfg.chunk_size if anchor_per_chunk else None,
                       default_model_kwargs=dict(depth=cfg.mem_depth, expansion_factor=float(cfg.mem_expansion)))
    x = torch.randn(batch, length, cfg.dim)

    @torch.no_grad()
    def run():
        mem(x)

    return batch * length / timed(run, args.warmup, args.repeats)


def baseline_mac(args, results: dict) -> None:
    from titans_pytorch import MemoryAsContextTransformer

    model = MemoryAsContextTransformer(num_tokens=256, dim=256, depth=4, segment_len=128, num_persist_mem_tokens=4,
                                       num_longterm_mem_tokens=16, neural_memory_layers=(2, 4)).eval()
    results["titans_pytorch_mac_params"] = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, args.prefill), generator=gen)
    with torch.no_grad():
        t = timed(lambda: model(ids), args.warmup, args.repeats)
    results["titans_pytorch_prefill_b1_tok_s"] = args.prefill / t
    prompt = torch.randint(0, 256, (1, args.prompt), generator=gen)
    total = args.prompt + args.new_tokens
    t = timed(lambda: model.sample(prompt, total, temperature=0.0, use_cache=True, show_progress=False),
              args.warmup, args.repeats)
    results["titans_pytorch_sample_incl_prefill_tok_s"] = args.new_tokens / t


def table(results: dict) -> str:
    rows = [(k, v) for k, v in results.items() if isinstance(v, float)]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'measurement':<{width}}  value", f"{'-' * width}  ---------"]
    lines += [f"{k:<{width}}  {v:9.1f}" for k, v in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny model and lengths (a smoke test)")
    parser.add_argument("--no-baseline", action="store_true", help="skip titans-pytorch")
    parser.add_argument("--out", default="bench/results/engine_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        cfg = ModelConfig.preset("tiny-mac")
        args.prefill, args.prompt, args.new_tokens, args.batched_steps, args.sessions = 64, 16, 8, 4, [4]
        mem_shapes = [(1, 64)]
    else:
        cfg = ModelConfig.preset("small-mac")
        args.prefill, args.prompt, args.new_tokens, args.batched_steps, args.sessions = 1024, 256, 256, 32, [4, 16]
        mem_shapes = [(1, 1024), (4, 1024)]
    results: dict = {
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "torch": torch.__version__, "config": cfg.to_dict(),
        "params": sum(p.numel() for p in Engine.from_config(cfg, device="cpu").model.parameters()),
    }
    ours_model(cfg, args, results)
    lmm = ModelConfig.from_dict({**cfg.to_dict(), "variant": "lmm"})
    for batch, length in mem_shapes:
        results[f"ours_memory_layer_b{batch}_t{length}_tok_s"] = ours_memory_layer(lmm, batch, length, args)
        if not args.no_baseline:
            ours = results[f"ours_memory_layer_b{batch}_t{length}_tok_s"]
            for suffix, per_chunk in (("", False), ("_anchor_per_chunk", True)):
                base = baseline_memory_layer(lmm, batch, length, args, per_chunk)
                results[f"titans_pytorch_memory_layer{suffix}_b{batch}_t{length}_tok_s"] = base
                results[f"ratio_memory_layer{suffix}_b{batch}_t{length}"] = ours / base
    if not args.no_baseline:
        baseline_mac(args, results)
        for name in DTYPES:
            results[f"ratio_{name}_prefill_b1"] = (results[f"ours_{name}_prefill_b1_tok_s"]
                                                   / results["titans_pytorch_prefill_b1_tok_s"])
            results[f"ratio_{name}_sample_incl_prefill"] = (results[f"ours_{name}_sample_incl_prefill_tok_s"]
                                                            / results["titans_pytorch_sample_incl_prefill_tok_s"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
