"""The engine benchmark still runs end to end (tiny sizes, no baseline) and reports sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_engine_cpu_benchmark_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench/engine_cpu.py", "--quick", "--no-baseline", "--repeats", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)  # against a hang, not a speed bar: compiling on a loaded machine is slow
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    for key in ("ours_fp32_prefill_b1_tok_s", "ours_fp32_decode_tok_s", "ours_fp16_decode_tok_s",
                "ours_fp32_decode_4sessions_tok_s", "ours_memory_layer_b1_t64_tok_s",
                "ours_memory_layer_compiled_b1_t64_tok_s", "ours_fp32_compiled_prefill_b1_tok_s"):
        assert results[key] > 0, key
    assert "ours_fp32_decode_tok_s" in proc.stdout  # the table is printed
