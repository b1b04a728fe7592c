"""Training on several processes: 2 gloo processes under torchrun give the single process's step (DDP and FSDP, with
gradient accumulation), and a run killed mid-way resumes, on another number of processes, to the same losses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.corpus import prepare

ROOT = Path(__file__).resolve().parents[2]
STEP_SCRIPT = Path(__file__).with_name("distributed_step.py")
STDLIB_JSON = Path(json.__file__).parent  # a real corpus every Python has (the PSF-licensed json package)


def torchrun(processes: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    prepare([STDLIB_JSON], out, heldout=0.2, seed=1, log=None)
    return out


def run_group(command: list[str], timeout: float = 240) -> tuple[int, str]:
    """Run a command in a process group of its own (torchrun and its ranks), killing the whole group if it
    overruns; (exit code, output)."""
    process = subprocess.Popen(command, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return -signal.SIGKILL, f"timed out after {timeout} s\n{output}"
    return process.returncode, output


def write_config(path: Path, **options) -> Path:
    base = dict(model={"preset": "tiny-mal"}, batch_size=4, seq_len=32, steps=1, seed=3, lr=1e-3, warmup=1,
                log_every=1, eval_every=0, checkpoint_every=0, threads=1)
    path.write_text(json.dumps({**base, **options}))
    return path


def gradients(tmp_path: Path, name: str, processes: int, **options) -> tuple[dict, float]:
    config = write_config(tmp_path / f"{name}.json", out_dir=str(tmp_path / name), **options)
    out = tmp_path / f"{name}.safetensors"
    command = ([sys.executable, str(STEP_SCRIPT)] if processes == 1 else torchrun(processes, str(STEP_SCRIPT)))
    failures = []
    for _ in range(2):  # a second try only when a rank dies (gloo's transport has aborted a rank under load)
        code, output = run_group([*command, str(config), str(out)])
        if code == 0:
            break
        failures.append(f"{name} exited {code}:\n{output[-6000:]}")
        assert code < 0 or "Signal" in output or "SIGABRT" in output, failures[-1]  # an error of ours: no retry
    else:
        raise AssertionError("\n\n".join(failures))
    with safe_open(str(out), "pt") as f:
        loss = float(f.metadata()["loss"])
    return load_file(str(out)), loss


def assert_same_gradients(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("data", ["corpus", "synthetic"])
def test_two_processes_take_the_single_process_step(tmp_path, corpus, data):
    options = {"data": str(corpus)} if data == "corpus" else {"recall_fraction": 0.5, "n_facts": 2,
                                                              "curriculum": [[0, 0, 16]]}
    alone, loss = gradients(tmp_path, "alone", 1, **options)
    accumulated, accumulated_loss = gradients(tmp_path, "accumulated", 1, grad_accum=2, **options)
    ddp, ddp_loss = gradients(tmp_path, "ddp", 2, **options)
    fsdp, fsdp_loss = gradients(tmp_path, "fsdp", 2, parallel="fsdp", grad_accum=2, **options)
    scale = max(float(g.abs().max()) for g in alone.values())
    assert scale > 0
    for other, other_loss in ((accumulated, accumulated_loss), (ddp, ddp_loss), (fsdp, fsdp_loss)):
        assert other_loss == pytest.approx(loss, rel=1e-5)
        assert_same_gradients(other, alone)


def losses(metrics: Path) -> dict[int, float]:
    """Each step's loss as last logged (a resumed run logs the steps after its checkpoint again)."""
    return {r["step"]: r["loss"] for r in map(json.loads, metrics.read_text().splitlines())}


def train_killed(tmp_path: Path, name: str, processes: int, **options) -> Path:
    """Start a training run, SIGKILL it (all its processes) once its first checkpoint is written; its out_dir."""
    config = write_config(tmp_path / f"{name}.json", out_dir=str(tmp_path / name), **options)
    command = [*(torchrun(2) if processes == 2 else [sys.executable]), "-m", "titans", "train", "--config", str(config)]
    run = subprocess.Popen(command, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, start_new_session=True)
    checkpoint = tmp_path / name / "trainer.safetensors"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert max(losses(tmp_path / name / "metrics.jsonl")) < options["steps"] - 1, "the run ended before its kill"
    return config


def train(config: Path) -> None:
    subprocess.run([sys.executable, "-m", "titans", "train", "--config", str(config)], check=True, env=env(),
                   cwd=ROOT, timeout=600, stdout=subprocess.DEVNULL)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_losses_on_any_number_of_processes(tmp_path, corpus):
    steps = 40
    options = dict(data=str(corpus), steps=steps, checkpoint_every=4, eval_every=20, eval_windows=2)
    train(write_config(tmp_path / "whole.json", out_dir=str(tmp_path / "whole"), **options))
    whole = losses(tmp_path / "whole" / "metrics.jsonl")
    assert sorted(whole) == list(range(steps))
    # killed and resumed on one process: the uninterrupted run to the bit
    train(train_killed(tmp_path, "alone", 1, **options))
    assert losses(tmp_path / "alone" / "metrics.jsonl") == whole
    # killed on two processes, resumed on one: the same run but for the rounding of the ranks' gradient sums
    train(train_killed(tmp_path, "two", 2, **options))
    resumed = losses(tmp_path / "two" / "metrics.jsonl")
    assert sorted(resumed) == list(range(steps))
    for step in range(steps):
        assert resumed[step] == pytest.approx(whole[step], rel=2e-3), step
    held_out = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
                if "heldout" in line]
    assert held_out and all(0 < r["heldout"]["bits_per_byte"] < 8 for r in held_out)
