"""Property-based fuzzing of every route from the server's own OpenAPI schema (bench/fuzz.py, schemathesis),
against a real server process: no input gets a 5xx, and every error has the OpenAI shape. A bounded run
(TITANS_FUZZ_EXAMPLES per route and mode); `bench/fuzz.py --examples 500` runs long."""

from __future__ import annotations

import os

import pytest

from bench.fuzz import fuzz
from tests.server_process import ServerProcess

EXAMPLES = int(os.environ.get("TITANS_FUZZ_EXAMPLES", "15"))


@pytest.mark.slow
def test_no_input_gets_a_5xx_and_every_error_is_openai_shaped(model_dir, tmp_path):
    with ServerProcess(model_dir, f"sqlite:///{tmp_path}/sessions.db", "--max-output-tokens", "64") as srv:
        report = fuzz(srv.url, EXAMPLES)
    assert report["calls"] > 100 and report["failures"] == [], report["failures"][:10]
