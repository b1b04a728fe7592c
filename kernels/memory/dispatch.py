"""Which implementation the engine's memory runs: the Triton kernels or the PyTorch path.

TITANS_KERNELS=triton | torch forces one; unset (auto) means Triton on CUDA when triton imports, PyTorch
otherwise. The PyTorch path is always used where the kernels do not apply: autograd (outer-loop training
differentiates through the memory), memory depth above 2, a state dtype other than fp32, or heads and chunks
larger than the kernels' tiles (fits_on_chip). With
TITANS_KERNELS=triton on a CPU, run under TRITON_INTERPRET=1 (tests do, at tiny sizes).
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
