"""The kernels compile for a real GPU (sm_90: H100/H200) on this CPU machine, and fit its shared memory.

The interpreter of TRITON_INTERPRET=1 runs the kernels' Python: it accepts what a GPU compile refuses (a plain
float global read inside a kernel: no kernel compiled for a GPU until its constants became constexpr) and knows
nothing of shared memory. triton.compile with a CUDA target needs no GPU: it lowers to PTX and runs the wheel's
ptxas. In a subprocess, without TRITON_INTERPRET (this test session's kernels are interpreted functions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
H100_SHARED_BYTES = 227 * 1024  # the most one block may use


def shared_bytes(blocks: dict, depth: int, kernels: str = "step,step_only,read,prefill") -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "bench/kernels_compile.py"), json.dumps(blocks), str(depth),
                           kernels], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: row["shared_bytes"] for name, row in json.loads(done.stdout).items()}


@pytest.mark.parametrize("depth", [1, 2])
def test_every_kernel_compiles_for_an_h100(depth):
    shared = shared_bytes({"BT": 16, "BD": 32, "BFB": 32}, depth)
    assert set(shared) == {"step", "step_only", "read", "prefill"}
    assert all(0 < used <= H100_SHARED_BYTES for used in shared.values()), shared


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_tensor_cores_run_the_products_unless_ieee(precision):
    done = subprocess.run([sys.executable, str(ROOT / "bench/kernels_compile.py"), '{"BT": 16, "BD": 32, "BFB": 32}',
                           "2", "step,read", precision], env={k: v for k, v in os.environ.items()
                                                              if k != "TRITON_INTERPRET"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    mma = {name: row["tensor_core_instructions"] for name, row in json.loads(done.stdout).items()}
    assert all((count > 0) == (precision != "ieee") for count in mma.values()), mma
