"""Compile the memory kernels for an H100 (sm_90) on a machine without a GPU; print, as JSON, each kernel's shared
memory in bytes, registers and stack (spilled registers) per thread (cuobjdump's resource usage), its tensor-core
instructions (mma and wgmma in the PTX) and its compile seconds (to PTX, then the triton wheel's ptxas), with the
warps the kernels launch with (fused_chunk._warps; NUM_WARPS=8 in the environment overrides).

    .venv/bin/python bench/kernels_compile.py '{"BT": 64, "BD": 128, "BFB": 32}' 2     # block sizes, memory depth
    .venv/bin/python bench/kernels_compile.py '{"BT": 16, "BD": 64, "BFB": 64}' 2 step,read bf16   # kernels, DOT

BT: the chunk (rows), BD: the head dim, BFB: the hidden-width block (fused_chunk._hidden_tile), each a power of
two of at least 16. Run without TRITON_INTERPRET: under it, triton.jit makes interpreted functions, which do
not compile.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.memory import chunk, fused_chunk  # noqa: E402

POINTERS = {"W1", "W2", "S1", "S2", "Q", "K", "V", "LOG_ETA", "LOG_KEEP", "THETA", "READ", "SURPRISE"}
INDICES = {"IDX", "CU"}
FLAGS = {"ONLY"}
FLOATS = {"eps", "clip"}


def compile_for_h100(kernel, num_warps: int | None = None, num_stages: int = 3, **constexprs):
    num_warps = num_warps or int(os.environ.get("NUM_WARPS", 0)) or \
        fused_chunk._warps(constexprs["BT"], constexprs["BD"])
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "*fp32" if name in POINTERS else "*i64" if name in INDICES else \
                "*i1" if name in FLAGS else "fp32" if name in FLOATS else "i32"
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def main() -> None:
    blocks, depth = json.loads(sys.argv[1]), int(sys.argv[2])
    which = sys.argv[3].split(",") if len(sys.argv) > 3 else ["step", "step_only", "read", "prefill"]
    blocks = {**blocks, "DOT": sys.argv[4] if len(sys.argv) > 4 else "ieee"}
    launches = {  # as kernels/memory launches them
        "step": lambda: compile_for_h100(fused_chunk._chunk_step_kernel, DEPTH=depth, HAS_CLIP=True, DO_READ=True,
                                         HAS_ONLY=False, **blocks),
        "step_only": lambda: compile_for_h100(fused_chunk._chunk_step_kernel, DEPTH=depth, HAS_CLIP=True,
                                              DO_READ=False, HAS_ONLY=True, **blocks),  # a decode batch's update
        "read": lambda: compile_for_h100(fused_chunk._read_kernel, DEPTH=depth, **blocks),
        "prefill": lambda: compile_for_h100(chunk._prefill_kernel, num_stages=1, DEPTH=depth, HAS_CLIP=True, **blocks),
    }
    report = {}
    for name in which:
        start = time.perf_counter()
        compiled = launches[name]()
        assert compiled.asm.get("cubin"), f"{name}: no cubin"
        report[name] = {"shared_bytes": compiled.metadata.shared, **resources(compiled.asm["cubin"]),
                        "tensor_core_instructions": len(re.findall(r"^\s*w?mma\.", compiled.asm["ptx"], re.M)),
                        "compile_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(report))


def resources(cubin: bytes) -> dict:
    """Registers and stack bytes per thread, from the triton wheel's cuobjdump (empty if it is missing)."""
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", usage)
    return {"registers": int(found[1]), "stack_bytes": int(found[2])} if found else {}


if __name__ == "__main__":
    main()
