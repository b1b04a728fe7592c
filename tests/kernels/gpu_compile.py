"""Compile the memory kernels for an H100 (sm_90) on a machine without a GPU and print, as JSON, each kernel's
shared memory in bytes. Run without TRITON_INTERPRET (under it, triton.jit makes interpreted functions, which
do not compile): `python -m tests.kernels.gpu_compile '{"BT": 16, "BD": 32, "BF": 64}' 2`."""

from __future__ import annotations

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.memory import chunk, fused_chunk

POINTERS = {"W1", "W2", "S1", "S2", "Q", "K", "V", "LOG_ETA", "LOG_KEEP", "THETA", "READ", "SURPRISE"}
INDICES = {"IDX", "CU"}
FLAGS = {"ONLY"}
FLOATS = {"eps", "clip"}


def compile_for_h100(kernel, num_warps: int = 4, num_stages: int = 3, **constexprs):
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
    launches = {  # as kernels/memory launches them
        "step": lambda: compile_for_h100(fused_chunk._chunk_step_kernel, DEPTH=depth, HAS_CLIP=True, DO_READ=True,
                                         HAS_ONLY=False, **blocks),
        "step_only": lambda: compile_for_h100(fused_chunk._chunk_step_kernel, DEPTH=depth, HAS_CLIP=True,
                                              DO_READ=False, HAS_ONLY=True, **blocks),  # a decode batch's update
        "read": lambda: compile_for_h100(fused_chunk._read_kernel, num_warps=8, DEPTH=depth, **blocks),
        "prefill": lambda: compile_for_h100(chunk._prefill_kernel, num_stages=1, DEPTH=depth, HAS_CLIP=True, **blocks),
    }
    shared = {}
    for name in which:
        compiled = launches[name]()
        assert compiled.asm.get("cubin"), f"{name}: no cubin"
        shared[name] = compiled.metadata.shared
    print(json.dumps(shared))


if __name__ == "__main__":
    main()
