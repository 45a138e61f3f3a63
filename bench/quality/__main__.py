"""Method quality that can be trusted: tasks × methods × seeds, rates chosen on validation, paired confidence intervals.

``python bench/quality`` runs the default grid and writes its tables into ``bench/RESULTS.md`` and its plots into
``bench/quality-*.png``; ``--grid quick`` checks the harness in a few minutes on slivers of the data.

How a study runs (one task, several methods):

1. **Sweep** — each method trains once (seed 0) at each rate of its grid; the rate with the best *validation*
   accuracy (15% carved from the training split) is chosen. A best rate at the edge of what was swept gets one more
   point past that edge, up to three times (a rate still at the edge is marked so); a longer schedule of a method
   (``-x2``) sweeps only the rate the shorter one chose and its two swept neighbours. The test split is never read
   for a choice. Each choice is recorded, with every swept rate's validation accuracy, in
   ``bench/quality/rates.json``: a method whose choice is recorded runs its seeds at that rate without sweeping
   again, while ``--sweep`` (and the quick grid, always) chooses again and records the new choices.
2. **Seeds** — the chosen rate runs on seeds 1–4 as well (5 seeds with the sweep's seed 0). A seed fixes the head's
   init, the adapter's random init, dropout and the data order, and is shared by every method, so differences are
   paired: each row reports its mean ± std and its mean paired difference from the study's reference (LoRA r = 8, or
   the shared LoRA in the multi-task study) with a 95% t-interval.
3. **Few-shot transfer** (after the multi-task study) — each seed's saved multi-task run continues on 16 / 32 / 64
   examples of the held-out ``returns`` task for a fixed 200 steps (a fixed number of epochs would give the
   16-example runs a dozen steps), against a fresh LoRA; TA-LoRA also with ``add_task(train_shared=True)``.

Every run is a subprocess with a time limit that writes one JSON record under ``bench/quality/runs/`` (committed
with the tables; its log and saved adapters go to ``bench/quality-runs/``, which is not); an interrupted sweep
resumes where it stopped (finished runs are not repeated), and ``--report`` rebuilds the tables from the records.
Each run records its validation curve (accuracy after each epoch), its trainable parameters and wall time. A table
whose runs have no records here (runs from before the records were committed) is kept as the last report wrote
it, marked so, rather than dropped; a report that would drop a table refuses unless ``--force``.

Cost, measured on 2 CPU cores (two runs side by side, one thread each; 64 tokens, 3 epochs — the validation curves
in the tables show how far each run got; three epochs leave the multi-task methods short of converged, as the
schedule study of the full grid shows, see docs/methods.md): a package-task run takes 1.5–2.5 minutes; a
multi-task run trains on three tasks' examples and takes 5–9 minutes (TA-LoRA, the shared LoRA) and 8–24 minutes
for prompt tuning, whose 50 virtual tokens nearly double each sequence; a few-shot run under 2 minutes. ``--plan``
prints what is left to run and its expected time, from the recorded time of each kind of run (the fastest, on a
quiet machine, and the median).
The default grid — the package study (8 methods), the learnability check, the multi-task study (TA-LoRA, prompt
tuning, one shared LoRA) and few-shot transfer (TA-LoRA, the shared LoRA, a fresh LoRA), 5 seeds each at the recorded
rates, 101 runs — takes about 1.7–2.6 hours on such a machine; with ``--sweep``, 125 runs and 2.3–3.4 hours.
``--tasks``/``--methods`` select parts and ``--seeds 0,1,2`` trims it (sweeps always train on seed 0, so
``--seeds 5,6`` adds seeds to a finished study). ``--grid full`` adds AdaLoRA, LoRA-GA, full
fine-tuning, the head alone, DoRA, LoRA r = 4, PEFT's LoRA, multitask prompt tuning, prompt tuning's and TA-LoRA's
transfer with its shared weights trained, the SymPy task (TLoRA's Fisher score among its methods: the second task on
which that choice is checked), the variant studies of TLoRA's and TA-LoRA's own choices, the schedule study
(TA-LoRA, prompt tuning and the shared LoRA at twice the epochs, at their 3-epoch rates), the multi-task comparison
at 6 epochs with each rate chosen at 6, a 12-epoch point at those rates (is 6 enough?) and TA-LoRA at 24 epochs
(is 12?): most of a day from nothing (``--plan --grid full`` says how long).
On a GPU the same grid runs unchanged (one run at a time, all of it on the GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import entries  # noqa: E402
from _common import machine, read_section, table, write_section  # noqa: E402
from unit import TRANSFER_BATCH, TRANSFER_STEPS, transfer_epochs  # noqa: E402

# Each finished run's record (its spec, accuracies, curve, parameters and time): committed with the tables, so
# ``--report`` rebuilds them on a fresh clone and a lost working directory loses no evidence.
RUNS = HERE / "runs"
# What a run leaves besides its record: its log, a failure marker, the adapters saved for few-shot transfer. Not
# committed (adapters are megabytes; a log says nothing once the record exists).
WORK = HERE.parent / "quality-runs"
# The rate each (study, method) chose on validation in its last sweep, with every swept rate's validation accuracy,
# and the fastest and median seconds of each kind of run: without --sweep, seeds run at these rates instead of
# sweeping again, and --plan estimates from the times.
RATES = HERE / "rates.json"
SEEDS = (0, 1, 2, 3, 4)
# Every sweep trains on this seed, whatever --seeds asks for: a rate is chosen once, and --seeds 5,6 adds seeds at it.
SWEEP_SEED = 0
SHOTS = (16, 32, 64)


@dataclasses.dataclass
class Study:
    task: str
    methods: Tuple[str, ...]
    reference: str
    seeds: Tuple[int, ...] = SEEDS
    # Few-shot transfer rows run after the study from each seed's saved run (so the study keeps its adapters).
    transfer: Tuple[str, ...] = ()
    title: str = ""
    # No sweep: each method runs at the rate its base method (``Entry.base``, else itself) chose in this task's own
    # study: variants of a method, paired on the same seeds.
    rate_from: Optional[str] = None


# In order of what the targets need first: an interrupted run leaves these rows whole.
PACKAGE_METHODS = ("lora", "tlora8", "tlora16", "pissa", "eva", "corda", "tlora-a", "loratrf")
PACKAGE_MORE = ("adalora", "loraga", "head", "full", "lora4", "dora", "peft-lora")
TLORA_CHOICES = ("tlora8", "tlora8-n16", "tlora8-n256", "tlora8-per-rank", "tlora8-global", "tlora8-none",
                 "tlora8-grad", "tlora8-fisher")  # fmt: skip
# "lora" starts fresh; the others continue their multi-task runs. "talora+shared" is TA-LoRA's add_task with
# train_shared=True: the shared weights and gates train too, not only the new task's rank-1 fast weights.
TRANSFER = ("talora", "talora+shared", "mpt", "prompt", "shared-lora", "lora")
GRIDS: Dict[str, List[Study]] = {
    "default": [
        Study("package", PACKAGE_METHODS, "lora", title="stdlib package (8 labels)"),
        Study("returns", ("lora",), "lora", seeds=(0,), title="learnability check of the transfer task"),
        Study("multitask", ("shared-lora", "talora", "prompt"), "shared-lora",
              transfer=("talora", "shared-lora", "lora"), title="multi-task: package, domain, kind"),  # fmt: skip
    ],
}
GRIDS["full"] = [
    dataclasses.replace(GRIDS["default"][0], methods=PACKAGE_METHODS + PACKAGE_MORE),
    GRIDS["default"][1],
    dataclasses.replace(GRIDS["default"][2], methods=("shared-lora", "talora", "prompt", "mpt"), transfer=TRANSFER),
    Study("sympy", ("lora", "tlora8", "tlora16", "tlora8-fisher", "eva", "pissa", "loratrf", "corda"), "lora",
          title="SymPy subpackage (8 labels)"),  # fmt: skip
    Study("package", TLORA_CHOICES, "tlora8", title="TLoRA's own choices (stdlib package)",
          rate_from="package"),  # fmt: skip
    Study("multitask", ("talora", "talora-L5", "talora-L20", "talora-r1", "talora-r8", "talora-orth0",
                        "talora-orth1e-1", "talora-fast3", "talora-fast30"), "talora",
          title="TA-LoRA's choices (multi-task)", rate_from="multitask"),  # fmt: skip
    # Prompt-style methods are known to want longer schedules, and the shared LoRA's curve still rose at the end.
    Study("multitask", ("talora", "talora-x2", "prompt", "prompt-x2", "shared-lora", "shared-lora-x2"), "talora",
          title="schedule: twice the epochs (multi-task)", rate_from="multitask"),  # fmt: skip
    # The schedule study says 3 epochs are too short: the multi-task comparison again at 6, each method's rate chosen
    # at 6 (swept around its 3-epoch choice), then a 12-epoch point at those rates to see whether 6 is enough.
    Study("multitask", ("shared-lora-x2", "talora-x2", "prompt-x2"), "shared-lora-x2",
          title="multi-task at 6 epochs (rates chosen at 6)"),  # fmt: skip
    Study("multitask", ("talora-x4", "prompt-x4", "shared-lora-x4"), "talora-x4", seeds=(0, 1, 2),
          title="schedule: 12 epochs against 6 (multi-task)", rate_from="multitask"),  # fmt: skip
    # 12 epochs still beat 6 for every method: TA-LoRA (the cheapest of the three) once more at 24.
    Study("multitask", ("talora-x2", "talora-x4", "talora-x8"), "talora-x2", seeds=(0, 1, 2),
          title="schedule: TA-LoRA at 6, 12 and 24 epochs (multi-task)", rate_from="multitask"),  # fmt: skip
]
GRIDS["quick"] = [
    Study("package", ("lora", "tlora8", "head", "pissa", "adalora", "eva", "corda", "loraga", "loratrf", "full",
                      "tlora-a"), "lora", seeds=(0, 1)),  # fmt: skip
    Study("sympy", ("lora",), "lora", seeds=(0,)),
    Study("multitask", ("shared-lora", "talora", "prompt", "mpt"), "shared-lora", seeds=(0, 1), transfer=TRANSFER),
]


# -- running units ---------------------------------------------------------------------------------------------------


def _key(spec: Dict[str, Any]) -> str:
    parts = [spec["task"], spec["method"], f"lr{spec['lr']:g}", f"s{spec['seed']}"]
    if spec.get("shots"):
        parts.append(f"k{spec['shots']}e{spec['epochs']}" + ("-shared" if spec.get("train_shared") else ""))
    return "/".join(parts)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # A run's result depends on its spec alone, so the default and full grids share one directory (the full grid
        # reuses the default's runs); the quick grid's slivers of data keep theirs in the working directory, out of
        # the repository.
        quick = args.grid == "quick"
        self.work = Path(args.work) / ("quick" if quick else "default")
        self.dir = self.work / "runs" if quick else Path(args.runs)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self._results: Dict[Path, Dict[str, Any]] = {}
        # Runs started by this invocation: one that failed is not started again until the next invocation.
        self.attempted: Set[str] = set()
        self.done = 0
        self.started = time.perf_counter()
        # The quick grid's slivers of data are another task, so recorded rates never apply to it.
        self.sweeping = args.sweep or quick
        # Rates and times recorded at other settings (another --epochs or --max-length) do not apply.
        record = load_record(_settings(args)) if args.grid != "quick" else {"rates": {}, "seconds": {}}
        self.recorded: Dict[str, Dict[str, Any]] = record["rates"]
        self.timings: Dict[str, Dict[str, float]] = record["seconds"]

    def path(self, spec: Dict[str, Any]) -> Path:
        return self.dir / (_key(spec).replace("/", "__") + ".json")

    def log_path(self, spec: Dict[str, Any], suffix: str = ".log") -> Path:
        return self.work / (_key(spec).replace("/", "__") + suffix)

    def result(self, spec: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        # Finished runs never change, so each file is read once (the report asks for the same runs many times).
        path = self.path(spec)
        if path not in self._results and path.exists():
            with open(path) as f:
                self._results[path] = json.load(f)
        return self._results.get(path)

    def spec(self, task: str, method: str, lr: float, seed: int, **more: Any) -> Dict[str, Any]:
        epochs = self.args.epochs * entries.ENTRIES[method].epochs_factor
        spec = {"task": task, "method": method, "lr": lr, "seed": seed, "epochs": epochs,
                "max_length": self.args.max_length, "limit": self.args.limit, **more}  # fmt: skip
        return spec

    def run_all(self, specs: Sequence[Dict[str, Any]]) -> int:
        """Run the specs not yet done, ``--workers`` at a time, each in its own process; return how many started."""
        todo = [s for s in specs if self.result(s) is None and _key(s) not in self.attempted]
        started = len(todo)
        running: List[Tuple[Dict[str, Any], subprocess.Popen, float, Any]] = []
        while todo or running:
            while todo and len(running) < self.args.workers:
                spec = todo.pop(0)
                self.attempted.add(_key(spec))
                log = open(self.log_path(spec), "w")
                cmd = [sys.executable, str(HERE), "--unit", json.dumps(spec), "--out", str(self.path(spec)),
                       "--threads", str(self.args.threads)]  # fmt: skip
                running.append((spec, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time(), log))
            time.sleep(1.0)
            for item in list(running):
                spec, proc, t0, log = item
                timed_out = time.time() - t0 > self.args.run_limit
                if timed_out:
                    proc.kill()
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                self.done += 1
                res = self.result(spec)
                elapsed = (time.perf_counter() - self.started) / 60
                if res is None:
                    why = "over its time limit" if timed_out else f"exit {proc.returncode}"
                    log_path = self.log_path(spec)
                    print(f"[{elapsed:5.1f} min] {_key(spec):<40} FAILED ({why}); see {log_path}", flush=True)
                    with open(self.log_path(spec, ".failed"), "w") as f:
                        f.write(why)
                else:
                    curve = " ".join(f"{100 * c[1]:.0f}" for c in res["curve"] if c[1] is not None)
                    print(f"[{elapsed:5.1f} min] {_key(spec):<40} val {100 * res['val_mean']:.1f}%  test "
                          f"{100 * res['test_mean']:.1f}%  ({res['trainable']:,} params, {res['seconds']:.0f} s; "
                          f"val by epoch {curve})", flush=True)  # fmt: skip
        return started


# A winner at the edge of what was swept gets one more rate past that edge, up to this many times; a rate still at
# the edge after them is marked as such in the tables.
MAX_EXTENSIONS = 3


@dataclasses.dataclass
class Sweep:
    """Seed 0's validation accuracy at each rate swept so far (the grid, then the extensions past an edge winner)."""

    results: Dict[float, float]
    best: Optional[float]
    # The extension the choice still waits for; None once it is settled or while the grid itself is unfinished.
    pending: Optional[float]
    complete: bool  # the grid and every extension it asked for have finished: the choice is final
    edge: bool  # the choice is at the edge of what was swept (out of extensions, or the next one failed)


def _extension(swept: Sequence[float], best: float) -> Optional[float]:
    """The next rate past ``best`` when it is the lowest or highest of the sorted rates ``swept``, one grid step on."""
    if len(swept) < 2:
        return None
    if best == swept[0]:
        return round(swept[0] * swept[0] / swept[1], 10)
    if best == swept[-1]:
        return round(swept[-1] * swept[-1] / swept[-2], 10)
    return None


def _alone(task: str, method: str, seeds: Tuple[int, ...] = SEEDS) -> Study:
    """The study in which ``method`` chose its own rate on ``task`` (a variant's base, a shorter schedule)."""
    return Study(task, (method,), method, seeds)


def _val(res: Dict[str, Any]) -> float:
    # A mean of per-task accuracies: the same counts of correct examples can differ in the last bit, and a tie must
    # stay a tie (it goes to the lower rate).
    return round(res["val_mean"], 9)


def sweep_grid(runner: Runner, study: Study, method: str) -> List[float]:
    """The rates a sweep starts from: the entry's grid, except for a longer schedule of a method (``-x2``), which is
    swept around what the shorter one chose on the same task (that rate and its swept neighbours; the edge rule
    extends past them as usual), so it costs three runs rather than a sweep from nothing. Empty while the shorter
    schedule has not chosen."""
    entry = entries.ENTRIES[method]
    if entry.epochs_factor == 1 or entry.base is None:
        return sorted(entry.lrs)
    base = sweep_state(runner, _alone(study.task, entry.base), entry.base)
    if not base.complete or base.best is None:
        return []
    swept = sorted(base.results)
    i = swept.index(base.best)
    return swept[max(0, i - 1) : i + 2]


def sweep_state(runner: Runner, study: Study, method: str) -> Sweep:
    grid = sweep_grid(runner, study, method)
    results: Dict[float, float] = {}
    for lr_ in grid:
        res = runner.result(runner.spec(study.task, method, lr_, SWEEP_SEED))
        if res is not None:
            results[lr_] = _val(res)
    if not results:
        return Sweep(results, None, None, False, False)
    # Ties go to the lower rate; an extension must beat the best so far outright to take its place.
    best = max(results, key=lambda k: (results[k], -k))
    if len(results) < len(grid):
        return Sweep(results, best, None, False, False)
    swept = list(grid)
    for _ in range(MAX_EXTENSIONS):
        ext = _extension(swept, best)
        if ext is None:
            return Sweep(results, best, None, True, False)
        spec = runner.spec(study.task, method, ext, SWEEP_SEED)
        res = runner.result(spec)
        if res is None:
            # One that failed in this invocation (diverged, over its limit) ends the search where it stands.
            if _key(spec) in runner.attempted:
                return Sweep(results, best, None, True, True)
            return Sweep(results, best, ext, False, False)
        results[ext] = _val(res)
        swept = sorted(swept + [ext])
        if results[ext] > results[best]:
            best = ext
    return Sweep(results, best, None, True, _extension(swept, best) is not None)


def chosen_lr(runner: Runner, study: Study, method: str) -> Optional[float]:
    """The swept rate with the best validation accuracy on seed 0, extensions past an edge winner included."""
    return sweep_state(runner, study, method).best


def run_study(runner: Runner, study: Study) -> None:
    """Method by method, as a pipeline (method k's sweep beside the edge extensions and seeds of the methods before
    it), so the workers stay busy and an interrupted study leaves whole rows rather than all rows half done."""
    methods = [m for m in study.methods if m in entries.ENTRIES and _selected(runner.args, m)]
    seed0 = SWEEP_SEED
    if study.rate_from is not None:
        rates = _variant_rates(runner, study, methods)
        for m in (m for m, rate in rates.items() if rate is None):
            print(f"  (skipped {m}: {_base(m)} has no chosen rate on {study.rate_from} yet)", flush=True)
        # Seed by seed, so an interrupted study leaves paired rows.
        runner.run_all([runner.spec(study.task, m, rate, seed) for seed in study.seeds
                        for m, rate in rates.items() if rate is not None])  # fmt: skip
        return

    def sweep(m: str) -> List[Dict[str, Any]]:
        rates = sweep_grid(runner, study, m)
        if (recorded := _recorded(runner, study, m)) is not None:
            rates = [recorded] if seed0 in study.seeds else []
        return [runner.spec(study.task, m, lr_, seed0, **_saving(runner, study, m, lr_, seed0))
                for lr_ in rates]  # fmt: skip

    def extension(m: str) -> List[Dict[str, Any]]:
        if _recorded(runner, study, m) is not None:
            return []
        ext = sweep_state(runner, study, m).pending
        return [] if ext is None else [runner.spec(study.task, m, ext, seed0, **_saving(runner, study, m, ext, seed0))]

    def finals(m: str) -> List[Dict[str, Any]]:
        if _recorded(runner, study, m) is None and sweep_state(runner, study, m).pending is not None:
            return []
        best = best_lr(runner, study, m)
        if best is None:
            return []
        return [runner.spec(study.task, m, best, seed, **_saving(runner, study, m, best, seed))
                for seed in study.seeds if seed != seed0]  # fmt: skip

    # Method k's sweep runs beside the edge extensions of the methods before it and the seeds of those whose choice
    # is settled; then the extensions and seeds left over run until nothing is.
    for k in range(len(methods) + 1):
        batch = [s for m in methods[:k] for s in finals(m) + extension(m)]
        if k < len(methods):
            batch += sweep(methods[k])
        runner.run_all(batch)
    while runner.run_all([s for m in methods for s in finals(m) + extension(m)]):
        pass


def saved_path(runner: Runner, study: Study, method: str, lr: float, seed: int) -> str:
    return str(runner.work / "saved" / f"{study.task}-{method}-lr{lr:g}-s{seed}")


def _saving(runner: Runner, study: Study, method: str, lr: float, seed: int) -> Dict[str, str]:
    # A study whose runs feed few-shot transfer keeps every run's adapter (the sweep's too: seed 0 at the chosen
    # rate is one of the five starting points). The path is not part of the run's key.
    return {"save": saved_path(runner, study, method, lr, seed)} if study.transfer else {}


def _base(method: str) -> str:
    return entries.ENTRIES[method].base or method


def _variant_rates(runner: Runner, study: Study, methods: Sequence[str]) -> Dict[str, Optional[float]]:
    """A ``rate_from`` study's rate for each method: its base's chosen rate, None while that is not chosen yet."""
    return {m: best_lr(runner, study, m) for m in methods}


def _rate_key(study: Study, method: str) -> str:
    return f"{study.task}/{method}"


def _recorded(runner: Runner, study: Study, method: str) -> Optional[float]:
    """The rate recorded by the last sweep, when this invocation does not sweep (no ``--sweep``, not the quick
    grid); None means sweep."""
    if runner.sweeping or study.rate_from is not None:
        return None
    entry = runner.recorded.get(_rate_key(study, method))
    return float(entry["rate"]) if entry else None


def best_lr(runner: Runner, study: Study, method: str) -> Optional[float]:
    if study.rate_from is not None:
        source = _base(method)
        return best_lr(runner, _alone(study.rate_from, source, study.seeds), source)
    recorded = _recorded(runner, study, method)
    if recorded is not None:
        return recorded
    return chosen_lr(runner, study, method)


def _transfer_specs(runner: Runner, study: Study, name: str, rate: Optional[float] = None) -> List[Dict[str, Any]]:
    """One transfer row's runs (every shot count and seed), each continuing its seed's saved multi-task run."""
    method, _, mode = name.partition("+")
    source = "shared-lora" if method == "lora" else method
    rate = best_lr(runner, study, source) if rate is None else rate
    if rate is None:
        return []
    specs = []
    # The quick grid checks the path, not the result: a tenth of the steps.
    steps = TRANSFER_STEPS // 10 if runner.args.grid == "quick" else TRANSFER_STEPS
    for shots in SHOTS:
        for seed in study.seeds:
            start = None if method == "lora" else saved_path(runner, study, method, rate, seed)
            spec = runner.spec("multitask", method, rate, seed, shots=shots, start=start)
            spec["epochs"] = transfer_epochs(shots, steps)
            if mode == "shared":
                spec["train_shared"] = True
            specs.append(spec)
    return specs


def run_transfer(runner: Runner, study: Study) -> None:
    specs = []
    for name in study.transfer:
        if _selected(runner.args, name.partition("+")[0]):
            specs += [s for s in _transfer_specs(runner, study, name) if not s["start"] or Path(s["start"]).exists()]
    runner.run_all(specs)


def _selected(args: argparse.Namespace, method: str) -> bool:
    return not args.methods or method in args.methods.split(",")


# -- recorded rates and the plan -------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Dict[str, int]:
    return {"epochs": args.epochs, "max_length": args.max_length}


def load_record(settings: Dict[str, int], path: Optional[Path] = None) -> Dict[str, Any]:
    """The recorded rates and run times, empty when there are none or they were recorded at other settings."""
    path = path or RATES
    empty = {"settings": settings, "rates": {}, "seconds": {}}
    if not path.exists():
        return empty
    with open(path) as f:
        out = json.load(f)
    return out if out.get("settings") == settings else empty


def timing_key(spec: Dict[str, Any]) -> str:
    """What a run's time depends on: its task, method and (for transfer) shots, not its rate or seed."""
    key = f"{spec['task']}/{spec['method']}"
    if spec.get("shots"):
        key += f"/k{spec['shots']}" + ("-shared" if spec.get("train_shared") else "")
    return key


def record(runner: Runner, studies: Sequence[Study], path: Optional[Path] = None) -> None:
    """Write what the finished runs say: each swept (study, method)'s chosen rate with every swept rate's validation
    accuracy (only a complete sweep is recorded; a recorded choice is replaced only under ``--sweep``), and the
    fastest and median seconds of each kind of run."""
    path = path or RATES
    out = load_record(_settings(runner.args), path)
    for study in studies:
        if study.rate_from is not None:
            continue
        for m in study.methods:
            if m not in entries.ENTRIES or _recorded(runner, study, m) is not None:
                continue
            sweep = sweep_state(runner, study, m)
            if not sweep.complete:
                continue
            validation = {f"{k:g}": round(v, 4) for k, v in sorted(sweep.results.items())}
            chosen: Dict[str, Any] = {"rate": sweep.best, "validation": validation}
            if sweep.edge:
                chosen["edge"] = True
            out["rates"][_rate_key(study, m)] = chosen
    times: Dict[str, List[float]] = {}
    for file in runner.dir.glob("*.json"):
        with open(file) as f:
            res = json.load(f)
        if "spec" in res:
            times.setdefault(timing_key(res["spec"]), []).append(res["seconds"])
    for key, secs in times.items():
        # Times recorded from more runs than the records here hold (runs from before the records were committed)
        # stay: a few runs on a busy machine would replace the quiet machine's fastest.
        if len(secs) >= out["seconds"].get(key, {}).get("runs", 0):
            out["seconds"][key] = {"fastest": round(min(secs)), "median": round(statistics.median(secs)),
                                   "runs": len(secs)}  # fmt: skip
    out["rates"] = dict(sorted(out["rates"].items()))
    out["seconds"] = dict(sorted(out["seconds"].items()))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


def planned(runner: Runner, study: Study) -> List[Dict[str, Any]]:
    """Every run the study would make, as ``run_study`` and ``run_transfer`` make them. Where a rate is not chosen
    yet, a grid rate stands in (a run's time does not depend on its rate), and an edge extension the sweep has not
    asked for yet is not counted (each one it may still ask for is a run more)."""
    methods = [m for m in study.methods if m in entries.ENTRIES and _selected(runner.args, m)]
    if study.rate_from is not None:
        specs = []
        for m, rate in _variant_rates(runner, study, methods).items():
            lrs = entries.ENTRIES[_base(m)].lrs
            specs += [runner.spec(study.task, m, rate or lrs[len(lrs) // 2], seed) for seed in study.seeds]
        return specs
    specs: List[Dict[str, Any]] = []
    rates: Dict[str, float] = {}
    for m in methods:
        grid = sweep_grid(runner, study, m) or sorted(entries.ENTRIES[m].lrs)
        recorded = _recorded(runner, study, m)
        if recorded is None:
            sweep = sweep_state(runner, study, m)
            rates_swept = sorted(set(grid) | set(sweep.results) | ({sweep.pending} if sweep.pending else set()))
            specs += [runner.spec(study.task, m, lr_, SWEEP_SEED) for lr_ in rates_swept]
        rates[m] = best_lr(runner, study, m) or grid[len(grid) // 2]
        seeds = [s for s in study.seeds if recorded is not None or s != SWEEP_SEED]
        specs += [runner.spec(study.task, m, rates[m], seed) for seed in seeds]
    for name in study.transfer:
        method = name.partition("+")[0]
        if _selected(runner.args, method):
            source = "shared-lora" if method == "lora" else method
            rate = rates.get(source) or best_lr(runner, study, source) or entries.ENTRIES[source].lrs[0]
            specs += _transfer_specs(runner, study, name, rate)
    return specs


def plan(runner: Runner, studies: Sequence[Study]) -> None:
    """Print what is left to run and how long it should take, from the recorded time of each kind of run."""
    workers = runner.args.workers
    fast_all = slow_all = 0.0
    unknown_all = todo_all = 0
    for study in studies:
        specs = planned(runner, study)
        todo = [s for s in specs if runner.result(s) is None]
        known = [runner.timings[timing_key(s)] for s in todo if timing_key(s) in runner.timings]
        fast = sum(t["fastest"] for t in known) / workers / 60
        slow = sum(t["median"] for t in known) / workers / 60
        unknown = len(todo) - len(known)
        fast_all, slow_all = fast_all + fast, slow_all + slow
        unknown_all, todo_all = unknown_all + unknown, todo_all + len(todo)
        more = f", {unknown} of a kind never timed" if unknown else ""
        print(f"{study.title or study.task}: {len(todo)} of {len(specs)} runs to do, about {fast:.0f}–{slow:.0f} min"
              f"{more}", flush=True)  # fmt: skip
    more = f", plus {unknown_all} runs of a kind never timed" if unknown_all else ""
    print(f"In all {todo_all} runs, about {fast_all:.0f}–{slow_all:.0f} min with {workers} side by side{more}: the "
          f"first figure from the fastest recorded run of each kind (a quiet machine), the second from their median "
          f"(recorded in {RATES.name}, on the machine named in bench/RESULTS.md).", flush=True)  # fmt: skip


# -- statistics and report -------------------------------------------------------------------------------------------


def _t95(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else math.nan


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean_std(xs: Sequence[float]) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{_pct(xs[0])}%"
    return f"{_pct(statistics.mean(xs))} ± {_pct(statistics.stdev(xs))}%"


def paired(xs: Dict[int, float], ref: Dict[int, float]) -> Tuple[str, Optional[Tuple[float, float, float]]]:
    seeds = sorted(set(xs) & set(ref))
    if len(seeds) < 2:
        return "—", None
    d = [xs[s] - ref[s] for s in seeds]
    mean = statistics.mean(d)
    half = _t95(len(d)) * statistics.stdev(d) / math.sqrt(len(d))
    text = f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]"
    return text, (mean, mean - half, mean + half)


def _finals(runner: Runner, study: Study, method: str) -> Tuple[Optional[float], Dict[int, Dict[str, Any]]]:
    rate = best_lr(runner, study, method)
    if rate is None:
        return None, {}
    out = {}
    for seed in study.seeds:
        res = runner.result(runner.spec(study.task, method, rate, seed))
        if res is not None:
            out[seed] = res
    return rate, out


def _rate_note(runner: Runner, study: Study, method: str) -> str:
    """" (edge)" when the chosen rate is still the highest or lowest swept after every extension allowed, " (sweep
    unfinished)" while an extension it asked for has not run."""
    if study.rate_from is not None:
        return ""
    if _recorded(runner, study, method) is not None:
        return " (edge)" if runner.recorded[_rate_key(study, method)].get("edge") else ""
    sweep = sweep_state(runner, study, method)
    return " (edge)" if sweep.edge else " (sweep unfinished)" if sweep.pending is not None else ""


def _curve(results: Dict[int, Dict[str, Any]]) -> str:
    # Mean validation accuracy after each epoch over the seeds that ran: flat at the end means trained enough.
    curves = [r["curve"] for r in results.values() if r["curve"]]
    if not curves:
        return "—"
    n = min(len(c) for c in curves)
    return " → ".join(f"{100 * statistics.mean(c[i][1] for c in curves):.0f}" for i in range(n))


def report_study(runner: Runner, study: Study, summary: Dict[str, Any], plots: Optional[List[Any]] = None) -> str:
    """A study's table from its records. Its plot is drawn at once, or appended to ``plots`` to be drawn only if
    the table is used."""
    ref_rate, ref = _finals(runner, study, study.reference)
    ref_acc = {s: r["test_mean"] for s, r in ref.items()}
    rows, points = [], []
    runs: List[Dict[str, Any]] = []
    multitask = study.task == "multitask"
    header = ["method", "trainable params", "lr (by val)", "val by epoch"]
    header += ([f"{t} test" for t in ("package", "domain", "kind")] if multitask else []) + [
        "test accuracy", f"Δ vs {entries.ENTRIES[study.reference].title} [95% CI]"]
    # Variants of several methods side by side (the schedule studies) are each also paired with their own base, at the
    # rate the base runs at where it chose it (the base need not be a row of this study).
    bases = {m: b for m in study.methods if m in entries.ENTRIES and (b := entries.ENTRIES[m].base) is not None}
    if study.rate_from is not None:
        # A base with no runs pairs with nothing; without it the column may only repeat the reference's.
        bases = {m: b for m, b in bases.items() if _base_finals(runner, study, b)}
    by_base = study.rate_from is not None and bool(bases) and set(bases.values()) != {study.reference}
    header += ["Δ vs its base [95% CI]"] if by_base else []
    header += ["time / run"]
    description = ""
    for m in study.methods:
        if m not in entries.ENTRIES:
            continue
        rate, res = _finals(runner, study, m)
        if not res:
            continue
        description = next(iter(res.values()))["description"]
        accs = {s: r["test_mean"] for s, r in res.items()}
        diff, ci = paired(accs, ref_acc) if m != study.reference else ("(reference)", None)
        params = next(iter(res.values()))["trainable"]
        row = [entries.ENTRIES[m].title, f"{params:,}", f"{rate:g}{_rate_note(runner, study, m)}",
               _curve(res)]
        if multitask:
            row += [_mean_std([r["test"][t] for r in res.values()]) for t in ("package", "domain", "kind")]
        row += [_mean_std(list(accs.values())) + f" (n={len(accs)})", diff]
        if by_base:
            base_runs = _base_finals(runner, study, bases[m]) if m in bases else {}
            base_acc = {s: r["test_mean"] for s, r in base_runs.items()}
            row.append(paired(accs, base_acc)[0] if base_acc else "")
        row.append(f"{statistics.median(r['seconds'] for r in res.values()):.0f} s")
        rows.append(row)
        points.append((entries.ENTRIES[m].title, params, [a for a in accs.values()], entries.ENTRIES[m].family))
        summary.setdefault(study.task, {})[m] = {"mean": statistics.mean(accs.values()), "ci": ci, "params": params}
        runs += res.values()
    if not rows:
        return ""
    majority = next(iter(ref.values()))["majority"] if ref else {}
    text = f"### {study.title or study.task}\n\n{description}. Majority class (test): " + ", ".join(
        f"{k} {_pct(v)}%" for k, v in majority.items()) + ".\n\n" + table(header, rows)  # fmt: skip
    text += "\n\n" + versions_line(runs)
    text += _against_best_peer(runner, study)
    gate_lines = []
    for m in study.methods:
        _, res = _finals(runner, study, m) if m in entries.ENTRIES else (None, {})
        traces = [r.get("gate_trace") for r in res.values() if r.get("gate_trace")]
        if traces:
            n = min(len(t) for t in traces)
            picks = sorted({max(0, n * q // 4 - 1) for q in (1, 2, 3, 4)})
            cells = []
            for i in picks:
                layers = [statistics.mean(t[i][1:]) for t in traces]
                cells.append(f"step {traces[0][i][0]}: {statistics.mean(layers):.3f}")
            gate_lines.append(f"- {entries.ENTRIES[m].title}: " + ", ".join(cells))
    if gate_lines:
        text += ("\n\nGates (mean |tanh g| over heads and layers; 0 = prompt branch closed), mean over seeds:\n\n"
                 + "\n".join(gate_lines))  # fmt: skip
    if len(points) > 1 and not multitask:
        text += f"\n\n![accuracy vs trainable parameters, {study.task}](quality-{_slug(study)}.png)"
        if plots is not None:
            plots.append((points, study))
        elif not runner.args.no_write:
            _plot(points, study, runner)
    return text


def versions_line(runs: Sequence[Dict[str, Any]]) -> str:
    """The library versions the table's runs ran under, so that a table mixing installs says so. A run is
    deterministic on one install (two runs of one spec match bit for bit), but not across installs: TA-LoRA's 6-epoch
    seed 0 scored 80.3% in an earlier session and 78.5% in a later one, torch 2.15.0 both times (what else differed,
    transformers, peft or the thread count, was not recorded then; it is now)."""
    counts: Dict[str, int] = {}
    for res in runs:
        v = res.get("versions")
        key = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "peft")) if v else "versions not recorded"
        counts[key] = counts.get(key, 0) + 1
    if len(counts) == 1:
        return f"Runs under {next(iter(counts))}."
    return "Runs under mixed versions: " + "; ".join(f"{k} ({n} runs)" for k, n in sorted(counts.items())) + "."


def _base_finals(runner: Runner, study: Study, base: str) -> Dict[int, Dict[str, Any]]:
    """A variant's base's runs on this study's seeds, at the rate the variant runs at (the base's own choice)."""
    assert study.rate_from is not None
    return _finals(runner, _alone(study.rate_from, base, study.seeds), base)[1]


def _against_best_peer(runner: Runner, study: Study) -> str:
    """Each of our rows paired against the best PEFT peer of the study (by mean test accuracy) and, when another,
    against the best of PEFT's initialisations of LoRA (the peers TLoRA's target names)."""
    finals = {m: _finals(runner, study, m)[1] for m in study.methods if m in entries.ENTRIES}
    acc = {m: {s: r["test_mean"] for s, r in res.items()} for m, res in finals.items() if res}
    peers = [m for m in acc if entries.ENTRIES[m].family == "peer" and len(acc[m]) > 1]
    ours = [m for m in acc if entries.ENTRIES[m].family == "ours" and m != study.reference]
    if not peers or not ours:
        return ""
    text = ""
    best = max(peers, key=lambda m: statistics.mean(acc[m].values()))
    against = [("the best PEFT peer", best)]
    inits = [m for m in peers if entries.ENTRIES[m].init]
    best_init = max(inits, key=lambda m: statistics.mean(acc[m].values())) if inits else best
    if best_init != best:
        against.append(("the best of PEFT's initialisations of LoRA", best_init))
    for what, peer in against:
        title = entries.ENTRIES[peer].title
        rows = [[entries.ENTRIES[m].title, paired(acc[m], acc[peer])[0]] for m in ours]
        text += f"\n\nPaired against {what} here, {title}:\n\n" + table(["method", f"Δ vs {title} [95% CI]"], rows)
    return text


def report_transfer(runner: Runner, study: Study) -> str:
    rows = []
    majority = None
    for name in study.transfer:
        specs = _transfer_specs(runner, study, name)
        if not specs:
            continue
        cells = []
        for shots in SHOTS:
            accs = []
            for spec in (s for s in specs if s["shots"] == shots):
                res = runner.result(spec)
                if res is not None:
                    accs.append(res["test_mean"])
                    majority = res["majority"]["returns"]
            # The runs are bimodal (each either stays at the majority class or learns the task), so the count of
            # runs clear of the majority says more than the spread.
            clear = sum(a > majority + 0.05 for a in accs) if majority is not None else 0
            cells.append(_mean_std(accs) + (f" (n={len(accs)}; {clear} clear)" if accs else ""))
        method, _, mode = name.partition("+")
        title = "fresh LoRA r = 8" if method == "lora" else entries.ENTRIES[method].title + " (from its multi-task run)"
        if mode == "shared":
            title = f"{entries.ENTRIES[method].title}, `add_task(train_shared=True)` (from its multi-task run)"
        rows.append([title, *cells])
    if not rows or majority is None:
        return ""
    return (
        f"{TRANSFER_HEADING} (`returns`, majority class {_pct(majority)}%)\n\n"
        "Each seed's multi-task run continues on k examples (TA-LoRA: `add_task`, mean init; the others: the task "
        f"prefix `task: returns.`) for {TRANSFER_STEPS} steps at batch {TRANSFER_BATCH} "
        f"({TRANSFER_STEPS * TRANSFER_BATCH} / k epochs), at the rate chosen for it in the multi-task study. "
        "\"clear\": runs more than 5 points above the majority class.\n\n"
        + table(["method", *[f"{k} examples" for k in SHOTS]], rows)
    )


def _slug(study: Study) -> str:
    return study.task if study.rate_from is None else f"{study.task}-{study.reference}-choices"


def _plot(points, study: Study, runner: Runner) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    colors = {"ours": "tab:blue", "peer": "tab:orange", "baseline": "tab:gray"}
    fig, ax = plt.subplots(figsize=(8, 5))
    means = [100 * statistics.mean(accs) for _, _, accs, _ in points]
    gap = (max(means) - min(means) + 4) / 28  # label spacing in accuracy points: one line of 7-point text
    placed: List[Tuple[float, float]] = []  # (params, label height) of the labels so far
    # Most rows sit near LoRA's parameter count, so labels there are pushed apart vertically (top down) and joined to
    # their points by a thin line.
    for (title, params, accs, family), mean in sorted(zip(points, means), key=lambda pm: -pm[1]):
        std = 100 * statistics.stdev(accs) if len(accs) > 1 else 0.0
        ax.errorbar(params, mean, yerr=std, fmt="o", color=colors[family], capsize=3)
        near = [y for p, y in placed if abs(math.log10(p / params)) < 0.6]
        label_y = min([mean, *[y - gap for y in near]])
        placed.append((params, label_y))
        ax.annotate(title, (params, mean), xytext=(params * 1.5, label_y), fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.6"})  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(f"{study.title or study.task}: blue ours, orange PEFT, grey baselines")
    fig.tight_layout()
    if runner.args.grid != "quick":
        fig.savefig(HERE.parent / f"quality-{_slug(study)}.png", dpi=110)
    plt.close(fig)


TRANSFER_HEADING = "### Few-shot transfer to the held-out task"
NOT_RUN = "Not run yet (no finished runs): "
KEPT = "_Kept as the last report wrote it"


def kept_mark(then: str) -> str:
    """The line under a kept table; ``then`` is the torch the report that wrote it named (its runs may be older)."""
    return (f"{KEPT}{f' (by a report on {then})' if then else ''}: some or all of the runs behind this table have no "
            "records in `bench/quality/runs/` (they ran before the records were committed), and rebuilding it from "
            "the records there would lose rows or seeds._")  # fmt: skip


def subsections(section: str) -> Dict[str, str]:
    """The tables of a written quality section, by heading line (each with what follows it up to the next heading,
    a kept table's mark included), without the section's closing "not run yet" line."""
    out: Dict[str, str] = {}
    heading = None
    for line in section.splitlines():
        if line.startswith("### "):
            heading = line
            out[heading] = ""
        elif heading is not None and not line.startswith(NOT_RUN):
            out[heading] += line + "\n"
    return {h: (h + "\n" + body).strip() for h, body in out.items()}


def coverage(text: str) -> Dict[str, List[int]]:
    """Each table row's runs: its first cell, and every "(n=K" in it (one per cell that counts runs)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("| ") and (counts := re.findall(r"\(n=(\d+)", line)):
            out[line.split(" | ")[0][2:]] = [int(k) for k in counts]
    return out


def covers(new: str, old: str) -> bool:
    """Whether a rebuilt table has every row of the old one, each with at least as many runs."""
    have = coverage(new)
    return all(
        row in have and len(have[row]) == len(counts) and all(a >= b for a, b in zip(have[row], counts))
        for row, counts in coverage(old).items()
    )


def dropped_tables(last: Dict[str, str], body: str) -> List[str]:
    """The headings of ``last`` that ``body`` neither rebuilds nor keeps (another grid's studies): writing it would
    lose them."""
    written = subsections(body)
    return [h for h in last if h not in written]


def report(
    runner: Runner, studies: Sequence[Study], last: Optional[Dict[str, str]] = None, then: str = ""
) -> Tuple[str, Dict[str, Any], List[str]]:
    """The tables of every study with finished runs. A table of ``last`` (the section as written before, by heading)
    that the records cannot rebuild whole (a row or a seed missing) is kept as it was, marked with ``then`` (the
    torch its report named) unless it is marked already; returns the body, the summary and the kept headings."""
    last = last or {}
    summary: Dict[str, Any] = {}
    parts = []
    missing = []
    kept = []

    def choose(text: str, match: Any) -> str:
        heading = next((h for h in last if match(h)), None)
        if heading is None or (text and covers(text, last[heading])):
            return text
        kept.append(heading)
        old = last[heading]
        return old if f"\n{KEPT}" in old else old + "\n\n" + kept_mark(then)

    for study in studies:
        title = study.title or study.task
        plots: List[Any] = []
        rebuilt = report_study(runner, study, summary, plots)
        text = choose(rebuilt, lambda h: h == f"### {title}")
        # A kept table keeps the plot drawn with it.
        if text == rebuilt and not runner.args.no_write:
            for points, plotted in plots:
                _plot(points, plotted, runner)
        if text:
            parts.append(text)
        else:
            missing.append(title)
        if study.transfer:
            transfer = choose(report_transfer(runner, study), lambda h: h.startswith(TRANSFER_HEADING))
            if transfer:
                parts.append(transfer)
    if missing:
        parts.append(NOT_RUN + "; ".join(missing) + ".")
    return "\n\n".join(parts), summary, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default", help="default: the studies the targets "
                        "need (about two hours on 2 cores); full: every peer, the SymPy task and the variant studies; "
                        "quick: slivers of the data, to check the harness in minutes")  # fmt: skip
    parser.add_argument("--tasks", default="", help="comma-separated studies to run (default: all of the grid)")
    parser.add_argument("--methods", default="", help="comma-separated methods to run (default: all)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds to run at the chosen rates (default: "
                        "0–4); sweeps always train on seed 0, so --seeds 5,6 adds two seeds to a finished study")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (recorded rates hold for 3 only)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (recorded rates: 64)")
    parser.add_argument("--workers", type=int, default=0, help="runs side by side (default: 1 on a GPU, 2 on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (default: cores / workers)")
    parser.add_argument("--run-limit", type=float, default=1800, help="seconds before a run is killed")
    parser.add_argument("--runs", default=str(RUNS), help="where each finished run's record goes (resume and --report "
                        "read them; committed with the tables)")  # fmt: skip
    parser.add_argument("--work", default=str(WORK), help="where logs, failure markers and saved adapters go")
    parser.add_argument("--sweep", action="store_true", help="choose every rate again on validation (otherwise a "
                        f"method whose choice is recorded in bench/quality/{RATES.name} runs its seeds at that rate; "
                        "the quick grid always sweeps)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="let the report replace tables in RESULTS.md that it "
                        "cannot rebuild (by default it refuses, or keeps a table whose runs have no records here)")
    parser.add_argument("--plan", action="store_true", help="print the runs left to do and their expected time; "
                        "run nothing")  # fmt: skip
    parser.add_argument("--report", action="store_true", help="only rebuild the tables from finished runs")
    parser.add_argument("--no-write", action="store_true",
                        help="print the tables; leave RESULTS.md, rates.json and the plots alone")
    parser.add_argument("--unit", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.unit:
        import unit

        unit.main_unit(args.unit, args.out, args.threads)
        return
    args.limit = 0
    if args.grid == "quick":
        args.epochs, args.limit = 1, 48
    import torch

    cuda = torch.cuda.is_available()
    if not args.workers:
        args.workers = 1 if cuda else min(2, os.cpu_count() or 1)
    if not args.threads:
        args.threads = max(1, (os.cpu_count() or 1) // args.workers)
    if args.seeds:
        seeds = tuple(int(x) for x in args.seeds.split(","))
        GRIDS[args.grid] = [dataclasses.replace(s, seeds=seeds[: len(s.seeds)]) for s in GRIDS[args.grid]]
    studies = [s for s in GRIDS[args.grid] if not args.tasks or s.task in args.tasks.split(",")]
    runner = Runner(args)
    started = time.perf_counter()
    print(machine(), flush=True)
    if args.plan:
        plan(runner, studies)
        return
    if not args.report:
        for study in studies:
            print(f"== {study.task}: {', '.join(study.methods)} ==", flush=True)
            run_study(runner, study)
            if study.transfer:
                run_transfer(runner, study)
    # The tables cover every study of the grid that has finished runs, not only those this invocation ran; one with no
    # records keeps what the last report wrote.
    section = "" if args.grid == "quick" or args.force else read_section("quality")
    last = subsections(section)
    # The torch the last report ran on, for the tables it keeps (its header names it).
    then = next(iter(re.findall(r"torch [^\s,]+", section.split("\n### ")[0])), "")
    body, summary, kept = report(runner, GRIDS[args.grid], last, then)
    dropped = dropped_tables(last, body)
    minutes = (time.perf_counter() - started) / 60
    header = (
        f"## Quality (`bench/quality`, grid `{args.grid}`)\n\nall-MiniLM-L6-v2, {args.max_length} tokens, "
        f"{args.epochs} epochs, batch 16, AdamW with 10% warmup then cosine; the rate of each method chosen on "
        f"validation (seed 0; the choices and each swept rate's validation accuracy are in `bench/quality/"
        f"{RATES.name}`; a winner at the edge of its grid gets up to {MAX_EXTENSIONS} more rates past that edge, and "
        "\"(edge)\" marks one still at the edge after them), then seeds 0–4 at that rate; mean ± std of test "
        "accuracy; Δ is the mean paired difference from the study's reference over the same seeds, with its 95% "
        "t-interval. Machine: "
        f"{machine()}\n\n"
    )
    print(body, flush=True)
    with open(runner.work / "summary.json", "w") as f:
        json.dump(summary, f, indent=1, default=str)
    if kept:
        print(f"kept {len(kept)} table(s) from the last report, the records here covering only part of them or none: "
              + "; ".join(h[4:] for h in kept), flush=True)  # fmt: skip
    if not args.no_write and args.grid != "quick":
        record(runner, GRIDS[args.grid])
        if dropped:
            print(f"RESULTS.md was left alone: its quality section holds {len(dropped)} table(s) that grid "
                  f"`{args.grid}` does not make ({'; '.join(h[4:] for h in dropped)}). Rebuild it with the grid "
                  "that wrote them (--grid full --report), or pass --force to replace them.", flush=True)  # fmt: skip
            sys.exit(1)
        write_section("quality", header + body)
    print(f"done in {minutes:.0f} min", flush=True)


if __name__ == "__main__":
    main()
