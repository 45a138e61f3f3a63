"""LoRA configs, the LoRA layer, attach/merge, and adapter files checked against Hugging Face PEFT as the oracle.

Every model is a tiny random-initialised transformers config (2 layers); nothing is downloaded.
"""

import copy
import json
import math
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import tiny_model  # noqa: E402
from torch import nn  # noqa: E402

import lowrank_rs as lr  # noqa: E402
from lowrank_rs import (  # noqa: E402  # noqa: E402
    AdapterStateError,
    ConfigError,
    LoraConfig,
    LoraLinear,
    TargetError,
    TLoraConfig,
    adapter_state,
    lora_layers,
)
from lowrank_rs.adapters import config_from_dict  # noqa: E402
from lowrank_rs.package import read_adapter, write_adapter  # noqa: E402

FAMILIES = ["llama", "qwen2", "bert", "deberta"]
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
    "deberta": ["query_proj", "value_proj"],
}
# Sequence classifiers keep their freshly initialised head trainable, as a user would.
SAVE = {"llama": [], "qwen2": [], "bert": ["classifier"], "deberta": ["classifier"]}


def tiny(family, seed=0, layers=2, hidden=32):
    return tiny_model(family, seed, layers=layers, hidden=hidden)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


def randomise(model, seed=7, kept=()):
    """Make every adapter (and saved module) non-trivial so a round trip that drops or mis-scales anything shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name in kept:
            for p in model.get_submodule(name).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def mixed_plan(model, targets):
    """Per-module ranks (one of them 0) and scales with no short binary expansion, like a TLoRA plan."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    cycle = [2, 5, 0, 8, 3, 1]
    ranks = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
    scales = {n: (i + 1) / 3 + 0.1 for i, n in enumerate(names)}
    return ranks, scales


def peft_load(base, path):
    with warnings.catch_warnings():
        # PEFT warns that it ignores our extras under the `lowrank_rs` key; that is the intended behaviour.
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(path)).eval()


def peft_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix) :]: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


# --- configs --------------------------------------------------------------------------------------------------------


def test_config_json_round_trip():
    lora = LoraConfig(["q_proj", "v_proj"], r=4, alpha=8, use_rslora=True, dropout=0.1, modules_to_save=["score"])
    assert LoraConfig.from_json(lora.to_json()) == lora
    assert lora.to_dict()["target_modules"] == ["q_proj", "v_proj"]
    tlora = TLoraConfig(
        r".*\.(q|v)_proj", r=16, alpha=32, budget=100, min_rank=0, max_rank=64, multiple_of=4, center="global",
        num_examples=8, count_prompt_tokens=False, scaling="per_rank", train_a=True, oversample=5, power_iters=2,
        per_example_scores=False, init_seed=3,
    )  # fmt: skip
    back = TLoraConfig.from_dict(json.loads(json.dumps(tlora.to_dict())))
    assert back == tlora and isinstance(back, TLoraConfig)
    assert config_from_dict("tlora", tlora.to_dict()) == tlora
    assert lora.scaling_for(4) == 8 / math.sqrt(4)
    assert TLoraConfig(["q"]).train_a is False and TLoraConfig(["q"]).budget is None


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (LoraConfig, dict(target_modules=[]), "target_modules"),
        (LoraConfig, dict(target_modules="(unclosed"), "target_modules"),
        (LoraConfig, dict(target_modules=["q", 3]), "target_modules"),
        (LoraConfig, dict(target_modules=["q", "q"]), "target_modules"),
        (LoraConfig, dict(target_modules=["q"], r=0), "r"),
        (LoraConfig, dict(target_modules=["q"], r=2.5), "r"),
        (LoraConfig, dict(target_modules=["q"], r=True), "r"),
        (LoraConfig, dict(target_modules=["q"], alpha=0), "alpha"),
        (LoraConfig, dict(target_modules=["q"], alpha=float("nan")), "alpha"),
        (LoraConfig, dict(target_modules=["q"], dropout=1.0), "dropout"),
        (LoraConfig, dict(target_modules=["q"], use_rslora=1), "use_rslora"),
        (LoraConfig, dict(target_modules=["q"], modules_to_save="classifier"), "modules_to_save"),
        (LoraConfig, dict(target_modules=["q"], bias="all"), "bias"),
        (LoraConfig, dict(target_modules=["q"], init_seed=-1), "init_seed"),
        (TLoraConfig, dict(target_modules=["q"], budget=0), "budget"),
        (TLoraConfig, dict(target_modules=["q"], min_rank=-1), "min_rank"),
        (TLoraConfig, dict(target_modules=["q"], min_rank=4, max_rank=2), "max_rank"),
        (TLoraConfig, dict(target_modules=["q"], multiple_of=0), "multiple_of"),
        (TLoraConfig, dict(target_modules=["q"], center="mean"), "center"),
        (TLoraConfig, dict(target_modules=["q"], num_examples=0), "num_examples"),
        (TLoraConfig, dict(target_modules=["q"], scaling="alpha"), "scaling"),
        (TLoraConfig, dict(target_modules=["q"], train_a="no"), "train_a"),
        (TLoraConfig, dict(target_modules=["q"], power_iters=-1), "power_iters"),
    ],
)
def test_config_rejects_bad_values(cls, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        cls(**kwargs)


def test_config_from_dict_errors():
    with pytest.raises(ConfigError, match=r"unknown LoraConfig field\(s\) \['lora_alpha'\].*valid fields.*'alpha'"):
        LoraConfig.from_dict({"target_modules": ["q"], "lora_alpha": 8})
    with pytest.raises(ConfigError, match="needs field"):
        TLoraConfig.from_dict({"r": 4})
    with pytest.raises(ConfigError, match="not valid JSON"):
        LoraConfig.from_json("{")
    with pytest.raises(ConfigError, match="unknown adapter method"):
        config_from_dict("vera", {"target_modules": ["q"]})
    assert issubclass(ConfigError, lr.LowRankError)


# --- the layer ------------------------------------------------------------------------------------------------------


def test_lora_linear_matches_the_equation_for_any_leading_dims():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoraLinear(base, r=3, scaling=0.7)
    assert torch.equal(layer.lora_B.weight, torch.zeros(5, 3))
    bound = 1 / math.sqrt(6)  # Kaiming-uniform with a=√5 on fan_in 6, as nn.Linear and PEFT
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 4
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 3, 4, 6)
    expected = base(x) + 0.7 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    assert layer.weight is base.weight and layer.bias is base.bias
    with pytest.raises(lr.ShapeError, match=r"\[3, 6\]"):
        LoraLinear(nn.Linear(6, 5), r=3, scaling=1.0, init_a=torch.zeros(2, 6))
    with pytest.raises(lr.LowRankError, match="nn.Linear"):
        LoraLinear(nn.Conv1d(3, 3, 1), r=1, scaling=1.0)


def test_lora_linear_under_autocast_and_bf16():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 8), r=2, scaling=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 8))
    assert y.dtype == torch.bfloat16
    half = LoraLinear(nn.Linear(8, 8).to(torch.bfloat16), r=2, scaling=1.0)
    assert half.lora_A.weight.dtype == torch.bfloat16 and half(torch.randn(3, 8, dtype=torch.bfloat16)).shape == (3, 8)


# --- the fused forward/backward node --------------------------------------------------------------------------------


def fused_pair(dtype, freeze_a, bias=True, d_in=24, d_out=20, r=4, scaling=0.75, seed=0):
    """Two identical layers with non-trivial A and B: one runs the fused node, the other the module graph."""
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias).to(dtype).requires_grad_(False)
    layer = LoraLinear(base, r=r, scaling=scaling, freeze_a=freeze_a)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer, copy.deepcopy(layer)


def run_layer(layer, x, grad, path):
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = layer(x) if path == "fused" else layer._forward_modules(x)
    y.backward(grad)
    grads = [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    return y.detach(), grads, y.grad_fn


def oracle(layer, x, grad):
    """The equations of docs/methods.md in float64, with gradients from autograd on the plain expression."""
    w, a, b = (t.detach().double().requires_grad_(True) for t in (layer.weight, layer.lora_A.weight,
                                                                    layer.lora_B.weight))  # fmt: skip
    x64 = x.detach().double().requires_grad_(True)
    y = x64 @ w.T + layer.scaling * (x64 @ a.T) @ b.T
    if layer.bias is not None:
        y = y + layer.bias.double()
    y.backward(grad.double())
    return y.detach(), [x64.grad, a.grad, b.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("freeze_a", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_node_equals_the_module_graph(dtype, freeze_a, bias):
    fused, modules = fused_pair(dtype, freeze_a, bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 24, generator=g).to(dtype).requires_grad_(True)
    grad = torch.randn(2, 5, 20, generator=g).to(dtype)
    y_f, grads_f, fn = run_layer(fused, x, grad, "fused")
    y_m, grads_m, fn_m = run_layer(modules, x, grad, "modules")
    assert type(fn).__name__ == "_LoraFunctionBackward" and type(fn_m).__name__ != type(fn).__name__
    assert (grads_f[1] is None) == freeze_a and (grads_m[1] is None) == freeze_a
    assert all(t is None or t.dtype == dtype for t in [y_f] + grads_f)
    if dtype == torch.float32:
        for got, want in zip([y_f] + grads_f, [y_m] + grads_m):
            if want is not None:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        # bf16 rounds in different places on the two paths; both must sit as close to the float64 truth as the
        # module graph (PEFT's order) does, give or take one rounding of the result.
        y_o, grads_o = oracle(fused, x, grad)
        for got, want, truth in zip([y_f] + grads_f, [y_m] + grads_m, [y_o] + grads_o):
            if want is None:
                continue
            ulp = truth.abs().max().item() * 2**-8
            err_fused = (got.double() - truth).abs().max().item()
            err_modules = (want.double() - truth).abs().max().item()
            assert err_fused <= err_modules + 2 * ulp, (err_fused, err_modules, ulp)
            torch.testing.assert_close(got.double(), want.double(), atol=4 * ulp, rtol=0)


def test_fused_node_keeps_r_numbers_per_token_when_a_is_frozen():
    """With A frozen nothing [tokens, d_in]-sized is saved for backward: only A x, r wide (the memory saving)."""
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    for freeze_a in (True, False):
        fused, _ = fused_pair(torch.float32, freeze_a, d_in=48, d_out=40, r=3)
        x = torch.randn(7, 48, requires_grad=True)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fused(x)
        parameters = {tuple(p.shape) for p in fused.parameters()}
        activations = [s for s in saved if s not in parameters]
        assert activations == ([(7, 3)] if freeze_a else [(7, 48), (7, 3)])
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_fused_node_under_cpu_autocast_matches_the_module_graph():
    fused, modules = fused_pair(torch.float32, freeze_a=True)
    x = torch.randn(3, 24, requires_grad=True)
    grad = torch.randn(3, 20).bfloat16()
    outs = {}
    for name, layer in (("fused", fused), ("modules", modules)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[name] = run_layer(layer, x, grad, name)
    (y_f, grads_f, fn), (y_m, grads_m, _) = outs["fused"], outs["modules"]
    assert type(fn).__name__ == "_LoraFunctionBackward"
    assert y_f.dtype == torch.bfloat16 and grads_f[0].dtype == torch.float32 and grads_f[2].dtype == torch.float32
    torch.testing.assert_close(y_f.float(), y_m.float(), atol=0.05, rtol=0.02)
    for got, want in zip(grads_f, grads_m):
        if want is not None:
            torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)


def test_what_the_fused_node_does_not_cover_runs_the_module_graph():
    x = torch.randn(4, 24)
    # Active dropout: the mask belongs to the module graph.
    layer = LoraLinear(nn.Linear(24, 20).requires_grad_(False), r=4, scaling=1.0, dropout=0.5)
    assert type(layer.train()(x).grad_fn).__name__ != "_LoraFunctionBackward"
    assert type(layer.eval()(x).grad_fn).__name__ == "_LoraFunctionBackward"  # dropout off in eval
    # A trainable base layer gets its gradient.
    layer = LoraLinear(nn.Linear(24, 20), r=4, scaling=1.0)
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is not None and layer.base_layer.bias.grad is not None
    # Hooks on the inner modules still fire.
    layer = LoraLinear(nn.Linear(24, 20).requires_grad_(False), r=4, scaling=1.0)
    seen = []
    layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    layer(x)
    assert seen == [(4, 20)]
    # Mixed dtypes keep the module graph's error; float64 keeps its precision under autocast.
    layer = LoraLinear(nn.Linear(24, 20).requires_grad_(False), r=4, scaling=1.0)
    with pytest.raises(RuntimeError):
        layer(x.double())
    layer = LoraLinear(nn.Linear(24, 20).double().requires_grad_(False), r=4, scaling=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.double()).dtype == torch.float64


def test_fused_node_without_grad_and_double_backward():
    fused, modules = fused_pair(torch.float32, freeze_a=True)
    x = torch.randn(5, 24)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), modules._forward_modules(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert fused(x).grad_fn is None
    x.requires_grad_(True)
    (gx,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice|once"):
        gx.sum().backward()  # the fused backward is not differentiable; it must say so rather than be wrong


@pytest.mark.parametrize("freeze_a", [True, False])
def test_fused_node_compiles_without_graph_breaks(freeze_a):
    fused, eager = fused_pair(torch.float32, freeze_a)
    x = torch.randn(3, 5, 24)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    y_c, grads_c, _ = run_layer(compiled, x.requires_grad_(True), torch.ones(3, 5, 20), "fused")
    y_e, grads_e, _ = run_layer(eager, x, torch.ones(3, 5, 20), "fused")
    torch.testing.assert_close(y_c, y_e)
    for got, want in zip(grads_c, grads_e):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want)


# --- attach ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_attach_is_identity_at_init_and_trains_only_adapters(family):
    model = tiny(family)
    inputs = batch()
    before = logits(model, inputs)
    config = LoraConfig(TARGETS[family], r=4, alpha=8, modules_to_save=SAVE[family])
    assert lr.attach(model, config) is model
    torch.testing.assert_close(logits(model, inputs), before, atol=0, rtol=0)

    layers = lora_layers(model)
    assert layers and all(isinstance(m.base_layer, nn.Linear) for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_{f}.weight" for n in layers for f in "AB"}
    expected |= {f"{m}.{p}" for m in SAVE[family] for p, _ in model.get_submodule(m).named_parameters()}
    assert trainable == expected
    per_adapter = sum(4 * (m.in_features + m.out_features) for m in layers.values())
    kept = sum(p.numel() for m in SAVE[family] for p in model.get_submodule(m).parameters())
    assert lr.trainable_parameters(model) == per_adapter + kept
    # PEFT-style names, so state dicts line up with PEFT's files.
    some = next(iter(layers))
    assert {f"{some}.base_layer.weight", f"{some}.lora_A.weight", f"{some}.lora_B.weight"} <= set(model.state_dict())


@pytest.mark.parametrize("freeze_a", [False, True])
def test_gradients_reach_the_adapter(freeze_a):
    model = tiny("llama")
    config = TLoraConfig(TARGETS["llama"], r=4, train_a=not freeze_a) if freeze_a else LoraConfig(TARGETS["llama"])
    lr.attach(model, config)
    randomise(model)  # with B = 0, A's gradient would be exactly zero and prove nothing
    model(**batch(), labels=batch()["input_ids"]).loss.backward()
    for layer in lora_layers(model).values():
        assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
        if freeze_a:
            assert not layer.lora_A.weight.requires_grad and layer.lora_A.weight.grad is None
        else:
            assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.abs().sum() > 0
        assert layer.base_layer.weight.grad is None
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_attach_with_plan_overrides():
    model = tiny("llama")
    ranks, scales = mixed_plan(model, ["q_proj", "v_proj"])
    q0 = "model.layers.0.self_attn.q_proj"
    basis = torch.linalg.qr(torch.randn(32, ranks[q0]))[0].T
    lr.attach(model, LoraConfig(["q_proj", "v_proj"], r=4, init_seed=0), ranks=ranks, scales=scales, init_a={q0: basis})
    layers = lora_layers(model)
    assert set(layers) == {n for n, r in ranks.items() if r > 0}
    # γ may move by an ulp onto a value PEFT can compute as alpha_i / r_i; see the test below.
    assert all(layers[n].r == ranks[n] and layers[n].scaling == pytest.approx(scales[n], rel=1e-15) for n in layers)
    assert torch.equal(layers[q0].lora_A.weight, basis)
    # Same seed, same initial A: adapters are reproducible.
    again = tiny("llama")
    lr.attach(again, LoraConfig(["q_proj", "v_proj"], r=4, init_seed=0), ranks=ranks, scales=scales)
    v1 = "model.layers.1.self_attn.v_proj"
    assert torch.equal(lora_layers(again)[v1].lora_A.weight, layers[v1].lora_A.weight)


@pytest.mark.parametrize("rslora", [False, True])
def test_every_stored_scale_is_one_peft_reproduces_exactly(rslora):
    from lowrank_rs.adapters.peft_format import alpha_reproducing as _alpha_reproducing
    from lowrank_rs.adapters.peft_format import peft_scale as _peft_scale

    g = torch.Generator().manual_seed(0)
    gammas = (torch.rand(3000, generator=g, dtype=torch.float64) * 20).tolist()
    ranks = torch.randint(1, 129, (3000,), generator=g).tolist()
    for gamma, r in zip(gammas, ranks):
        stored = _peft_scale(gamma, r, 16.0, rslora)
        assert abs(stored - gamma) <= 4 * math.ulp(gamma)
        alpha = _alpha_reproducing(stored, r, 16.0, rslora)
        assert (alpha / math.sqrt(r) if rslora else alpha / r) == stored  # PEFT's expression, bit for bit


def test_attach_errors():
    model = tiny("llama")
    with pytest.raises(TargetError, match=r"'q_prj' matches no module.*'q_proj'"):
        lr.attach(model, LoraConfig(["q_prj"]))
    with pytest.raises(TargetError, match=r"target regex .* matches no module name.*self_attn.q_proj"):
        lr.attach(model, LoraConfig(r"layers\.0\.q_proj"))  # fullmatch: the regex must cover the whole name
    with pytest.raises(TargetError, match=r"nn.Linear.*'model.layers.0.self_attn' \(LlamaAttention\)"):
        lr.attach(model, LoraConfig(["self_attn"]))
    with pytest.raises(TargetError, match="modules_to_save entry 'clasifier'"):
        lr.attach(model, LoraConfig(["q_proj"], modules_to_save=["clasifier"]))
    with pytest.raises(TargetError, match=r"ranks names 'model.layers.0.q_proj'.*model.layers.0.self_attn.q_proj"):
        lr.attach(model, LoraConfig(["q_proj"]), ranks={"model.layers.0.q_proj": 2})
    with pytest.raises(lr.LowRankError, match="non-negative integer"):
        lr.attach(model, LoraConfig(["q_proj"]), ranks={"model.layers.0.self_attn.q_proj": -1})
    with pytest.raises(lr.LowRankError, match="finite number"):
        lr.attach(model, LoraConfig(["q_proj"]), scales={"model.layers.0.self_attn.q_proj": float("inf")})
    with pytest.raises(lr.LowRankError, match="rank 0"):
        lr.attach(model, LoraConfig(["lm_head"]), ranks={"lm_head": 0})
    with pytest.raises(lr.ShapeError, match="init_a has shape"):
        lr.attach(model, LoraConfig(["q_proj"]), init_a={"model.layers.1.self_attn.q_proj": torch.zeros(3, 32)})
    # None of the failures above touched the model.
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(AdapterStateError):
        lr.merge(model)
    with pytest.raises(AdapterStateError, match="no adapter attached"):
        lr.save_adapter(model, "unused")
    lr.attach(model, LoraConfig(["q_proj"]))
    with pytest.raises(AdapterStateError, match="already has an adapter: LoRA"):
        lr.attach(model, LoraConfig(["v_proj"]))


# --- merge ----------------------------------------------------------------------------------------------------------


def test_merge_and_unmerge_are_exact_in_float32():
    model = tiny("qwen2")
    inputs = batch()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr.attach(model, LoraConfig(TARGETS["qwen2"], r=4, alpha=8))
    randomise(model)
    adapted = logits(model, inputs)
    lr.merge(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(logits(model, inputs), adapted, atol=1e-5, rtol=0)
    with pytest.raises(AdapterStateError, match="already merged"):
        lr.merge(model)
    lr.unmerge(model)
    torch.testing.assert_close(logits(model, inputs), adapted, atol=1e-5, rtol=0)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, base_weights[f"{name}.weight"], atol=1e-5, rtol=0)
    with pytest.raises(AdapterStateError, match="not merged"):
        lr.unmerge(model)


def test_merge_keeps_bf16():
    model = tiny("llama").to(torch.bfloat16)
    lr.attach(model, LoraConfig(TARGETS["llama"], r=4))
    randomise(model)
    layer = lora_layers(model)["model.layers.0.mlp.down_proj"]
    w0 = layer.base_layer.weight.detach().clone()
    expected = (w0.float() + layer.scaling * layer.lora_B.weight.float() @ layer.lora_A.weight.float()).bfloat16()
    adapted = logits(model, batch())
    lr.merge(model)
    assert all(layer.base_layer.weight.dtype == torch.bfloat16 for layer in lora_layers(model).values())
    assert torch.equal(layer.base_layer.weight, expected)  # one rounding, from float32
    torch.testing.assert_close(logits(model, batch()), adapted, atol=0.1, rtol=0.05)


# --- adapter files against PEFT -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["uniform", "mixed", "rslora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_our_adapter(family, variant, tmp_path):
    model = tiny(family)
    fresh = copy.deepcopy(model)
    inputs = batch()
    config = LoraConfig(TARGETS[family], r=4, alpha=8, use_rslora=variant == "rslora", modules_to_save=SAVE[family])
    ranks, scales = mixed_plan(model, TARGETS[family]) if variant == "mixed" else (None, None)
    lr.attach(model, config, ranks=ranks, scales=scales)
    randomise(model, kept=SAVE[family])
    ours = logits(model, inputs)
    assert (ours - logits(fresh, inputs)).abs().max() > 1e-3
    lr.save_adapter(model, tmp_path)

    theirs = peft_load(fresh, tmp_path)
    torch.testing.assert_close(logits(theirs, inputs), ours, atol=1e-5, rtol=0)
    # Not just close: PEFT computes each module's γ to the last bit, and adapts exactly our modules.
    layers = lora_layers(model)
    twins = peft_layers(theirs)
    assert set(twins) == set(layers)
    for name, twin in twins.items():
        assert twin.r["default"] == layers[name].r and twin.scaling["default"] == layers[name].scaling

    _, written = read_adapter(tmp_path)
    assert written["peft_type"] == "LORA" and written["bias"] == "none"
    assert written["task_type"] == ("CAUSAL_LM" if family in ("llama", "qwen2") else "SEQ_CLS")
    if variant == "mixed":
        assert written["target_modules"] == sorted(layers)  # the spec would also adapt the rank-0 modules
        assert set(written["rank_pattern"]) <= set(layers) and written["rank_pattern"]
    else:
        assert written["target_modules"] == TARGETS[family] and not written["rank_pattern"]
    assert written["lowrank_rs"]["scaling"] == {n: m.scaling for n, m in layers.items()}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_vllm_variant_folds_scales_and_pads_ranks(family, tmp_path):
    model = tiny(family)
    fresh, fresh_ours = copy.deepcopy(model), copy.deepcopy(model)
    inputs = batch()
    ranks, scales = mixed_plan(model, TARGETS[family])
    lr.attach(model, TLoraConfig(TARGETS[family], r=4, alpha=8), ranks=ranks, scales=scales)
    randomise(model)
    ours = logits(model, inputs)
    lr.save_adapter(model, tmp_path, vllm=True)

    tensors, written = read_adapter(tmp_path)
    top = max(ranks.values())
    assert written["r"] == written["lora_alpha"] == top and not written["use_rslora"]
    assert not written["rank_pattern"] and not written["alpha_pattern"] and written["modules_to_save"] is None
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {top}
    assert {t.shape[1] for k, t in tensors.items() if "lora_B" in k} == {top}

    torch.testing.assert_close(logits(peft_load(fresh, tmp_path), inputs), ours, atol=1e-5, rtol=0)
    lr.load_adapter(fresh_ours, tmp_path)
    assert {n: m.r for n, m in lora_layers(fresh_ours).items()} == {n: r for n, r in ranks.items() if r > 0}
    assert all(m.scaling == 1.0 for m in lora_layers(fresh_ours).values())
    torch.testing.assert_close(logits(fresh_ours, inputs), ours, atol=1e-5, rtol=0)

    kept = tiny("bert")
    lr.attach(kept, LoraConfig(["query"], modules_to_save=["classifier"]))
    with pytest.raises(lr.LowRankError, match="vLLM cannot load adapters with modules_to_save"):
        lr.save_adapter(kept, tmp_path / "no", vllm=True)


def test_our_round_trip_keeps_method_config_and_frozen_a(tmp_path):
    model = tiny("deberta")
    fresh = copy.deepcopy(model)
    config = TLoraConfig(TARGETS["deberta"], r=4, alpha=8, modules_to_save=["classifier"], min_rank=0)
    ranks, scales = mixed_plan(model, TARGETS["deberta"])
    lr.attach(model, config, ranks=ranks, scales=scales)
    randomise(model, kept=["classifier"])
    lr.save_adapter(model, tmp_path)
    lr.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, batch()), logits(model, batch()), atol=1e-6, rtol=0)
    assert lr.adapter_config(fresh) == config
    assert all(not m.lora_A.weight.requires_grad for m in lora_layers(fresh).values())
    assert fresh.classifier.weight.requires_grad
    state = adapter_state(model)
    assert "base_model.model.classifier.weight" in state and "base_model.model.classifier.bias" in state
    # Loading again into the attached model replaces the weights in place.
    randomise(fresh, seed=99)
    lr.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, batch()), logits(model, batch()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_we_load_an_adapter_peft_saved(family, tmp_path):
    base = tiny(family)
    ours = copy.deepcopy(base)
    first, second = TARGETS[family][0], TARGETS[family][1]
    layer0 = next(n for n, _ in base.named_modules() if n.endswith(first))
    config = peft.LoraConfig(
        target_modules=[first, second],
        r=4,
        lora_alpha=8,
        rank_pattern={layer0: 2},
        alpha_pattern={second: 3},
        modules_to_save=SAVE[family] or None,
        task_type="SEQ_CLS" if family == "bert" else "CAUSAL_LM",
    )
    theirs = peft.get_peft_model(base, config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_pretrained(str(tmp_path))

    lr.load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, batch()), logits(theirs, batch()), atol=1e-5, rtol=0)
    twins = peft_layers(theirs)
    layers = lora_layers(ours)
    assert set(layers) == set(twins)
    assert all(layers[n].r == t.r["default"] and layers[n].scaling == t.scaling["default"] for n, t in twins.items())


def test_pattern_keys_stay_unambiguous_when_one_path_ends_another(tmp_path):
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)
            self.inner = nn.Module()
            self.inner.proj = nn.Linear(6, 6)

        def forward(self, x):
            return self.inner.proj(self.proj(x))

    torch.manual_seed(0)
    model = Toy()
    fresh = copy.deepcopy(model)
    # A plain "proj" key would also hand inner.proj rank 3 in PEFT; the regex target exercises fullmatch too.
    lr.attach(model, LoraConfig(r".*proj", r=4, alpha=4), ranks={"proj": 3}, scales={"proj": 0.3})
    randomise(model)
    lr.save_adapter(model, tmp_path)
    _, written = read_adapter(tmp_path)
    assert written["rank_pattern"] == {"^proj": 3} and written["task_type"] is None
    x = torch.randn(4, 6)
    torch.testing.assert_close(peft_load(fresh, tmp_path)(x), model(x), atol=1e-6, rtol=0)


def test_load_errors(tmp_path):
    source = tiny("llama")
    lr.attach(source, LoraConfig(TARGETS["llama"], r=4))
    lr.save_adapter(source, tmp_path / "ok")

    with pytest.raises(lr.ShapeError, match="lora_A"):
        lr.load_adapter(tiny("llama", hidden=48), tmp_path / "ok")
    with pytest.raises(TargetError, match=r"does not have, e.g. 'model.layers.1"):
        lr.load_adapter(tiny("llama", layers=1), tmp_path / "ok")
    attached = tiny("llama")
    lr.attach(attached, LoraConfig(TARGETS["llama"], r=2))
    with pytest.raises(lr.ShapeError, match="rank 2; the file's is rank 4"):
        lr.load_adapter(attached, tmp_path / "ok")
    other = tiny("llama")
    lr.attach(other, LoraConfig(["q_proj"], r=4))
    with pytest.raises(TargetError, match="adapted modules differ"):
        lr.load_adapter(other, tmp_path / "ok")

    tensors, config = read_adapter(tmp_path / "ok", framework="torch")
    for field, value, message in [
        ("peft_type", "IA3", "'IA3' adapter"),
        ("use_dora", True, "use_dora"),
        ("bias", "all", "bias='all'"),
        ("r", 8, "gives rank 8"),
    ]:
        write_adapter(tmp_path / field, tensors, {**config, field: value})
        with pytest.raises(lr.LowRankError, match=message):
            lr.load_adapter(tiny("llama"), tmp_path / field)
    merged = tiny("llama")
    lr.load_adapter(merged, tmp_path / "ok")
    lr.merge(merged)
    with pytest.raises(AdapterStateError, match="merged"):
        lr.load_adapter(merged, tmp_path / "ok")

    stray = {**tensors, "base_model.model.model.norm.weight": torch.ones(32)}
    write_adapter(tmp_path / "stray", stray, config)
    with pytest.raises(lr.AdapterFormatError, match="model.norm.weight"):
        lr.load_adapter(tiny("llama"), tmp_path / "stray")


def test_a_saved_head_that_does_not_fit_leaves_the_model_untouched(tmp_path):
    source = tiny("bert")
    lr.attach(source, LoraConfig(["query"], modules_to_save=["classifier"]))
    lr.save_adapter(source, tmp_path)
    target = tiny("bert")
    target.classifier = nn.Linear(32, 2)  # a two-label head against the file's three labels
    with pytest.raises(lr.ShapeError, match=r"saved classifier\.(weight|bias) has shape \(3"):
        lr.load_adapter(target, tmp_path)
    assert not lora_layers(target) and all(p.requires_grad for p in target.parameters())


@pytest.mark.gpu
def test_adapters_follow_a_cuda_bf16_model(tmp_path):
    model = tiny("llama").to("cuda", torch.bfloat16)
    fresh = copy.deepcopy(model)
    inputs = {k: v.cuda() for k, v in batch().items()}
    lr.attach(model, TLoraConfig(TARGETS["llama"], r=4, init_seed=0))
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.weight.device.type == "cuda" and layer.lora_A.weight.dtype == torch.bfloat16
    randomise(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        adapted = logits(model, inputs)
    lr.save_adapter(model, tmp_path)
    lr.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, inputs), logits(model, inputs), atol=0, rtol=0)
    lr.merge(model)
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.base_layer.weight.device.type == "cuda"
    torch.testing.assert_close(logits(model, inputs), adapted, atol=0.1, rtol=0.05)
