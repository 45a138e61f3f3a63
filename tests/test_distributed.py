"""Training on two processes (gloo on loopback, launched with torchrun) against one process on the same global batch.

The oracle is the single-process run of the same scenario with ``grad_accum`` doubled: the very micro-batches the two
processes share between them. DDP and FSDP2 must end at its losses and parameters to float tolerance, report the
global loss on every rank, and resume exactly from their own checkpoints; one process must refuse a checkpoint that
two wrote. The scenarios are in ``distributed_worker.py``; all of them run in a single torchrun launch.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import distributed_worker as worker  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import lowrank_rs as lr  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH_TIMEOUT = 300


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc=2, timeout=LAUNCH_TIMEOUT):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *map(str, args)]  # fmt: skip
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {timeout} s: {(e.stderr or '')[-3000:]}")
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}")
    return done


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    torchrun(os.path.join(HERE, "distributed_worker.py"), out)
    return out


def read(out, name):
    with open(out / name) as f:
        return json.load(f)


@pytest.mark.parametrize("name", list(worker.SCENARIOS))
def test_two_processes_match_one_on_the_same_global_batch(two_processes, name):
    model, single = worker.run(name, world=1)
    expected = worker.trained(model)
    got = load_file(two_processes / f"{name}.safetensors")
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=2e-6, msg=lambda m, k=key: f"{k}: {m}")
    ranks = [read(two_processes, f"{name}.rank{r}.json") for r in range(2)]
    for record in ranks:
        # Every rank reports the global figures, not its own share.
        assert record["steps"] == single.steps
        assert record["losses"] == pytest.approx(single.losses, rel=1e-5)
        assert record["tokens"] == single.tokens
        assert [e[0] for e in record["evals"]] == [e.step for e in single.evals]
        assert [e[1] for e in record["evals"]] == pytest.approx([e.loss for e in single.evals], rel=1e-5)
        assert [e[2] for e in record["evals"]] == [e.accuracy for e in single.evals]
    assert ranks[0] == ranks[1]


@pytest.mark.parametrize("name", ["lora-bert-ddp", "lora-llama-fsdp"])
def test_resume_on_the_same_world_size_is_exact(two_processes, name):
    uninterrupted = load_file(two_processes / f"{name}.safetensors")
    resumed = load_file(two_processes / f"resumed-{name}.safetensors")
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0)
    record = read(two_processes, f"resumed-{name}.json")
    assert record["losses"] == read(two_processes, f"{name}.rank0.json")["losses"]
    # The resumed run wrote its own final checkpoint, for two processes.
    last = record["steps"]
    where = two_processes / f"checkpoints-{name}"
    state = json.loads((where / f"step-{last:08d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == last


def test_one_process_refuses_a_two_process_checkpoint(two_processes):
    where = two_processes / "checkpoints-lora-bert-ddp" / "step-00000001"
    with pytest.raises(lr.CheckpointError, match="2 process"):
        worker.run("lora-bert-ddp", world=1, resume_from=where)


def test_ranks_that_disagree_raise_instead_of_hanging(two_processes):
    for rank in range(2):
        errors = read(two_processes, f"errors.rank{rank}.json")
        assert "disagree on the run" in errors["different data"]
        assert "FSDP2 cannot reduce" in errors["fsdp regulariser"]


@pytest.mark.parametrize("name", worker.SAVED)
def test_save_adapter_writes_the_trained_adapter_once(two_processes, tmp_path, name):
    model, _ = worker.run(name, world=1)
    lr.save_adapter(model, tmp_path / "single")
    written = two_processes / f"adapter-{name}"
    assert sorted(os.listdir(written)) == sorted(os.listdir(tmp_path / "single"))
    expected = load_file(tmp_path / "single" / "adapter_model.safetensors")
    got = load_file(written / "adapter_model.safetensors")
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_sharded_calibration_gives_the_single_process_plan(two_processes, family):
    np = pytest.importorskip("numpy")
    single = worker.plan_record(worker.calibrated(family))
    ranks = [read(two_processes, f"plan-{family}.rank{r}.json") for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank ends with the identical plan
    sharded = ranks[0]
    assert set(sharded) == set(single)
    for name, expected in single.items():
        got = sharded[name]
        assert got["rank"] == expected["rank"] and got["scale"] == expected["scale"], name
        assert got["score"] == pytest.approx(expected["score"], rel=1e-6), name
        a, b = np.array(got["a"]).reshape(got["rank"], -1), np.array(expected["a"]).reshape(expected["rank"], -1)
        # The same row space: the orthogonal projectors agree, over the rows W0·C determines. The budget can give a
        # module more rank than W0·C has (BERT's pooler sees one token per example: rank 10 from 5 examples, three
        # singular values, the rest 1e-8 of rounding); rows past that span its null space in no particular basis,
        # which the order of the sums decides.
        s = np.asarray(expected["s"])
        determined = int((s[: expected["rank"]] > 1e-4 * s[0]).sum())
        np.testing.assert_allclose(got["s"][:determined], s[:determined], rtol=1e-5, err_msg=name)
        a, b = a[:determined], b[:determined]
        np.testing.assert_allclose(a.T @ a, b.T @ b, atol=1e-5, err_msg=name)


def test_attached_model_trains_under_hf_trainer_with_ddp(two_processes):
    pytest.importorskip("accelerate")
    before = dict(worker.model_for("lora", "bert").named_parameters())
    ranks = [load_file(two_processes / f"hf-trainer.rank{r}.safetensors") for r in range(2)]
    for name, p in before.items():
        # DDP keeps the replicas identical; only the adapters (and the saved head) move.
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        if p.requires_grad and "lora_B" in name:
            assert not torch.equal(ranks[0][name], p.detach()), name
        if not p.requires_grad:
            assert torch.equal(ranks[0][name], p.detach()), name
