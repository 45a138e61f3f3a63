"""A corrupt ``trainer_state.json`` is a :class:`CheckpointError`, never a built-in exception or a silent no-op.

One real checkpoint is written (two steps of a tiny BERT with LoRA), then each case rewrites one field of a copy and
resumes from it. The oracle is the file as written: the unmodified copy must still resume.
"""

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import tiny_model  # noqa: E402

import lowrank_rs as lr  # noqa: E402
from lowrank_rs import CheckpointError  # noqa: E402

VOCAB = 64


def model():
    base = tiny_model("bert", 0, vocab=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0).train()
    return lr.attach(base, lr.LoraConfig(["query", "value"], r=2, modules_to_save=["classifier"], init_seed=0))


def data(n=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, VOCAB, (5,), generator=g), "labels": torch.tensor(i % 3)} for i in range(n)]


CONFIG = dict(batch_size=2, max_steps=4, lr=1e-3)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    config = lr.TrainConfig(**CONFIG, checkpoint_dir=str(root), checkpoint_every=2)
    lr.train(model(), data(), config=config, progress=False)
    return root / "step-00000002"


def corrupt(written, tmp_path, edit):
    where = tmp_path / "step-00000002"
    shutil.copytree(written, where)
    path = where / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    return where


def resume(where):
    return lr.train(model(), data(), config=lr.TrainConfig(**CONFIG), resume_from=where, progress=False)


def setter(key, value):
    def edit(state):
        state[key] = value

    return edit


CASES = {
    "negative step": setter("step", -3),
    "step past the run": setter("step", 10**6),
    "step as a string": setter("step", "2"),
    "step as a float": setter("step", 2.5),
    "step as a bool": setter("step", True),
    "step missing": lambda s: s.pop("step"),
    "epoch past the step": setter("epoch", 5),
    "negative offset": setter("offset", -1),
    "offset past the data": setter("offset", 10**6),
    "offset as a list": setter("offset", [4]),
    "num_examples as a string": setter("num_examples", "8"),
    "world_size zero": setter("world_size", 0),
    "world_size as a string": setter("world_size", "1"),
    "another total_steps": setter("total_steps", 40),
    "history of strings": lambda s: s["history"].update(losses=["nan", "x"]),
    "history too short": lambda s: s["history"].update(losses=[1.0]),
    "history not an object": setter("history", [1, 2]),
    "scheduler behind": lambda s: s["scheduler"].update(last_epoch=1),
    "scheduler not an object": setter("scheduler", 3),
    "optimizer not an object": setter("optimizer", "adam"),
    "state is a list": lambda s: s.clear(),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_trainer_state_is_a_checkpoint_error(written, tmp_path, case):
    where = corrupt(written, tmp_path, CASES[case])
    with pytest.raises(CheckpointError):
        resume(where)


def test_a_checkpoint_of_another_world_size_names_both(written, tmp_path):
    where = corrupt(written, tmp_path, setter("world_size", 4))
    with pytest.raises(CheckpointError, match="4 process.*this run has 1"):
        resume(where)


def test_the_untouched_copy_still_resumes(written, tmp_path):
    result = resume(corrupt(written, tmp_path, lambda state: None))
    assert result.resumed_from == 2 and result.steps == 4
