"""What limits the memory's horizon: the gates each memory head applies to facts and to filler.

    .venv/bin/python bench/memory_gates.py                                  # the default model; ~1 min on one thread
    .venv/bin/python bench/memory_gates.py --model DIR --examples 8 --distance 4096

For each filler kind, held-out examples of 8 facts followed by `distance` bytes of filler are read in one go, and
every memory layer's gates are recorded per token and head (DESIGN.md §2.3): the write strength theta (the inner
learning rate, theta_max * sigmoid) and the forgetting alpha. Reported per layer and head:

    theta facts / filler    mean theta on the facts' bytes and on the filler's: a memory that keeps facts writes
                            them far harder than the text around them (filler written as hard interferes)
    keep 64K                what is left of a write after 65,536 bytes of that filler, exp(sum log(1 - alpha)) at
                            its mean log(1 - alpha): 1 keeps everything, 0 has forgotten
    write mass 64K          theta summed over 65,536 bytes of filler over theta summed over the 8 facts: how much
                            filler the memory has written for every unit of facts by then
    eta facts / filler      the mean momentum gate: a write goes on landing through the momentum for ~1 / (1 - eta)
                            steps
    echoed mass 64K         the write mass with each side's theta over 1 - its mean eta (what training's
                            price_momentum prices)
    byte spread             the largest standard deviation of theta among the filler's occurrences of one byte
                            value: 0 when theta is a function of the byte alone, whatever stands around it
    digit share             the share of the filler's echoed write, theta / (1 - eta) summed, that falls on digits

JSON to bench/results/memory_gates.json (--out).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import Engine  # noqa: E402
from engine.data import FACT_BYTES, FILLER_KINDS, recall_example  # noqa: E402
from engine.model import NeuralMemory  # noqa: E402
from engine.train import fresh_state  # noqa: E402

HORIZON = 65536


def recorded_gates(engine: Engine, texts: list[str]) -> list[torch.Tensor]:
    """Per memory layer, log-gates [B, H, T, 3] (log theta gate, log eta, log(1 - alpha)) of the texts (equal
    lengths), read in one forward."""
    seen: list[list[torch.Tensor]] = []
    plain = NeuralMemory.gates

    def recording(memory, logits):
        out = plain(memory, logits)
        index = engine.model.memories().index(memory)
        while len(seen) <= index:
            seen.append([])
        seen[index].append(out)
        return out

    ids = torch.tensor([engine.tokenizer.encode(t) for t in texts])
    NeuralMemory.gates = recording
    try:
        with torch.inference_mode():
            engine.model.forward_tokens(ids, fresh_state(engine.model, len(texts)), [0] * len(texts))
    finally:
        NeuralMemory.gates = plain
    return [torch.cat(steps, 2) for steps in seen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "titans-mal-recall"))
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--facts", type=int, default=8)
    parser.add_argument("--distance", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_gates.json"))
    args = parser.parse_args()
    engine = Engine.load(args.model, device="cpu")
    theta_max = engine.config.theta_max
    facts_end = args.facts * FACT_BYTES
    result = {"model": args.model, "fingerprint": engine.fingerprint, "distance": args.distance, "kinds": {}}
    print(f"{args.model}: {args.facts} facts, then {args.distance} bytes of held-out filler, {args.examples} examples")
    print(f"{'filler':>6} {'layer':>5} {'head':>4} {'theta facts':>11} {'filler':>8} {'keep 64K':>9} "
          f"{'write mass 64K':>15} {'eta facts':>9} {'filler':>7} {'echoed mass 64K':>16} {'byte spread':>11} "
          f"{'digit share':>11}")
    for kind in FILLER_KINDS:
        rng = random.Random(args.seed)
        texts = []
        for _ in range(args.examples):
            ex = recall_example(rng, args.facts, args.distance, kind, "heldout")
            texts.append(ex.text[:facts_end + args.distance - 1])  # facts and filler, the same length for all
        rows = []
        filler_ids = torch.tensor([engine.tokenizer.encode(t) for t in texts])[:, facts_end:]  # [B, T - facts]
        values = filler_ids.unique()
        digits = (filler_ids >= ord("0")) & (filler_ids <= ord("9"))
        for layer, gates in enumerate(recorded_gates(engine, texts)):
            theta = theta_max * gates[..., 0].exp()  # [B, H, T]
            eta, log_keep = gates[..., 1].exp(), gates[..., 2]
            for head in range(theta.shape[1]):
                on_facts = theta[:, head, :facts_end].mean().item()
                on_filler = theta[:, head, facts_end:].mean().item()
                eta_facts = eta[:, head, :facts_end].mean().item()
                eta_filler = eta[:, head, facts_end:].mean().item()
                keep = torch.exp(HORIZON * log_keep[:, head, facts_end:].mean()).item()
                mass = on_filler * HORIZON / (on_facts * facts_end)
                echoed = mass * (1 - eta_facts) / (1 - eta_filler)
                filler_theta = theta[:, head, facts_end:]
                spread = max((filler_theta[filler_ids == v].std(correction=0).item() for v in values), default=0.0)
                echoes = filler_theta / (1 - eta[:, head, facts_end:])
                digit_share = (echoes[digits].sum() / echoes.sum()).item()
                rows.append({"layer": layer, "head": head, "theta_facts": on_facts, "theta_filler": on_filler,
                             "keep_64k": keep, "write_mass_64k": mass, "eta_facts": eta_facts,
                             "eta_filler": eta_filler, "echoed_mass_64k": echoed, "theta_byte_spread": spread,
                             "digit_share": digit_share})
                print(f"{kind:>6} {layer:>5} {head:>4} {on_facts:>11.4f} {on_filler:>8.4f} {keep:>9.3g} {mass:>15.3g}"
                      f" {eta_facts:>9.3f} {eta_filler:>7.3f} {echoed:>16.3g} {spread:>11.2g} {digit_share:>11.2f}")
        result["kinds"][kind] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
