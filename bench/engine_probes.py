"""Paired probes behind ten engine choices, each measured side by side in one run (medians of --repeats rounds).

  1. fp16 dense layers on a CPU (Linear.UPCAST_ROWS): one projection of small-mac's shape (256 -> 1048) over
     1024 rows as a half GEMM and as a float GEMM on the upcast weight; then small-mac with fp16 weights decoding
     a running batch of 4 and 16 sessions with the upcast from 4 rows against from 64 rows (the default).
  2. Staggered batches (NeuralMemory.write): a running batch of 32 sessions at different positions on the
     default model, one token per step, with the update computed only for the sessions that complete a memory
     chunk (the default) against the masked update of every session (what a step without host positions does),
     next to one session and to 32 aligned sessions.
  3. The memory-chunk update of 32 sessions at the default model's memory shapes (4 heads, 32 -> 64 -> 32, chunk
     8): kernels.memory.naive.apply_chunk against the previous code, kept here (both weighted sums as one GEMM over
     interleaved coefficients, then five elementwise passes over the weights), and the memory's layer-norm
     statistics with torch.var (before) against a centred mean of squares (now).
  4. Aligned batches without padding rows (Titans.step_limit): the default model reading a 93-token prompt in
     2, 8 and 32 fresh sessions with long steps (now) against steps within the attention window (the rule for
     any batch before; still the rule for a ragged one).
  5. The chunk update's GEMM in place (kernels.memory.naive._minus_matmul: baddbmm_ into the decayed weights it
     made) against the out-of-place baddbmm, which first copies them (before 2026-11-27, sixth session): the
     default model reading a 93-token prompt in 32 sessions, and 16 decode steps of the same batch.
  6. Ring and chunk-buffer writes without padding (StepContext.unpadded): decode steps of 1 and 32 sessions
     writing their rows directly (now) against keeping the old value of padding rows with a gather and a
     where, which every step did before 2026-11-27 (sixth session).
  7. A serving batch's chunk updates in place on its own W and S (apply_chunk / read_and_update in_place,
     seventh session) against fresh outputs: 32 sessions reading a 93-token prompt, and 8 decode steps (one
     chunk end) of the same batch.
  8. The short convolution summed tap by tap (ShortConv, serving, seventh session) against the unfolded
     product (training's form, and serving's before): 32 sessions reading a 93-token prompt.
  9. A decode step's listed ids as one [B, 1] tensor (Engine.id_rows, seventh session) against a tensor per
     session and their stack: decode steps of 1 and 32 sessions.
 10. A snapshot written by SessionState.to_bytes (seventh session) against safetensors.torch.save with its
     header parsed back for the checksum (before): the default model's state.

    .venv/bin/python bench/engine_probes.py        # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import Engine, ModelConfig  # noqa: E402
from engine.quant import Linear  # noqa: E402
from engine.step import StepContext  # noqa: E402


def per_call_ms(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def running_batch(engine: Engine, sessions: int, staggered: bool, gen: torch.Generator):
    states = [engine.forward(torch.randint(0, 256, (68 + (s if staggered else 0),), generator=gen),
                             engine.new_state())[1] for s in range(sessions)]
    batch = engine.batch(states)
    return lambda: batch.forward([[7]] * sessions)


def median_rounds(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved: every case once per round
        for name, case in cases.items():
            samples[name].append(case())
    return {name: statistics.median(values) for name, values in samples.items()}


def fp16_probe(repeats: int) -> dict[str, float]:
    x = torch.randn(1024, 256)
    w, b = torch.randn(1048, 256).half(), torch.randn(1048).half()
    engine = Engine.from_config(ModelConfig.preset("small-mac"), device="cpu", weight_dtype=torch.float16)
    gen = torch.Generator().manual_seed(0)
    cases: dict[str, Callable[[], float]] = {
        "linear_1024_rows_half_ms": lambda: per_call_ms(lambda: F.linear(x.half(), w, b).float(), 10),
        "linear_1024_rows_upcast_ms": lambda: per_call_ms(
            lambda: F.linear(x.half().float(), w.float(), b.float()).half().float(), 10)}
    for sessions in (4, 16):
        step = running_batch(engine, sessions, staggered=True, gen=gen)
        for upcast_rows in (4, 64):
            def case(step=step, sessions=sessions, upcast_rows=upcast_rows) -> float:
                Linear.UPCAST_ROWS = upcast_rows
                try:
                    return sessions * 1e3 / per_call_ms(step, 16)
                finally:
                    Linear.UPCAST_ROWS = 64
            cases[f"decode_{sessions}_sessions_upcast_from_{upcast_rows}_tok_s"] = case
    return median_rounds(cases, repeats)


def staggered_probe(repeats: int, model: Path) -> dict[str, float]:
    engine = Engine.load(model, device="cpu")
    gen = torch.Generator().manual_seed(0)
    masked_full_sessions = StepContext.full_sessions

    def masked(step: Callable[[], object]) -> float:
        StepContext.full_sessions = lambda ctx: None  # every session pays, as in a step without host positions
        try:
            return per_call_ms(step, 32)
        finally:
            StepContext.full_sessions = masked_full_sessions

    one = running_batch(engine, 1, staggered=False, gen=gen)
    aligned = running_batch(engine, 32, staggered=False, gen=gen)
    staggered = running_batch(engine, 32, staggered=True, gen=gen)
    return median_rounds({
        "one_session_ms_per_step": lambda: per_call_ms(one, 32),
        "32_aligned_ms_per_step": lambda: per_call_ms(aligned, 32),
        "32_staggered_ms_per_step": lambda: per_call_ms(staggered, 32),
        "32_staggered_masked_update_ms_per_step": lambda: masked(staggered),
    }, repeats)


def previous_apply_chunk(weights, momentum, inputs, deltas, theta, coefficients, grad_clip):
    """kernels.memory.naive.apply_chunk before 2026-11-27 (fifth session), for the side-by-side timing."""
    if grad_clip is not None:
        norm_sq = sum(a.square().sum(-1) * d.square().sum(-1) for a, d in zip(inputs, deltas))
        theta = theta * torch.clamp(grad_clip * torch.rsqrt(norm_sq + 1e-12), max=1.0)
    beta, gamma, p_end, decay_m, decay_s = coefficients
    coefs = (torch.stack((decay_m, decay_s), -1) * theta[..., None]).unsqueeze(-2)
    beta, gamma, p_end = (c[..., None, None] for c in (beta, gamma, p_end))
    new_w, new_s = [], []
    for w, s, a, d in zip(weights, momentum, inputs, deltas):
        both = a.transpose(-1, -2) @ (d.unsqueeze(-1) * coefs).flatten(-2)
        upd_m, upd_s = both.view(*both.shape[:-1], -1, 2).unbind(-1)
        new_w.append(beta * w + gamma * s - upd_m)
        new_s.append(p_end * s - upd_s)
    return new_w, new_s


def memory_update_probe(repeats: int) -> dict[str, float]:
    from engine.model import memory_shapes
    from kernels.memory import naive as memory

    sessions, heads, head_dim, chunk = 32, 4, 32, 8
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(sessions, heads, i, o, generator=gen) / i**0.5
               for i, o in memory_shapes(2, head_dim, 2)]
    momentum = [0.01 * torch.randn(w.shape, generator=gen) for w in weights]
    k = F.normalize(torch.randn(sessions, heads, chunk, head_dim, generator=gen), dim=-1)
    v = torch.randn(sessions, heads, chunk, head_dim, generator=gen)
    gates = [torch.randn(sessions, heads, chunk, generator=gen) for _ in range(3)]
    coefficients = memory.chunk_coefficients(F.logsigmoid(gates[0]), F.logsigmoid(gates[1] + 4))
    theta = 0.1 * torch.sigmoid(gates[2])
    inputs, deltas = memory.memory_grads(weights, k, v, 1e-5)
    z = torch.randn(sessions, heads, 2 * chunk, head_dim, generator=gen)

    def var_stats():
        return z.mean(-1, keepdim=True), torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)

    def centred_stats():
        centred = z - z.mean(-1, keepdim=True)
        return centred, torch.rsqrt(centred.square().mean(-1, keepdim=True) + 1e-5)

    return median_rounds({
        "32_sessions_chunk_update_previous_ms": lambda: per_call_ms(
            lambda: previous_apply_chunk(weights, momentum, inputs, deltas, theta, coefficients, 1.0), 20),
        "32_sessions_chunk_update_now_ms": lambda: per_call_ms(
            lambda: memory.apply_chunk(weights, momentum, inputs, deltas, theta, coefficients, 1.0), 20),
        "32_sessions_ln_stats_var_us": lambda: 1e3 * per_call_ms(var_stats, 100),
        "32_sessions_ln_stats_centred_us": lambda: 1e3 * per_call_ms(centred_stats, 100),
    }, repeats)


def step_rule_probe(repeats: int, model: Path) -> dict[str, float]:
    from engine import step

    engine = Engine.load(model, device="cpu")
    prompt = list(range(40, 133))  # 93 tokens
    step_limit = step.step_limit

    def prefill_ms(sessions: int, window_steps: bool) -> float:
        if window_steps:
            step.step_limit = lambda cfg, pos, aligned, ragged: step_limit(cfg, pos, aligned, True)
        try:
            return per_call_ms(lambda: engine.batch([engine.new_state()] * sessions).forward([prompt] * sessions), 2)
        finally:
            step.step_limit = step_limit

    cases = {}
    for sessions in (2, 8, 32):
        for rule in ("long", "window"):
            cases[f"{sessions}_sessions_93_tokens_{rule}_steps_ms"] = \
                lambda sessions=sessions, rule=rule: prefill_ms(sessions, rule == "window")
    return median_rounds(cases, repeats)


def prompt_or_steps_ms(engine: Engine, decode: bool, steps: int = 16) -> float:
    """32 fresh sessions reading a 93-token prompt (ms per read), or decode steps of a batch that has read it."""
    prompt = list(range(40, 133))
    if not decode:
        return per_call_ms(lambda: engine.batch([engine.new_state()] * 32).forward([prompt] * 32), 2)
    batch = engine.batch([engine.new_state()] * 32)
    batch.forward([prompt] * 32)
    return per_call_ms(lambda: batch.forward([[7]] * 32), steps)


def previous_minus_matmul(x, a, b):
    """kernels.memory.naive._minus_matmul before 2026-11-27 (sixth session): out of place, so x is copied first."""
    lead = x.shape[:-2]
    a, b = a.expand(*lead, *a.shape[-2:]), b.expand(*lead, *b.shape[-2:])
    out = torch.baddbmm(x.reshape(-1, *x.shape[-2:]), a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]),
                        alpha=-1.0)
    return out.view(x.shape)


def in_place_update_probe(repeats: int, model: Path) -> dict[str, float]:
    from kernels.memory import naive as memory

    engine, now = Engine.load(model, device="cpu"), memory._minus_matmul

    def timed(previous: bool, decode: bool) -> float:
        memory._minus_matmul = previous_minus_matmul if previous else now
        try:
            return prompt_or_steps_ms(engine, decode)
        finally:
            memory._minus_matmul = now

    return median_rounds({
        "32_sessions_93_tokens_update_copied_ms": lambda: timed(True, False),
        "32_sessions_93_tokens_update_in_place_ms": lambda: timed(False, False),
        "32_sessions_decode_step_update_copied_ms": lambda: timed(True, True),
        "32_sessions_decode_step_update_in_place_ms": lambda: timed(False, True),
    }, repeats)


def decode_step_probe(repeats: int, model: Path, names: tuple[str, str],
                      patch: Callable[[], Callable[[], None]]) -> dict[str, float]:
    """Decode steps of 1 and 32 sessions with `patch` applied (it returns its undo: names[0]) and without
    (names[1])."""
    engine = Engine.load(model, device="cpu")
    cases = {}
    for sessions in (1, 32):
        batch = engine.batch([engine.new_state()] * sessions)
        batch.forward([list(range(40, 133))] * sessions)

        def step_ms(patched: bool, batch=batch, sessions=sessions) -> float:
            undo = patch() if patched else (lambda: None)
            try:
                return per_call_ms(lambda: batch.forward([[7]] * sessions), 16)
            finally:
                undo()

        for name, patched in zip(names, (True, False)):
            cases[f"{sessions}_sessions_decode_step_{name}_ms"] = lambda step_ms=step_ms, patched=patched: step_ms(
                patched)
    return median_rounds(cases, repeats)


def unpadded_write_probe(repeats: int, model: Path) -> dict[str, float]:
    def masked() -> Callable[[], None]:
        now, StepContext.unpadded = StepContext.unpadded, property(lambda self: False)
        return lambda: setattr(StepContext, "unpadded", now)

    return decode_step_probe(repeats, model, ("masked_write", "direct_write"), masked)


def in_place_serving_probe(repeats: int, model: Path) -> dict[str, float]:
    from kernels.memory import naive

    engine = Engine.load(model, device="cpu")
    update, read_update = naive.chunk_update, naive.read_and_update

    def fresh_outputs(function):
        def call(*args, in_place=False):
            return function(*args[:9])  # in_place (the 10th argument, or a keyword) left False
        return call

    def timed(fresh: bool, decode: bool) -> float:
        if fresh:  # fresh outputs, then copied into the batch's slots
            naive.chunk_update, naive.read_and_update = map(fresh_outputs, (update, read_update))
        try:
            return prompt_or_steps_ms(engine, decode, steps=8)
        finally:
            naive.chunk_update, naive.read_and_update = update, read_update

    return median_rounds({
        "32_sessions_93_tokens_fresh_updates_ms": lambda: timed(True, False),
        "32_sessions_93_tokens_in_place_updates_ms": lambda: timed(False, False),
        "32_sessions_decode_step_fresh_updates_ms": lambda: timed(True, True),
        "32_sessions_decode_step_in_place_updates_ms": lambda: timed(False, True),
    }, repeats)


def previous_short_conv(self, x, tail, ctx):
    """ShortConv.forward before 2026-11-27 (seventh session), when serving also used the unfolded product."""
    ext = torch.cat([tail, x], 1)
    y = (ext.unfold(1, self.kernel, 1) * self.weight).sum(-1)
    index = ctx.tail_index(self.kernel)[..., None].expand(-1, -1, x.shape[-1])
    return y, ext.gather(1, index)


def short_conv_probe(repeats: int, model: Path) -> dict[str, float]:
    from engine.model import ShortConv

    engine, now = Engine.load(model, device="cpu"), ShortConv.forward

    def timed(previous: bool) -> float:
        ShortConv.forward = previous_short_conv if previous else now
        try:
            return prompt_or_steps_ms(engine, decode=False)
        finally:
            ShortConv.forward = now

    return median_rounds({"32_sessions_93_tokens_unfolded_conv_ms": lambda: timed(True),
                          "32_sessions_93_tokens_tap_by_tap_conv_ms": lambda: timed(False)}, repeats)


def decode_ids_probe(repeats: int, model: Path) -> dict[str, float]:
    def per_session() -> Callable[[], None]:
        now, Engine.id_rows = Engine.id_rows, lambda self, ids: None
        return lambda: setattr(Engine, "id_rows", now)

    return decode_step_probe(repeats, model, ("ids_per_session", "ids_as_one_tensor"), per_session)


def previous_to_bytes(state) -> bytes:
    """SessionState.to_bytes before 2026-11-27 (seventh session): safetensors writes, its header is read back."""
    import json
    import struct

    from safetensors.torch import save

    from engine.state import FORMAT_VERSION, _checksum, _split

    blob = save({k: v.contiguous() for k, v in sorted(state.tensors.items())})
    header, data = _split(blob, max_header=len(blob))
    meta = {"format_version": FORMAT_VERSION, "model_fingerprint": state.model_fingerprint,
            "tokens_seen": f"{state.tokens_seen:020d}", "created_at": f"{state.created_at:020.6f}"}
    header["__metadata__"] = {**meta, "content_sha256": _checksum(meta, data)}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + bytes(data)


def snapshot_write_probe(repeats: int, model: Path) -> dict[str, float]:
    state = Engine.load(model, device="cpu").new_state()
    return median_rounds({"snapshot_write_via_safetensors_save_ms": lambda: per_call_ms(
                              lambda: previous_to_bytes(state), 50),
                          "snapshot_write_now_ms": lambda: per_call_ms(state.to_bytes, 50)}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=str(ROOT / "models/titans-mal-recall"))
    parser.add_argument("--only", type=int, nargs="+", default=list(range(1, 11)), help="probe numbers to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Path(args.model)
    probes = {1: lambda: fp16_probe(args.repeats), 2: lambda: staggered_probe(args.repeats, model),
              3: lambda: memory_update_probe(args.repeats), 4: lambda: step_rule_probe(args.repeats, model),
              5: lambda: in_place_update_probe(args.repeats, model),
              6: lambda: unpadded_write_probe(args.repeats, model),
              7: lambda: in_place_serving_probe(args.repeats, model), 8: lambda: short_conv_probe(args.repeats, model),
              9: lambda: decode_ids_probe(args.repeats, model), 10: lambda: snapshot_write_probe(args.repeats, model)}
    results = {}
    with torch.inference_mode():
        for number in args.only:
            results.update(probes[number]())
    for name, value in results.items():
        print(f"{name:<48} {value:10.2f}")


if __name__ == "__main__":
    main()
