"""TLoRA calibration checked against plain-torch oracles (hooks + float64 math, per-example ``loss.backward()``) and
numpy's exact SVD, on tiny random-initialised transformers configs (2 layers); nothing is downloaded.
"""

import copy
import importlib
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import tiny_model  # noqa: E402
from torch import nn  # noqa: E402

import lowrank_rs as lr  # noqa: E402
from lowrank_rs import ConfigError, LoraConfig, TargetError, TLoraConfig, lora_layers  # noqa: E402  # noqa: E402
from lowrank_rs.methods.tlora import CalibrationPlan, build_plan, collect_statistics  # noqa: E402

# `lowrank_rs.calibrate` as an attribute is the function; the module is needed to patch its energy threshold.
calibrate_module = importlib.import_module("lowrank_rs.methods.tlora.calibrate")

VOCAB = 96
CAUSAL = ("llama", "qwen2")
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # "dense" also matches BERT's pooler, whose input is one row per example.
    "bert": ["query", "key", "value", "dense"],
    "deberta": ["query_proj", "key_proj", "value_proj", "dense"],
}
SAVE = {"llama": [], "qwen2": [], "bert": ["classifier"], "deberta": ["classifier"]}


def tiny(family, seed=0, dtype=torch.float32):
    # DeBERTa with relative attention and shared keys: query_proj and key_proj also run on the relative position
    # embeddings, which is the case of a module called twice per forward on different tensors.
    extra = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True, position_buckets=8,
                 max_relative_positions=16) if family == "deberta" else {}  # fmt: skip
    return tiny_model(family, seed, vocab=VOCAB, dtype=dtype, **extra)


def config(family, **kwargs):
    kwargs.setdefault("r", 4)
    kwargs.setdefault("alpha", 8)
    kwargs.setdefault("num_examples", 64)
    # The oracles here compute the reference's score |W ⊙ G|, which is no longer the default.
    kwargs.setdefault("score", "reference")
    return TLoraConfig(TARGETS[family], modules_to_save=SAVE[family], **kwargs)


def examples(family, n=5, seed=0, lengths=(4, 9)):
    """Unpadded single examples, ``[1, L]`` each; causal-LM ones have a two-token prompt labelled -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (1, length), generator=g)
        ex = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if family in CAUSAL:
            labels = ids.clone()
            labels[:, :2] = -100
        else:
            labels = torch.randint(0, 3, (1,), generator=g)
        ex["labels"] = labels
        out.append(ex)
    return out


def pad(exs, family):
    """One right-padded batch of ``exs``; padding is labelled -100 for causal LMs, as a collator does."""
    width = max(ex["input_ids"].shape[1] for ex in exs)
    ids = torch.zeros(len(exs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, ex in enumerate(exs):
        length = ex["input_ids"].shape[1]
        ids[i, :length] = ex["input_ids"][0]
        mask[i, :length] = 1
        if family in CAUSAL:
            labels[i, :length] = ex["labels"][0]
    if family not in CAUSAL:
        labels = torch.cat([ex["labels"] for ex in exs])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def oracle_covariances(model, exs, names, center, count_prompt_tokens=True):
    """Each module's input covariance from plain forward hooks and float64 torch, one unpadded example at a time."""
    seen = {n: [] for n in names}
    hooks = []
    for n in names:

        def record(module, args, output, n=n):
            x = args[0].detach().double()
            if x.dim() == 3 and x.shape[:2] == (1, current["length"]):
                seen[n].append(("tokens", x[0][current["keep"]]))
            elif x.dim() == 2:
                seen[n].append(("rows", x))

        hooks.append(model.get_submodule(n).register_forward_hook(record))
    current = {}
    try:
        with torch.no_grad():
            for ex in exs:
                current["length"] = ex["input_ids"].shape[1]
                keep = torch.ones(current["length"], dtype=torch.bool)
                if not count_prompt_tokens:
                    keep &= ex["labels"][0] != -100
                current["keep"] = keep
                model(**ex)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, parts in seen.items():
        xs = [x for _, x in parts]
        kind = parts[0][0]
        allx = torch.cat(xs)
        if center == "none":
            c = allx.T @ allx / allx.shape[0]
        elif center == "global" or kind == "rows":  # one-row inputs are centred over examples (see _center_for)
            d = allx - allx.mean(0)
            c = d.T @ d / allx.shape[0]
        else:
            c = sum((x - x.mean(0)).T @ (x - x.mean(0)) for x in xs if x.shape[0]) / allx.shape[0]
        out[n] = c.numpy()
    return out


def oracle_scores(model, exs, names, loss_fn=None):
    """``mean |W ⊙ ∂L/∂W| / |W|`` with the weights requiring grad and one ``loss.backward()`` per example."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(False)
    weights = {n: m.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    sums = dict.fromkeys(names, 0.0)
    for ex in exs:
        for w in weights.values():
            w.grad = None
        out = m(**ex)
        loss = loss_fn(out, ex) if loss_fn else out.loss
        loss.backward()
        for n, w in weights.items():
            sums[n] += float((w.detach().double() * w.grad.double()).abs().sum()) / w.numel()
    return {n: s / len(exs) for n, s in sums.items()}


def assert_cov_close(actual, expected, rtol=1e-5):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def snapshot(model):
    return {
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
        ),
        "grads": [n for n, p in model.named_parameters() if p.grad is not None],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["flags"] == before["flags"]
    assert after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"] == 0
    assert after["grads"] == []
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


# --- covariance and scores against the oracles ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, center, count_prompt_tokens",
    [
        ("llama", "sequence", True),
        ("llama", "sequence", False),
        ("qwen2", "global", True),
        ("bert", "none", True),
        ("bert", "sequence", True),
        ("deberta", "global", True),
    ],
)
def test_covariance_matches_torch_oracle(family, center, count_prompt_tokens):
    model = tiny(family)
    exs = examples(family, n=5)
    cfg = config(family, center=center, count_prompt_tokens=count_prompt_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DeBERTa's relative-position calls, tested below
        stats = collect_statistics(model, [pad(exs[:3], family), pad(exs[3:], family)], cfg, progress=False)
    expected = oracle_covariances(model, exs, stats.modules, center, count_prompt_tokens)
    for name in stats.modules:
        assert_cov_close(stats.covariance(name), expected[name])
    assert stats.num_examples == 5
    if count_prompt_tokens:
        assert stats.num_tokens == sum(ex["input_ids"].shape[1] for ex in exs)
    else:
        assert stats.num_tokens == sum(int((ex["labels"] != -100).sum()) for ex in exs)


@pytest.mark.parametrize("family", ["llama", "qwen2", "bert", "deberta"])
def test_scores_match_torch_oracle(family):
    model = tiny(family)
    exs = examples(family, n=4, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = collect_statistics(model, [pad(exs, family)], config(family), progress=False)
    expected = oracle_scores(model, exs, stats.modules)
    for name in stats.modules:
        assert stats.scores[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-12), name
    assert all(s > 0 for s in stats.scores.values())
    relative_position_calls = [w for w in caught if "relative position" in str(w.message)]
    assert bool(relative_position_calls) == (family == "deberta")


def test_per_batch_scores_match_oracle_and_loss_fn():
    model = tiny("bert")
    exs = examples("bert", n=5, seed=2)
    batches = [pad(exs[:2], "bert"), pad(exs[2:], "bert")]

    def loss_fn(outputs, batch):
        return outputs.logits.float().logsumexp(-1).mean()

    cfg = config("bert", per_example_scores=False)
    stats = collect_statistics(model, batches, cfg, loss_fn=loss_fn, progress=False)
    # One backward per batch, each batch weighted by its rows.
    per_batch = [oracle_scores(model, [b], stats.modules, loss_fn) for b in batches]
    for name in stats.modules:
        expected = (2 * per_batch[0][name] + 3 * per_batch[1][name]) / 5
        assert stats.scores[name] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_padded_batch_gives_the_plan_of_unpadded_examples(family):
    model = tiny(family)
    exs = examples(family, n=5, seed=3)
    cfg = config(family, budget=4 * len(TARGETS[family]) * 2)
    padded = collect_statistics(model, [pad(exs, family)], cfg, progress=False)
    single = collect_statistics(model, exs, cfg, progress=False)
    assert padded.num_tokens == single.num_tokens
    for name in padded.modules:
        assert_cov_close(padded.covariance(name), single.covariance(name), rtol=1e-6)
        assert padded.scores[name] == pytest.approx(single.scores[name], rel=1e-5)
    assert build_plan(model, padded, cfg, progress=False).ranks == build_plan(model, single, cfg, progress=False).ranks


def test_batches_without_attention_mask_are_all_tokens():
    model = tiny("llama")
    exs = examples("llama", n=3, seed=4, lengths=(6, 6))
    cfg = config("llama")
    with_mask = collect_statistics(model, exs, cfg, progress=False)
    without = collect_statistics(model, [{k: v for k, v in ex.items() if k != "attention_mask"} for ex in exs], cfg,
                                 progress=False)  # fmt: skip
    assert without.num_tokens == with_mask.num_tokens == 18
    for name in with_mask.modules:
        np.testing.assert_array_equal(without.covariance(name), with_mask.covariance(name))


def test_modules_reading_one_tensor_share_one_accumulator():
    model = tiny("llama")
    exs = examples("llama", n=3, seed=5)
    stats = collect_statistics(model, exs, config("llama"), progress=False)
    for layer in range(2):
        p = f"model.layers.{layer}."
        q = stats.accumulator(p + "self_attn.q_proj")
        assert q is stats.accumulator(p + "self_attn.k_proj") is stats.accumulator(p + "self_attn.v_proj")
        assert stats.accumulator(p + "mlp.gate_proj") is stats.accumulator(p + "mlp.up_proj")
        assert q is not stats.accumulator(p + "self_attn.o_proj")
        assert (p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj") in stats.shared
    assert len(stats.shared) == 4
    # The shared statistics equal what each module gets when it is calibrated alone.
    for alone in ("v_proj", "up_proj"):
        solo = collect_statistics(model, exs, TLoraConfig([alone], num_examples=64, score="reference"), progress=False)
        for name in solo.modules:
            np.testing.assert_array_equal(solo.covariance(name), stats.covariance(name))
            assert solo.scores[name] == pytest.approx(stats.scores[name], rel=1e-6)


# --- the plan -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_stats():
    model = tiny("llama")
    stats = collect_statistics(model, examples("llama", n=6, seed=6), config("llama"), progress=False)
    return model, stats


def test_basis_is_orthonormal_and_spans_the_exact_top_subspace(llama_stats):
    model, stats = llama_stats
    plan = build_plan(model, stats, config("llama", oversample=4, power_iters=2), progress=False)
    for name, m in plan.modules.items():
        a = m.a.astype(np.float64)
        w = model.get_submodule(name).weight.detach().double().numpy()
        wc = w @ stats.covariance(name)
        s = np.linalg.svd(wc, compute_uv=False)
        exact = float(np.sum(s[: m.rank] ** 2))
        captured = float(np.sum((wc @ a.T) ** 2))
        assert a.shape == (m.rank, w.shape[1]) and m.a.dtype == np.float32
        np.testing.assert_allclose(a @ a.T, np.eye(m.rank), atol=1e-5)
        assert captured >= 0.995 * exact, name
        assert m.energy_exact and m.energy == pytest.approx(captured / float(np.sum(s**2)), rel=1e-4)
        np.testing.assert_allclose(m.singular_values, s[: m.rank], rtol=1e-3)


def test_estimated_energy_is_close_to_exact(llama_stats, monkeypatch):
    model, stats = llama_stats
    cfg = config("llama")
    exact = build_plan(model, stats, cfg, progress=False)
    monkeypatch.setattr(importlib.import_module("lowrank_rs.methods.tlora.memory"), "EXACT_ENERGY_LIMIT", 0)
    estimated = build_plan(model, stats, cfg, progress=False)
    for name, m in estimated.modules.items():
        e = exact.modules[name]
        assert not m.energy_exact and e.energy_exact
        # Only the residual 1 - energy is estimated; 64 Gaussian probes keep it within a modest fraction of itself.
        assert abs(m.energy - e.energy) <= 0.25 * (1 - e.energy) + 1e-6, name


def test_wide_bases_read_the_covariance_in_float32_with_the_same_plan(llama_stats, monkeypatch):
    # Where the energy check is estimated the basis runs in float32, so the covariance is read out as float32 (half
    # the memory a basis worker holds); the plan must be exactly what the float64 read, rounded later, gave.
    model, stats = llama_stats
    cfg = config("llama")
    monkeypatch.setattr(importlib.import_module("lowrank_rs.methods.tlora.memory"), "EXACT_ENERGY_LIMIT", 0)
    read = []
    original = type(stats).covariance

    def spy(self, name, dtype="float64"):
        read.append(dtype)
        return original(self, name, dtype)

    monkeypatch.setattr(type(stats), "covariance", spy)
    narrow = build_plan(model, stats, cfg, progress=False)
    assert read and set(read) == {"float32"}
    monkeypatch.setattr(type(stats), "covariance", lambda self, name, dtype="float64": original(self, name))
    wide = build_plan(model, stats, cfg, progress=False)
    for name, m in narrow.modules.items():
        np.testing.assert_array_equal(m.a, wide.modules[name].a)
        assert m.energy == wide.modules[name].energy


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(budget=50),
        dict(budget=48, multiple_of=4, min_rank=0),
        dict(budget=30, min_rank=0, max_rank=6),
        dict(budget=42, min_rank=2, scaling="per_rank"),
        dict(budget=40, use_rslora=True, scaling="per_rank"),
    ],
)
def test_ranks_meet_the_budget_and_scales_follow_the_rule(llama_stats, kwargs):
    model, stats = llama_stats
    cfg = config("llama", **kwargs)
    plan = build_plan(model, stats, cfg, progress=False)
    n = len(stats.modules)
    assert plan.budget == sum(plan.ranks.values()) == (cfg.budget or cfg.r * n)
    scores = [stats.scores[name] for name in stats.modules]
    alphas = lr.linalg.allocate_alphas(scores, cfg.alpha)
    for (name, m), alpha in zip(plan.modules.items(), alphas):
        d_out, d_in = m.shape
        assert cfg.min_rank <= m.rank <= min(d_out, d_in, cfg.max_rank or 10**9) and m.rank % cfg.multiple_of == 0
        assert m.alpha == alpha and m.score == stats.scores[name]
        denominator = (lambda r: r**0.5) if cfg.use_rslora else (lambda r: r)
        if cfg.scaling == "reference":
            assert m.scale == alpha / denominator(cfg.r)
        else:
            assert m.scale == (alpha / denominator(m.rank) if m.rank else 0.0)
        assert m.a.shape == (m.rank, d_in)
    # Higher scores never get lower ranks (up to the caps and the rounding to multiples).
    if not kwargs:
        order = np.argsort(scores)
        ranks = np.array(list(plan.ranks.values()))[order]
        assert np.all(np.diff(ranks) >= -1)


def test_infeasible_budget_names_the_module(llama_stats):
    model, stats = llama_stats
    with pytest.raises(lr.InfeasibleError):
        build_plan(model, stats, config("llama", budget=3), progress=False)  # below min_rank × N


@pytest.mark.parametrize("train_a", [False, True])
def test_attach_plan_is_identity_at_init_and_trains_only_b(train_a):
    model = tiny("llama")
    exs = examples("llama", n=4, seed=7)
    cfg = config("llama", budget=40, min_rank=0, train_a=train_a)
    plan = lr.calibrate(model, exs, cfg, progress=False)
    base_logits = logits(model, exs[0])
    assert lr.attach(model, plan) is model
    layers = lora_layers(model)
    assert set(layers) == {n for n, r in plan.ranks.items() if r > 0}
    torch.testing.assert_close(logits(model, exs[0]), base_logits, rtol=0, atol=0)
    for name, layer in layers.items():
        m = plan.modules[name]
        np.testing.assert_array_equal(layer.lora_A.weight.detach().numpy(), m.a)
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        assert layer.r == m.rank and layer.scaling == pytest.approx(m.scale, rel=1e-15)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_B.weight" for n in layers} | ({f"{n}.lora_A.weight" for n in layers} if train_a else set())
    assert trainable == expected
    assert lr.trainable_parameters(model) == plan.trainable_parameters
    model(**exs[1]).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected


def test_attach_plan_errors():
    model = tiny("llama")
    plan = lr.calibrate(model, examples("llama", n=2), config("llama"), progress=False)
    with pytest.raises(lr.LowRankError, match="from the plan"):
        lr.attach(tiny("llama"), plan, ranks={})
    other = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2)
    )  # fmt: skip
    with pytest.raises(TargetError, match="no entry for target 'model.layers.2"):
        lr.attach(other, plan)


def test_plan_save_load_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny("bert")
    cfg = config("bert", min_rank=0, budget=24, scaling="per_rank")
    plan = lr.calibrate(model, [pad(examples("bert", n=4), "bert")], cfg, progress=False)
    assert any(r == 0 for r in plan.ranks.values())  # the rank-0 path goes through the file too
    plan.save(tmp_path / "plan")
    back = CalibrationPlan.load(tmp_path / "plan")
    assert back == plan and back.config == cfg and back.num_tokens == plan.num_tokens
    for name, m in back.modules.items():
        np.testing.assert_array_equal(m.a, plan.modules[name].a)

    text = plan.table()
    assert str(plan) == text
    for name, m in plan.modules.items():
        row = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert f" {m.rank} " in row
    assert "total rank 24" in text
    assert "score 'reference', scaling 'per_rank'" in text  # the score is named whichever it is

    png = tmp_path / "plan.png"
    plan.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    fresh = tiny("bert")
    lr.attach(fresh, back)
    assert set(lora_layers(fresh)) == {n for n, r in plan.ranks.items() if r > 0}


def test_plan_load_rejects_other_directories(tmp_path):
    model = tiny("llama")
    lr.attach(model, LoraConfig(["q_proj"], r=2))
    lr.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(lr.AdapterFormatError, match="not a calibration plan.*load_adapter"):
        CalibrationPlan.load(tmp_path / "adapter")
    plan = lr.calibrate(tiny("llama"), examples("llama", n=2), config("llama"), progress=False)
    plan.save(tmp_path / "plan")
    tensors, description = lr.package.read_adapter(tmp_path / "plan")
    description["modules"][0]["rank"] += 1
    lr.package.write_adapter(tmp_path / "bad", tensors, description)
    with pytest.raises(lr.AdapterFormatError, match="malformed"):
        CalibrationPlan.load(tmp_path / "bad")


def test_bf16_model(tmp_path):
    model = tiny("llama", dtype=torch.bfloat16)
    exs = examples("llama", n=3, seed=8)
    cfg = config("llama")
    stats = collect_statistics(model, [pad(exs, "llama")], cfg, progress=False)
    expected = oracle_covariances(model, exs, stats.modules, "sequence")
    for name in stats.modules:
        # The activations are bf16 in both; only the accumulation differs.
        assert_cov_close(stats.covariance(name), expected[name], rtol=1e-4)
    scores = oracle_scores(model, exs, stats.modules)
    for name in stats.modules:
        assert stats.scores[name] == pytest.approx(scores[name], rel=0.05)
    plan = build_plan(model, stats, cfg, progress=False)
    assert plan.budget == cfg.r * len(stats.modules)
    assert all(m.a.dtype == np.float32 and np.isfinite(m.a).all() for m in plan.modules.values())
    before = logits(model, exs[0])
    lr.attach(model, plan)
    assert next(iter(lora_layers(model).values())).lora_A.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits(model, exs[0]), before, rtol=0, atol=0)


# --- limits, errors and leaving the model alone ---------------------------------------------------------------------


def test_stops_after_num_examples_without_drawing_more_batches():
    model = tiny("bert")
    drawn = []

    def batches():
        for i in range(5):
            drawn.append(i)
            yield pad(examples("bert", n=4, seed=10 + i), "bert")

    stats = collect_statistics(model, batches(), config("bert", num_examples=6), progress=False)
    assert stats.num_examples == 6 and drawn == [0, 1]


def test_model_is_left_unchanged():
    model = tiny("bert").train()
    model.bert.embeddings.requires_grad_(False)  # a mix of flags, and train mode, must come back as they were
    model.classifier.eval()
    before = snapshot(model)
    lr.calibrate(model, [pad(examples("bert", n=3), "bert")], config("bert"), progress=False)
    assert_unchanged(model, before)


def test_no_weight_gradient_is_ever_allocated():
    model = tiny("llama").train()
    during = []

    def loss_fn(outputs, batch):
        # Checked while calibration runs: eval mode, grad on, and no parameter that backward would give a .grad.
        during.append((model.training, torch.is_grad_enabled(), any(p.requires_grad for p in model.parameters())))
        return outputs.loss

    with torch.no_grad():
        lr.calibrate(model, examples("llama", n=2), config("llama"), loss_fn=loss_fn, progress=False)
    assert during == [(False, True, False)] * 2
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


def test_errors_leave_the_model_unchanged(monkeypatch):
    model = tiny("bert")
    before = snapshot(model)
    cfg = config("bert")
    no_labels = [{k: v for k, v in pad(examples("bert", n=2), "bert").items() if k != "labels"}]
    with pytest.raises(lr.LowRankError, match="returned no loss.*loss_fn"):
        lr.calibrate(model, no_labels, cfg, progress=False)
    assert_unchanged(model, before)

    with pytest.raises(lr.EmptyInputError, match="at least one example"):
        lr.calibrate(model, [], cfg, progress=False)
    assert_unchanged(model, before)

    # A failure on the covariance thread reaches the caller.
    def broken_update(self, x, mask=None):
        raise RuntimeError("core exploded")

    monkeypatch.setattr(lr.linalg.CovarianceAccumulator, "update", broken_update)
    with pytest.raises(RuntimeError, match="core exploded"):
        lr.calibrate(model, examples("bert", n=3), cfg, progress=False)
    assert_unchanged(model, before)


def test_bad_inputs_are_clear_errors():
    model = tiny("bert")
    exs = examples("bert", n=2)
    with pytest.raises(ConfigError, match="TLoraConfig"):
        lr.calibrate(model, exs, LoraConfig(["query"]), progress=False)
    with pytest.raises(lr.LowRankError, match="dict of tensors"):
        lr.calibrate(model, [exs[0]["input_ids"]], config("bert"), progress=False)
    with pytest.raises(lr.LowRankError, match="iterable of batch dicts"):
        lr.calibrate(model, exs[0], config("bert"), progress=False)
    with pytest.raises(lr.LowRankError, match="token-aligned labels"):
        lr.calibrate(model, exs, config("bert", count_prompt_tokens=False), progress=False)
    with pytest.raises(TargetError, match="nearest"):
        lr.calibrate(model, exs, TLoraConfig(["qeury"]), progress=False)
    with pytest.raises(lr.EmptyInputError, match="attention_mask is 0 everywhere"):
        lr.calibrate(model, [{**exs[0], "attention_mask": torch.zeros_like(exs[0]["input_ids"])}], config("bert"),
                     progress=False)  # fmt: skip
    attached = tiny("bert")
    lr.attach(attached, LoraConfig(["query"]))
    with pytest.raises(lr.AdapterStateError, match="already has adapters"):
        lr.calibrate(attached, exs, config("bert"), progress=False)
    frozen_branch = tiny("llama")

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    frozen_branch.extra = Unused()
    with pytest.raises(lr.LowRankError, match="loss does not depend on any target"):
        lr.calibrate(frozen_branch, examples("llama", n=1), TLoraConfig(["proj"]), progress=False)
    with pytest.raises(lr.LowRankError, match="1 target module.*never ran.*'extra.proj'"):
        lr.calibrate(frozen_branch, examples("llama", n=1), TLoraConfig(["q_proj", "proj"]), progress=False)


def test_progress_bar_runs():
    model = tiny("llama")
    plan = lr.calibrate(model, examples("llama", n=2), config("llama"), progress=True)
    assert plan.num_examples == 2


def test_scores_and_gradient_share_summed_in_blocks_match(monkeypatch):
    # Wide gradients are summed in float64 block by block (a whole-tensor cast would double a pass's peak memory);
    # blocks far smaller than the tiny model's weights must give the same scores and shares.
    model = tiny("llama")
    exs = examples("llama", n=4, seed=9)
    cfg = config("llama", gradient_share=True)
    whole = lr.calibrate(model, exs, cfg, progress=False)
    monkeypatch.setattr(calibrate_module, "_SUM_BLOCK", 7)
    blocked = lr.calibrate(model, exs, cfg, progress=False)
    for name, m in whole.modules.items():
        assert blocked.modules[name].score == pytest.approx(m.score, rel=1e-12)
        assert blocked.modules[name].gradient_share == pytest.approx(m.gradient_share, rel=1e-6)
    values = torch.randn(1000, dtype=torch.float32)
    assert float(calibrate_module._wide_sum(values, torch.float64)) == pytest.approx(float(values.double().sum()))


@pytest.mark.parametrize("score", ["reference", "grad", "fisher"])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("share", ["off", "sketched"])
def test_scores_reduced_in_tiles_match_the_whole_gradient(monkeypatch, score, batch_size, share):
    # The tiny model's gradients fit one tile; smaller tiles (1 element: one output row per tile; 100: three rows of
    # the 32-wide inputs, the last tile partial) must give the scores of the whole gradient, per example and in
    # batches. A module whose gradient share keeps
    # G itself forms it whole; with sketches for every module (as for wide ones) no gradient is formed whole.
    import lowrank_rs.methods.tlora.memory as memory_module

    if share == "sketched":
        monkeypatch.setattr(memory_module, "GRADIENT_SKETCH_ROWS", 4)
    model = tiny("llama")
    exs = pad(examples("llama", n=4, seed=3), "llama")
    cfg = config("llama", score=score, gradient_share=share != "off", calibration_batch_size=batch_size)
    whole = lr.calibrate(model, [exs], cfg, progress=False)
    products = []
    real = calibrate_module._weight_gradient
    monkeypatch.setattr(calibrate_module, "_weight_gradient", lambda pairs: products.append(1) or real(pairs))
    for elements in (1, 100):
        monkeypatch.setattr(calibrate_module, "_TILE_ELEMENTS_CPU", elements)
        tiled = lr.calibrate(model, [exs], cfg, progress=False)
        for name, m in whole.modules.items():
            assert tiled.modules[name].score == pytest.approx(m.score, rel=1e-6)
            if share != "off":
                assert tiled.modules[name].gradient_share == pytest.approx(m.gradient_share, rel=1e-6)
            assert tiled.modules[name].rank == m.rank
    # Only the sketches' [k, d_in] products remain.
    assert len(products) == (0 if share == "off" else 2 * 4 * len(whole.modules))
