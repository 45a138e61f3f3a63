"""LoRATRF: the filter against a plain-torch oracle of docs/methods.md, its place in the model, gradients, padding, NaN
safety, attach/train/save/load/merge through the one adapter code path, PEFT loading the LoRA part, composition with a
TLoRA plan, the parameter count on a DeBERTaV3-base-shaped model, export, and errors.

Every model is a tiny random-initialised transformers config (2 layers); nothing is downloaded.
"""

import copy
import dataclasses
import json
import math
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import torch.nn.functional as F  # noqa: E402
from conftest import tiny_model  # noqa: E402
from torch import nn  # noqa: E402

import lowrank_rs as lr  # noqa: E402
from lowrank_rs import (  # noqa: E402
    AdapterStateError,
    ConfigError,
    LoraConfig,
    TaskFilter,
    TLoraConfig,
    TrfConfig,
    lora_layers,  # noqa: E402
)
from lowrank_rs.adapters import config_from_dict  # noqa: E402
from lowrank_rs.methods.loratrf.filters import layer_stack, resolve, trf_filters  # noqa: E402
from lowrank_rs.package import read_adapter, write_adapter  # noqa: E402
from lowrank_rs.training import TrainConfig  # noqa: E402

FAMILIES = ["llama", "qwen2", "bert", "deberta"]
DECODERS = ("llama", "qwen2")
SITES = ["layer_output", "linear_input"]
VOCAB = 96
PREFIX = "base_model.model."


def tiny(family, seed=0, layers=2, hidden=32):
    return tiny_model(family, seed, vocab=VOCAB, layers=layers, hidden=hidden)


def batch(seed=1, rows=2, length=7, valid=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, valid:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


def randomise(model, seed=7):
    """Every LoRA factor and filter tensor non-trivial, so nothing can pass for being zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for f in trf_filters(model).values():
            f.task_vector.copy_(torch.randn(f.task_vector.shape, generator=g))
            f.C.copy_(torch.randn(f.C.shape, generator=g) * 0.3)
            f.D.copy_(torch.randn(f.D.shape, generator=g) * 0.3)


def oracle(h, t, c, d):
    """docs/methods.md as written, in float64: s = clamp(cos(h, t), 0, 1); h + (s·h) C D."""
    h, t, c, d = (x.detach().double() for x in (h, t, c, d))
    s = F.cosine_similarity(h, t.expand_as(h), dim=-1).clamp(0, 1)
    return h + (s.unsqueeze(-1) * h) @ (c @ d)


def filter_oracle(f, h):
    return oracle(h, f.task_vector, f.C, f.D)


def peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about our `lowrank_rs` config key; intended
        return peft.PeftModel.from_pretrained(base, str(path)).eval()


def layers_of(model):
    return layer_stack(model)[1]


# --- config ---------------------------------------------------------------------------------------------------------


def test_config_json_round_trip_and_tlora_part():
    config = TrfConfig(filter_rank=4, filter_site="linear_input", filter_layers=[1, 0], task_vector_init="mean")
    assert config.filter_layers == (0, 1) and config.target_modules is None and not config.resolved
    assert TrfConfig.from_json(config.to_json()) == config
    assert config_from_dict("loratrf", config.to_dict()) == config and TrfConfig.method == "loratrf"
    assert isinstance(config, LoraConfig)  # the LoRA part is a LoraConfig

    tlora = TLoraConfig(["o_proj"], r=4, alpha=8, dropout=0.1, budget=10)
    composed = TrfConfig(tlora=tlora)
    # Fields left at their defaults take the TLoRA part's values.
    assert (composed.target_modules, composed.r, composed.alpha, composed.dropout) == (("o_proj",), 4, 8.0, 0.1)
    assert TrfConfig.from_json(composed.to_json()) == composed
    assert json.loads(composed.to_json())["tlora"]["budget"] == 10
    assert TrfConfig(tlora=tlora, r=4) == composed


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"filter_rank": 0}, "filter_rank"),
        ({"filter_rank": 2.0}, "filter_rank"),
        ({"filter_site": "attention"}, "filter_site"),
        ({"filter_layers": [-1]}, "filter_layers"),
        ({"filter_layers": [0, 0]}, "twice"),
        ({"filter_layers": []}, "at least one"),
        ({"filter_layers": "0"}, "filter_layers"),
        ({"task_vector_init": "zeros"}, "task_vector_init"),
        ({"layers_module": ""}, "layers_module"),
        ({"tlora": "o_proj"}, "tlora"),
        ({"tlora": TLoraConfig(["o_proj"], r=4), "r": 8}, "differs from the TLoRA part"),
        ({"r": 0}, "r must"),
        ({"alpha": -1}, "alpha"),
        ({"target_modules": []}, "target_modules"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        TrfConfig(**kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_per_family(family):
    model = tiny(family)
    config = resolve(TrfConfig(), model)
    assert config.resolved and config.filter_layers == (0, 1)
    if family in DECODERS:
        assert (config.r, config.alpha) == (32, 64.0)
        expected = {
            f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
        }
    else:
        assert (config.r, config.alpha) == (8, 16.0)
        value = "value" if family == "bert" else "value_proj"
        expected = {
            f"{family}.encoder.layer.{i}.{m}"
            for i in range(2)
            for m in (f"attention.self.{value}", "intermediate.dense", "output.dense")
        }
    lr.attach(model, TrfConfig())
    assert set(lora_layers(model)) == expected  # never gate_proj, never the attention block's output.dense
    assert lr.adapter_config(model) == config
    assert TrfConfig(r=4).alpha is None and resolve(TrfConfig(r=4), tiny(family)).alpha == 8.0


# --- the filter on its own ------------------------------------------------------------------------------------------


def test_filter_matches_the_equations():
    torch.manual_seed(0)
    f = TaskFilter(16, 3, dtype=torch.float64)
    assert torch.equal(f.D, torch.zeros(3, 16)) and f.C.shape == (16, 3) and f.task_vector.shape == (16,)
    bound = 1 / math.sqrt(16)  # Kaiming-uniform with a=√5 over fan-in 16, as LoRA's A
    assert f.C.abs().max() <= bound and f.C.std() > bound / 4
    with torch.no_grad():
        f.D.normal_()
    h = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    t = f.task_vector.detach()
    h[0, 0, 0] = 3.0 * t  # cos = 1: the gate fully open
    h[0, 0, 1] = -2.0 * t  # cos = -1: clamped to 0, the token passes unchanged
    out = f(h)
    torch.testing.assert_close(out, filter_oracle(f, h), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out[0, 0, 1], h[0, 0, 1], atol=0, rtol=0)
    gate = f.gate(h).detach()
    assert gate.dtype == torch.float64 and gate.shape == (2, 3, 5)
    assert float(gate.min()) == 0.0 and abs(float(gate[0, 0, 0]) - 1) < 1e-6
    # Any leading dimensions, including none.
    torch.testing.assert_close(f(h[0, 0, 2]), filter_oracle(f, h[0, 0, 2]), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(f.delta_matrix(), (f.C @ f.D).float())


def test_filter_in_bf16_and_fp16_and_under_autocast():
    torch.manual_seed(0)
    f = TaskFilter(32, 4)
    with torch.no_grad():
        f.D.normal_(std=0.3)
    h = torch.randn(3, 6, 32) * 5
    expected = filter_oracle(f, h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = f(h)
    assert out.dtype == torch.float32  # the residual stream keeps its dtype
    torch.testing.assert_close(out.double(), expected, atol=0.15, rtol=0.03)

    half = copy.deepcopy(f).to(torch.bfloat16)
    out = half(h.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and half.task_vector.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), filter_oracle(half, h.to(torch.bfloat16)), atol=0.3, rtol=0.05)

    # fp16 hidden states of norm ~3000: ‖h‖² overflows fp16, the gate must not.
    big = torch.randn(4, 32) * 500
    out = f(big.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(f.gate(big.half()), f.gate(big), atol=2e-3, rtol=0)
    # A float32 filter on bf16 input (adapters kept in float32 on a bf16 model).
    assert f(h.to(torch.bfloat16)).dtype == torch.bfloat16


def test_filter_is_nan_free_at_zero_norms():
    torch.manual_seed(0)
    f = TaskFilter(8, 2)
    with torch.no_grad():
        f.D.normal_()
    h = torch.randn(4, 8, requires_grad=True)
    x = h * torch.tensor([0.0, 1.0, 1.0, 1.0]).unsqueeze(-1)  # token 0 is the zero vector
    out = f(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(8))
    assert all(torch.isfinite(p.grad).all() for p in (h, f.task_vector, f.C, f.D))

    f.zero_grad()
    with torch.no_grad():
        f.task_vector.zero_()  # a zero task vector: every gate is 0, every gradient finite
    h2 = torch.randn(4, 8, requires_grad=True)
    out = f(h2)
    torch.testing.assert_close(out, h2, atol=0, rtol=0)
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (h2, f.task_vector, f.C, f.D))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(f(torch.zeros(2, 8))).all()

    # A NaN token (say, padding a model filled with garbage) stays in its own row.
    poisoned = torch.randn(3, 8)
    poisoned[1] = float("nan")
    out = f(poisoned)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


# --- in the model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_and_only_adapters_train(family, site):
    model = tiny(family)
    inputs = batch()
    before = logits(model, inputs)
    assert lr.attach(model, TrfConfig(filter_site=site, filter_rank=4, init_seed=0)) is model
    torch.testing.assert_close(logits(model, inputs), before, atol=0, rtol=0)

    filters = trf_filters(model)
    layers = lora_layers(model)
    if site == "layer_output":
        assert sorted(filters) == [f"{layer_stack(model)[0]}.{i}" for i in range(2)]
    else:
        assert sorted(filters) == sorted(layers)
        assert all(f.dim == layers[n].in_features for n, f in filters.items())
    assert all(torch.equal(f.D, torch.zeros_like(f.D)) for f in filters.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_{x}.weight" for n in layers for x in "AB"}
    expected |= {f"{n}.trf_filter.{p}" for n in filters for p in ("task_vector", "C", "D")}
    assert trainable == expected
    lora_count = sum(m.r * (m.in_features + m.out_features) for m in layers.values())
    filter_count = sum(f.dim * (2 * 4 + 1) for f in filters.values())
    assert lr.trainable_parameters(model) == lora_count + filter_count


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_output_filter_equals_the_oracle_in_the_model(family):
    model = tiny(family)
    seen = {}
    stack = layers_of(model)
    # Hooks registered before attach run before the filter's: they see layer 0's raw output; layer 1's pre-hook sees
    # what the model passes on, the filtered state.
    stack[0].register_forward_hook(lambda m, a, out: seen.__setitem__("raw", out if torch.is_tensor(out) else out[0]))
    stack[1].register_forward_pre_hook(lambda m, args: seen.__setitem__("next", args[0]))
    lr.attach(model, TrfConfig(filter_rank=4))
    randomise(model)
    logits(model, batch())
    f = trf_filters(model)[f"{layer_stack(model)[0]}.0"]
    torch.testing.assert_close(seen["next"].double(), filter_oracle(f, seen["raw"]), atol=1e-5, rtol=1e-5)
    assert (seen["next"] - seen["raw"]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_linear_input_filter_equals_the_oracle_in_the_model(family):
    model = tiny(family)
    lr.attach(model, TrfConfig(filter_site="linear_input", filter_rank=4))
    randomise(model)
    name, layer = next(iter(lora_layers(model).items()))
    seen = {}
    layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("raw", args[0]), prepend=True)
    layer.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out))
    logits(model, batch())
    xf = filter_oracle(trf_filters(model)[name], seen["raw"])
    base = layer.base_layer
    w, b = base.weight.double(), (base.bias.double() if base.bias is not None else 0)
    expected = xf @ w.T + b + layer.scaling * xf @ layer.lora_A.weight.double().T @ layer.lora_B.weight.double().T
    torch.testing.assert_close(seen["out"].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "deberta"])
def test_gradients_reach_d_first_then_c_and_t(family):
    """With D = 0 the first backward pass gives D a gradient and C and t exactly none; after one optimiser step
    D ≠ 0, so the second gives all three one."""
    model = tiny(family)
    lr.attach(model, TrfConfig(filter_rank=4, init_seed=0))
    inputs = batch()
    labels = inputs["input_ids"] if family in DECODERS else torch.tensor([0, 2])
    filters = trf_filters(model).values()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2):
        optimizer.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        for f in filters:
            assert f.D.grad.abs().sum() > 0
            if step == 1:
                assert torch.equal(f.C.grad, torch.zeros_like(f.C)) and torch.equal(
                    f.task_vector.grad, torch.zeros_like(f.task_vector)
                )
            else:
                assert f.C.grad.abs().sum() > 0 and f.task_vector.grad.abs().sum() > 0
        optimizer.step()


def test_lr_train_moves_d_at_step_one_and_c_t_from_step_two():
    data = [{"input_ids": torch.randint(1, VOCAB, (6,)), "labels": torch.tensor(i % 3)} for i in range(8)]
    snapshots = {}
    for steps in (1, 2):
        model = tiny("bert")
        lr.attach(model, TrfConfig(filter_rank=4, init_seed=0, modules_to_save=["classifier"]))
        start = {n: p.detach().clone() for n, p in model.named_parameters() if "trf_filter" in n}
        lr.train(
            model, data, config=TrainConfig(lr=1e-2, min_lr_ratio=1.0, max_steps=steps, batch_size=4), progress=False
        )
        snapshots[steps] = {n: not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start}
    for name, moved in snapshots[1].items():
        assert moved == name.endswith(".D"), name  # AdamW turns an exactly-zero gradient into no update
    assert all(snapshots[2].values())


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_never_changes_non_padding_outputs(family):
    model = tiny(family)
    lr.attach(model, TrfConfig(filter_rank=4, filter_site="layer_output"))
    randomise(model)
    padded = batch(valid=4)
    garbage = copy.deepcopy(padded)
    garbage["input_ids"][-1, 4:] = torch.randint(1, VOCAB, (3,))
    alone = {k: v[-1:, :4] for k, v in padded.items()}
    first, second, single = logits(model, padded), logits(model, garbage), logits(model, alone)
    if family in DECODERS:  # per-token logits: compare the real tokens
        first, second = first[-1:, :4], second[-1:, :4]
    else:
        first, second = first[-1:], second[-1:]
    torch.testing.assert_close(first, second, atol=1e-5, rtol=0)
    torch.testing.assert_close(first, single, atol=1e-5, rtol=0)


def test_merge_folds_lora_and_keeps_filters():
    model = tiny("llama")
    lr.attach(model, TrfConfig(filter_rank=4, filter_site="linear_input"))
    randomise(model)
    inputs = batch()
    adapted = logits(model, inputs)
    lr.merge(model)
    assert all(m.merged for m in lora_layers(model).values()) and len(trf_filters(model)) == 6
    torch.testing.assert_close(logits(model, inputs), adapted, atol=1e-5, rtol=0)
    # The merged forward is the base layer alone, with its input still filtered.
    name, layer = next(iter(lora_layers(model).items()))
    x = torch.randn(3, layer.in_features)
    expected = filter_oracle(trf_filters(model)[name], x) @ layer.weight.double().T
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    lr.unmerge(model)
    torch.testing.assert_close(logits(model, inputs), adapted, atol=1e-5, rtol=0)


def test_deepcopy_gives_the_copy_its_own_filters():
    model = tiny("llama")
    lr.attach(model, TrfConfig(filter_rank=4))
    randomise(model)
    twin = copy.deepcopy(model)
    inputs = batch()
    before = logits(model, inputs)
    torch.testing.assert_close(logits(twin, inputs), before, atol=0, rtol=0)
    with torch.no_grad():
        for f in trf_filters(twin).values():
            f.D.zero_()
    torch.testing.assert_close(logits(model, inputs), before, atol=0, rtol=0)  # the original's hooks use its own
    assert (logits(twin, inputs) - before).abs().max() > 1e-3


def test_torch_export_traces_the_filters_as_graph_ops():
    model = tiny("llama")
    lr.attach(model, TrfConfig(filter_rank=4))
    randomise(model)

    class Logits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(input_ids=ids, use_cache=False).logits

    ids = batch()["input_ids"]
    program = torch.export.export(Logits(model), (ids,), strict=False)
    other = torch.randint(1, VOCAB, ids.shape)
    torch.testing.assert_close(program.module()(other), Logits(model)(other), atol=1e-5, rtol=0)
    norms = [n for n in program.graph.nodes if "vector_norm" in str(n.target)]
    assert len(norms) == 2 * 2  # per filter: ‖t‖ and ‖h‖


# --- task-vector init -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", ["qwen2", "bert"])
def test_mean_init_is_the_rescaled_mean_of_non_padding_hidden_states(family, site):
    model = tiny(family)
    base = copy.deepcopy(model)
    batches = [batch(seed=1, valid=3), batch(seed=2, rows=3, valid=6)]
    lr.attach(model, TrfConfig(filter_rank=4, filter_site=site, task_vector_init="mean"), batches=batches)
    filters = trf_filters(model)

    # The oracle: hidden states at each site of the bare model, summed over tokens whose mask is 1.
    sums, counts, mask = {}, {}, {}
    modules = dict(base.named_modules())

    def record(name, x):
        x = (x if torch.is_tensor(x) else x[0]).detach().double()
        sums[name] = sums.get(name, 0) + (x * mask["m"].unsqueeze(-1)).sum(dim=(0, 1))
        counts[name] = counts.get(name, 0) + int(mask["m"].sum())

    for name in filters:
        if site == "layer_output":
            modules[name].register_forward_hook(lambda m, a, out, name=name: record(name, out))
        else:
            modules[name].register_forward_pre_hook(lambda m, args, name=name: record(name, args[0]))
    for b in batches:
        mask["m"] = b["attention_mask"].double()
        base(**b)
    for name, f in filters.items():
        mean = sums[name] / counts[name]
        expected = mean / mean.norm() * math.sqrt(f.dim)
        torch.testing.assert_close(f.task_vector.double(), expected, atol=1e-5, rtol=1e-5)
    assert counts[next(iter(filters))] == 2 * 7 - 4 + 3 * 7 - 1

    # init_task_vectors on an attached model computes the same from the filters' own inputs.
    with torch.no_grad():
        for f in filters.values():
            f.task_vector.normal_()
    lr.init_task_vectors(model, batches)
    for name, f in filters.items():
        mean = sums[name] / counts[name]
        torch.testing.assert_close(f.task_vector.double(), mean / mean.norm() * math.sqrt(f.dim), atol=1e-5, rtol=1e-5)


def test_mean_init_errors():
    with pytest.raises(ConfigError, match="batches="):
        lr.attach(tiny("bert"), TrfConfig(task_vector_init="mean"))
    with pytest.raises(lr.LowRankError, match="task_vector_init='mean' only"):
        lr.attach(tiny("bert"), TrfConfig(), batches=[batch()])
    with pytest.raises(lr.LowRankError, match="LoraConfig does not take"):
        lr.attach(tiny("bert"), LoraConfig(["query"]), batches=[batch()])
    empty = batch()
    empty["attention_mask"] = torch.zeros_like(empty["attention_mask"])
    model = tiny("bert")
    with pytest.raises(lr.EmptyInputError, match="no non-padding token"):
        lr.attach(model, TrfConfig(task_vector_init="mean"), batches=[empty])
    assert not lora_layers(model) and not trf_filters(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(lr.LowRankError, match="dict of tensors"):
        lr.attach(tiny("bert"), TrfConfig(task_vector_init="mean"), batches=[[1, 2]])
    with pytest.raises(AdapterStateError, match="no LoRATRF filters"):
        lr.init_task_vectors(tiny("bert"), [batch()])


# --- adapter files --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, site, tmp_path):
    model = tiny(family)
    fresh = copy.deepcopy(model)
    saved = ["classifier"] if family not in DECODERS else []
    config = TrfConfig(
        filter_rank=3, filter_site=site, filter_layers=[1], modules_to_save=saved, task_vector_init="mean"
    )
    lr.attach(model, config, batches=[batch()])
    randomise(model)
    inputs = batch(seed=5)
    lr.save_adapter(model, tmp_path)

    tensors, written = read_adapter(tmp_path)
    filters = trf_filters(model)
    assert written["lowrank_rs"]["method"] == "loratrf"
    assert written["lowrank_rs"]["filters"] == {n: {"dim": f.dim, "rank": 3} for n, f in filters.items()}
    for name, f in filters.items():
        for part in ("task_vector", "C", "D"):
            assert torch.equal(torch.as_tensor(tensors[f"{PREFIX}{name}.trf_filter.{part}"]), getattr(f, part).detach())
    assert all(".layers.0." not in n and ".layer.0." not in n for n in filters)  # filter_layers=[1]

    lr.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, inputs), logits(model, inputs), atol=0, rtol=0)
    assert lr.adapter_config(fresh) == lr.adapter_config(model) == resolve(config, tiny(family))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    # Loading into the attached model again replaces its weights in place.
    randomise(fresh, seed=99)
    lr.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, inputs), logits(model, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_the_lora_part(family, site, tmp_path):
    model = tiny(family)
    fresh = copy.deepcopy(model)
    saved = ["classifier"] if family not in DECODERS else []
    lr.attach(model, TrfConfig(filter_rank=4, filter_site=site, modules_to_save=saved))
    randomise(model)
    inputs = batch()
    lr.save_adapter(model, tmp_path)
    theirs = peft_load(fresh, tmp_path)

    from peft.tuners.lora import LoraLayer

    twins = {n[len(PREFIX) :]: m for n, m in theirs.named_modules() if isinstance(m, LoraLayer)}
    layers = lora_layers(model)
    assert set(twins) == set(layers)
    for name, twin in twins.items():
        assert torch.equal(twin.lora_A["default"].weight, layers[name].lora_A.weight)
        assert torch.equal(twin.lora_B["default"].weight, layers[name].lora_B.weight)
        assert twin.scaling["default"] == layers[name].scaling
    assert not any("trf_filter" in n for n, _ in theirs.named_modules())

    # With every D zeroed our filters are exactly the identity: what remains is the LoRA part, which PEFT reproduces.
    full = logits(model, inputs)
    lora_only = copy.deepcopy(model)
    with torch.no_grad():
        for f in trf_filters(lora_only).values():
            f.D.zero_()
    torch.testing.assert_close(logits(theirs, inputs), logits(lora_only, inputs), atol=1e-5, rtol=0)
    assert (full - logits(theirs, inputs)).abs().max() > 1e-3  # and the filters are not a no-op


def test_vllm_variant_is_refused_with_filters(tmp_path):
    model = tiny("llama")
    lr.attach(model, TrfConfig(filter_rank=2))
    with pytest.raises(lr.LowRankError, match="cannot run LoRATRF's filters"):
        lr.save_adapter(model, tmp_path, vllm=True)
    assert not (tmp_path / "adapter_config.json").exists()


def test_tlora_plan_drives_the_lora_part(tmp_path):
    model = tiny("bert")
    fresh = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    examples = [
        {**batch(seed=s, rows=2, length=6, valid=6), "labels": torch.randint(0, 3, (2,), generator=g)} for s in range(2)
    ]
    targets = resolve(TrfConfig(), model).target_modules
    tlora = TLoraConfig(targets, r=4, alpha=8, num_examples=4, min_rank=1, modules_to_save=["classifier"])
    plan = lr.calibrate(model, examples, tlora, progress=False)
    lr.attach(model, TrfConfig(filter_rank=2), plan=plan)

    config = lr.adapter_config(model)
    assert config.tlora == tlora and config.r == 4 and config.modules_to_save == ("classifier",)
    layers = lora_layers(model)
    assert {n: m.r for n, m in layers.items()} == {n: r for n, r in plan.ranks.items() if r > 0}
    for name, layer in layers.items():
        torch.testing.assert_close(layer.lora_A.weight, torch.as_tensor(plan.init_a[name]), atol=1e-6, rtol=0)
        assert not layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
        assert layer.scaling == pytest.approx(plan.scales[name], rel=1e-12)
    assert len(trf_filters(model)) == 2

    randomise(model)
    lr.save_adapter(model, tmp_path)
    lr.load_adapter(fresh, tmp_path)
    assert lr.adapter_config(fresh) == config
    assert all(not m.lora_A.weight.requires_grad for m in lora_layers(fresh).values())
    torch.testing.assert_close(logits(fresh, batch()), logits(model, batch()), atol=0, rtol=0)

    with pytest.raises(lr.LowRankError, match="from the plan"):
        lr.attach(tiny("bert"), TrfConfig(), plan=plan, ranks={})
    with pytest.raises(ConfigError, match="differs from the plan"):
        lr.attach(tiny("bert"), TrfConfig(tlora=TLoraConfig(targets, r=2)), plan=plan)
    with pytest.raises(lr.LowRankError, match="LoraConfig does not take"):
        lr.attach(tiny("bert"), LoraConfig(["query"]), plan=plan)


def test_parameter_count_on_a_deberta_v3_base_shape():
    """DeBERTaV3-base's shape (12 layers, d = 768, FFN 3072), on the meta device: no memory, no init cost.

    LoRA part: 12 × 8 · ((768 + 768) + (768 + 3072) + (3072 + 768)) = 884,736 — the paper's 0.88M. Filters at the
    layer outputs, r_f = 8: 12 × 768 · (2 · 8 + 1) = 156,672; at the linear inputs: 12 × (768 + 768 + 3072) · 17 =
    940,032.
    """
    config = transformers.DebertaV2Config(
        vocab_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    )
    counts = {}
    for site in SITES:
        with torch.device("meta"):
            model = transformers.DebertaV2Model(config)
        lr.attach(model, TrfConfig(filter_site=site))
        lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        filters = sum(p.numel() for n, p in model.named_parameters() if ".trf_filter." in n)
        assert lr.trainable_parameters(model) == lora + filters
        counts[site] = (lora, filters)
    assert counts["layer_output"] == (884_736, 156_672)
    assert counts["linear_input"] == (884_736, 940_032)


# --- errors ---------------------------------------------------------------------------------------------------------


def test_attach_errors():
    with pytest.raises(lr.TargetError, match="filter_layers names layer 2, but the model has 2 layers"):
        lr.attach(tiny("llama"), TrfConfig(filter_layers=[0, 2]))
    with pytest.raises(lr.TargetError, match="no default targets for model_type 'gpt2'"):
        lr.attach(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)), TrfConfig())
    with pytest.raises(lr.TargetError, match="layers_module 'blocks' matches no module"):
        lr.attach(tiny("llama"), TrfConfig(layers_module="blocks"))
    with pytest.raises(lr.TargetError, match="leave it out of filter_layers"):
        lr.attach(
            tiny("llama"), TrfConfig(target_modules=["model.layers.0.self_attn.o_proj"], filter_site="linear_input")
        )
    with pytest.raises(lr.TargetError, match="modules_to_save saves"):
        lr.attach(tiny("llama"), TrfConfig(modules_to_save=["model.layers.1"]))
    model = tiny("llama")
    lr.attach(model, TrfConfig(filter_rank=2))
    with pytest.raises(AdapterStateError, match="already"):
        lr.attach(model, TrfConfig())
    # A model with filters only (all LoRA on other modules removed) still counts as attached.
    stripped = tiny("llama")
    lr.attach(stripped, TrfConfig(filter_rank=2))
    delattr(stripped, "_lowrank_rs_attachment")
    with pytest.raises(AdapterStateError):
        lr.attach(stripped, TrfConfig())
    # layers_module picks the stack explicitly.
    explicit = tiny("bert")
    lr.attach(explicit, TrfConfig(layers_module="encoder.layer", filter_layers=[0]))
    assert list(trf_filters(explicit)) == ["bert.encoder.layer.0"]


def test_loading_into_mismatched_models(tmp_path):
    source = tiny("llama")
    lr.attach(source, TrfConfig(r=4, filter_rank=2))
    randomise(source)
    lr.save_adapter(source, tmp_path / "trf")
    plain = tiny("llama")
    lr.attach(plain, LoraConfig(["o_proj", "up_proj", "down_proj"], r=4))
    lr.save_adapter(plain, tmp_path / "lora")

    with pytest.raises(lr.ShapeError):
        lr.load_adapter(tiny("llama", hidden=48), tmp_path / "trf")
    with pytest.raises(lr.TargetError, match="does not have"):
        lr.load_adapter(tiny("llama", layers=1), tmp_path / "trf")
    attached_lora = tiny("llama")
    lr.attach(attached_lora, LoraConfig(["o_proj", "up_proj", "down_proj"], r=4))
    with pytest.raises(lr.TargetError, match="does not fit the model's LoRATRF filters"):
        lr.load_adapter(attached_lora, tmp_path / "trf")
    attached_trf = tiny("llama")
    lr.attach(attached_trf, TrfConfig(r=4, filter_rank=2))
    with pytest.raises(lr.TargetError, match="does not fit the model's LoRATRF filters"):
        lr.load_adapter(attached_trf, tmp_path / "lora")
    other_site = tiny("llama")
    lr.attach(other_site, TrfConfig(r=4, filter_rank=2, filter_site="linear_input"))
    with pytest.raises(lr.TargetError, match="filter_site"):
        lr.load_adapter(other_site, tmp_path / "trf")
    other_rank = tiny("llama")
    lr.attach(other_rank, TrfConfig(r=4, filter_rank=3))
    with pytest.raises(lr.ShapeError, match=r"has C of shape \(32, 2\); the model's filter needs \(32, 3\)"):
        lr.load_adapter(other_rank, tmp_path / "trf")

    tensors, config = read_adapter(tmp_path / "trf", framework="torch")
    key = f"{PREFIX}model.layers.0.trf_filter.D"
    write_adapter(tmp_path / "shape", {**tensors, key: torch.zeros(2, 31)}, config)
    untouched = tiny("llama")
    with pytest.raises(lr.ShapeError, match="has D of shape"):
        lr.load_adapter(untouched, tmp_path / "shape")
    assert not lora_layers(untouched) and not trf_filters(untouched)
    write_adapter(tmp_path / "missing", {k: v for k, v in tensors.items() if k != key}, config)
    with pytest.raises(lr.AdapterFormatError, match="lacks its"):
        lr.load_adapter(tiny("llama"), tmp_path / "missing")
    undescribed = {**config, "lowrank_rs": {**config["lowrank_rs"], "filters": {}}}
    write_adapter(tmp_path / "undescribed", tensors, undescribed)
    with pytest.raises(lr.AdapterFormatError, match="described under lowrank_rs.filters"):
        lr.load_adapter(tiny("llama"), tmp_path / "undescribed")
    as_lora = {**config, "lowrank_rs": {**config["lowrank_rs"], "method": "lora"}}
    write_adapter(tmp_path / "as_lora", tensors, as_lora)
    with pytest.raises(lr.AdapterFormatError, match="method is 'lora'"):
        lr.load_adapter(tiny("llama"), tmp_path / "as_lora")
    odd = {**tensors, f"{PREFIX}model.layers.0.trf_filter.E": torch.zeros(2)}
    write_adapter(tmp_path / "odd", odd, config)
    with pytest.raises(lr.AdapterFormatError, match="not one of a filter's"):
        lr.load_adapter(tiny("llama"), tmp_path / "odd")


# --- Hugging Face Trainer and gradient checkpointing ----------------------------------------------------------------


@pytest.mark.parametrize("site", SITES)
def test_gradient_checkpointing_gives_the_same_gradients(site):
    model = tiny("llama").train()
    lr.attach(model, TrfConfig(filter_rank=4, filter_site=site, init_seed=0))
    randomise(model)
    plain = copy.deepcopy(model)
    model.activation_checkpointing_enable()
    inputs = batch()
    calls = {"checkpointed": 0, "plain": 0}
    for key, m in (("checkpointed", model), ("plain", plain)):
        for layer in layers_of(m):
            # Counted where forward starts: torch stops recomputing a checkpoint once every saved tensor is back,
            # which is before the last module's forward hooks would run.
            layer.mlp.forward = counted(layer.mlp.forward, calls, key)
        m(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
    assert calls == {"checkpointed": 4, "plain": 2}  # the checkpointed layers were recomputed
    # Layer-output filters hook onto the layer's __call__ and stay outside the checkpoint of its forward (as FSDP2's
    # hooks do); linear-input filters run inside it and are recomputed. Either way: the same gradients.
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def counted(forward, calls, key):
    def wrapper(*args, **kwargs):
        calls[key] += 1
        return forward(*args, **kwargs)

    return wrapper


def test_trains_under_hf_trainer(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny("llama")
    lr.attach(model, TrfConfig(filter_rank=4, init_seed=0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = batch(rows=8)["input_ids"]
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in rows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    # Every adapter tensor moved (C and t from the second step on), nothing else did.
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name


def test_tlora_plans_warm_up_holds_for_the_lora_part():
    # train_a_after = N in the plan keeps A still for N steps under LoRATRF too, then A trains.
    model = tiny("bert")
    g = torch.Generator().manual_seed(0)
    examples = [
        {**batch(seed=s, rows=2, length=6, valid=6), "labels": torch.randint(0, 3, (2,), generator=g)} for s in range(2)
    ]
    targets = resolve(TrfConfig(), model).target_modules
    tlora = TLoraConfig(targets, r=4, alpha=8, num_examples=4, modules_to_save=["classifier"], train_a_after=2)
    plan = lr.calibrate(model, examples, tlora, progress=False)
    lr.attach(model, TrfConfig(filter_rank=2), plan=plan)
    layers = lora_layers(model)
    before = {n: m.lora_A.weight.detach().clone() for n, m in layers.items()}
    train = [{**batch(seed=9, rows=1, length=6, valid=6), "labels": torch.tensor([1])} for _ in range(4)]
    train = [{k: v[0] for k, v in row.items()} for row in train]
    config = lr.TrainConfig(lr=1e-2, batch_size=2, epochs=1, seed=0)
    lr.train(model, train, config=config, progress=False)  # 2 steps: the warm-up
    assert all(torch.equal(m.lora_A.weight, before[n]) for n, m in layers.items())
    lr.train(model, train, config=dataclasses.replace(config, epochs=2), progress=False)  # steps 1-2 again, then 3-4
    assert any(not torch.equal(m.lora_A.weight, before[n]) for n, m in layers.items())
