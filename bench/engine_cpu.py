"""CPU benchmark of the engine, side by side with titans-pytorch==0.5.5 in the same process.

For the small-mac preset (~7.5M parameters: dim 256, 4 layers, memory depth 2 x4, chunk 16, segment 128):
  - model prefill tokens/s (one session; 4 fresh sessions batched),
  - decode tokens/s of one session after a 256-token prompt, and 256 new tokens including that prefill
    (how titans-pytorch's `sample` is timed), and the throughput of a running batch of 4 / 16 sessions,
  - memory-layer prefill against titans-pytorch's NeuralMemory at equal dim/heads/chunk/depth, both in its
    default mode (every gradient taken at M_0) and re-anchored per chunk (batch_size=chunk) as the paper
    and this engine do,
  - titans-pytorch's MemoryAsContextTransformer forward and `sample(use_cache=True)`.
Our weights run in fp32 and with fp16 dense weights (Engine weight_dtype), each eager and with compiled steps
(Engine compile=True: torch.compile of the one-row decode step and of prefill's whole-chunk memory step;
compiling happens in the warm-up round), and fp16 compiled with aot_decode (one session's decode step compiled
ahead of time by AOTInductor), and int8 dense weights compiled the same way (not in --quick). Our memory layer runs
eager and with its chunk step compiled.

The machine is noisy, so every repetition runs all workloads once, interleaved, and each ratio is the median
of per-repetition ratios (ours and the baseline timed back to back). Values are medians over --repeats
after --warmup rounds. Writes JSON, prints a table.

    python bench/engine_cpu.py                        # full run (about 13 minutes on 2 cores, most compiling)
    python bench/engine_cpu.py --quick --no-baseline  # smoke test at tiny sizes
    python bench/engine_cpu.py --memory-only --repeats 9 --out bench/results/engine_cpu_memory.json  # memory layer
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine import Engine, ModelConfig, SamplingParams
from engine.compiled import compile_chunk_step
from engine.model import MemoryMixer
from engine.step import MAX_SPAN, StepContext

# name -> Engine options; compiled engines run decode and prefill's memory chunks through torch.compile
ENGINES = {"fp32": {}, "fp16": {"weight_dtype": torch.float16},
           "fp32_compiled": {"compile": True}, "fp16_compiled": {"weight_dtype": torch.float16, "compile": True},
           # and one session's decode step compiled ahead of time (AOTInductor, in Engine.warm_up)
           "fp16_compiled_aot": {"weight_dtype": torch.float16, "compile": True, "aot_decode": True},
           # int8 dense weights (weight-only, a scale per row); not in --quick: its AOT build takes minutes
           "int8_compiled_aot": {"weight_dtype": torch.int8, "compile": True, "aot_decode": True}}
Workload = Callable[[], dict[str, float]]  # one timed run -> {metric: tokens per second}


def rate(tokens: int, fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return tokens / (time.perf_counter() - start)


def engine_workloads(eng: Engine, name: str, args, gen: torch.Generator) -> dict[str, Workload]:
    fresh = eng.new_state()
    ids = torch.randint(0, 256, (args.prefill,), generator=gen)
    batch = [torch.randint(0, 256, (args.prefill,), generator=gen) for _ in range(4)]
    prompt = torch.randint(0, 256, (args.prompt,), generator=gen)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0)

    def generate() -> dict[str, float]:
        start = time.perf_counter()
        for i, _ in enumerate(eng.generate(prompt, fresh, params)):
            if i == 0:
                first = time.perf_counter()
        end = time.perf_counter()
        return {f"ours_{name}_decode_tok_s": (args.new_tokens - 1) / (end - first),
                f"ours_{name}_sample_incl_prefill_tok_s": args.new_tokens / (end - start)}

    workloads = {f"{name}_generate": generate}
    workloads[f"{name}_prefill_b1"] = lambda: {f"ours_{name}_prefill_b1_tok_s": rate(
        args.prefill, lambda: eng.forward(ids, fresh))}
    workloads[f"{name}_prefill_b4"] = lambda: {f"ours_{name}_prefill_b4_tok_s": rate(
        4 * args.prefill, lambda: eng.forward_batch(batch, [fresh] * 4))}
    for sessions in args.sessions:
        states = [eng.forward(torch.randint(0, 256, (args.prompt,), generator=gen), fresh)[1] for _ in range(sessions)]

        def running_batch(states=states) -> None:  # sessions stay stacked between steps, as a scheduler keeps them
            running = eng.batch(states)
            for _ in range(args.batched_steps):
                running.forward([[7]] * len(states))

        workloads[f"{name}_decode_{sessions}"] = lambda states=states, fn=running_batch, n=sessions: {
            f"ours_{name}_decode_{n}sessions_tok_s": rate(n * args.batched_steps, fn)}
    return workloads


def ours_memory_layer(cfg: ModelConfig, batch: int, length: int, compiled: bool) -> Callable[[], object]:
    """Our memory layer (LMM mixer: projections, conv, read, chunk updates, output) over [B, T, D], stepping
    as the engine steps aligned sessions: MAX_SPAN rows, the memory chunk by chunk inside; compiled: the
    whole-chunk memory step through torch.compile, as Titans.compile_steps sets it."""
    mixer = MemoryMixer(cfg).eval()
    if compiled:
        mixer.memory.compiled_chunk_step = compile_chunk_step(id(mixer))
    x = torch.randn(batch, length, cfg.dim)

    @torch.inference_mode()
    def run():
        state = {k: v.unsqueeze(0).repeat(batch, *[1] * v.dim()) for k, v in mixer.initial_state().items()}
        for start in range(0, length, MAX_SPAN):
            rows = min(MAX_SPAN, length - start)
            ctx = StepContext.build([start] * batch, [rows] * batch, cfg, x.device)
            _, state, _ = mixer(x[:, start:start + rows], state, ctx, False)

    return run


def baseline_memory_layer(cfg: ModelConfig, batch: int, length: int, anchor_per_chunk: bool) -> Callable[[], object]:
    from titans_pytorch import NeuralMemory

    mem = NeuralMemory(dim=cfg.dim, chunk_size=cfg.chunk_size, heads=cfg.mem_heads, dim_head=cfg.mem_head_dim,
                       batch_size=cfg.chunk_size if anchor_per_chunk else None,
                       default_model_kwargs=dict(depth=cfg.mem_depth, expansion_factor=float(cfg.mem_expansion)))
    x = torch.randn(batch, length, cfg.dim)
    return torch.no_grad()(lambda: mem(x))


def baseline_mac_workloads(args, results: dict) -> dict[str, Workload]:
    from titans_pytorch import MemoryAsContextTransformer

    model = MemoryAsContextTransformer(num_tokens=256, dim=256, depth=4, segment_len=128, num_persist_mem_tokens=4,
                                       num_longterm_mem_tokens=16, neural_memory_layers=(2, 4)).eval()
    results["titans_pytorch_mac_params"] = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, args.prefill), generator=gen)
    prompt = torch.randint(0, 256, (1, args.prompt), generator=gen)
    total = args.prompt + args.new_tokens
    forward = torch.no_grad()(lambda: model(ids))
    return {
        "titans_prefill": lambda: {"titans_pytorch_prefill_b1_tok_s": rate(args.prefill, forward)},
        "titans_sample": lambda: {"titans_pytorch_sample_incl_prefill_tok_s": rate(
            args.new_tokens,
            lambda: model.sample(prompt, total, temperature=0.0, use_cache=True, show_progress=False))},
    }


def run_interleaved(workloads: dict[str, Workload], warmup: int, repeats: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    names = list(workloads)
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate, so no workload always runs first
        for name in order:
            for metric, value in workloads[name]().items():
                if r >= warmup:
                    samples.setdefault(metric, []).append(value)
    return samples


_SAMPLE = "titans_pytorch_sample_incl_prefill_tok_s"
RATIOS = [  # (name, ours, baseline)
    ("ratio_fp32_prefill_b1", "ours_fp32_prefill_b1_tok_s", "titans_pytorch_prefill_b1_tok_s"),
    ("ratio_fp32_compiled_prefill_b1", "ours_fp32_compiled_prefill_b1_tok_s", "titans_pytorch_prefill_b1_tok_s"),
    ("ratio_fp32_sample_incl_prefill", "ours_fp32_sample_incl_prefill_tok_s", _SAMPLE),
    ("ratio_fp16_sample_incl_prefill", "ours_fp16_sample_incl_prefill_tok_s", _SAMPLE),
    ("ratio_fp16_compiled_sample_incl_prefill", "ours_fp16_compiled_sample_incl_prefill_tok_s", _SAMPLE),
    ("ratio_fp16_compiled_aot_sample_incl_prefill", "ours_fp16_compiled_aot_sample_incl_prefill_tok_s", _SAMPLE),
    ("ratio_int8_compiled_aot_sample_incl_prefill", "ours_int8_compiled_aot_sample_incl_prefill_tok_s", _SAMPLE),
]
SPEEDUPS = [  # (name, compiled, eager): our own engine, compiled against eager, paired per repetition
    (f"speedup_{dtype}_compiled_{work}", f"ours_{dtype}_compiled_{work}_tok_s", f"ours_{dtype}_{work}_tok_s")
    for dtype in ("fp32", "fp16") for work in ("decode", "prefill_b1")] + [
    ("speedup_fp16_aot_decode", "ours_fp16_compiled_aot_decode_tok_s", "ours_fp16_compiled_decode_tok_s"),
    ("speedup_int8_over_fp16_aot_decode", "ours_int8_compiled_aot_decode_tok_s", "ours_fp16_compiled_aot_decode_tok_s")]


def table(results: dict) -> str:
    rows = [(k, v) for k, v in results.items() if isinstance(v, float)]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'measurement':<{width}}  value", f"{'-' * width}  ---------"]
    lines += [f"{k:<{width}}  {v:9.1f}" if v >= 10 else f"{k:<{width}}  {v:9.2f}" for k, v in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny model and lengths (a smoke test)")
    parser.add_argument("--no-baseline", action="store_true", help="skip titans-pytorch")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the memory-layer comparison (about 2 minutes; no engines, no MAC baseline)")
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
        "torch": torch.__version__, "config": cfg.to_dict(), "repeats": args.repeats,
        "params": sum(p.numel() for p in Engine.from_config(cfg, device="cpu").model.parameters()),
    }
    gen = torch.Generator().manual_seed(0)
    workloads: dict[str, Workload] = {}
    for name, options in ({} if args.memory_only else ENGINES).items():
        if args.quick and options.get("weight_dtype") == torch.int8:
            continue
        eng = Engine.from_config(cfg, seed=0, device="cpu", **options)
        if options.get("aot_decode"):
            eng.warm_up()  # the package is built here; torch.compile's graphs compile in the warm-up round
        workloads.update(engine_workloads(eng, name, args, gen))
    lmm = ModelConfig.from_dict({**cfg.to_dict(), "variant": "lmm"})
    ratios = SPEEDUPS + (RATIOS if not args.no_baseline else [])
    for batch, length in mem_shapes:
        shape = f"b{batch}_t{length}"
        for mode in ("", "_compiled"):
            ours = f"ours_memory_layer{mode}_{shape}_tok_s"
            fn = ours_memory_layer(lmm, batch, length, compiled=bool(mode))
            workloads[f"mem{mode}_{shape}"] = lambda ours=ours, fn=fn, n=batch * length: {ours: rate(n, fn)}
        ratios.append((f"speedup_memory_layer_compiled_{shape}", f"ours_memory_layer_compiled_{shape}_tok_s",
                       f"ours_memory_layer_{shape}_tok_s"))
        if args.no_baseline:
            continue
        for suffix, per_chunk in (("", False), ("_anchor_per_chunk", True)):
            base = f"titans_pytorch_memory_layer{suffix}_{shape}_tok_s"
            fn = baseline_memory_layer(lmm, batch, length, per_chunk)
            workloads[f"base{suffix}_{shape}"] = lambda base=base, fn=fn, n=batch * length: {base: rate(n, fn)}
            for mode in ("", "_compiled"):
                ratios.append((f"ratio_memory_layer{mode}{suffix}_{shape}", f"ours_memory_layer{mode}_{shape}_tok_s",
                               base))
    if not args.no_baseline and not args.memory_only:
        workloads.update(baseline_mac_workloads(args, results))

    samples = run_interleaved(workloads, args.warmup, args.repeats)
    results.update({metric: statistics.median(values) for metric, values in samples.items()})
    for name, ours, base in ratios:  # repetition r of ours against repetition r of the baseline
        if ours not in samples:  # an engine --quick leaves out
            continue
        results[name] = statistics.median(o / b for o, b in zip(samples[ours], samples[base]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "samples": samples}, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
