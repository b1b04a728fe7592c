"""The kernels' products on tensor cores (TITANS_KERNEL_PRECISION): within the stated tolerances of the fp32
reference on a GPU; on the CPU, the choice is checked and the interpreter's limits are said, not hidden."""

from __future__ import annotations

import random

import pytest
import torch

from kernels.memory import chunk, fused_chunk
from kernels.memory.dispatch import TOLERANCES, dot_precision
from kernels.memory.naive import chunk_step_ref, prefill_ref
from tests.kernels.test_memory_kernels import EPS, random_case

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="tensor cores need a GPU")


def test_the_precision_is_checked(monkeypatch):
    monkeypatch.setenv("TITANS_KERNEL_PRECISION", "fp8")
    with pytest.raises(ValueError, match="ieee, tf32, bf16"):
        dot_precision()
    monkeypatch.delenv("TITANS_KERNEL_PRECISION")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dot_precision() == "ieee"
    monkeypatch.setenv("TITANS_KERNEL_PRECISION", "bf16")
    with pytest.raises(ValueError, match="interpreter cannot run bf16"):
        dot_precision()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert dot_precision() == "bf16"
    monkeypatch.delenv("TITANS_KERNEL_PRECISION")
    assert dot_precision() == "ieee"  # tensor cores are asked for, until a GPU run has checked them


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's case")
def test_tf32_under_the_interpreter_is_fp32():
    weights, momentum, slots, q, k, v, log_eta, log_keep, theta = random_case(random.Random(4), 2)
    runs = []
    for precision in ("ieee", "tf32"):
        pool_w, pool_s = [w.clone() for w in weights], [s.clone() for s in momentum]
        runs.append((*fused_chunk.chunk_step(pool_w, pool_s, slots, q, k, v, log_eta, log_keep, theta, EPS, 1.0,
                                             precision=precision), *pool_w, *pool_s))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def assert_within(precision: str, what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCES[precision][what]
    torch.testing.assert_close(actual, expected.to(actual.device), atol=atol, rtol=rtol)


@gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_tensor_core_chunk_step_and_prefill_within_tolerance(precision, depth, seed):
    case = random_case(random.Random(seed * 10 + depth), depth)
    weights, momentum, slots, q, k, v, log_eta, log_keep, theta = case
    ref_read, ref_surprise, ref_w, ref_s = chunk_step_ref(*case, EPS, 1.0)
    cuda = [x.cuda() for x in (slots, q, k, v, log_eta, log_keep, theta)]
    pool_w, pool_s = [w.cuda() for w in weights], [s.cuda() for s in momentum]
    read, surprise = fused_chunk.chunk_step(pool_w, pool_s, *cuda, EPS, 1.0, precision=precision)
    assert_within(precision, "read", read, ref_read)
    assert_within(precision, "surprise", surprise, ref_surprise)
    for layer in range(depth):
        assert_within(precision, "state", pool_w[layer][cuda[0]], ref_w[layer])
        assert_within(precision, "state", pool_s[layer][cuda[0]], ref_s[layer])
    # prefill: every session's T rows as whole chunks of 8 (and a partial last one)
    B, H, T, D = q.shape
    packed = [x.transpose(1, 2).reshape(B * T, H, *x.shape[3:]) for x in (q, k, v, log_eta, log_keep, theta)]
    cu = torch.arange(B + 1) * T
    ref = prefill_ref([w.clone() for w in weights], [s.clone() for s in momentum], slots, cu, *packed, 8, EPS, 1.0)
    pool_w, pool_s = [w.cuda() for w in weights], [s.cuda() for s in momentum]
    out, surprise = chunk.prefill(pool_w, pool_s, slots.cuda(), cu.cuda(), *(x.cuda() for x in packed), 8, EPS, 1.0,
                                  precision=precision)
    assert_within(precision, "read", out, ref[0])
    assert_within(precision, "surprise", surprise, ref[1])
