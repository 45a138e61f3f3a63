"""The quality harness's own arithmetic and data: paired intervals against scipy, splits that never overlap."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent.parent / "bench" / "quality"


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(HARNESS))
    sys.path.insert(0, str(HARNESS.parent))
    try:
        import importlib

        yield importlib.import_module("tasks"), _load_main()
    finally:
        sys.path.remove(str(HARNESS))
        sys.path.remove(str(HARNESS.parent))


def _load_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_main", HARNESS / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    sys.modules["quality_main"] = module
    spec.loader.exec_module(module)
    return module


def test_paired_interval_matches_scipy(harness):
    stats = pytest.importorskip("scipy.stats")
    _, main = harness
    xs = {0: 0.70, 1: 0.74, 2: 0.69, 3: 0.75, 4: 0.72}
    ref = {0: 0.66, 1: 0.71, 2: 0.70, 3: 0.70, 4: 0.69}
    _, (mean, lo, hi) = main.paired(xs, ref)
    d = [xs[s] - ref[s] for s in xs]
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert mean == pytest.approx(sum(d) / len(d))
    assert (lo, hi) == pytest.approx((ci.low, ci.high))
    # Only seeds both rows ran are paired; fewer than two give no interval.
    assert main.paired({0: 0.5}, {0: 0.4})[1] is None
    assert main.paired({0: 0.5, 1: 0.6, 7: 0.9}, {0: 0.4, 1: 0.4})[1][0] == pytest.approx(0.15)


def test_grid_extension_past_an_edge_winner(harness):
    _, main = harness
    assert main._extension([1e-4, 3e-4, 1e-3], 1e-3) == pytest.approx(1e-3 * 1e-3 / 3e-4)
    assert main._extension([1e-4, 3e-4, 1e-3], 1e-4) == pytest.approx(1e-4 * 1e-4 / 3e-4)
    assert main._extension([1e-4, 3e-4, 1e-3], 3e-4) is None


def test_tasks_split_without_overlap_and_transfer_task_is_a_property_of_the_visible_text(harness):
    tasks, _ = harness
    mt = tasks.multitask()
    for task in mt.values():
        train, val, test = ({t for t, _ in getattr(task, s)} for s in ("train", "val", "test"))
        assert train and val and test
        assert not (train & val) and not (train & test) and not (val & test)
    returns = mt[tasks.TRANSFER_TASK]
    for text, y in returns.train:
        assert (returns.labels[y] == "mentions") == bool(tasks._RETURN.search(text[:200]))
    assert 0.5 < returns.majority() < 0.8
    # The package task's test split is the demo's own.
    from lowrank_rs.data import stdlib

    assert {t for t, _ in mt["package"].test} == {t for t, _ in stdlib.package_task().test}
    package = mt["package"]
    assert math.isclose(len(package.val) / (len(package.train) + len(package.val)), 0.15, abs_tol=0.04)
