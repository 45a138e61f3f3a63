"""TLoRA's frozen-A ceiling (issue 13 item 7): the gradient-share diagnostic, ``train_a_after``, the score variants,
and ``lr.train``'s ``on_step`` — each checked against a plain-torch/numpy oracle on tiny random models."""

import copy
import dataclasses
import importlib
import json
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import tiny_model  # noqa: E402

import lowrank_rs as lr  # noqa: E402
from lowrank_rs.methods.tlora import CalibrationPlan, build_plan, collect_statistics  # noqa: E402
from lowrank_rs.methods.tlora.sharded import calibrate_sharded  # noqa: E402
from lowrank_rs.training.distributed import Distributed  # noqa: E402

calibrate_module = importlib.import_module("lowrank_rs.methods.tlora.calibrate")
memory_module = importlib.import_module("lowrank_rs.methods.tlora.memory")

VOCAB = 96
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "intermediate.dense"]}
SHARE_WARNING = "frozen A holds less than"


def examples(family, n=6, seed=0, length=(5, 9)):
    """Single-example batches ``[1, L]``, labelled (causal LM: the tokens; BERT: one of 3 classes)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        size = int(torch.randint(length[0], length[1] + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (1, size), generator=g)
        labels = ids.clone() if family == "llama" else torch.randint(0, 3, (1,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def padded(exs):
    """One right-padded batch of BERT examples (class labels)."""
    width = max(e["input_ids"].shape[1] for e in exs)
    ids = torch.zeros(len(exs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(exs):
        ids[i, : e["input_ids"].shape[1]] = e["input_ids"][0]
        mask[i, : e["input_ids"].shape[1]] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.cat([e["labels"] for e in exs])}


def config(family, **kwargs):
    kwargs.setdefault("r", 2)
    kwargs.setdefault("alpha", 4)
    kwargs.setdefault("num_examples", 64)
    return lr.TLoraConfig(TARGETS[family], **kwargs)


def calibrate(model, batches, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lr.calibrate(model, batches, cfg, progress=False)


def oracle_gradients(model, exs, names):
    """Each example's ``∂L/∂W`` per module, float64, from plain ``loss.backward()`` with the weights requiring grad."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(False)
    weights = {n: m.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    out = []
    for ex in exs:
        for w in weights.values():
            w.grad = None
        m(**ex).loss.backward()
        out.append({n: w.grad.double().numpy().copy() for n, w in weights.items()})
    return out, {n: w.detach().double().numpy() for n, w in weights.items()}


def share_oracle(gradient, a):
    a = a.astype(np.float64)
    return float(np.sum(np.square(gradient @ a.T)) / np.sum(np.square(gradient)))


# --- (a) the gradient share -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("per_example", [True, False])
def test_gradient_share_matches_numpy(family, per_example):
    model = tiny_model(family, vocab=VOCAB)
    exs = examples(family, n=5, seed=1)
    batches = exs if family == "llama" else [padded(exs[:3]), padded(exs[3:])]
    cfg = config(family, per_example_scores=per_example, budget=4 * len(TARGETS[family]))
    plan = calibrate(model, batches, cfg)
    grads, _ = oracle_gradients(model, exs, list(plan.modules))
    assert all(m.gradient_share is not None for m in plan.modules.values())
    for name, m in plan.modules.items():
        total = sum(g[name] for g in grads)
        assert m.gradient_share == pytest.approx(share_oracle(total, m.a), rel=1e-4, abs=1e-7), name
        assert 0.0 <= m.gradient_share <= 1.0


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("per_example", [True, False])
def test_wide_modules_keep_a_sketch_whose_share_is_the_sketched_formula(family, per_example, monkeypatch):
    # Modules with more outputs than GRADIENT_SKETCH_ROWS keep Ψ·ΣG, not ΣG: the sums must be exactly Ψ times the
    # oracle's, the share exactly ‖ΨG Aᵀ‖²/‖ΨG‖², and narrower modules stay exact.
    from lowrank_rs.methods.tlora.calibrate import gradient_sketch

    monkeypatch.setattr(memory_module, "GRADIENT_SKETCH_ROWS", 24)
    model = tiny_model(family, vocab=VOCAB)
    exs = examples(family, n=5, seed=1)
    batches = exs if family == "llama" else [padded(exs[:3]), padded(exs[3:])]
    cfg = config(family, per_example_scores=per_example, budget=4 * len(TARGETS[family]), gradient_share=True)
    stats = collect_statistics(model, batches, cfg, progress=False)
    plan = build_plan(model, stats, cfg, progress=False)
    grads, _ = oracle_gradients(model, exs, list(plan.modules))
    sketched = 0
    for name, m in plan.modules.items():
        total = sum(g[name] for g in grads)
        d_out = total.shape[0]
        if d_out > 24:
            psi = gradient_sketch(d_out).double().numpy()
            assert psi.shape == (24, d_out)
            np.testing.assert_allclose(psi @ psi.T, np.eye(24) * d_out / 24, atol=1e-5)
            total = psi @ total
            sketched += 1
        kept = stats.gradients[name].double().numpy()
        assert kept.shape == total.shape
        np.testing.assert_allclose(kept, total, rtol=1e-4, atol=1e-6 * np.abs(total).max())
        assert m.gradient_share == pytest.approx(share_oracle(total, m.a), rel=1e-4, abs=1e-7), name
    assert sketched > 0
    assert memory_module.gradient_sums_bytes(stats.shapes) == sum(4 * g.numel() for g in stats.gradients.values())


def test_gradient_share_is_one_for_a_full_basis_and_zero_for_rank_zero():
    model = tiny_model("llama", vocab=VOCAB)
    # hidden 32: q_proj is 32×32, so rank 32 spans every input direction; min_rank 0 lets others get none.
    cfg = lr.TLoraConfig(["q_proj"], r=16, budget=32, min_rank=0, max_rank=32, num_examples=4)
    plan = calibrate(model, examples("llama", 4), cfg)
    for m in plan.modules.values():
        if m.rank == 32:
            assert m.gradient_share == pytest.approx(1.0, abs=1e-5)
        elif m.rank == 0:
            assert m.gradient_share == 0.0


def test_low_share_warns_naming_the_modules(monkeypatch):
    model = tiny_model("llama", vocab=VOCAB)
    exs = examples("llama", 4)
    monkeypatch.setattr(calibrate_module, "GRADIENT_SHARE_WARNING", 1.01)  # every share is below it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = lr.calibrate(model, exs, config("llama"), progress=False)
    messages = [str(w.message) for w in caught if SHARE_WARNING in str(w.message)]
    assert len(messages) == 1
    assert "model.layers.0.self_attn.q_proj" in messages[0] and "train_a_after" in messages[0]
    assert plan.low_gradient_share(1.01) == list(plan.modules)

    monkeypatch.setattr(calibrate_module, "GRADIENT_SHARE_WARNING", 0.0)  # none is below it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lr.calibrate(model, exs, config("llama"), progress=False)
    assert not [w for w in caught if SHARE_WARNING in str(w.message)]


def test_no_warning_when_a_trains_or_the_share_is_not_measured(monkeypatch):
    model = tiny_model("llama", vocab=VOCAB)
    exs = examples("llama", 4)
    monkeypatch.setattr(calibrate_module, "GRADIENT_SHARE_WARNING", 1.01)
    for cfg in (config("llama", train_a_after=5), config("llama", gradient_share=False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = lr.calibrate(model, exs, cfg, progress=False)
        assert not [w for w in caught if SHARE_WARNING in str(w.message)]
    assert all(m.gradient_share is None for m in plan.modules.values())
    assert "gradient share not measured" in repr(plan) and "gradient share not measured" in plan.table()


def test_auto_measures_only_below_the_memory_limit(monkeypatch):
    model = tiny_model("llama", vocab=VOCAB)
    exs = examples("llama", 3)
    stats = collect_statistics(model, exs, config("llama"), progress=False)
    assert stats.gradients is not None and set(stats.gradients) == set(stats.modules)
    monkeypatch.setattr(memory_module, "GRADIENT_SUMS_AUTO_BYTES", 0)
    assert collect_statistics(model, exs, config("llama"), progress=False).gradients is None
    assert collect_statistics(model, exs, config("llama", gradient_share=True), progress=False).gradients is not None


def test_plan_memory_counts_the_gradient_sums():
    from lowrank_rs.methods.tlora import plan_memory

    model = tiny_model("llama", vocab=VOCAB)
    shapes = {
        n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))
    }
    plan = plan_memory(model, config("llama"))
    assert plan.gradient_bytes == 4 * sum(a * b for a, b in shapes.values())
    assert "gradient sums" in str(plan)
    assert plan_memory(model, config("llama", gradient_share=False)).gradient_bytes == 0
    # LLaMA-7B's seven projections: 24 GiB of whole sums; sketched (256 rows each) 1.09 GiB, within the automatic
    # limit. LLaMA-70B's (80 layers, 8192 wide, FFN 28672, grouped k/v): 6 GiB, over it.
    square, up, down = (4096, 4096), (11008, 4096), (4096, 11008)
    llama7b = {f"{i}.{p}": square for i in range(32) for p in ("q", "k", "v", "o")}
    llama7b.update({f"{i}.{p}": up for i in range(32) for p in ("gate", "up")})
    llama7b.update({f"{i}.down": down for i in range(32)})
    assert plan_memory(llama7b, config("llama")).gradient_bytes == 4 * 256 * 32 * (6 * 4096 + 11008)
    llama70b = {f"{i}.{p}": (8192, 8192) for i in range(80) for p in ("q", "o")}
    llama70b.update({f"{i}.{p}": (1024, 8192) for i in range(80) for p in ("k", "v")})
    llama70b.update({f"{i}.{p}": (28672, 8192) for i in range(80) for p in ("gate", "up")})
    llama70b.update({f"{i}.down": (8192, 28672) for i in range(80)})
    assert plan_memory(llama70b, config("llama")).gradient_bytes == 0
    assert plan_memory(llama70b, config("llama", gradient_share=True)).gradient_bytes > 5 * 2**30


def test_share_is_shown_in_the_table_and_repr():
    plan = calibrate(tiny_model("llama", vocab=VOCAB), examples("llama", 3), config("llama"))
    table = plan.table()
    assert "grad share" in table.splitlines()[1]
    name, m = next(iter(plan.modules.items()))
    row = next(line for line in table.splitlines() if line.startswith(name))
    assert row.rstrip().endswith(f"{100 * m.gradient_share:.1f}%")
    assert "gradient share in A" in repr(plan)


def test_running_out_of_memory_drops_the_share_and_keeps_the_scores(monkeypatch):
    model = tiny_model("llama", vocab=VOCAB, dtype=torch.float64)
    exs = examples("llama", 4, length=(6, 6))
    batches = [{k: torch.cat([e[k] for e in exs]) for k in exs[0]}]
    single = collect_statistics(model, batches, config("llama", calibration_batch_size=1), progress=False)
    original = type(model).forward

    def forward(self, *args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", forward)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = collect_statistics(model, batches, config("llama", calibration_batch_size=4), progress=False)
    assert [w for w in caught if "gradient share (TLoraConfig.gradient_share) is not measured" in str(w.message)]
    assert stats.gradients is None
    assert stats.scores == pytest.approx(single.scores, rel=1e-6)


@pytest.mark.parametrize("sketch_rows", [None, 24])
def test_sharded_path_reduces_the_gradient_sums(sketch_rows, monkeypatch):
    # One process through the sharded code: the sums (or, for modules wider than the sketch, the sketches) travel
    # packed behind the covariance and are unpacked again.
    if sketch_rows is not None:
        monkeypatch.setattr(memory_module, "GRADIENT_SKETCH_ROWS", sketch_rows)
    model = tiny_model("llama", vocab=VOCAB)
    exs = examples("llama", 5)
    cfg = config("llama", budget=12)
    single = calibrate(model, exs, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sharded = calibrate_sharded(model, exs, cfg, Distributed(), progress=False, build=build_plan)
    for name, m in single.modules.items():
        assert sharded.modules[name].gradient_share == pytest.approx(m.gradient_share, rel=1e-5), name


# --- plan files -------------------------------------------------------------------------------------------------------


def test_plan_round_trips_the_share_and_the_new_fields(tmp_path):
    cfg = config("llama", train_a_after=3, score="fisher")
    plan = calibrate(tiny_model("llama", vocab=VOCAB), examples("llama", 3), cfg)
    plan.save(tmp_path / "plan")
    loaded = CalibrationPlan.load(tmp_path / "plan")
    assert loaded == plan
    assert loaded.config.train_a_after == 3 and loaded.config.score == "fisher" and loaded.config.train_a
    assert loaded.gradient_shares == plan.gradient_shares
    assert all(s is not None for s in loaded.gradient_shares.values())


def test_an_old_plan_without_the_share_or_the_fields_loads(tmp_path):
    plan = calibrate(tiny_model("llama", vocab=VOCAB), examples("llama", 3), config("llama"))
    plan.save(tmp_path / "plan")
    path = tmp_path / "plan" / "adapter_config.json"
    description = json.loads(path.read_text())
    for field in ("train_a_after", "score", "gradient_share"):
        del description["config"][field]
    for entry in description["modules"]:
        del entry["gradient_share"]
    path.write_text(json.dumps(description))
    loaded = CalibrationPlan.load(tmp_path / "plan")
    # The defaults, except the score: a file from before the field existed was allocated by the reference's.
    assert loaded.config == dataclasses.replace(plan.config, score="reference")
    assert all(s is None for s in loaded.gradient_shares.values())
    assert "gradient share not measured" in loaded.table()


def test_a_plan_with_a_share_outside_zero_one_is_refused(tmp_path):
    plan = calibrate(tiny_model("llama", vocab=VOCAB), examples("llama", 3), config("llama"))
    plan.save(tmp_path / "plan")
    path = tmp_path / "plan" / "adapter_config.json"
    description = json.loads(path.read_text())
    description["modules"][0]["gradient_share"] = 1.5
    path.write_text(json.dumps(description))
    with pytest.raises(lr.AdapterFormatError, match="gradient share"):
        CalibrationPlan.load(tmp_path / "plan")


# --- (c) the score variants -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("score", ["reference", "grad", "fisher"])
def test_score_variants_follow_their_formulas(family, score):
    model = tiny_model(family, vocab=VOCAB)
    exs = examples(family, n=4, seed=2)
    batches = exs if family == "llama" else [padded(exs)]
    stats = collect_statistics(model, batches, config(family, score=score), progress=False)
    grads, weights = oracle_gradients(model, exs, list(stats.modules))
    formula = {
        "reference": lambda g, w: np.abs(w * g).sum(),
        "grad": lambda g, w: np.abs(g).sum(),
        "fisher": lambda g, w: np.square(g).sum(),
    }[score]
    for name in stats.modules:
        w = weights[name]
        expected = np.mean([formula(g[name], w) for g in grads]) / w.size
        assert stats.scores[name] == pytest.approx(expected, rel=1e-4, abs=1e-30), name


def test_score_variants_change_the_allocation():
    model = tiny_model("llama", vocab=VOCAB)
    exs = examples("llama", 4)
    plans = {s: calibrate(model, exs, config("llama", score=s, budget=24)) for s in ("reference", "grad", "fisher")}
    assert plans["reference"].scores != plans["grad"].scores != plans["fisher"].scores
    # Same A for the same rank: the basis does not depend on the score.
    for name, m in plans["reference"].modules.items():
        other = plans["fisher"].modules[name]
        if other.rank == m.rank:
            np.testing.assert_array_equal(other.a, m.a)


@pytest.mark.parametrize("bad", ["abs", "", None, 1])
def test_a_bad_score_is_refused(bad):
    with pytest.raises(lr.ConfigError, match="score must be one of"):
        lr.TLoraConfig(["q_proj"], score=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_a_bad_train_a_after_is_refused(bad):
    with pytest.raises(lr.ConfigError, match="train_a_after"):
        lr.TLoraConfig(["q_proj"], train_a_after=bad)


def test_a_bad_gradient_share_is_refused():
    with pytest.raises(lr.ConfigError, match="gradient_share"):
        lr.TLoraConfig(["q_proj"], gradient_share="yes")


# --- (b) freeing A ----------------------------------------------------------------------------------------------------


def train_examples(n=12, seed=3):
    return [{"input_ids": e["input_ids"][0], "labels": e["input_ids"][0]} for e in examples("llama", n, seed=seed)]


def attached(after, **kwargs):
    model = tiny_model("llama", vocab=VOCAB)
    plan = calibrate(model, examples("llama", 4), config("llama", train_a_after=after, **kwargs))
    return lr.attach(model, plan), plan


def a_of(model):
    return {n: layer.lora_A.weight.detach().clone() for n, layer in lr.lora_layers(model).items()}


def run(model, steps=6, on_step=None, **kwargs):
    cfg = lr.TrainConfig(lr=1e-2, batch_size=2, max_steps=steps, min_lr_ratio=0.5, weight_decay=0.1, seed=0, **kwargs)
    return lr.train(model, train_examples(), config=cfg, progress=False, on_step=on_step)


def a_changes(model, start):
    """Per step, whether any A moved in that step (read by on_step, right after optimizer.step())."""
    moved, last = [], dict(start)

    def on_step(step):
        now = a_of(model)
        moved.append(any(not torch.equal(now[n], last[n]) for n in now))
        last.update(now)

    return moved, on_step


def test_train_a_after_none_keeps_a_frozen():
    model, plan = attached(None)
    start = a_of(model)
    assert (
        lr.trainable_parameters(model)
        == plan.trainable_parameters
        == sum(layer.lora_B.weight.numel() for layer in lr.lora_layers(model).values())
    )
    run(model)
    after = a_of(model)
    assert all(torch.equal(after[n], start[n]) for n in start)


def test_train_a_after_zero_trains_a_from_the_start():
    model, plan = attached(0)
    layers = lr.lora_layers(model)
    assert all(layer.lora_A.weight.requires_grad for layer in layers.values())
    assert (
        lr.trainable_parameters(model)
        == plan.trainable_parameters
        == sum(layer.lora_A.weight.numel() + layer.lora_B.weight.numel() for layer in layers.values())
    )
    moved, on_step = a_changes(model, a_of(model))
    run(model, on_step=on_step)
    # Step 1: B = 0, so A's gradient is zero and AdamW moves it only by weight decay; from step 2 it trains.
    assert all(moved[1:])


@pytest.mark.parametrize("frozen", [1, 3])
def test_train_a_after_n_keeps_a_for_n_steps_then_trains_it(frozen):
    model, _ = attached(frozen)
    start = a_of(model)
    moved, on_step = a_changes(model, start)
    result = run(model, steps=frozen + 3, on_step=on_step)
    assert moved[:frozen] == [False] * frozen  # no update and no weight decay
    assert all(moved[frozen:])
    assert result.steps == frozen + 3


def test_train_a_after_n_leaves_b_training_as_with_a_frozen():
    # During the warm-up the run is the frozen-A run: A's gradient is dropped before clipping and the step.
    frozen_model, _ = attached(None)
    warm_model, _ = attached(3)
    a = run(frozen_model, steps=3, max_grad_norm=1e-3)
    b = run(warm_model, steps=3, max_grad_norm=1e-3)
    assert a.losses == b.losses and a.grad_norms == pytest.approx(b.grad_norms, rel=1e-6)
    for name, layer in lr.lora_layers(frozen_model).items():
        torch.testing.assert_close(lr.lora_layers(warm_model)[name].lora_B.weight, layer.lora_B.weight)


def test_a_trained_after_warm_up_saves_loads_merges_and_exports(tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = attached(2)
    run(model, steps=5)
    lr.save_adapter(model, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["lowrank_rs"]["config"]["train_a_after"] == 2

    fresh = tiny_model("llama", vocab=VOCAB)
    lr.load_adapter(fresh, tmp_path / "adapter")
    assert lr.adapter_config(fresh) == lr.adapter_config(model)
    ids = examples("llama", 1, seed=7)[0]["input_ids"]
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, expected)
        lr.merge(fresh)
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes our extras under the `lowrank_rs` key, which it ignores
        through_peft = peft.PeftModel.from_pretrained(tiny_model("llama", vocab=VOCAB), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(through_peft.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_an_old_adapter_file_without_the_fields_loads(tmp_path):
    model, _ = attached(None)
    lr.save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    written = json.loads(path.read_text())
    for field in ("train_a_after", "score", "gradient_share"):
        del written["lowrank_rs"]["config"][field]
    path.write_text(json.dumps(written))
    fresh = tiny_model("llama", vocab=VOCAB)
    lr.load_adapter(fresh, tmp_path / "adapter")
    assert lr.adapter_config(fresh).train_a_after is None and lr.adapter_config(fresh).score == "reference"


def test_resume_during_and_after_the_warm_up_is_exact(tmp_path):
    straight, _ = attached(2)
    expected = run(straight, steps=5)
    for stop in (1, 3):
        first, _ = attached(2)
        run(first, steps=5, checkpoint_dir=str(tmp_path / f"c{stop}"), checkpoint_every=stop)
        resumed, _ = attached(2)
        cfg = lr.TrainConfig(lr=1e-2, batch_size=2, max_steps=5, min_lr_ratio=0.5, weight_decay=0.1, seed=0,
                             checkpoint_dir=str(tmp_path / f"c{stop}"), checkpoint_every=stop)  # fmt: skip
        result = lr.train(
            resumed, train_examples(), config=cfg, progress=False,
            resume_from=os.path.join(tmp_path, f"c{stop}", f"step-{stop:08d}"),
        )  # fmt: skip
        assert result.losses == expected.losses, stop
        for name, layer in lr.lora_layers(straight).items():
            assert torch.equal(lr.lora_layers(resumed)[name].lora_A.weight, layer.lora_A.weight), (stop, name)


# --- on_step ----------------------------------------------------------------------------------------------------------


def test_on_step_is_called_once_per_step_with_the_gradients_present():
    model, _ = attached(None)
    calls = []

    def on_step(step):
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        calls.append((step, all(g is not None for g in grads.values())))

    result = run(model, steps=5, on_step=on_step, grad_accum=2)
    assert calls == [(s, True) for s in range(1, 6)]
    assert result.steps == 5


def test_on_step_sees_the_step_already_applied():
    model, _ = attached(None)
    seen = []
    before = {}

    def on_step(step):
        b = next(iter(lr.lora_layers(model).values())).lora_B.weight
        seen.append(not torch.equal(b, before["b"]))
        before["b"] = b.detach().clone()

    before["b"] = next(iter(lr.lora_layers(model).values())).lora_B.weight.detach().clone()
    run(model, steps=3, on_step=on_step)
    assert seen == [True, True, True]


@pytest.mark.parametrize("bad", [1, "print", object()])
def test_on_step_must_be_callable(bad):
    model, _ = attached(None)
    with pytest.raises(lr.InvalidArgumentError, match="on_step must be callable"):
        lr.train(model, train_examples(), config=lr.TrainConfig(max_steps=1), progress=False, on_step=bad)


SHARDED_SCRIPT = """
import json, os, sys, warnings
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import test_tlora_release as t
warnings.simplefilter("ignore")
plan = t.calibrate(t.tiny_model("llama", vocab=t.VOCAB), t.examples("llama", 6), t.config("llama", budget=12))
with open(os.path.join({out!r}, "shares.rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(plan.gradient_shares, f)
"""


def test_two_processes_give_the_single_process_shares(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    from test_distributed import torchrun

    script = tmp_path / "worker.py"
    script.write_text(SHARDED_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(tmp_path)))
    torchrun(str(script))
    single = calibrate(tiny_model("llama", vocab=VOCAB), examples("llama", 6), config("llama", budget=12))
    ranks = [json.loads((tmp_path / f"shares.rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    for name, share in single.gradient_shares.items():
        assert ranks[0][name] == pytest.approx(share, rel=1e-5), name
