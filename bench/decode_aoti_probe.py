"""Probe: the compiled decode step exported and compiled ahead of time (AOTInductor) against torch.compile.

torch.compile's call path (dynamo guards, inductor's Python wrapper) costs ~0.6 ms of a ~2 ms decode step on a
2-core CPU. An AOTInductor package runs the same graph from a C++ runner. This script exports
Titans._single_row_step for one session (no chunk end) with torch.export, compiles it with
aoti_compile_and_package, checks that it computes what the torch.compile step computes (logits and the state it
updates in place), and times both, interleaved, on the same model. Not yet used by the engine: a package per
flag combination and a dynamic batch dimension would be needed.

    .venv/bin/python bench/decode_aoti_probe.py                   # small-mac, fp16 weights; ~1 minute
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import Engine, ModelConfig  # noqa: E402
from engine.model import StepContext, Titans, flatten_state, nest_state  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small-mac")
    parser.add_argument("--fp32", action="store_true", help="fp32 dense weights (default fp16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_config(ModelConfig.preset(args.preset), device="cpu", compile=True,
                                weight_dtype=None if args.fp32 else torch.float16)
    model = engine.model
    batch = engine.batch([engine.new_state()])
    pos = 2 * model.cfg.chunk_size + 1  # a step that does not end a chunk
    batch.forward([torch.randint(0, 256, (pos,))])
    names = sorted(flatten_state(batch._state))

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tokens, pos, count, cos, sin, *tensors):
            state = nest_state(dict(zip(names, tensors, strict=True)))
            return Titans._single_row_step(self.model, tokens, state, pos, count, (cos, sin), False, False)

    ctx = StepContext.build([pos], [1], model.cfg, torch.device("cpu"))
    cos, sin = ctx.rope(torch.float32)
    tokens = torch.tensor([[5]])

    def fresh():
        return [t.clone() for t in (flatten_state(batch._state)[n] for n in names)]

    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        exported = torch.export.export(Step().eval(), (tokens, ctx.pos, ctx.count, cos, sin, *fresh()), strict=False)
        package = torch._inductor.aoti_compile_and_package(exported, package_path=f"{tmp}/step.pt2")
        runner = torch._inductor.aoti_load_package(package)
        print(f"export + AOT compile: {time.perf_counter() - start:.1f} s")

        def compiled(state_tensors):
            return model.decode_step(tokens, nest_state(dict(zip(names, state_tensors, strict=True))), ctx.pos,
                                     ctx.count, (cos, sin), False, False)

        def aoti(state_tensors):
            out = runner(tokens, ctx.pos, ctx.count, cos, sin, *state_tensors)
            return out[0] if isinstance(out, (list, tuple)) else out

        a, b = fresh(), fresh()
        logits_a, logits_b = compiled(a), aoti(b)
        state_diff = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
        changed = sum(not torch.equal(x, y) for x, y in zip(a, fresh(), strict=True))
        print(f"logits max diff {float((logits_a - logits_b).abs().max()):.2e}, state max diff {state_diff:.2e} "
              f"({changed} state tensors updated in place)")

        times: dict[str, list[float]] = {"torch.compile": [], "AOTInductor": []}
        state_c, state_a = fresh(), fresh()
        for _ in range(20):
            compiled(state_c)
            aoti(state_a)
        for _ in range(6):
            for name, fn, state in (("torch.compile", compiled, state_c), ("AOTInductor", aoti, state_a)):
                start = time.perf_counter()
                for _ in range(args.steps):
                    fn(state)
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
        medians = {k: statistics.median(v) for k, v in times.items()}
        ratio = statistics.median(c / a for c, a in zip(times["torch.compile"], times["AOTInductor"], strict=True))
        print(" | ".join(f"{k} {v:.3f} ms/step" for k, v in medians.items()) + f" | speedup {ratio:.2f}x")


if __name__ == "__main__":
    main()
