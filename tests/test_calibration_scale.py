"""TLoRA calibration at scale: the torch statistics backend against numpy float64 and the core backend, batched
per-example scores against batch-size-1 runs, the covariance memory planner, and their config fields."""

import importlib
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_calibrate import TARGETS, config, examples, pad, tiny  # noqa: E402

import lowrank_rs as lr  # noqa: E402
from lowrank_rs import ConfigError, InvalidArgumentError, TLoraConfig  # noqa: E402
from lowrank_rs.linalg import CovarianceAccumulator  # noqa: E402
from lowrank_rs.methods.tlora import CalibrationPlan, build_plan, collect_statistics, plan_memory  # noqa: E402
from lowrank_rs.statistics import TorchCovarianceAccumulator, make_accumulator, resolve_backend  # noqa: E402

calibrate_module = importlib.import_module("lowrank_rs.methods.tlora.calibrate")
SPLIT_WARNING = "one example per forward and backward"


# --- the torch accumulator against numpy float64 ---------------------------------------------------------------------


def oracle(batches, center):
    """float64 numpy covariance of the counted tokens of ``[(x [B, T, d], mask [B, T])]``."""
    seqs = [x[b][m[b]] for x, m in batches for b in range(x.shape[0]) if m[b].any()]
    allx = np.concatenate(seqs)
    if center == "none":
        return allx.T @ allx / len(allx), allx.mean(0)
    if center == "global":
        d = allx - allx.mean(0)
        return d.T @ d / len(allx), allx.mean(0)
    return sum((s - s.mean(0)).T @ (s - s.mean(0)) for s in seqs) / len(allx), allx.mean(0)


def random_batches(seed=0, dim=24):
    rng = np.random.default_rng(seed)
    out = []
    for rows, length in ((3, 7), (2, 11), (4, 5)):
        x = rng.standard_normal((rows, length, dim)) * rng.uniform(0.5, 3.0, dim) + rng.uniform(-2, 2, dim)
        mask = rng.random((rows, length)) < 0.8
        mask[0, :] = False  # a sequence that is all padding
        x[~mask] = np.nan  # padding is never read
        out.append((x, mask))
    return out


@pytest.mark.parametrize("center", ["sequence", "global", "none"])
@pytest.mark.parametrize("f64", [True, False])
def test_torch_accumulator_matches_numpy_float64(center, f64):
    batches = random_batches()
    acc = TorchCovarianceAccumulator(24, center, f64=f64)
    for x, mask in batches:
        acc.update(torch.from_numpy(x).float(), torch.from_numpy(mask))
    expected, mean = oracle(batches, center)
    assert acc.count == sum(int(m.sum()) for _, m in batches)
    np.testing.assert_allclose(acc.covariance(), expected, rtol=0, atol=2e-6 * np.abs(expected).max())
    np.testing.assert_allclose(acc.mean(), mean, rtol=0, atol=1e-6 * np.abs(mean).max())
    assert np.array_equal(acc.covariance(), acc.covariance().T)


@pytest.mark.parametrize("center", ["sequence", "global", "none"])
def test_torch_accumulator_merges_exactly_with_itself_and_the_core(center):
    batches = random_batches(seed=1)
    whole = TorchCovarianceAccumulator(24, center)
    parts = [TorchCovarianceAccumulator(24, center), CovarianceAccumulator(24, center)]
    for i, (x, mask) in enumerate(batches):
        whole.update(torch.from_numpy(x).float(), mask)
        parts[i % 2].update(torch.from_numpy(x).float(), mask)
    merged = TorchCovarianceAccumulator(24, center)
    merged.merge(parts[0])
    merged.merge(parts[1])
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=0, atol=1e-9)
    # The additive state is what a distributed run all-reduces: for these modes a plain sum of the parts'.
    state = merged.state()
    assert state.count == whole.count and state.scatter.dtype == torch.float64
    with pytest.raises(InvalidArgumentError):
        merged.merge(TorchCovarianceAccumulator(24, "none" if center != "none" else "global"))


def test_backend_choice():
    assert resolve_backend("auto", torch.device("cpu")) == "core"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    assert isinstance(make_accumulator(4, "none", "cpu", "torch"), TorchCovarianceAccumulator)
    with pytest.raises(InvalidArgumentError):
        resolve_backend("gpu", "cpu")
    with pytest.raises(ConfigError):
        TLoraConfig(["q"], statistics_backend="gpu")


# --- one plan whichever backend ran ---------------------------------------------------------------------------------


def assert_same_plan(a, b, score_rtol=1e-6, subspace_tol=1e-5):
    assert a.ranks == b.ranks
    assert a.scales == b.scales
    for name, m in a.modules.items():
        other = b.modules[name]
        assert m.score == pytest.approx(other.score, rel=score_rtol), name
        if m.rank:
            # The sines of the principal angles between the two row spaces.
            gap = m.a.astype(np.float64) - (m.a @ other.a.T) @ other.a
            assert np.linalg.norm(gap, 2) < subspace_tol, name


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_torch_backend_on_cpu_gives_the_core_plan(family):
    model = tiny(family)
    exs = examples(family, n=6, seed=7)
    batches = [pad(exs[:4], family), pad(exs[4:], family)]
    plans, covariances = {}, {}
    for backend in ("core", "torch"):
        cfg = config(family, statistics_backend=backend, budget=4 * len(TARGETS[family]) * 2)
        stats = collect_statistics(model, batches, cfg, progress=False)
        assert all(
            isinstance(acc, TorchCovarianceAccumulator) == (backend == "torch") for _, acc in stats._accumulators
        )
        covariances[backend] = {name: stats.covariance(name) for name in stats.modules}
        plans[backend] = build_plan(model, stats, cfg, progress=False)
    for name, core in covariances["core"].items():
        np.testing.assert_allclose(covariances["torch"][name], core, rtol=0, atol=2e-6 * np.abs(core).max())
    assert_same_plan(plans["core"], plans["torch"])


@pytest.mark.gpu
def test_cuda_statistics_give_the_cpu_plan():
    model = tiny("llama")
    exs = examples("llama", n=6, seed=8)
    cfg = config("llama", budget=56)
    cpu = lr.calibrate(model, [pad(exs, "llama")], cfg, progress=False)
    cuda_model = tiny("llama").cuda()
    stats = collect_statistics(cuda_model, [pad(exs, "llama")], cfg, progress=False)
    assert all(acc.device.type == "cuda" for _, acc in stats._accumulators)  # auto picked torch on the device
    gpu = build_plan(cuda_model, stats, cfg, progress=False)
    assert_same_plan(cpu, gpu, score_rtol=1e-4, subspace_tol=1e-3)


# --- batched per-example scores = batch size 1 ----------------------------------------------------------------------


def per_example_loss_fn(family):
    def loss_fn(outputs, batch):
        # Mean log-sum-exp of the logits per example: a loss of the whole output, padded tokens left out.
        lse = outputs.logits.logsumexp(-1)
        if lse.dim() == 1:
            return lse
        mask = batch["attention_mask"].to(lse.dtype)
        return (lse * mask).sum(1) / mask.sum(1)

    return loss_fn


def scores(model, batches, family, batch_size, loss_fn=None):
    cfg = config(family, calibration_batch_size=batch_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = collect_statistics(model, batches, cfg, loss_fn=loss_fn, progress=False)
    return stats, [str(w.message) for w in caught if SPLIT_WARNING in str(w.message)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "bert", "deberta"])
@pytest.mark.parametrize("own_loss", [True, False])
def test_batched_scores_equal_batch_size_one(family, own_loss):
    model = tiny(family, dtype=torch.float64)
    exs = examples(family, n=7, seed=9, lengths=(3, 10))
    batches = [pad(exs[:5], family), pad(exs[5:], family)]
    loss_fn = None if own_loss else per_example_loss_fn(family)
    batched, split_warnings = scores(model, batches, family, 4, loss_fn)
    single, _ = scores(model, batches, family, 1, loss_fn)
    assert batched.num_tokens == single.num_tokens
    for name in single.modules:
        assert batched.scores[name] == pytest.approx(single.scores[name], rel=1e-6), name
        # Products are f32 whatever the model's dtype, and batching changes the order of their sums.
        expected = single.covariance(name)
        np.testing.assert_allclose(batched.covariance(name), expected, rtol=0, atol=2e-6 * np.abs(expected).max())
    # DeBERTa's shared-key projections read the relative position embeddings once for the whole batch: their
    # gradient cannot be split by example, so it falls back to one example per pass (and says so).
    assert bool(split_warnings) == (family == "deberta")


@pytest.mark.parametrize(
    "num_labels, problem_type, labels",
    [
        (1, None, lambda g, n: torch.randn(n, generator=g, dtype=torch.float64)),
        (3, "multi_label_classification", lambda g, n: (torch.rand(n, 3, generator=g) > 0.5).double()),
        (3, "regression", lambda g, n: torch.randn(n, 3, generator=g, dtype=torch.float64)),
    ],
)
def test_batched_scores_for_regression_and_multi_label(num_labels, problem_type, labels):
    import transformers

    torch.manual_seed(0)
    bert = transformers.BertConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_labels=num_labels, problem_type=problem_type,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(bert).double().eval()
    exs = examples("bert", n=5, seed=10)
    batch = pad(exs, "bert")
    batch["labels"] = labels(torch.Generator().manual_seed(0), 5)
    batched, split_warnings = scores(model, [batch], "bert", 8)
    single, _ = scores(model, [batch], "bert", 1)
    assert not split_warnings
    for name in single.modules:
        assert batched.scores[name] == pytest.approx(single.scores[name], rel=1e-6), name


def test_a_scalar_loss_fn_falls_back_to_one_example_per_pass():
    model = tiny("bert", dtype=torch.float64)
    batches = [pad(examples("bert", n=4, seed=11), "bert")]

    def mean_loss(outputs, batch):
        return outputs.logits.logsumexp(-1).mean()

    fallback, split_warnings = scores(model, batches, "bert", 4, mean_loss)
    single, _ = scores(model, batches, "bert", 1, mean_loss)
    assert split_warnings and "shape [batch]" in split_warnings[0]
    assert fallback.scores == pytest.approx(single.scores, rel=1e-9)
    assert fallback.num_tokens == single.num_tokens


def test_out_of_memory_halves_the_batch_and_keeps_the_scores(monkeypatch):
    model = tiny("llama", dtype=torch.float64)
    batches = [pad(examples("llama", n=6, seed=12), "llama")]
    single, _ = scores(model, batches, "llama", 1)
    original = type(model).forward
    sizes = []

    def forward(self, *args, **kwargs):
        rows = kwargs["input_ids"].shape[0]
        sizes.append(rows)
        if rows > 2:
            raise torch.OutOfMemoryError("simulated")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", forward)
    with pytest.warns(UserWarning, match="out of device memory at 6 examples"):
        stats = collect_statistics(model, batches, config("llama", calibration_batch_size=6), progress=False)
    assert sizes[:3] == [6, 3, 1] or sizes[:2] == [6, 3]
    assert max(sizes[1:]) <= 3
    assert stats.num_tokens == single.num_tokens
    assert stats.scores == pytest.approx(single.scores, rel=1e-6)


# --- memory planner -------------------------------------------------------------------------------------------------


def llama7b_shapes():
    shapes = {}
    for i in range(32):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{i}.self_attn.{p}"] = (4096, 4096)
        shapes[f"model.layers.{i}.mlp.gate_proj"] = (11008, 4096)
        shapes[f"model.layers.{i}.mlp.up_proj"] = (11008, 4096)
        shapes[f"model.layers.{i}.mlp.down_proj"] = (4096, 11008)
    return shapes


def test_plan_memory_for_llama_7b_from_shapes():
    cfg = TLoraConfig(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    plan = plan_memory(llama7b_shapes(), cfg)
    # Per layer: q/k/v share one 4096 accumulator, o one, gate/up one, down one of 11008.
    assert len(plan.groups) == 4 * 32
    packed = 3 * (4096 * 4097 // 2 + 4096) + (11008 * 11009 // 2 + 11008)
    assert plan.accumulator_bytes == 32 * 8 * packed
    assert plan.backend == "core"
    torch_plan = plan_memory(llama7b_shapes(), cfg, device=torch.device("cuda", 0))
    assert torch_plan.backend == "torch"
    assert torch_plan.accumulator_bytes == 32 * 8 * (3 * (4096**2 + 4096) + 11008**2 + 11008)
    assert "GiB" in str(plan)


@pytest.mark.parametrize("cores, workers", [(None, 1), (1, 1), (2, 1), (3, 1), (8, 4), (64, 4)])
def test_basis_workers_default_to_half_the_cores_and_the_estimate_counts_them(monkeypatch, cores, workers):
    import lowrank_rs.methods.tlora.memory as memory_module

    monkeypatch.setattr(memory_module.os, "cpu_count", lambda: cores)
    assert memory_module.default_basis_workers() == workers
    cfg = TLoraConfig(["down_proj"])
    # Each worker holds one of the 11008-wide float32 covariances while its basis is computed.
    assert plan_memory(llama7b_shapes(), cfg).transient_bytes == workers * 4 * 11008**2
    assert plan_memory(llama7b_shapes(), cfg, basis_workers=2).transient_bytes == 2 * 4 * 11008**2


@pytest.mark.parametrize("backend", ["core", "torch"])
def test_plan_memory_matches_what_calibration_holds_and_the_cap_refuses(backend, capsys):
    model = tiny("llama")
    cfg = config("llama", statistics_backend=backend)
    estimate = plan_memory(model, cfg)
    stats = collect_statistics(model, [pad(examples("llama", n=2), "llama")], cfg, progress=True)
    assert "TLoRA covariance memory" in capsys.readouterr().err
    assert stats.covariance_bytes == estimate.accumulator_bytes
    with pytest.raises(InvalidArgumentError, match="max_covariance_bytes"):
        collect_statistics(
            model, [pad(examples("llama", n=2), "llama")], config("llama", max_covariance_bytes=1000), progress=False
        )


# --- config and plan files ------------------------------------------------------------------------------------------


def test_new_fields_validate_round_trip_and_old_plans_load(tmp_path):
    cfg = TLoraConfig(["q"], calibration_batch_size=3, statistics_backend="torch", max_covariance_bytes=10**9)
    assert TLoraConfig.from_json(cfg.to_json()) == cfg
    assert TLoraConfig(["q"]).calibration_batch_size is None
    for bad in (dict(calibration_batch_size=0), dict(max_covariance_bytes=0), dict(statistics_backend=1)):
        with pytest.raises(ConfigError):
            TLoraConfig(["q"], **bad)
    model = tiny("llama")
    plan = lr.calibrate(model, [pad(examples("llama", n=2), "llama")], config("llama"), progress=False)
    assert plan.covariance_bytes and "covariance memory" in plan.table()
    plan.save(tmp_path / "new")
    assert CalibrationPlan.load(tmp_path / "new").covariance_bytes == plan.covariance_bytes
    # A plan written before these fields existed: no covariance_bytes, a config without the new fields.
    plan.save(tmp_path / "old")
    path = tmp_path / "old" / "adapter_config.json"
    description = json.loads(path.read_text())
    del description["covariance_bytes"]
    for key in ("calibration_batch_size", "statistics_backend", "max_covariance_bytes"):
        del description["config"][key]
    path.write_text(json.dumps(description))
    old = CalibrationPlan.load(tmp_path / "old")
    assert old.covariance_bytes is None and old.ranks == plan.ranks
    assert "covariance memory" not in old.table()


def test_gradient_checkpointing_gives_the_same_statistics():
    model = tiny("llama", dtype=torch.float64)
    batches = [pad(examples("llama", n=5, seed=13), "llama")]
    cfg = config("llama", calibration_batch_size=4)
    plain = collect_statistics(model, batches, cfg, progress=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation of the name
        checkpointed = collect_statistics(model, batches, cfg, progress=False)
    assert not model.training  # the blocks' training flag, set so transformers checkpoints, is restored
    assert checkpointed.scores == pytest.approx(plain.scores, rel=1e-9)
    for name in plain.modules:
        np.testing.assert_allclose(checkpointed.covariance(name), plain.covariance(name), rtol=0, atol=1e-12)


def test_bases_in_parallel_give_the_same_plan():
    model = tiny("llama")
    cfg = config("llama", budget=60)
    stats = collect_statistics(model, [pad(examples("llama", n=4, seed=14), "llama")], cfg, progress=False)
    serial = build_plan(model, stats, cfg, progress=False, basis_workers=1)
    assert build_plan(model, stats, cfg, progress=True, basis_workers=3) == serial
    with pytest.raises(InvalidArgumentError, match="basis_workers"):
        build_plan(model, stats, cfg, progress=False, basis_workers=0)


def test_both_backends_refuse_the_same_bad_masks():
    x = torch.randn(2, 5, 8)
    for bad in (2, -1, 0.5, float("nan")):
        mask = torch.ones(2, 5)
        mask[0, 1] = bad
        for acc in (TorchCovarianceAccumulator(8, "sequence"), CovarianceAccumulator(8, "sequence")):
            with pytest.raises(InvalidArgumentError, match="0 or 1"):
                acc.update(x, mask=mask)
            assert acc.count == 0
