"""The training loop: schedule against its closed form, accumulation against one big batch, clipping seen from an
optimizer hook, accuracy against a per-example oracle, bit-exact determinism and resume, checkpoint files, errors,
and an attached model under Hugging Face ``Trainer``.

Every model is a tiny random-initialised transformers config (2 layers); nothing is downloaded.
"""

import json
import math
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import tiny_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

import lowrank_rs as lr  # noqa: E402
from lowrank_rs import (  # noqa: E402
    CheckpointError,
    ConfigError,
    LoraConfig,
    TrainConfig,
    lora_layers,  # noqa: E402
)
from lowrank_rs.training import collate  # noqa: E402

VOCAB = 64


def tiny_bert(seed=0, dropout=0.0):
    options = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, max_position_embeddings=32)
    return tiny_model("bert", seed, vocab=VOCAB, **options).train()


def attached_bert(seed=0, dropout=0.0, lora_dropout=0.0):
    # "dense" also adapts the pooler, which a classifier on a random-initialised encoder needs to memorise quickly.
    config = LoraConfig(["query", "value", "dense"], r=4, alpha=8, dropout=lora_dropout, modules_to_save=["classifier"],
                        init_seed=seed)  # fmt: skip
    return lr.attach(tiny_bert(seed, dropout), config)


def tiny_llama(seed=0):
    model = tiny_model("llama", seed, vocab=VOCAB, max_position_embeddings=32).train()
    # A random-initialised head maps hidden states to tokens arbitrarily; training it lets the model memorise quickly.
    config = LoraConfig(["q_proj", "v_proj", "up_proj", "down_proj"], r=4, alpha=8, modules_to_save=["lm_head"],
                        init_seed=seed)  # fmt: skip
    return lr.attach(model, config)


def classification_examples(n, seed=0, lengths=(3, 9), with_mask=False):
    """Random sequences of random lengths with random labels: memorisable, and padded differently in every batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        example = {
            "input_ids": torch.randint(1, VOCAB, (length,), generator=g),
            "labels": torch.randint(0, 3, (), generator=g),
        }
        if with_mask:
            example["attention_mask"] = torch.ones(length, dtype=torch.long)
        out.append(example)
    return out


def lm_examples(n, seed=0):
    """Causal-LM examples with a two-token prompt left out of the loss (-100), of different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 10, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[:2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def adapter_weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


class OptimizerWatch:
    """A global optimizer pre-step hook: what the optimizer is about to apply — its lrs and gradient norms."""

    def __enter__(self):
        self.lrs, self.grad_norms = [], []
        self.handle = register_optimizer_step_pre_hook(self._hook)
        return self

    def _hook(self, optimizer, args, kwargs):
        self.lrs.append([group["lr"] for group in optimizer.param_groups])
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def __exit__(self, *exc):
        self.handle.remove()


# --- config ---------------------------------------------------------------------------------------------------------


def test_config_json_round_trip_and_validation_normalises():
    config = TrainConfig(
        lr=1e-3, weight_decay=0.01, betas=[0.8, 0.95], warmup_steps=3, min_lr_ratio=0.1, max_steps=20, batch_size=4,
        grad_accum=2, max_grad_norm=None, bf16=False, seed=7, shuffle=False, eval_every=5, eval_batch_size=16,
        checkpoint_dir=os.path.join("runs", "x"), checkpoint_every=10,
    )  # fmt: skip
    assert config.betas == (0.8, 0.95)
    back = TrainConfig.from_json(config.to_json())
    assert back == config and hash(back) == hash(config)
    assert json.loads(config.to_json())["betas"] == [0.8, 0.95]
    assert TrainConfig().total_steps(20) == math.ceil(20 / 8)
    assert TrainConfig(batch_size=3, grad_accum=2, epochs=2).total_steps(10) == 2 * 2  # 4 micro-batches → 2 steps
    assert TrainConfig(warmup_ratio=0.25).warmup_for(10) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0}, "lr must be positive"),
        ({"lr": float("nan")}, "lr must be finite"),
        ({"lr": "1e-3"}, "lr must be a number"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"betas": (0.9,)}, "betas must be a pair"),
        ({"betas": (0.9, 1.0)}, r"betas must lie in \[0, 1\)"),
        ({"eps": 0.0}, "eps must be positive"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"warmup_ratio": 0.1, "warmup_steps": 2}, "not both"),
        ({"warmup_steps": -1}, "warmup_steps must be at least 0"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"epochs": 2, "max_steps": 10}, "epochs or max_steps"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"max_steps": 2.5}, "max_steps must be an integer"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"grad_accum": True}, "grad_accum must be an integer"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be positive"),
        ({"bf16": "yes"}, "bf16 must be"),
        ({"seed": -1}, "seed must be at least 0"),
        ({"shuffle": 1}, "shuffle must be"),
        ({"eval_every": 0}, "eval_every"),
        ({"checkpoint_every": 5}, "checkpoint_every needs checkpoint_dir"),
        ({"checkpoint_dir": ""}, "checkpoint_dir"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


def test_config_from_dict_and_json_errors():
    with pytest.raises(ConfigError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_json("{lr: 1}")
    assert issubclass(ConfigError, lr.LowRankError)


def test_schedule_closed_form_and_what_the_optimizer_uses():
    config = TrainConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, max_steps=6, batch_size=4)
    half_cos = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]  # cosine over steps 2..6 (T - W = 4)
    expected = [0.5e-2, 1e-2] + [1e-2 * (0.1 + 0.9 * c) for c in half_cos[1:]]
    assert [config.lr_at(s, 6) for s in range(1, 7)] == pytest.approx(expected, rel=1e-12)
    assert config.lr_at(6, 6) == pytest.approx(1e-3, rel=1e-12)
    ratio = TrainConfig(lr=1.0, warmup_ratio=0.3)  # W = ceil(0.3 · 10) = 3
    assert [ratio.lr_at(s, 10) for s in (1, 2, 3, 10)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.0], abs=1e-12)
    with pytest.raises(lr.LowRankError, match="step must be an integer from 1 to total_steps = 6"):
        config.lr_at(0, 6)

    model = attached_bert()
    with OptimizerWatch() as watch:
        result = lr.train(model, classification_examples(8), config=config, progress=False)
    assert result.steps == 6
    assert result.learning_rates == pytest.approx(expected, rel=1e-12)
    # Both parameter groups (matrices with weight decay, biases without) follow the schedule.
    assert [group_lrs for group_lrs in watch.lrs] == [[v, v] for v in result.learning_rates]


# --- data -----------------------------------------------------------------------------------------------------------


def test_collate_pads_right_with_the_right_values():
    examples = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "token_type_ids": [0, 0, 1]},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "token_type_ids": [1]},
    ]
    batch = collate(examples, pad_token_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]

    scalar = collate([{"input_ids": [1, 2], "labels": 2}, {"input_ids": [3, 4], "labels": 0}])
    assert scalar["labels"].tolist() == [2, 0] and scalar["labels"].shape == (2,)
    assert "attention_mask" not in scalar  # nothing was padded, so there is nothing to mask
    masked = collate([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 0]}, {"input_ids": [4], "attention_mask": [1]}])
    assert masked["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]


def test_collate_errors():
    with pytest.raises(lr.LowRankError, match="the same fields"):
        collate([{"input_ids": [1]}, {"input_ids": [2], "labels": 0}])
    with pytest.raises(lr.ShapeError, match="1-D tensor"):
        collate([{"input_ids": torch.ones(1, 4, dtype=torch.long)}])
    with pytest.raises(lr.LowRankError, match="'text'"):
        collate([{"input_ids": [1], "text": object()}])
    with pytest.raises(lr.LowRankError, match="dict of tensors"):
        collate([[1, 2, 3]])


# --- training -------------------------------------------------------------------------------------------------------


def test_memorises_a_tiny_task_training_adapters_only():
    model = attached_bert()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = classification_examples(8)
    config = TrainConfig(lr=1e-2, epochs=30, batch_size=4, warmup_ratio=0.1)
    result = lr.train(model, data, eval_data=data, config=config, progress=False)

    assert result.steps == 60 and len(result.losses) == 60
    assert sum(result.losses[-5:]) < 0.2 * sum(result.losses[:5])
    assert result.evals[-1].step == 60 and result.evals[-1].accuracy == 1.0
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("classifier.") for n in trainable)
    assert any(n.startswith("bert.pooler.dense.lora_B") for n in trainable)
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    assert result.tokens == 30 * sum(len(ex["input_ids"]) for ex in data)
    assert result.tokens_per_second > 0 and result.wall_time > 0
    assert model.training  # a fresh HF model is in train mode; lr.train leaves the mode as it found it


def test_causal_lm_with_padded_token_labels():
    model = tiny_llama()
    data = lm_examples(6)
    result = lr.train(model, data, config=TrainConfig(lr=1e-2, epochs=15, batch_size=3), progress=False)
    assert result.steps == 30
    assert sum(result.losses[-3:]) < 0.5 * sum(result.losses[:3])
    # Right padding with -100 labels and a zero mask leaves each example's loss as it is unpadded.
    model.eval()
    with torch.no_grad():
        padded = collate(data[:3], pad_token_id=0)
        batch_loss = model(**padded).loss
        counts = [int((ex["labels"][1:] != -100).sum()) for ex in data[:3]]
        sums = [float(model(**{k: v[None] for k, v in ex.items()}).loss) * c for ex, c in zip(data[:3], counts)]
    assert float(batch_loss) == pytest.approx(sum(sums) / sum(counts), rel=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
    data = classification_examples(10)  # 10 = 4 + 4 + 2: the last step is short in both runs
    results, weights = [], []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        model = attached_bert()
        config = TrainConfig(lr=5e-3, weight_decay=0.01, epochs=2, batch_size=batch_size, grad_accum=grad_accum)
        results.append(lr.train(model, data, config=config, progress=False))
        weights.append(adapter_weights(model))
    big, accumulated = results
    assert big.steps == accumulated.steps == 6
    assert accumulated.losses == pytest.approx(big.losses, abs=1e-6)
    assert accumulated.grad_norms == pytest.approx(big.grad_norms, rel=1e-5)
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=1e-6, msg=name)
    b_weights = [n for n in weights[0] if n.endswith("lora_B.weight")]
    assert b_weights and all(weights[0][n].abs().max() > 1e-3 for n in b_weights)


def test_clipping_bounds_what_the_optimizer_sees():
    data = classification_examples(8)
    config = TrainConfig(lr=1e-3, max_steps=4, batch_size=4, max_grad_norm=0.05)
    with OptimizerWatch() as watch:
        result = lr.train(attached_bert(), data, config=config, progress=False)
    assert len(watch.grad_norms) == 4
    assert all(norm > 0.05 for norm in result.grad_norms)  # clipping was active at every step
    assert watch.grad_norms == pytest.approx([0.05] * 4, rel=1e-4)

    with OptimizerWatch() as unclipped:
        free = lr.train(attached_bert(), data, config=TrainConfig(**{**config.to_dict(), "max_grad_norm": None}),
                        progress=False)  # fmt: skip
    assert unclipped.grad_norms == pytest.approx(free.grad_norms, rel=1e-5)
    assert free.grad_norms[0] == pytest.approx(result.grad_norms[0], rel=1e-6)  # same first step, before clipping


def test_same_seed_same_run_bit_for_bit():
    data = classification_examples(10)
    config = TrainConfig(lr=5e-3, epochs=2, batch_size=3, grad_accum=2, weight_decay=0.01, warmup_steps=1, seed=3)
    runs = []
    for seed in (3, 3, 4):
        model = attached_bert(dropout=0.1, lora_dropout=0.1)
        result = lr.train(model, data, config=TrainConfig(**{**config.to_dict(), "seed": seed}), progress=False)
        runs.append((result.losses, adapter_weights(model)))
    (losses_a, weights_a), (losses_b, weights_b), (losses_c, _) = runs
    assert losses_a == losses_b
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
    assert losses_a != losses_c  # the seed drives the data order and dropout


def test_eval_loss_and_accuracy_match_a_per_example_oracle():
    model = attached_bert()
    train_data = classification_examples(8, seed=1)
    eval_data = classification_examples(7, seed=2, with_mask=True)
    config = TrainConfig(lr=5e-3, max_steps=4, batch_size=4, eval_every=2, eval_batch_size=3)
    result = lr.train(model, train_data, eval_data=eval_data, config=config, progress=False)
    assert [e.step for e in result.evals] == [2, 4]  # the step-4 evaluation is also the final one

    model.eval()
    with torch.no_grad():
        outputs = [model(**{k: v[None] for k, v in ex.items()}) for ex in eval_data]
    oracle_loss = sum(float(o.loss) for o in outputs) / len(eval_data)
    oracle_accuracy = sum(int(o.logits.argmax(-1)) == int(ex["labels"]) for o, ex in zip(outputs, eval_data)) / 7
    final = result.evals[-1]
    assert final.examples == 7
    assert final.loss == pytest.approx(oracle_loss, rel=1e-5)
    assert final.accuracy == pytest.approx(oracle_accuracy, abs=1e-12)
    assert lr.evaluate(model, eval_data, batch_size=2).accuracy == final.accuracy

    lm = tiny_llama()
    assert lr.evaluate(lm, lm_examples(3)).accuracy is None  # token-level labels: no classification accuracy


# --- checkpoints and resume -----------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def interrupt_after(model, micro_batches):
    """A loss_fn that crashes the run at the training micro-batch after ``micro_batches``, as a killed job would."""
    calls = [0]

    def loss_fn(outputs, batch):
        if model.training:
            calls[0] += 1
            if calls[0] > micro_batches:
                raise Interrupted
        return outputs.loss

    return loss_fn


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    train_data = classification_examples(10, seed=1)
    eval_data = classification_examples(4, seed=2)
    # 10 examples, 2 per micro-batch, 2 per step: steps of 4, 4, 2 examples → 3 steps per epoch, 9 in all; the
    # checkpoint at step 4 is mid-epoch, and epoch 3 draws a new order after the resume. Dropout, weight decay,
    # warmup and cosine decay are on, so RNG, data-order, optimizer and scheduler state all matter.
    config = TrainConfig(
        lr=5e-3, weight_decay=0.01, warmup_steps=2, min_lr_ratio=0.1, epochs=3, batch_size=2, grad_accum=2,
        eval_every=3, seed=5,
    )  # fmt: skip

    straight_model = attached_bert(dropout=0.1, lora_dropout=0.1)
    straight = lr.train(straight_model, train_data, eval_data=eval_data, config=config, progress=False)

    checkpointing = TrainConfig(**{**config.to_dict(), "checkpoint_dir": str(tmp_path), "checkpoint_every": 2})
    model = attached_bert(dropout=0.1, lora_dropout=0.1)
    with pytest.raises(Interrupted):
        # Steps 1-4 take 2 + 2 + 1 + 2 = 7 micro-batches; the 8th, inside step 5, never finishes.
        lr.train(model, train_data, eval_data=eval_data, config=checkpointing, loss_fn=interrupt_after(model, 7),
                 progress=False)  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["step-00000002", "step-00000004"]

    fresh = attached_bert(dropout=0.1, lora_dropout=0.1)
    torch.manual_seed(1234)  # whatever the global RNG holds now must not matter: the checkpoint restores it
    resumed = lr.train(fresh, train_data, eval_data=eval_data, config=checkpointing, resume_from=tmp_path,
                       progress=False)  # fmt: skip
    assert resumed.resumed_from == 4 and resumed.steps == 9
    assert resumed.losses == straight.losses
    assert resumed.losses[4:] == straight.losses[4:] and len(resumed.losses) == 9
    assert resumed.learning_rates == straight.learning_rates
    assert resumed.evals == straight.evals and [e.step for e in resumed.evals] == [3, 6, 9]
    expected = adapter_weights(straight_model)
    got = adapter_weights(fresh)
    b_names = [n for n in expected if n.endswith("lora_B.weight")]
    assert b_names and all(torch.equal(got[n], expected[n]) for n in b_names)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert resumed.checkpoint == str(tmp_path / "step-00000009")
    assert 0 < resumed.tokens < straight.tokens  # this call trained steps 5-9 only


def test_checkpoint_files_hold_no_pickle_and_follow_the_naming_scheme(tmp_path):
    model = attached_bert()
    config = TrainConfig(lr=1e-3, max_steps=3, batch_size=4, checkpoint_dir=str(tmp_path / "ckpt"))
    result = lr.train(model, classification_examples(8), config=config, progress=False)
    where = tmp_path / "ckpt" / "step-00000003"
    assert result.checkpoint == str(where)
    assert os.listdir(tmp_path / "ckpt") == ["step-00000003"]  # no temporary directory left behind
    assert sorted(os.listdir(where)) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json",
    ]  # fmt: skip

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with safe_open(str(where / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(trainable)
        assert all(torch.equal(f.get_tensor(n), trainable[n].detach()) for n in trainable)
    with safe_open(str(where / "optimizer.safetensors"), "pt") as f:
        expected = {f"optimizer/{n}/{k}" for n in trainable for k in ("step", "exp_avg", "exp_avg_sq")}
        assert set(f.keys()) == expected
    with safe_open(str(where / "rng.safetensors"), "pt") as f:
        assert {"rng/torch_cpu", "rng/data_order", "rng/epoch_order"} <= set(f.keys())
    state = json.loads((where / "trainer_state.json").read_text())
    assert state["format"] == "lowrank_rs.train_checkpoint" and state["step"] == 3
    assert state["history"]["losses"] == result.losses
    assert TrainConfig.from_dict(state["config"]) == config
    named_groups = [g["params"] for g in state["optimizer"]["param_groups"]]
    assert sorted(n for g in named_groups for n in g) == sorted(trainable)

    # A finished run resumes to itself: nothing left to train, the same history.
    again = lr.train(attached_bert(), classification_examples(8), config=config, resume_from=where, progress=False)
    assert again.losses == result.losses and again.steps == 3 and again.tokens == 0
    assert again.checkpoint == str(where) and os.listdir(tmp_path / "ckpt") == ["step-00000003"]


def test_resume_errors(tmp_path):
    data = classification_examples(8)
    config = TrainConfig(lr=1e-3, max_steps=2, batch_size=4, checkpoint_dir=str(tmp_path))
    lr.train(attached_bert(), data, config=config, progress=False)

    with pytest.raises(CheckpointError, match=r"different config: lr \(0.001 → 0.002\)"):
        lr.train(attached_bert(), data, config=TrainConfig(**{**config.to_dict(), "lr": 2e-3}), resume_from=tmp_path,
                 progress=False)  # fmt: skip
    with pytest.raises(CheckpointError, match="8 examples; train_data has 7"):
        lr.train(attached_bert(), data[:7], config=config, resume_from=tmp_path, progress=False)
    other = lr.attach(tiny_bert(), LoraConfig(["query", "key"], r=4, modules_to_save=["classifier"]))
    with pytest.raises(CheckpointError, match="trainable parameters"):
        lr.train(other, data, config=config, resume_from=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        lr.train(attached_bert(), data, config=config, resume_from=tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        lr.train(attached_bert(), data, config=config, resume_from=tmp_path / "empty", progress=False)
    state_file = tmp_path / "step-00000002" / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        lr.train(attached_bert(), data, config=config, resume_from=tmp_path, progress=False)


# --- errors and options ---------------------------------------------------------------------------------------------


def test_training_errors():
    data = classification_examples(4)
    with pytest.raises(lr.LowRankError, match=r"call lr\.attach"):
        lr.train(tiny_bert().requires_grad_(False), data, progress=False)
    with pytest.raises(lr.EmptyInputError, match="train_data is empty"):
        lr.train(attached_bert(), [], progress=False)
    with pytest.raises(lr.EmptyInputError, match="eval_data is empty"):
        lr.train(attached_bert(), data, eval_data=[], progress=False)
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    with pytest.raises(lr.LowRankError, match=r"sequence of examples.*pass its \.dataset"):
        lr.train(attached_bert(), loader, progress=False)
    with pytest.raises(lr.LowRankError, match="sequence of examples"):
        lr.train(attached_bert(), (ex for ex in data), progress=False)
    unlabelled = [{"input_ids": ex["input_ids"]} for ex in data]
    with pytest.raises(lr.LowRankError, match="returned no loss"):
        lr.train(attached_bert(), unlabelled, progress=False)
    with pytest.raises(lr.NonFiniteError, match="nan at step 1"):
        lr.train(attached_bert(), data, loss_fn=lambda outputs, batch: outputs.loss * float("nan"), progress=False)
    with pytest.raises(lr.LowRankError, match=r"train_data\[3\] has fields \['input_ids'\], but train_data\[0\]"):
        lr.train(attached_bert(), [*data[:3], {"input_ids": torch.tensor([1, 2])}], progress=False,
                 config=TrainConfig(batch_size=4, shuffle=False))  # fmt: skip
    with pytest.raises(lr.LowRankError, match="TrainConfig"):
        lr.train(attached_bert(), data, config={"lr": 1e-3}, progress=False)


def test_bf16_autocast_only_when_asked_on_cpu():
    seen = []

    def loss_fn(outputs, batch):
        seen.append(outputs.logits.dtype)
        return outputs.loss

    data = classification_examples(4)
    for bf16 in (None, True):
        model = attached_bert()
        lr.train(model, data, config=TrainConfig(max_steps=1, batch_size=4, bf16=bf16), loss_fn=loss_fn,
                 progress=False)  # fmt: skip
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert seen == [torch.float32, torch.bfloat16]


def test_progress_bar_shows_loss_lr_and_tokens_per_second(capsys):
    lr.train(attached_bert(), classification_examples(4), config=TrainConfig(max_steps=2, batch_size=2))
    err = capsys.readouterr().err
    assert "loss=" in err and "lr=" in err and "tok/s=" in err and "2/2" in err


# --- Hugging Face Trainer -------------------------------------------------------------------------------------------


def test_attached_model_trains_under_hf_trainer(tmp_path):
    pytest.importorskip("accelerate")
    model = attached_bert()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # default_data_collator stacks without padding, so the examples share one length.
    data = classification_examples(8, lengths=(6, 6), with_mask=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=data).train()

    layers = lora_layers(model)
    assert layers
    for name, layer in layers.items():
        assert not torch.equal(layer.lora_B.weight, before[f"{name}.lora_B.weight"]), name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in frozen)


# --- CUDA -----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_bf16_autocast_and_exact_resume(tmp_path):
    seen = []
    data = classification_examples(10, seed=1)
    config = TrainConfig(lr=5e-3, epochs=2, batch_size=2, grad_accum=2, warmup_steps=1, seed=2)

    straight_model = attached_bert(dropout=0.1, lora_dropout=0.1).cuda()
    straight = lr.train(straight_model, data, config=config, progress=False,
                        loss_fn=lambda outputs, batch: seen.append(outputs.logits.dtype) or outputs.loss)  # fmt: skip
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in straight_model.parameters())

    checkpointing = TrainConfig(**{**config.to_dict(), "checkpoint_dir": str(tmp_path), "checkpoint_every": 2})
    model = attached_bert(dropout=0.1, lora_dropout=0.1).cuda()
    with pytest.raises(Interrupted):
        lr.train(model, data, config=checkpointing, loss_fn=interrupt_after(model, 5), progress=False)
    with safe_open(str(tmp_path / "step-00000002" / "rng.safetensors"), "pt") as f:
        assert "rng/cuda/0" in f.keys()
    fresh = attached_bert(dropout=0.1, lora_dropout=0.1).cuda()
    resumed = lr.train(fresh, data, config=checkpointing, resume_from=tmp_path, progress=False)
    # Some CUDA kernels may sum in a different order from one launch to the next, so agreement is to rounding.
    assert resumed.resumed_from == 2 and resumed.losses == pytest.approx(straight.losses, abs=1e-6)
    expected, got = adapter_weights(straight_model), adapter_weights(fresh)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
