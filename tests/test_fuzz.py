"""Smoke run of the Python fuzz targets (tests/fuzz/targets.py): a fixed, derandomized set of cases per target,
each of which may raise only a LowRankError. The long run is tests/fuzz/run_long.py."""

import os

import pytest
from fuzz.targets import TARGETS, cleanup
from hypothesis import HealthCheck, given, settings

EXAMPLES = int(os.environ.get("LOWRANK_FUZZ_EXAMPLES", "40"))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_smoke(name):
    strategy, run = TARGETS[name]

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy())
    def case(path):
        try:
            run(path)
        finally:
            cleanup(path)

    case()
