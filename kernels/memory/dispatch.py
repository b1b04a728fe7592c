"""Which implementation the engine's memory runs: the Triton kernels or the PyTorch path.

TITANS_KERNELS=triton | torch forces one; unset (auto) means Triton on CUDA when triton imports, PyTorch
otherwise. The PyTorch path is always used where the kernels do not apply: autograd (outer-loop training
differentiates through the memory), memory depth above 2, a state dtype other than fp32, or heads and chunks
larger than the kernels' tiles (fits_on_chip). With
TITANS_KERNELS=triton on a CPU, run under TRITON_INTERPRET=1 (tests do, at tiny sizes).

TITANS_KERNEL_PRECISION=ieee | tf32 | bf16 sets the inputs of the kernels' matrix products (their sums, the
weights, momentum and everything else stay fp32): ieee multiplies in fp32 without tensor cores; tf32 and bf16
round the inputs to 10 and 7 bits of mantissa and run on tensor cores. Unset: ieee, until bench/gpu_suite.sh has
checked the others on a GPU (the interpreter computes tf32 as fp32 and cannot run bf16 products).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# A program holds a [d, BFB] block of a head's weights at a time (depth 1: the whole [d, d] matrix) and the
# [rows, d] tiles of a chunk; these bounds keep its shared memory inside an H100's per-block limit (their shared
# memory for sm_90: bench/kernels_compile.py).
MAX_HEAD_DIM = 128
MAX_ROW_TILE = 64 * 128  # rows x head dim, both padded to powers of two


def fits_on_chip(weights: list[Tensor], rows: int) -> bool:
    d = weights[0].shape[-2]
    return d <= MAX_HEAD_DIM and padded(rows) * padded(d) <= MAX_ROW_TILE


def padded(n: int) -> int:
    """A kernel tile's size for n: the next power of two, at least 16 (as tl.dot wants)."""
    return max(16, 1 << (n - 1).bit_length())


PRECISIONS = ("ieee", "tf32", "bf16")
# what each precision may differ from the fp32 reference (kernels/memory/naive.py) by, after one chunk of unit-norm
# q, k, v on weights of unit scale: (atol, rtol) of the read, the surprise, and the weights and momentum after the
# update. ieee differs only by the order of fp32 sums
TOLERANCES = {
    "ieee": {"read": (1e-5, 1e-5), "surprise": (1e-4, 1e-4), "state": (1e-4, 1e-4)},
    "tf32": {"read": (1e-2, 1e-2), "surprise": (2e-2, 2e-2), "state": (1e-2, 1e-2)},
    "bf16": {"read": (5e-2, 5e-2), "surprise": (1e-1, 1e-1), "state": (5e-2, 5e-2)},
}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"kernel precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("Triton's interpreter cannot run bf16 products: use ieee or tf32 there")


def dot_precision() -> str:
    """The precision the engine's kernels run with (module docstring)."""
    precision = os.environ.get("TITANS_KERNEL_PRECISION") or "ieee"
    check_precision(precision)
    return precision


def use_triton(weights: list[Tensor], *activations: Tensor, rows: int) -> bool:
    """rows: what one program tiles (a chunk for updates and prefill; the rows read for a read)."""
    choice = os.environ.get("TITANS_KERNELS", "auto")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"TITANS_KERNELS must be triton, torch or unset, got {choice!r}")
    if choice == "torch" or len(weights) > 2 or weights[0].dtype != torch.float32 or not fits_on_chip(weights, rows):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*weights, *activations)):
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("TITANS_KERNELS=triton but triton is not installed")
        return True
    return weights[0].is_cuda and triton_available()
