"""Training throughput on this machine's CPUs: one process against two gloo processes (torchrun, DDP) on the same
global batch, side by side in one run. Each configuration trains the same steps of configs/paper/tiny.json on a
prepared corpus (the standard library's json package as bytes unless --data names one); tokens/s is the
trainer's own (all ranks' tokens over the wall time, compile warm-up excluded by skipping the first logged steps).

usage: python bench/train_distributed.py [--steps 40] [--data CORPUS] [--out bench/results/train_distributed.json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.corpus import prepare  # noqa: E402

SETUPS = [  # (name, processes, threads per process)
    ("1 process, 1 thread", 1, 1),
    ("1 process, 2 threads", 1, 2),
    ("2 processes (DDP, gloo), 1 thread each", 2, 1),
]


def run(name: str, processes: int, threads: int, data: str, steps: int, work: Path) -> dict:
    out = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    config = json.loads((ROOT / "configs/paper/tiny.json").read_text())
    config.update(extends=str(ROOT / "configs/paper/base.json"), data=data, steps=steps, out_dir=str(out),
                  threads=threads, log_every=5, eval_every=0, checkpoint_every=0, compile=False)
    path = work / f"{out.name}.json"
    path.write_text(json.dumps(config))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    subprocess.run([*launcher, "-m", "titans", "train", "--config", str(path), "--restart"], check=True, env=env,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[1], rows[-1]  # from the second logged step: the first holds start-up
    rate = (last["tokens_per_s"] * last["elapsed_s"] - first["tokens_per_s"] * first["elapsed_s"]) / (
        last["elapsed_s"] - first["elapsed_s"])
    return {"setup": name, "processes": processes, "threads": threads, "tokens_per_s": rate,
            "final_loss": last["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default="bench/results/train_distributed.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = str(work / "corpus")
            prepare([Path(json.__file__).parent], data, heldout=0.0, log=None)
        results = [run(name, p, t, data, args.steps, work) for name, p, t in SETUPS]
    base = results[0]["tokens_per_s"]
    for r in results:
        r["vs_one_thread"] = r["tokens_per_s"] / base
        print(f"{r['setup']:<42} {r['tokens_per_s']:>9,.0f} tokens/s  {r['vs_one_thread']:.2f}x  "
              f"loss after {args.steps} steps {r['final_loss']:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
