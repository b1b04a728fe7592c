"""Where the engine and HTTP processes run: plan_cpus, and the settings that reach it."""

from __future__ import annotations

import pydantic
import pytest

from server.engine_process import parse_cpu_list, plan_cpus
from server.settings import Settings


def test_auto_gives_the_engine_the_last_cpus_and_http_the_rest():
    plan = plan_cpus("auto", 0, {0, 1})
    assert (plan.engine, plan.api, plan.threads) == ({1}, {0}, 1)
    plan = plan_cpus("auto", 3, {0, 2, 4, 6, 8})  # a cpuset with gaps
    assert (plan.engine, plan.api, plan.threads) == ({4, 6, 8}, {0, 2}, 3)
    assert plan.describe() == "engine on CPUs 4,6,8 (3 torch threads), HTTP on 0,2"


def test_auto_does_not_pin_when_the_engine_would_take_every_cpu():
    assert plan_cpus("auto", 0, {0}) == plan_cpus("none", 0, {0})
    plan = plan_cpus("auto", 4, {0, 1, 2, 3})
    assert (plan.engine, plan.api, plan.threads) == (None, None, 4)
    assert plan.describe() == "engine: 4 torch threads, not pinned"


def test_none_pins_nothing_and_keeps_the_default_threads():
    plan = plan_cpus("none", 0, {0, 1, 2, 3})
    assert (plan.engine, plan.api, plan.threads) == (None, None, 3)


def test_a_list_goes_to_the_engine_with_one_thread_per_cpu():
    plan = plan_cpus("1-2,5", 0, set(range(8)))
    assert (plan.engine, plan.api, plan.threads) == ({1, 2, 5}, {0, 3, 4, 6, 7}, 3)
    plan = plan_cpus("0-3", 2, {0, 1, 2, 3})  # every CPU listed: HTTP shares them, unpinned
    assert (plan.engine, plan.api, plan.threads) == ({0, 1, 2, 3}, None, 2)
    with pytest.raises(ValueError, match="engine CPUs 9 are not among"):
        plan_cpus("1,9", 0, {0, 1, 2})


@pytest.mark.parametrize("bad", ["", "a", "3-1", "1,,2", "1-", "-2"])
def test_malformed_cpu_lists_are_refused(bad):
    with pytest.raises(ValueError, match="not a CPU list"):
        parse_cpu_list(bad)


def test_settings_check_the_cpu_list_syntax():
    assert Settings(engine_cpus="2-7,9").engine_cpus == "2-7,9"
    with pytest.raises(pydantic.ValidationError):
        Settings(engine_cpus="two")
