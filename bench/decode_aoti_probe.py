"""Probe: one session's decode with its step compiled ahead of time (Engine aot_decode) against torch.compile alone;
or, with --compare int8, int8 dense weights against fp16, both compiled with the AOT step.

torch.compile's call path (dynamo guards, inductor's Python wrapper) costs about a third of a small model's decode
step on a 2-core CPU; an AOTInductor package (engine.compiled.AotDecode) runs the same graph from a C++
runner. Two engines with the same weights (small-mac, fp16 dense weights by default), both compile=True and
warmed up, the second also aot_decode=True, each decode --tokens tokens greedily after a 256-token prompt in one
session, in interleaved rounds. Reported: decode tokens/s after the first token (medians over rounds), the median
of per-round ratios (second engine over first), and how many tokens the two engines chose alike before they first
differ (int8 weights are another rounding of the model, so its greedy path may part from fp16's).

    .venv/bin/python bench/decode_aoti_probe.py                   # ~4 minutes, most of it compiling
    .venv/bin/python bench/decode_aoti_probe.py --compare int8    # fp16 against int8 weights, both AOT
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import Engine, ModelConfig, SamplingParams  # noqa: E402


def decode(engine: Engine, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    """(tokens/s after the first token, the tokens) of one greedy generation in a fresh session."""
    stamps, out = [], []
    for token in engine.generate(prompt, engine.new_state(), SamplingParams(max_tokens=tokens, temperature=0)):
        stamps.append(time.perf_counter())
        out.append(token)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small-mac")
    parser.add_argument("--fp32", action="store_true", help="fp32 dense weights (default fp16)")
    parser.add_argument("--compare", choices=["aot", "int8"], default="aot",
                        help="aot: torch.compile vs + AOT step; int8: fp16 (or --fp32) vs int8 dense weights, both AOT")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, dtype = ModelConfig.preset(args.preset), None if args.fp32 else torch.float16
    engines = {}
    contenders = ((("torch.compile", dtype, False), ("torch.compile + AOTInductor step", dtype, True))
                  if args.compare == "aot" else
                  ((f"{'fp32' if args.fp32 else 'fp16'} weights, AOT step", dtype, True),
                   ("int8 weights, AOT step", torch.int8, True)))
    for name, weight_dtype, aot in contenders:
        start = time.perf_counter()
        engines[name] = Engine.from_config(cfg, seed=0, device="cpu", weight_dtype=weight_dtype, compile=True,
                                           aot_decode=aot)
        engines[name].warm_up()
        print(f"{name}: warm-up {time.perf_counter() - start:.0f} s")
    prompt = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    rates: dict[str, list[float]] = {name: [] for name in engines}
    outputs = {}
    for name, engine in engines.items():  # one untimed round each
        outputs[name] = decode(engine, prompt, args.tokens)[1]
    for _ in range(args.rounds):
        for name, engine in engines.items():
            rates[name].append(decode(engine, prompt, args.tokens)[0])
    base, other = rates.values()
    first, second = outputs.values()
    alike = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), len(first))
    for name, values in rates.items():
        print(f"{name:<34} decode {statistics.median(values):7.1f} tok/s (one session, after the first token)")
    print(f"ratio (median of per-round ratios): {statistics.median(a / b for a, b in zip(other, base)):.2f}x; "
          f"the same tokens for the first {alike} of {len(first)}")


if __name__ == "__main__":
    main()
