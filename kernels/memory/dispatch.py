"""Which implementation the engine's memory runs: the Triton kernels or the PyTorch path.

TITANS_KERNELS=triton | torch forces one; unset (auto) means Triton on CUDA when triton imports, PyTorch
otherwise. The PyTorch path is always used where the kernels do not apply: autograd (outer-loop training
differentiates through the memory), memory depth above 2, or a state dtype other than fp32. With
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


def use_triton(weights: list[Tensor], *activations: Tensor) -> bool:
    choice = os.environ.get("TITANS_KERNELS", "auto")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"TITANS_KERNELS must be triton, torch or unset, got {choice!r}")
    if choice == "torch" or len(weights) > 2 or weights[0].dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*weights, *activations)):
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("TITANS_KERNELS=triton but triton is not installed")
        return True
    return weights[0].is_cuda and triton_available()
