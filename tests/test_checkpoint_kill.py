"""SIGKILL during checkpoint saves (issue 14, fault injection): a training run killed at a random point leaves only
complete checkpoints, and a rerun resumes from the newest one and finishes."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

torch = pytest.importorskip("torch")

from bad_inputs import tiny_bert  # noqa: E402

import lowrank_rs as lr  # noqa: E402

STEPS = 150
TRIALS = 3

# The child trains for long enough to be killed mid-run, checkpointing after every step.
CHILD = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{tests!r}]
    import torch
    torch.set_num_threads(1)
    import lowrank_rs as lr
    from test_checkpoint_kill import examples, model, train_config
    print("ready", flush=True)
    lr.train(model(), examples(), config=train_config({ckpt!r}), progress=False)
    """
)


def examples():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 64, (6,), generator=g), "labels": i % 2} for i in range(16)]


def model():
    return lr.attach(tiny_bert(), lr.LoraConfig(target_modules=["query", "value"], r=2, init_seed=0))


def train_config(ckpt):
    return lr.TrainConfig(lr=1e-3, max_steps=STEPS, batch_size=4, seed=0, checkpoint_dir=ckpt, checkpoint_every=1)


def test_a_killed_run_leaves_complete_checkpoints_and_resumes(tmp_path):
    tests = os.fspath(pathlib.Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.fspath(pathlib.Path(lr.__file__).parents[1]), tests])}
    rng = random.Random(12)
    resumed = 0
    for trial in range(TRIALS):
        ckpt = tmp_path / f"run-{trial}"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD.format(tests=tests, ckpt=os.fspath(ckpt))], stdout=subprocess.PIPE, env=env
        )
        try:
            assert child.stdout.readline().strip() == b"ready"
            # Kill at a random point once checkpointing is under way (every step writes one).
            deadline = time.monotonic() + 120
            while not list(ckpt.glob("step-*")) and time.monotonic() < deadline and child.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
            assert child.poll() is None, "the run ended before it could be killed"
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        saved = sorted(p for p in ckpt.glob("step-*")) if ckpt.exists() else []
        for step in saved:
            # A checkpoint directory is either absent or whole: the state file and every tensor file are there.
            assert {"trainer_state.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors"} <= {
                p.name for p in step.iterdir()
            }, step
        assert saved, "the child wrote no checkpoint in two minutes"
        fresh = model()
        result = lr.train(fresh, examples(), config=train_config(os.fspath(ckpt)), resume_from=ckpt, progress=False)
        assert result.resumed_from == int(saved[-1].name.split("-")[1]) and result.steps == STEPS
        resumed += 1
    assert resumed == TRIALS
