"""The serving, store and kernel benchmarks still run end to end (tiny sizes) and report sane numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_benchmark_quick(tmp_path, model_dir):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, "bench/serve.py", "--model", str(model_dir), "--sessions", "1", "2",
                           "--tokens", "8", "--pairs", "2", "--threads", "1", "--starts", "2", "--rounds", "2",
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert [r["sessions"] for r in results["server"]] == [1, 2]
    repeats = {1: 2, 2: 1}  # N=1 streams twice per round, each after an engine-alone generation
    assert all(r["generated_tokens"] == 8 * r["sessions"] * repeats[r["sessions"]] and r["aggregate_tok_s"] > 0
               for r in results["server"])
    assert all(r["engine_alone"]["generated_tokens"] == 16 for r in results["rounds"])
    assert [r["start"] for r in results["rounds"]] == [0, 0, 1, 1]  # two server starts, two rounds each
    assert len(results["server_n1_over_engine_by_start"]) == 2
    assert results["server_n1_over_engine"] > 0 and "aggregate tok/s" in proc.stdout
    lo, hi = results["server_n1_over_engine_ci95"]  # a bootstrap interval over the rounds, around their median
    assert lo <= results["server_n1_over_engine"] <= hi and "95% interval" in proc.stdout
    # the N=1 split, from the server's titans_request_inference_time_seconds
    assert results["n1_engine_process_over_engine_alone"] > 0 and results["n1_request_over_engine_process"] > 0
    assert all(r["engine_s_per_request"] > 0 for r in results["server"])


@pytest.mark.slow
def test_store_benchmark_quick(tmp_path):
    out = tmp_path / "store.json"
    proc = subprocess.run([sys.executable, "bench/store.py", "--sizes", "1", "--iters", "3", "--seconds", "0.5",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    for store in ("redis", "sqlite"):
        assert results["stores"][store]["by_size_mb"]["1"]["commit_plus_load"]["p50_ms"] > 0
        assert results["stores"][store]["concurrent"]["commits_per_s"] > 0
    assert results["stores"]["redis"]["by_size_mb"]["1"]["raw_set_plus_get"]["p50_ms"] > 0


@pytest.mark.slow
def test_kernel_gpu_benchmark_dry_run(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "bench/kernels_gpu.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["dry_run"] and set(results["check"]) == {"tf32", "ieee"}  # the interpreter runs no bf16
    assert all(err < 1e-3 for errors in results["check"].values() for err in errors.values())
    assert all(set(r["triton_varlen_tok_s_by_precision"]) == {"tf32", "ieee"} for r in results["prefill"])
    assert {(r["chunk"], r["depth"]) for r in results["prefill"]} == {(16, 1), (16, 2)}
    assert all(r["triton_tok_s"] > 0 and r["torch_eager_tok_s"] > 0 for r in results["prefill"])
    assert [r["sessions"] for r in results["decode"]] == [1, 2]
    assert all(r["triton_read_us"] > 0 and r["triton_update_us"] > 0 for r in results["decode"])
    # the baseline ran, or the JSON says why not (a GPU machine may lack its dependencies)
    assert all((r["titans_pytorch_tok_s"] or 0) > 0 or r["titans_pytorch_error"] for r in results["prefill"])
    rows = out.with_suffix(".md").read_text()  # the RESULTS.md rows, with the device's name
    assert "cpu (dry run)" in rows and rows.count("| 1×32, 2×16, 16, ") == 2


@pytest.mark.slow
def test_aoti_decode_probe_quick():
    """Both engines decode, and the one with the ahead-of-time compiled step chooses the same tokens."""
    proc = subprocess.run([sys.executable, "bench/decode_aoti_probe.py", "--preset", "tiny-mac", "--fp32",
                           "--tokens", "12", "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    rates = re.findall(r"decode +(\S+) tok/s", proc.stdout)
    assert len(rates) == 2 and all(float(r) > 0 for r in rates), proc.stdout
    assert "the same tokens for the first 12 of 12" in proc.stdout


@pytest.mark.slow
def test_engine_probes_run():
    proc = subprocess.run([sys.executable, "bench/engine_probes.py", "--repeats", "1", "--threads", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    values = dict(line.rsplit(None, 1) for line in proc.stdout.splitlines())
    assert len(values) == 40 and all(float(v) > 0 for v in values.values())
    assert {"32_staggered_masked_update_ms_per_step", "32_sessions_chunk_update_previous_ms",
            "8_sessions_93_tokens_window_steps_ms", "32_sessions_93_tokens_update_copied_ms",
            "1_sessions_decode_step_direct_write_ms", "32_sessions_decode_step_in_place_updates_ms",
            "32_sessions_93_tokens_tap_by_tap_conv_ms", "32_sessions_decode_step_ids_as_one_tensor_ms",
            "snapshot_write_now_ms"} <= set(values)
    only = subprocess.run([sys.executable, "bench/engine_probes.py", "--repeats", "1", "--threads", "1", "--only", "6"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert only.returncode == 0, only.stderr
    assert {line.split()[0] for line in only.stdout.splitlines()} == {
        f"{n}_sessions_decode_step_{way}_write_ms" for n in (1, 32) for way in ("masked", "direct")}


@pytest.mark.slow
def test_train_step_benchmark_quick(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model": {"preset": "tiny-mal"}, "batch_size": 4, "seq_len": 48,
                                  "recall_fraction": 0.5, "n_facts": 2, "curriculum": [[0, 16, 64]]}))
    out = tmp_path / "train_step.json"
    proc = subprocess.run([sys.executable, "bench/train_step.py", "--config", str(config), "--batches", "1",
                           "--rounds", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    modes = ["ragged", "full-attn", "padded", "compiled"]
    assert list(results["seconds_per_step"]) == modes and all(results["seconds_per_step"][m] > 0 for m in modes)
    losses = [results["loss"][m] for m in modes]  # the same batches, the same loss whichever way they run
    assert max(losses) - min(losses) < 1e-4 * losses[0], losses
    assert results["speedup_over_ragged"]["ragged"] == 1.0 and "x ragged" in proc.stdout


def test_recall_context_probe_quick(tmp_path, model_dir):
    out = tmp_path / "recall_context.json"
    proc = subprocess.run([sys.executable, "bench/recall_context.py", "--model", str(model_dir), "--facts", "3",
                           "--distance", "20", "--examples", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = {r["before the last query"]: r for r in result["rows"]}
    assert list(rows) == ["alone", "right", "right, gap", "wrong", "wrong, gap", "right, last wrong",
                          "wrong, last right", "each alone"]
    assert all(0 <= r["exact"] <= 1 for r in rows.values()) and rows["each alone"]["queries"] == 3 * 2
    assert result["gap_bytes"] == 16 + 4 and "| wrong, gap |" in proc.stdout  # window 16 + 4 conv taps
    # one memory layer per block of the tiny MAL, four answer digits each
    assert [(r["layer"], r["digit"]) for r in result["keys"]] == [(i, d) for i in (0, 1) for d in (1, 2, 3, 4)]
    assert all(-1 <= r[c] <= 1 for r in result["keys"] for c in ("key_key_other_facts", "query_own_key",
                                                                     "query_other_keys"))


def test_batch_churn_benchmark_quick(tmp_path):
    out = tmp_path / "churn.json"
    proc = subprocess.run([sys.executable, "bench/batch_churn.py", "--quick", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["sessions"]
    assert sorted(results) == ["2", "4"]
    for cell in results.values():
        for layout in ("slot_pool", "restacking"):
            assert cell[layout]["tokens_s"] > 0 and cell[layout]["bookkeeping_ms_per_step"] > 0
        assert cell["tokens_s_ratio"] > 0


@pytest.mark.slow
def test_the_gpu_suite_rehearses_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run"], cwd=ROOT, env={**os.environ, "OUT": str(out)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    log = (out / "suite.log").read_text()
    assert [line.split(":")[1].strip().split()[1] for line in log.splitlines() if ": exit " in line] == ["0"] * 6, log
    assert json.loads((out / "kernels_gpu.json").read_text())["dry_run"]
    assert [r["sessions"] for r in json.loads((out / "decode_gpu.json").read_text())["rows"]] == [1, 2]
    assert (out / "serve.json").exists()
    assert json.loads((out / "many_sessions.json").read_text())["sessions_lost_or_torn"] == 0
    assert json.loads((out / "train_gpu.json").read_text())["ours"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_memory_interference_quick(tmp_path):
    # at distance 0 the facts' state is the carried one: every swap of it answers as carried, and what the filler
    # left of the facts' write at their keys is all of it (cos 1, norm 1, no offset)
    out = tmp_path / "mi.json"
    proc = subprocess.run([sys.executable, "bench/memory_interference.py", "--distances", "0,512", "--examples", "1",
                           "--filler", "words", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    at_zero, at_512 = json.loads(out.read_text())["rows"]
    exact = at_zero["exact"]
    assert exact["mem0 = F"] == exact["mem1 = F"] == exact["mem0 = X+F-0"] == exact["carried"]
    heads = at_zero["heads"]
    assert all(abs(c - 1) < 1e-4 for c in heads["cos"]) and all(abs(n - 1) < 1e-4 for n in heads["norm"])
    assert max(heads["offset"]) < 1e-4 and min(heads["signal"]) > 0
    assert at_512["distance"] == 512 and max(at_512["heads"]["offset"]) > 1e-3  # 512 bytes of words moved it
    assert all(0 <= v <= 1 for v in [*exact.values(), *at_512["exact"].values()])


@pytest.mark.slow
def test_memory_gates_quick(tmp_path):
    # the default model's first block reads the byte's embedding, and its gates come from that input unconvolved:
    # theta is one value per byte, whatever stands around it; the second block's input carries context
    out = tmp_path / "mg.json"
    proc = subprocess.run([sys.executable, "bench/memory_gates.py", "--examples", "1", "--distance", "256",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    for kind, rows in json.loads(out.read_text())["kinds"].items():
        first = [r for r in rows if r["layer"] == 0]
        second = [r for r in rows if r["layer"] == 1]
        assert first and second, kind
        assert max(r["theta_byte_spread"] for r in first) < 1e-6, kind
        assert max(r["theta_byte_spread"] for r in second) > 1e-4, kind
        assert all(0 <= r["digit_share"] <= 1 for r in rows), kind
