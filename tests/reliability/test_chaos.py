"""A few trials of bench/chaos.py in CI: the API process, the engine process and Redis killed (and Redis filled to
its maxmemory) under load, each session checked afterwards (its last acknowledged version or the next, its
snapshot whole). The long run is `bench/chaos.py --trials 50 --store both` (bench/RESULTS.md)."""

from __future__ import annotations

import pytest

from bench.chaos import Report, trials
from tests.redis_server import RedisServer


@pytest.mark.slow
def test_kills_under_load_lose_no_acknowledged_commit_on_sqlite(model_dir, tmp_path):
    report = Report()
    trials(model_dir, f"sqlite:///{tmp_path}/sessions.db", 4, report, seed=1, victims=["api", "engine"])
    assert report.kills == {"api": 2, "engine": 2, "redis": 0, "redis_full": 0} and report.trials == 4
    assert report.acknowledged > 0 and report.violations == []


@pytest.mark.slow
def test_kills_under_load_lose_no_acknowledged_commit_on_redis(model_dir, tmp_path):
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        report = Report()
        trials(model_dir, redis.url, 4, report, seed=2, redis=redis, victims=["api", "engine", "redis", "redis_full"])
    finally:
        redis.stop()
    assert report.kills == {"api": 1, "engine": 1, "redis": 1, "redis_full": 1} and report.trials == 4
    assert report.acknowledged > 0 and report.violations == []
