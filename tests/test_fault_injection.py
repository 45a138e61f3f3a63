"""SIGKILL at random points during the package's atomic writers — save_adapter, CalibrationPlan.save and
write_ort_adapter — must leave each target as the complete old or the complete new content, and a rerun must
succeed. (Checkpoint saves are covered with the training code.)

A child process overwrites the three targets in a loop, alternating between two versions; the parent kills it after
a random delay (fixed seed) and compares every target byte for byte with references written in-process."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from bad_inputs import tiny_bert

import lowrank_rs as lr
from lowrank_rs.export import write_ort_adapter

TRIALS = int(os.environ.get("LOWRANK_FAULT_TRIALS", "6"))

# One "zygote" process pays for the imports once and forks a writer per trial; the parent SIGKILLs the writer. The
# zygote touches no thread pool before forking (torch at one thread, the Rust core only to read the plan), so the
# forked writer is an ordinary single-threaded process.
ZYGOTE = textwrap.dedent(
    """
    import os, sys, pathlib
    sys.path[:0] = [{tests!r}]
    import torch
    torch.set_num_threads(1)
    import lowrank_rs as lr
    from lowrank_rs.export import write_ort_adapter
    from bad_inputs import tiny_bert
    work = pathlib.Path({work!r})
    config = lambda s: lr.LoraConfig(target_modules=["query", "value"], r=4, init_seed=s)
    models = [lr.attach(tiny_bert(), config(s)) for s in (0, 1)]
    plan = lr.CalibrationPlan.load(work / "plan-src")
    plans = [plan, lr.CalibrationPlan(plan.config, list(plan.modules.values()), plan.num_examples + 1, plan.num_tokens)]
    print("ready", flush=True)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            i = 0
            while True:
                v = i % 2
                lr.save_adapter(models[v], work / "target-adapter")
                plans[v].save(work / "target-plan")
                write_ort_adapter(work / f"src-{{v}}", work / "target.onnx_adapter")
                i += 1
                (work / "loops").write_text(str(i))
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    """
)


def _files(path):
    path = pathlib.Path(path)
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _plan(tmp):
    import torch

    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(1, 64, (2, 6), generator=g),
            "attention_mask": torch.ones(2, 6, dtype=torch.long),
            "labels": torch.tensor([0, 1]),
        }
        for _ in range(2)
    ]
    config = lr.TLoraConfig(target_modules=["query", "value"], r=2, alpha=4, num_examples=4)
    return lr.calibrate(tiny_bert(), batches, config, progress=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("fault")
    plan = _plan(work)
    plan.save(work / "plan-src")
    plans = [plan, lr.CalibrationPlan(plan.config, list(plan.modules.values()), plan.num_examples + 1, plan.num_tokens)]
    refs = {}
    for v in (0, 1):
        model = lr.attach(tiny_bert(), lr.LoraConfig(target_modules=["query", "value"], r=4, init_seed=v))
        lr.save_adapter(model, work / f"src-{v}")
        plans[v].save(work / f"plan-{v}")
        write_ort_adapter(work / f"src-{v}", work / f"ort-{v}.onnx_adapter")
        refs[v] = {
            "target-adapter": _files(work / f"src-{v}"),
            "target-plan": _files(work / f"plan-{v}"),
            "target.onnx_adapter": _files(work / f"ort-{v}.onnx_adapter"),
        }
    return work, refs, plans


def test_sigkill_during_writes_leaves_old_or_new_content(work):
    work, refs, plans = work
    tests = os.fspath(pathlib.Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.fspath(pathlib.Path(lr.__file__).parents[1]), tests])}
    rng = random.Random(14)
    outcomes = []
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE.format(tests=tests, work=os.fspath(work))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert zygote.stdout.readline().strip() == b"ready"
        loops = []
        for trial in range(TRIALS):
            (work / "loops").write_text("0")
            zygote.stdin.write(b"go\n")
            zygote.stdin.flush()
            writer = int(zygote.stdout.readline())
            # The first trial kills before the first write has finished; later ones at random points of the loop.
            time.sleep(rng.uniform(0.0, 0.02) if trial == 0 else rng.uniform(0.05, 0.6))
            os.kill(writer, signal.SIGKILL)
            # Until the zygote reaps it the killed writer is a zombie whose pid still answers, and the rerun in _check
            # rightly keeps the temporary file of a writer that looks alive.
            assert zygote.stdout.readline().strip() == b"reaped"
            loops.append(int((work / "loops").read_text() or 0))
            _check(work, refs, plans, trial, outcomes)
    finally:
        zygote.kill()
        zygote.wait()
    assert len(outcomes) == TRIALS * 3
    # The writers did write: most kills landed after some complete loops, i.e. in the middle of the rewriting.
    assert sum(n > 0 for n in loops) >= TRIALS // 2, loops


def _check(work, refs, plans, trial, outcomes):
    for target, _ in refs[0].items():
        path = work / target
        if not path.exists():
            # Only before the first complete write may nothing be there (the "old" state); after a rerun wrote it,
            # a missing target is a write that removed the old one before the new one was in place.
            assert trial == 0, f"trial {trial}: {target} vanished: the kill fell between removing and renaming"
            outcomes.append((trial, target, "absent"))
            continue
        got = _files(path)
        version = next((v for v in (0, 1) if got == refs[v][target]), None)
        assert version is not None, f"trial {trial}: {target} is neither the old nor the new content: {sorted(got)}"
        outcomes.append((trial, target, version))
    # A rerun over whatever the kill left succeeds and leaves the complete new content.
    model = lr.attach(tiny_bert(), lr.LoraConfig(target_modules=["query", "value"], r=4, init_seed=1))
    lr.save_adapter(model, work / "target-adapter")
    plans[1].save(work / "target-plan")
    write_ort_adapter(work / "src-1", work / "target.onnx_adapter")
    for target in refs[1]:
        assert _files(work / target) == refs[1][target]
    # The rerun also removed what the killed ONNX Runtime writer left (its pid is gone).
    assert not list(work.glob(".target.onnx_adapter.*.tmp"))
