"""Memory kernels on a GPU: check correctness first, then time prefill and decode against the baselines.

    python bench/kernels_gpu.py                 # on a CUDA machine; writes bench/results/kernels_gpu.json
    python bench/kernels_gpu.py --out $OUT/kernels_gpu.json   # on the lent GPU machine: only $OUT comes back
        # (bench/gpu_wheels.sh first, here: the wheels that machine lacks, and the device call that uses them)
    python bench/kernels_gpu.py --dry-run       # the whole script at tiny sizes on the CPU (TRITON_INTERPRET=1)

The JSON (and the RESULTS.md rows, in a .md beside it) is rewritten after every section, so a run cut short
keeps what it measured; chunk 16 runs before
chunk 64, whose kernels take minutes to compile. The titans-pytorch baseline needs its wheel and its
dependencies' on a machine without a package index (bench/gpu_wheels.sh); when it cannot import, the JSON says
why.

Measured in one run, side by side:
  - ceilings of this card: copy bandwidth (a large device-to-device copy) and a bf16 matmul;
  - prefill (B sessions x T tokens, H heads of d, chunk b, memory depth 1 and 2): our Triton varlen prefill
    (all chunks of all sessions in one launch) and our Triton chunk step launched per chunk, our PyTorch path
    eager and under torch.compile, titans-pytorch NeuralMemory (if installed), and flash-linear-attention's chunked
    gated delta rule at the same B, T, H, d (fla-core, if installed: a depth-1 memory's nearest kin);
  - decode (N sessions, one token each, a chunk update every b tokens): Triton vs PyTorch, with the
    achieved bandwidth (the weights each read step must stream) against the copy ceiling, and fla's fused
    recurrent gated delta rule stepping the same N sessions (one token, state [N, H, d, d]).
The correctness check compares the Triton kernels with the PyTorch reference on the same random inputs and
refuses to time anything if they disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.model import init_memory_weights  # noqa: E402
from kernels.memory import chunk as varlen  # noqa: E402
from kernels.memory import fused_chunk  # noqa: E402
from kernels.memory.dispatch import TOLERANCES  # noqa: E402
from kernels.memory.naive import (  # noqa: E402
    chunk_coefficients,
    chunk_step_ref,
    chunk_update,
    memory_read,
    prefill_ref,
    read_and_update,
)

EPS = 1e-5


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over repeats (after one warm-up), synchronising the device."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_gb_s(device: torch.device, dry: bool) -> float:
    """The card's copy bandwidth: bytes read and written per second by a large device-to-device copy."""
    n = 2**20 if dry else 2**28  # 4 MiB / 1 GiB of fp32
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    return 2 * n * 4 / timed(lambda: dst.copy_(src), device, 3) / 1e9


def ceilings(device: torch.device, dry: bool) -> dict:
    m = 256 if dry else 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    mm_s = timed(lambda: a @ a, device, 3)
    return {"copy_gb_s": copy_gb_s(device, dry), "matmul_tflops": 2 * m**3 / mm_s / 1e12}


def make_inputs(B, T, H, d, depth, expansion, device, pool=None):
    weights = [w.unsqueeze(0).repeat(pool or B, 1, 1, 1).to(device).contiguous()
               for w in init_memory_weights(H, depth, d, expansion)]
    momentum = [torch.zeros_like(w) for w in weights]
    q, k, v = (F.normalize(torch.randn(B, H, T, d, device=device), dim=-1) for _ in range(3))
    log_eta = F.logsigmoid(torch.randn(B, H, T, device=device) + 2)
    log_keep = F.logsigmoid(torch.randn(B, H, T, device=device) + 6)
    theta = 0.1 * torch.rand(B, H, T, device=device)
    return weights, momentum, q, k, v, log_eta, log_keep, theta


def check(device: torch.device, precisions: list[str]) -> dict:
    """Triton = PyTorch on one chunk, depth 1 and 2, ragged chunk, non-contiguous slots, within each precision's
    stated tolerances (kernels/memory/dispatch.TOLERANCES); the largest errors, by precision."""
    errors: dict[str, dict[str, float]] = {}

    def compare(precision: str, name: str, what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
        atol, rtol = TOLERANCES[precision][what]
        excess = float(((actual - expected).abs() - atol - rtol * expected.abs()).max())
        errors[precision][f"{name}_{what}_max_abs_err"] = float((actual - expected).abs().max())
        if excess > 0:
            raise SystemExit(f"Triton ({precision}) and PyTorch disagree beyond ({atol}, {rtol}) in {name}'s "
                             f"{what}: {errors}")

    for precision in precisions:
        errors[precision] = {}
        for depth in (1, 2):
            w, s, q, k, v, le, lk, th = make_inputs(3, 13, 2, 32, depth, 2, device, pool=5)
            slots = torch.tensor([4, 0, 2], device=device)
            ref = chunk_step_ref(w, s, slots, q, k, v, le, lk, th, EPS, 1.0)
            pool_w, pool_s = [x.clone() for x in w], [x.clone() for x in s]
            read, surprise = fused_chunk.chunk_step(pool_w, pool_s, slots, q, k, v, le, lk, th, EPS, 1.0,
                                                    precision=precision)
            compare(precision, f"depth{depth}", "read", read, ref[0])
            compare(precision, f"depth{depth}", "surprise", surprise, ref[1])
            for i in range(depth):
                compare(precision, f"depth{depth}", "state", pool_w[i][slots], ref[2][i])
            # varlen prefill: ragged packed sequences (3 chunks + a partial one, 2 chunks) in slots 4 and 0
            cu = torch.tensor([0, 61, 93], device=device)
            w, s, q, k, v, le, lk, th = make_inputs(1, 93, 2, 32, depth, 2, device, pool=5)
            rows = [x[0].transpose(0, 1).contiguous() for x in (q, k, v, le, lk, th)]  # [N, H, ...]
            slots = torch.tensor([4, 0], device=device)
            ref = prefill_ref(w, s, slots, cu, *rows, 16, EPS, 1.0)
            pool_w, pool_s = [x.clone() for x in w], [x.clone() for x in s]
            read, _ = varlen.prefill(pool_w, pool_s, slots, cu, *rows, 16, EPS, 1.0, precision=precision)
            compare(precision, f"varlen_depth{depth}", "read", read, ref[0])
            for i in range(depth):
                compare(precision, f"varlen_depth{depth}", "state", pool_w[i][slots], ref[2][i])
    return errors


def prefill(B, T, H, d, chunk, depth, device, repeats, baseline: bool, precisions: list[str]) -> dict:
    """Tokens/s of each way to prefill; Triton's at the first of precisions, and its varlen kernel at each."""
    w, s, q, k, v, le, lk, th = make_inputs(B, T, H, d, depth, 4, device)
    slots = torch.arange(B, device=device)
    n = T // chunk

    def triton_run():
        pool_w, pool_s = [x.clone() for x in w], [x.clone() for x in s]
        for c in range(n):
            sl = slice(c * chunk, (c + 1) * chunk)
            fused_chunk.chunk_step(pool_w, pool_s, slots, q[:, :, sl], k[:, :, sl], v[:, :, sl], le[:, :, sl],
                                   lk[:, :, sl], th[:, :, sl], EPS, 1.0, precision=precisions[0])

    packed = [x.transpose(1, 2).reshape(B * T, *x.shape[1:2], *x.shape[3:]).contiguous()
              for x in (q, k, v, le, lk, th)]  # [B*T, H, ...]
    cu = torch.arange(B + 1, device=device) * T

    def varlen_run(precision=precisions[0]):
        pool_w, pool_s = [x.clone() for x in w], [x.clone() for x in s]
        varlen.prefill(pool_w, pool_s, slots, cu, *packed, chunk, EPS, 1.0, precision=precision)

    def torch_chunk(ww, ss, qc, kc, vc, lec, lkc, thc):  # tensors, not a slice: a compiled graph per slice value
        _, _, ww, ss = read_and_update(ww, ss, qc, kc, vc, thc, chunk_coefficients(lec, lkc), EPS, 1.0)
        return ww, ss

    def torch_run(step=torch_chunk):
        ww, ss = w, s
        for c in range(n):
            sl = slice(c * chunk, (c + 1) * chunk)
            ww, ss = step(ww, ss, *(x[:, :, sl] for x in (q, k, v, le, lk, th)))

    tokens = B * T
    out = {"B": B, "T": T, "heads": H, "head_dim": d, "chunk": chunk, "depth": depth, "precision": precisions[0],
           "triton_varlen_tok_s": tokens / timed(varlen_run, device, repeats),
           "triton_varlen_tok_s_by_precision": {p: tokens / timed(lambda p=p: varlen_run(p), device, repeats)
                                                for p in precisions},
           "triton_tok_s": tokens / timed(triton_run, device, repeats),
           "torch_eager_tok_s": tokens / timed(torch_run, device, repeats)}
    if device.type == "cuda":  # one chunk's step compiled (the loop around it would unroll into the graph)
        compiled = torch.compile(torch_chunk)
        out["torch_compile_tok_s"] = tokens / timed(lambda: torch_run(compiled), device, repeats)
    if baseline:
        out["titans_pytorch_tok_s"], out["titans_pytorch_error"] = titans_pytorch_prefill(B, T, H, d, chunk, depth,
                                                                                          device, repeats)
        out["fla_gdn_tok_s"], out["fla_error"] = fla_prefill(B, T, H, d, device, repeats)
    rate = out.get("titans_pytorch_tok_s")
    out["triton_over_titans_pytorch"] = out["triton_varlen_tok_s"] / rate if rate else None
    return out


def titans_pytorch_prefill(B, T, H, d, chunk, depth, device, repeats) -> tuple[float | None, str | None]:
    """(tokens/s, None), or (None, why not)."""
    try:
        from titans_pytorch import MemoryMLP, NeuralMemory
    except ImportError as e:
        print(f"titans-pytorch baseline skipped: {e!r}", file=sys.stderr)
        return None, repr(e)
    memory = NeuralMemory(dim=H * d, chunk_size=chunk, heads=H, dim_head=d,
                          model=MemoryMLP(dim=d, depth=depth, expansion_factor=4.0)).to(device)
    x = torch.randn(B, T, H * d, device=device)
    with torch.no_grad():
        return B * T / timed(lambda: memory(x), device, repeats), None


def fla_prefill(B, T, H, d, device, repeats) -> tuple[float | None, str | None]:
    """flash-linear-attention's chunked gated delta rule (bf16 q, k, v [B, T, H, d]): (tokens/s, None), or (None,
    why not)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as e:
        return None, repr(e)
    if device.type != "cuda":
        return None, "fla's kernels need a GPU"
    q, k, v = (F.normalize(torch.randn(B, T, H, d, device=device), dim=-1).to(torch.bfloat16) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, device=device) + 6)
    beta = torch.rand(B, T, H, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        return B * T / timed(lambda: chunk_gated_delta_rule(q, k, v, g, beta), device, repeats), None


def fla_decode(N, H, d, device, repeats) -> tuple[float | None, str | None]:
    """fla's fused recurrent gated delta rule, one token for N sessions: (µs per step, None), or (None, why not)."""
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    except ImportError as e:
        return None, repr(e)
    if device.type != "cuda":
        return None, "fla's kernels need a GPU"
    q, k, v = (F.normalize(torch.randn(N, 1, H, d, device=device), dim=-1).to(torch.bfloat16) for _ in range(3))
    g = F.logsigmoid(torch.randn(N, 1, H, device=device) + 6)
    beta = torch.rand(N, 1, H, device=device, dtype=torch.bfloat16)
    state = torch.zeros(N, H, d, d, device=device)
    with torch.no_grad():
        return 1e6 * timed(lambda: fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=state,
                                                                    output_final_state=True), device, repeats), None


def decode(N, H, d, chunk, device, repeats, precision: str) -> dict:
    """N sessions, one token each per step: a read with each session's weights every step, and every `chunk`
    steps the chunk's update, in place on the pool (as the engine's running batch does). Timed apart; the
    rate is N tokens per (read + update / chunk)."""
    w, s, q, k, v, le, lk, th = make_inputs(N, chunk, H, d, 2, 4, device)
    slots = torch.arange(N, device=device)
    one = q[:, :, :1].contiguous()

    def triton_update():  # theta 0.1, keep ~0.998: the weights stay bounded over the repeats
        fused_chunk.chunk_step(w, s, slots, None, k, v, le, lk, th, EPS, 1.0, precision=precision)

    t_read = timed(lambda: fused_chunk.read(w, slots, one, EPS, precision), device, repeats)
    t_update = timed(triton_update, device, repeats)
    t_torch_read = timed(lambda: memory_read(w, one, EPS), device, repeats)
    t_torch_update = timed(lambda: chunk_update(w, s, k, v, le, lk, th, EPS, 1.0, True), device, repeats)
    weight_bytes = sum(x.numel() * 4 for x in w)
    fla_us, fla_error = fla_decode(N, H, d, device, repeats)
    return {"sessions": N, "precision": precision, "fla_recurrent_us": fla_us, "fla_error": fla_error,
            "triton_tok_s": N / (t_read + t_update / chunk),
            "torch_tok_s": N / (t_torch_read + t_torch_update / chunk),
            "triton_read_us": 1e6 * t_read, "triton_update_us": 1e6 * t_update,
            "triton_weight_stream_gb_s": weight_bytes / t_read / 1e9}


def markdown_rows(results: dict) -> str:
    """The rows for bench/RESULTS.md, with the card's name and the date (written beside the JSON)."""
    def rate(x):
        return f"{x / 1e6:.3g} M" if x else "—"

    where = f"{results['device']}, {results['date']}, torch {results['torch']}, triton {results['triton']}"
    lines = [f"Run on {where}. Ceilings: copy {results['ceilings']['copy_gb_s']:.0f} GB/s, bf16 matmul "
             f"{results['ceilings']['matmul_tflops']:.0f} TFLOP/s.", "",
             "| prefill B×T, heads×d, chunk, depth | Triton varlen tok/s (precision) | varlen, each precision | "
             "Triton per chunk | torch eager | torch compiled | titans-pytorch | varlen / titans-pytorch | fla GDN |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results.get("prefill", []):
        ratio = r.get("triton_over_titans_pytorch")
        lines.append(f"| {r['B']}×{r['T']}, {r['heads']}×{r['head_dim']}, {r['chunk']}, {r['depth']} | "
                     f"{rate(r['triton_varlen_tok_s'])} ({r['precision']}) | "
                     + ", ".join(f"{p} {rate(x)}" for p, x in r["triton_varlen_tok_s_by_precision"].items())
                     + f" | {rate(r['triton_tok_s'])} | {rate(r['torch_eager_tok_s'])} | "
                     f"{rate(r.get('torch_compile_tok_s'))} | {rate(r.get('titans_pytorch_tok_s'))} | "
                     f"{f'{ratio:.1f}×' if ratio else '—'} | {rate(r.get('fla_gdn_tok_s'))} |")
    lines += ["", "| decode sessions | Triton tok/s | torch tok/s | read µs | update µs | weight stream GB/s "
              "(of copy) | fla recurrent step µs |", "|---|---|---|---|---|---|---|"]
    for r in results.get("decode", []):
        lines.append(f"| {r['sessions']} | {rate(r['triton_tok_s'])} | {rate(r['torch_tok_s'])} | "
                     f"{r['triton_read_us']:.1f} | {r['triton_update_us']:.1f} | "
                     f"{r['triton_weight_stream_gb_s']:.0f} ({r['fraction_of_copy_bandwidth']:.0%}) | "
                     + (f"{r['fla_recurrent_us']:.1f} |" if r.get("fla_recurrent_us") else "— |"))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton interpreter)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench/results/kernels_gpu.json"))
    parser.add_argument("--precisions", default="tf32,ieee,bf16",
                        help="the kernels' product precisions, checked and timed; the first is the headline (the "
                             "engine's default on a GPU); a dry run keeps ieee and tf32 (the interpreter's)")
    args = parser.parse_args()
    dry = args.dry_run
    precisions = [p for p in args.precisions.split(",") if not (dry and p == "bf16")]
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    torch.manual_seed(0)
    name = "cpu (dry run)" if dry else torch.cuda.get_device_name()
    import triton

    results = {"device": name, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
               "triton": triton.__version__, "dry_run": dry}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(results, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown_rows(results))

    results["check"] = check(device, precisions)
    results["ceilings"] = ceilings(device, dry)
    save()
    repeats = 1 if dry else args.repeats
    B, T, H, d = (1, 32, 2, 16) if dry else (8, 4096, 8, 64)
    results["prefill"], results["decode"] = [], []
    for chunk in (16,) if dry else (16, 64):
        for depth in (1, 2):
            results["prefill"].append(prefill(B, T, H, d, chunk, depth, device, repeats, baseline=True,
                                              precisions=precisions))
            save()
        if chunk == 16:  # decode at the shipped chunk, before chunk 64's long compiles
            for n in (1, 2) if dry else (1, 16, 128, 256, 1024):
                row = decode(n, 2 if dry else 8, 16 if dry else 64, 16, device, repeats, precisions[0])
                row["fraction_of_copy_bandwidth"] = row["triton_weight_stream_gb_s"] / results["ceilings"]["copy_gb_s"]
                results["decode"].append(row)
                save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
