"""Fuzz every route of a real server from its own OpenAPI schema (schemathesis: valid and invalid inputs drawn
from each operation's schema): no input may get a 5xx, and every error must have the OpenAI shape.

    .venv/bin/python bench/fuzz.py --examples 500      # the long run (bench/RESULTS.md)

tests/reliability/test_fuzz.py runs a bounded version in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import hypothesis
import hypothesis.errors
import schemathesis
from schemathesis import GenerationMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server_process import ServerProcess  # noqa: E402


def fuzz(url: str, examples: int) -> dict:
    """Every operation of url's schema, `examples` valid and `examples` invalid cases each: the calls made and the
    failures found (a 5xx, or an error not in the OpenAI shape)."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    report = {"calls": 0, "failures": []}
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # nothing invalid to send (no inputs)
                fuzz_operation(url, result.ok(), mode, examples, report)
    return report


def fuzz_operation(url: str, operation, mode: GenerationMode, examples: int, report: dict) -> None:
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck),
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
    def one(case):
        response = case.call(base_url=url, timeout=60)
        report["calls"] += 1
        problem = shape_problem(response)
        if problem:
            report["failures"].append(f"{operation.label} ({mode.value}): {problem}")

    one()


def shape_problem(response) -> str | None:
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        try:
            err = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"{response.status_code} without an OpenAI error body: {response.text[:300]}"
        if set(err) != {"message", "type", "param", "code"} or not err["message"]:
            return f"{response.status_code} error body {err}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=500, help="per route and mode (valid, invalid)")
    parser.add_argument("--out", default="bench/results/fuzz.json")
    args = parser.parse_args()
    from engine import Engine
    from tests.engine.helpers import tiny

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny-mal"
        Engine.from_config(tiny("mal"), seed=3).save(model_dir)
        with ServerProcess(model_dir, f"sqlite:///{tmp}/sessions.db", "--max-output-tokens", "64") as srv:
            report = fuzz(srv.url, args.examples)
    report["examples_per_route_and_mode"] = args.examples
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({**report, "failures": report["failures"][:20]}, indent=2))
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()
