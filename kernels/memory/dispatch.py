"""Which implementation the engine's memory runs: the Triton kernels or the PyTorch path.

TITANS_KERNELS=triton | torch forces one; unset (auto) means Triton on CUDA when triton imports, PyTorch
otherwise. The PyTorch path is always used where the kernels do not apply: autograd (outer-loop training
differentiates through the memory), memory depth above 2, a state dtype other than fp32, or a head whose weight
matrix exceeds the kernels' on-chip tile (fits_on_chip). With
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


# A program holds one head's whole weight matrices (and momentum) on chip, padded to powers of two: beyond
# 64 x 256 elements (d 64 with expansion 4, or d 128 at depth 1) the chunk step needs more shared memory than an
# H100's 227 KB per block. Compiled for sm_90 on a CPU (`python -m tests.kernels.gpu_compile '{"BT": 64, "BD":
# 64, "BF": 256}' 2`, without TRITON_INTERPRET; triton 3.6 and 3.9): the chunk step at d 64, expansion 4, chunk 64
# 164 KB, prefill 162 KB; d 128 with expansion 2, 274 KB. Tiling over the hidden width would lift the limit.
MAX_WEIGHT_TILE = 64 * 256


def fits_on_chip(weights: list[Tensor]) -> bool:
    d_in, d_out = weights[0].shape[-2:]
    return _pow2(d_in) * _pow2(d_out) <= MAX_WEIGHT_TILE


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def use_triton(weights: list[Tensor], *activations: Tensor) -> bool:
    choice = os.environ.get("TITANS_KERNELS", "auto")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"TITANS_KERNELS must be triton, torch or unset, got {choice!r}")
    if choice == "torch" or len(weights) > 2 or weights[0].dtype != torch.float32 or not fits_on_chip(weights):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*weights, *activations)):
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("TITANS_KERNELS=triton but triton is not installed")
        return True
    return weights[0].is_cuda and triton_available()
