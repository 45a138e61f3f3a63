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
    assert main._extension([1e-4, 3e-4, 1e-3], 1e-4) == pytest.approx(1e-4 * 1e-4 / 3e-4, rel=1e-5)
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


def _fake_runner(main, tmp_path, grid="default", sweep=False):
    import argparse

    args = argparse.Namespace(grid=grid, sweep=sweep, runs=str(tmp_path / "runs"), work=str(tmp_path / "work"),
                              epochs=3, max_length=64, limit=0, workers=2, methods="", tasks="",
                              no_write=True)  # fmt: skip
    return main.Runner(args)


def _finish(runner, spec, val, seconds=100.0):
    """A finished run as the unit writes it (the fields the report reads), with test accuracy equal to ``val``."""
    import json

    with open(runner.path(spec), "w") as f:
        json.dump({"spec": spec, "val_mean": val, "test_mean": val, "seconds": seconds, "trainable": 1000,
                   "description": "three tasks", "curve": [[1, val]], "majority": {"package": 0.2},
                   "test": {t: val for t in ("package", "domain", "kind")}}, f)  # fmt: skip


def test_default_grid_runs_its_seeds_at_the_rates_a_sweep_recorded(harness, tmp_path, monkeypatch):
    _, main = harness
    monkeypatch.setattr(main, "RATES", tmp_path / "rates.json")
    study = main.Study("package", ("lora",), "lora", seeds=(0, 1, 2))
    sweeper = _fake_runner(main, tmp_path, sweep=True)
    # Before any sweep the plan sweeps: three rates on seed 0, then seeds 1-2 at the winner.
    assert len(main.planned(sweeper, study)) == 3 + 2
    for lr, val in zip((3e-4, 1e-3, 3e-3), (0.5, 0.8, 0.6)):
        _finish(sweeper, sweeper.spec("package", "lora", lr, 0), val, seconds=90.0 + 10 * lr / 3e-3)
    assert main.best_lr(sweeper, study, "lora") == 1e-3
    main.record(sweeper, [study])
    recorded = main.load_record({"epochs": 3, "max_length": 64})
    swept = {"0.0003": 0.5, "0.001": 0.8, "0.003": 0.6}
    assert recorded["rates"]["package/lora"] == {"rate": 1e-3, "validation": swept}
    assert recorded["seconds"]["package/lora"] == {"fastest": 91, "median": 93, "runs": 3}
    # Another grid without --sweep (a fresh runs directory) runs every seed at the recorded rate, nothing else.
    fresh = _fake_runner(main, tmp_path / "fresh")
    specs = main.planned(fresh, study)
    assert [(s["lr"], s["seed"]) for s in specs] == [(1e-3, 0), (1e-3, 1), (1e-3, 2)]
    assert main.best_lr(fresh, study, "lora") == 1e-3
    # A rate recorded at other settings does not apply; nor does it to the quick grid's slivers of data.
    fresh.args.epochs = 5
    assert main.load_record(main._settings(fresh.args))["rates"] == {}
    quick = _fake_runner(main, tmp_path / "quick", grid="quick")
    assert len(main.planned(quick, study)) == 3 + 2


def test_an_incomplete_sweep_is_not_recorded(harness, tmp_path, monkeypatch):
    _, main = harness
    monkeypatch.setattr(main, "RATES", tmp_path / "rates.json")
    study = main.Study("package", ("lora",), "lora", seeds=(0, 1))
    runner = _fake_runner(main, tmp_path, sweep=True)
    _finish(runner, runner.spec("package", "lora", 3e-4, 0), 0.5)
    _finish(runner, runner.spec("package", "lora", 1e-3, 0), 0.6)
    main.record(runner, [study])
    assert main.load_record({"epochs": 3, "max_length": 64})["rates"] == {}
    # The winner at the grid's edge needs its extension before the choice is final.
    _finish(runner, runner.spec("package", "lora", 3e-3, 0), 0.7)
    main.record(runner, [study])
    assert main.load_record({"epochs": 3, "max_length": 64})["rates"] == {}
    assert [s["lr"] for s in main.planned(runner, study)][3] == pytest.approx(9e-3)
    _finish(runner, runner.spec("package", "lora", 9e-3, 0), 0.2)
    main.record(runner, [study])
    assert main.load_record({"epochs": 3, "max_length": 64})["rates"]["package/lora"]["rate"] == 3e-3


def test_variants_run_at_their_base_methods_rate_and_a_schedule_variant_trains_longer(harness, tmp_path, monkeypatch):
    _, main = harness
    monkeypatch.setattr(main, "RATES", tmp_path / "rates.json")
    runner = _fake_runner(main, tmp_path, grid="full")
    for lr, val in zip((1.5e-3, 5e-3, 1.5e-2), (0.5, 0.8, 0.6)):
        _finish(runner, runner.spec("multitask", "talora", lr, 0), val)
    for lr, val in zip((3e-3, 1e-2, 3e-2), (0.5, 0.7, 0.6)):
        _finish(runner, runner.spec("multitask", "prompt", lr, 0), val)
    study = main.Study("multitask", ("talora", "talora-x2", "prompt-x2"), "talora", seeds=(0, 1), rate_from="multitask")
    specs = main.planned(runner, study)
    assert [(s["method"], s["lr"], s["seed"], s["epochs"]) for s in specs] == [
        ("talora", 5e-3, 0, 3), ("talora", 5e-3, 1, 3), ("talora-x2", 5e-3, 0, 6), ("talora-x2", 5e-3, 1, 6),
        ("prompt-x2", 1e-2, 0, 6), ("prompt-x2", 1e-2, 1, 6),
    ]  # fmt: skip


def test_seeds_past_the_sweep_add_runs_at_the_chosen_rate_and_never_sweep_again(harness, tmp_path, monkeypatch):
    _, main = harness
    monkeypatch.setattr(main, "RATES", tmp_path / "rates.json")
    runner = _fake_runner(main, tmp_path, grid="full", sweep=True)
    for lr, val in zip((3e-4, 1e-3, 3e-3), (0.5, 0.8, 0.6)):
        _finish(runner, runner.spec("package", "lora", lr, 0), val)
    # --seeds 3,4 on a swept study: the choice stays seed 0's, and only the two new seeds run at it.
    later = main.Study("package", ("lora",), "lora", seeds=(3, 4))
    assert main.best_lr(runner, later, "lora") == 1e-3
    left = [s for s in main.planned(runner, later) if runner.result(s) is None]
    assert [(s["lr"], s["seed"]) for s in left] == [(1e-3, 3), (1e-3, 4)]
    # From nothing, the sweep still trains on seed 0 before the asked-for seeds.
    fresh = _fake_runner(main, tmp_path / "fresh", grid="full", sweep=True)
    assert [s["seed"] for s in main.planned(fresh, later)] == [0, 0, 0, 3, 4]
    # Recorded rates (no sweep): seed 0 runs only when asked for.
    main.record(runner, [main.Study("package", ("lora",), "lora")])
    recorded = _fake_runner(main, tmp_path / "recorded")
    assert [(s["lr"], s["seed"]) for s in main.planned(recorded, later)] == [(1e-3, 3), (1e-3, 4)]


def _fake_runs(main, runner, val, fails=()):
    """Stand in for the subprocesses: each run "finishes" with val(lr, seed), or fails when its rate is in fails."""
    ran = []

    def run_all(specs):
        started = len(ran)
        for spec in specs:
            if runner.result(spec) is None and main._key(spec) not in runner.attempted:
                runner.attempted.add(main._key(spec))
                ran.append((spec["method"], spec["lr"], spec["seed"]))
                if spec["lr"] not in fails:
                    _finish(runner, spec, val(spec["lr"], spec["seed"]))
        return len(ran) - started

    runner.run_all = run_all
    return ran


def test_an_edge_winner_extends_until_it_is_inside_and_seeds_wait_for_the_final_choice(harness, tmp_path, monkeypatch):
    _, main = harness
    monkeypatch.setattr(main, "RATES", tmp_path / "rates.json")
    runner = _fake_runner(main, tmp_path, grid="full")
    # Validation accuracy peaks at 2.7e-2, two steps past the grid's top (3e-4, 1e-3, 3e-3).
    ran = _fake_runs(main, runner, lambda lr, seed: 0.9 - abs(math.log(lr / 2.7e-2)) / 20)
    main.run_study(runner, main.Study("package", ("lora",), "lora", seeds=(0, 1, 2)))
    sweep = [lr for _, lr, seed in ran if seed == 0]
    assert sweep == pytest.approx([3e-4, 1e-3, 3e-3, 9e-3, 2.7e-2, 8.1e-2])
    # Seeds 1-2 ran only at the final choice, after the last extension.
    assert [(lr, seed) for _, lr, seed in ran if seed != 0] == [(pytest.approx(2.7e-2), 1), (pytest.approx(2.7e-2), 2)]
    state = main.sweep_state(runner, main.Study("package", ("lora",), "lora"), "lora")
    assert state.complete and not state.edge and state.best == pytest.approx(2.7e-2)


def test_a_rate_still_at_the_edge_after_every_extension_is_marked_and_a_failed_one_ends_the_search(
        harness, tmp_path, monkeypatch):
    _, main = harness
    monkeypatch.setattr(main, "RATES", tmp_path / "rates.json")
    study = main.Study("package", ("lora",), "lora", seeds=(0, 1))
    runner = _fake_runner(main, tmp_path, grid="full")
    ran = _fake_runs(main, runner, lambda lr, seed: min(0.99, 0.5 + lr))  # always better higher up
    main.run_study(runner, study)
    assert len([1 for _, _, seed in ran if seed == 0]) == 3 + main.MAX_EXTENSIONS
    main.record(runner, [study])
    chosen = main.load_record({"epochs": 3, "max_length": 64})["rates"]["package/lora"]
    assert chosen["edge"] is True and chosen["rate"] == pytest.approx(3e-3 * 3**main.MAX_EXTENSIONS)
    assert main._rate_note(runner, study, "lora") == " (edge)"
    # A diverging extension (no result) ends the search at the edge it had reached; the seeds still run.
    other = _fake_runner(main, tmp_path / "other", grid="full", sweep=True)  # the choice above is recorded now
    ran = _fake_runs(main, other, lambda lr, seed: 0.5 + lr, fails=(pytest.approx(9e-3),))
    main.run_study(other, study)
    assert ran[-1] == ("lora", 3e-3, 1)
    state = main.sweep_state(other, study, "lora")
    assert state.complete and state.edge and state.best == 3e-3


def test_the_schedule_study_pairs_each_variant_with_its_own_base(harness, tmp_path, monkeypatch):
    _, main = harness
    monkeypatch.setattr(main, "RATES", tmp_path / "rates.json")
    runner = _fake_runner(main, tmp_path, grid="full")
    for method, grid in (("talora", (1.5e-3, 5e-3, 1.5e-2)), ("prompt", (3e-3, 1e-2, 3e-2))):
        for lr, val in zip(grid, (0.5, 0.8, 0.6)):
            _finish(runner, runner.spec("multitask", method, lr, 0), val)
    accs = {"talora": (0.75, 0.74, 0.77), "talora-x2": (0.80, 0.80, 0.81), "prompt": (0.76, 0.78, 0.75),
            "prompt-x2": (0.78, 0.81, 0.77)}  # fmt: skip
    study = main.Study("multitask", tuple(accs), "talora", seeds=(0, 1, 2), rate_from="multitask")
    for method, values in accs.items():
        rate = main.best_lr(runner, study, method)
        for seed, acc in enumerate(values):
            _finish(runner, runner.spec("multitask", method, rate, seed), acc)
    text = main.report_study(_fake_runner(main, tmp_path, grid="full"), study, {})  # a fresh one reads the files anew
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert header.split(" | ")[-2] == "Δ vs its base [95% CI]"
    title = main.entries.ENTRIES["prompt-x2"].title
    prompt_x2 = next(line for line in text.splitlines() if line.startswith(f"| {title} |"))
    expected = main.paired(dict(enumerate(accs["prompt-x2"])), dict(enumerate(accs["prompt"])))[0]
    assert prompt_x2.split(" | ")[-2] == expected
    assert expected != main.paired(dict(enumerate(accs["prompt-x2"])), dict(enumerate(accs["talora"])))[0]


def test_a_longer_schedule_is_swept_around_the_shorter_ones_choice_and_the_next_runs_at_its_own(
        harness, tmp_path, monkeypatch):
    _, main = harness
    monkeypatch.setattr(main, "RATES", tmp_path / "rates.json")
    runner = _fake_runner(main, tmp_path, grid="full")
    six = main.Study("multitask", ("talora-x2",), "talora-x2", seeds=(0, 1))
    # Until the 3-epoch schedule has chosen, the 6-epoch one has nothing to sweep around.
    assert main.sweep_grid(runner, six, "talora-x2") == []
    for lr, val in zip((1.5e-3, 5e-3, 1.5e-2, 4.5e-2), (0.5, 0.8, 0.6, 0.55)):
        _finish(runner, runner.spec("multitask", "talora", lr, 0), val)
    # The choice (5e-3) and its swept neighbours, not the entry's whole grid.
    assert main.sweep_grid(runner, six, "talora-x2") == [1.5e-3, 5e-3, 1.5e-2]
    # At 6 epochs the top neighbour wins: it is an edge of this sweep, so the usual extension follows, then seed 1.
    ran = _fake_runs(main, runner, lambda lr, seed: 0.9 - abs(math.log(lr / 1.5e-2)) / 20)
    main.run_study(runner, six)
    assert [(m, lr, seed) for m, lr, seed in ran] == [
        ("talora-x2", 1.5e-3, 0), ("talora-x2", 5e-3, 0), ("talora-x2", 1.5e-2, 0), ("talora-x2", 4.5e-2, 0),
        ("talora-x2", 1.5e-2, 1)]  # fmt: skip
    assert runner.result(runner.spec("multitask", "talora-x2", 1.5e-2, 0))["spec"]["epochs"] == 6
    # The 12-epoch point runs at the 6-epoch choice and pairs with those runs, though they are not a row of its own.
    twelve = main.Study("multitask", ("talora-x4",), "talora-x4", seeds=(0, 1), rate_from="multitask")
    assert [(s["lr"], s["epochs"]) for s in main.planned(runner, twelve)] == [(1.5e-2, 12), (1.5e-2, 12)]
    for spec, acc in zip(main.planned(runner, twelve), (0.95, 0.97)):
        _finish(runner, spec, acc)
    text = main.report_study(_fake_runner(main, tmp_path, grid="full"), twelve, {})
    row = next(line for line in text.splitlines() if line.startswith("| " + main.entries.ENTRIES["talora-x4"].title))
    six_accs = {0: 0.9, 1: 0.9}  # the stand-in's accuracy at 1.5e-2, on both seeds
    assert row.split(" | ")[-2] == main.paired({0: 0.95, 1: 0.97}, six_accs)[0]


def test_a_tie_in_validation_accuracy_goes_to_the_lower_rate_whatever_the_last_bit(harness, tmp_path, monkeypatch):
    _, main = harness
    monkeypatch.setattr(main, "RATES", tmp_path / "rates.json")
    runner = _fake_runner(main, tmp_path, grid="full")
    # (0.8083 + 0.85 + 0.6667) / 3 and (0.7917 + 0.8167 + 0.7167) / 3: the same 93 of 120, apart in the last bit.
    vals = {3e-4: 0.5, 1e-3: 0.775, 3e-3: 0.7749999999999999 + 2.3e-16}
    for lr, val in vals.items():
        _finish(runner, runner.spec("package", "lora", lr, 0), val)
    assert vals[3e-3] > vals[1e-3]
    state = main.sweep_state(runner, main.Study("package", ("lora",), "lora"), "lora")
    assert state.best == 1e-3 and state.complete and state.pending is None


def test_the_full_grid_runs_at_recorded_rates_and_keeps_logs_and_adapters_out_of_the_records(
        harness, tmp_path, monkeypatch):
    _, main = harness
    monkeypatch.setattr(main, "RATES", tmp_path / "rates.json")
    sweeper = _fake_runner(main, tmp_path / "a", grid="full", sweep=True)
    for lr, val in zip((1.5e-3, 5e-3, 1.5e-2), (0.5, 0.8, 0.6)):
        _finish(sweeper, sweeper.spec("multitask", "talora", lr, 0), val)
    main.record(sweeper, [main.Study("multitask", ("talora",), "talora")])
    # A fresh clone's full grid (no runs, no --sweep): the recorded choice stands, and a rate_from study (the 24-epoch
    # point) runs at it rather than waiting for a sweep whose runs are not there.
    fresh = _fake_runner(main, tmp_path / "b", grid="full")
    study = main.Study("multitask", ("talora-x8",), "talora-x2", seeds=(0, 1), rate_from="multitask")
    monkeypatch.setitem(fresh.recorded, "multitask/talora-x2", {"rate": 1.5e-2, "validation": {}})
    assert [(s["lr"], s["epochs"]) for s in main.planned(fresh, study)] == [(1.5e-2, 24), (1.5e-2, 24)]
    assert main.best_lr(fresh, main.Study("multitask", ("talora",), "talora"), "talora") == 5e-3
    # Records go to --runs (committed), everything else to --work.
    spec = fresh.spec("multitask", "talora", 5e-3, 1)
    assert fresh.path(spec).parent == tmp_path / "b" / "runs"
    assert fresh.log_path(spec).parent == tmp_path / "b" / "work" / "default"
    transfer = main.Study("multitask", ("talora",), "talora", transfer=("talora",))
    assert main.saved_path(fresh, transfer, "talora", 5e-3, 1).startswith(str(tmp_path / "b" / "work"))
    # The quick grid's records stay out of the repository.
    quick = _fake_runner(main, tmp_path / "c", grid="quick")
    assert quick.path(spec).is_relative_to(tmp_path / "c" / "work")


def test_a_table_whose_runs_have_no_records_is_kept_marked_and_one_with_records_is_rebuilt(
        harness, tmp_path, monkeypatch):
    _, main = harness
    monkeypatch.setattr(main, "RATES", tmp_path / "rates.json")
    runner = _fake_runner(main, tmp_path, grid="full")
    with_runs = main.Study("package", ("lora",), "lora", seeds=(0, 1), title="rebuilt")
    without = main.Study("sympy", ("lora",), "lora", seeds=(0, 1), title="kept")
    never = main.Study("sympy", ("eva",), "eva", seeds=(0,), title="never run")
    for lr, val in zip((3e-4, 1e-3, 3e-3), (0.5, 0.8, 0.6)):
        _finish(runner, runner.spec("package", "lora", lr, 0), val)
    _finish(runner, runner.spec("package", "lora", 1e-3, 1), 0.7)
    last = main.subsections("intro\n\n### rebuilt\n\nan old table\n\n### kept\n\n| the | old |\n\n"
                            + main.NOT_RUN + "something.\n")  # fmt: skip
    assert last == {"### rebuilt": "### rebuilt\n\nan old table", "### kept": "### kept\n\n| the | old |"}
    body, _, kept = main.report(runner, [with_runs, without, never], last, then="torch 2.13.0")
    assert kept == ["### kept"]
    assert "an old table" not in body and "| the | old |\n\n" + main.kept_mark("torch 2.13.0") in body
    assert body.endswith(main.NOT_RUN + "never run.")
    # Written and read again, a kept table is kept once more with one mark, not two.
    again = main.subsections(body)
    assert again["### kept"] == last["### kept"] + "\n\n" + main.kept_mark("torch 2.13.0")
    assert main.report(runner, [with_runs, without], again, then="torch 2.15.0")[0].count(main.KEPT) == 1
    assert "torch 2.15.0" not in main.report(runner, [with_runs, without], again, then="torch 2.15.0")[0]
    # Records of part of a table (one seed of two, or one row of two) do not replace it; all of it does.
    two_rows = main.Study("sympy", ("lora", "eva"), "lora", seeds=(0, 1), title="kept")
    _finish(runner, runner.spec("sympy", "lora", 3e-3, 0), 0.8)
    monkeypatch.setitem(runner.recorded, "sympy/lora", {"rate": 3e-3, "validation": {}})
    monkeypatch.setitem(runner.recorded, "sympy/eva", {"rate": 3e-3, "validation": {}})
    lora, eva = (main.entries.ENTRIES[m].title for m in ("lora", "eva"))
    old = {"### kept": f"### kept\n\n| method | test |\n|---|---|\n| {lora} | 80 (n=2) |\n| {eva} | 79 (n=1) |"}
    assert main.report(runner, [two_rows], old)[2] == ["### kept"]
    _finish(runner, runner.spec("sympy", "lora", 3e-3, 1), 0.8)
    assert main.report(runner, [two_rows], old)[2] == ["### kept"]
    _finish(runner, runner.spec("sympy", "eva", 3e-3, 0), 0.8)
    body, _, kept = main.report(runner, [two_rows], old)
    assert kept == [] and main.coverage(body) == {lora: [2], eva: [1]}
    # Another grid that does not make a table of the last report would lose it: the writer refuses on these.
    assert main.dropped_tables({**old, "### another grid's": "### another grid's\n\nx"}, body) == ["### another grid's"]
    assert main.dropped_tables(old, body) == []


def test_a_table_says_which_versions_its_runs_ran_under(harness):
    _, main = harness
    a = {"versions": {"torch": "2.15.0", "transformers": "5.25.0", "peft": "0.21.2", "lowrank_rs": "0.1.0"}}
    b = {"versions": {**a["versions"], "torch": "2.13.0"}}
    assert main.versions_line([a, a]) == "Runs under torch 2.15.0, transformers 5.25.0, peft 0.21.2."
    assert main.versions_line([a, b, {}]) == (
        "Runs under mixed versions: torch 2.13.0, transformers 5.25.0, peft 0.21.2 (1 runs); torch 2.15.0, "
        "transformers 5.25.0, peft 0.21.2 (1 runs); versions not recorded (1 runs)."
    )
