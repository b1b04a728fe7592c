#!/usr/bin/env bash
# Issues 26 and 28's GPU measurements in one call (about 9 minutes on one H100), each section's JSON written into $OUT as it
# finishes, so a call cut short keeps what it measured; a section that fails or runs out of its time is logged and
# the next one runs. Prepare here, then run on the lent machine:
#   bash bench/gpu_wheels.sh                                  # the wheels that machine lacks, into .gpu-wheels/
#   run(carry=[".gpu-wheels"], command="bash bench/gpu_suite.sh", timeout_s=560)
#   bash bench/gpu_suite.sh --dry-run                         # the rehearsal: every section, tiny, on this CPU
# Sections: the GPU tests (tensor-core tolerances, CUDA-graph decode = plain decode); kernels (correctness at each
# precision, then prefill against titans-pytorch and fla's chunked gated delta rule, decode against fla's recurrent
# step, copy bandwidth); engine decode at N = 1 ... 1,024 with and without CUDA graphs; HTTP serving at N = 1 ... 256;
# 1,024 sessions told text in rounds through one server, none lost; training the paper's 170M MAC (bf16, tokens/s and
# MFU) against titans-pytorch's MAC of the same shape.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY="${PYTHON:-python}"
[[ -x .venv/bin/python && $DRY == 1 ]] && PY=.venv/bin/python
if [[ -d .gpu-wheels && $DRY == 0 ]]; then
    "$PY" -m pip install -q --no-index --no-deps .gpu-wheels/*.whl >"$OUT/pip.log" 2>&1 || echo "pip: see $OUT/pip.log"
fi
log="$OUT/suite.log"
: >"$log"

section() {  # name, seconds, command...
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    echo "== $name" | tee -a "$log"
    timeout "$seconds" "$@" >"$OUT/$name.out" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    tail -n 3 "$OUT/$name.out" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; \
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } \
    >"$OUT/device.txt" 2>&1
if [[ $DRY == 1 ]]; then
    section tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_precision.py \
        tests/engine/test_decode_graphs.py -k "not static_buffer"
    section kernels 300 "$PY" bench/kernels_gpu.py --dry-run --out "$OUT/kernels_gpu.json"
    section decode 300 "$PY" bench/decode_gpu.py --dry-run --out "$OUT/decode_gpu.json"
    section serve 300 "$PY" bench/serve.py --sessions 1 2 --tokens 4 --rounds 1 --pairs 1 --out "$OUT/serve.json"
    section sessions 300 "$PY" bench/many_sessions.py --sessions 32 --concurrency 8 --text-bytes 32 \
        --max-running 4 --max-waiting 4 --out "$OUT/many_sessions.json"
    section train 300 "$PY" bench/train_gpu.py --dry-run --out "$OUT/train_gpu.json"
else
    section tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_precision.py \
        tests/engine/test_decode_graphs.py -k "not static_buffer"
    section kernels 150 "$PY" bench/kernels_gpu.py --out "$OUT/kernels_gpu.json"
    section decode 70 "$PY" bench/decode_gpu.py --out "$OUT/decode_gpu.json"
    section serve 90 "$PY" bench/serve.py --sessions 1 16 64 256 --tokens 32 --rounds 1 --pairs 2 \
        --out "$OUT/serve.json"
    section sessions 70 "$PY" bench/many_sessions.py --sessions 1024 --concurrency 256 --text-bytes 256 \
        --max-running 256 --max-waiting 256 --out "$OUT/many_sessions.json"
    section train 80 "$PY" bench/train_gpu.py --out "$OUT/train_gpu.json"
fi
echo "done: $OUT" | tee -a "$log"
