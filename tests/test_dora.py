"""DoRA (docs/methods.md): the output against the equation and against PEFT's ``use_dora=True``, merge and unmerge,
files both ways with PEFT, training, a TLoRA plan's frozen ``A``, and the merged ONNX graph."""

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import tiny_model  # noqa: E402
from torch import nn  # noqa: E402

import lowrank_rs as lr  # noqa: E402
from lowrank_rs.package import read_adapter  # noqa: E402

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "intermediate.dense"]}
SAVE = {"llama": [], "bert": ["classifier"]}


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or batch())).logits.float()


def dora(family, seed=0, **config):
    model = tiny_model(family, seed)
    options = dict(r=4, alpha=8, modules_to_save=SAVE[family], init_seed=seed)
    options.update(config)
    return lr.attach(model, lr.DoraConfig(TARGETS[family], **options))


def randomise(model, seed=7):
    """Non-trivial B, A and magnitudes, so a file or a merge that drops or mis-scales anything shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lr.lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(layer.out_features, generator=g))


def peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes our extras under the `lowrank_rs` key, which it ignores
        return peft.PeftModel.from_pretrained(base, str(path)).eval()


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_starts_equal_to_the_base_and_follows_the_equation(family):
    base = tiny_model(family)
    model = dora(family)
    torch.testing.assert_close(logits(model), logits(base), atol=1e-6, rtol=0)
    randomise(model)
    layer = next(iter(lr.lora_layers(model).values()))
    assert isinstance(layer, lr.DoraLinear)
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64)
    w0 = layer.base_layer.weight.detach().double()
    v = w0 + layer.scaling * layer.lora_B.weight.detach().double() @ layer.lora_A.weight.detach().double()
    w = layer.lora_magnitude_vector.detach().double()[:, None] * v / v.norm(dim=1, keepdim=True)
    bias = layer.base_layer.bias
    want = x @ w.T + (0 if bias is None else bias.detach().double())
    got = layer(x.float()).double()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_merge_and_unmerge_are_exact(family):
    model = dora(family)
    randomise(model)
    before = logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    lr.merge(model)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    with pytest.raises(lr.AdapterStateError, match="already merged"):
        lr.merge(model)
    lr.unmerge(model)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p.detach(), weights[n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_peft_loads_our_dora_adapter(family, tmp_path):
    model = dora(family)
    randomise(model)
    lr.save_adapter(model, tmp_path)
    tensors, config = read_adapter(tmp_path)
    assert config["use_dora"] is True and config["lowrank_rs"]["method"] == "dora"
    assert any(k.endswith(".lora_magnitude_vector") for k in tensors)
    theirs = peft_load(tiny_model(family), tmp_path)
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-5, rtol=0)
    # And back: our own file reloads into a fresh model to the same outputs.
    fresh = tiny_model(family)
    lr.load_adapter(fresh, tmp_path)
    assert isinstance(next(iter(lr.lora_layers(fresh).values())), lr.DoraLinear)
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_we_load_peft_dora_directories(family, tmp_path):
    base = tiny_model(family)
    ours = copy.deepcopy(base)
    config = peft.LoraConfig(
        target_modules=TARGETS[family], r=4, lora_alpha=8, use_dora=True, modules_to_save=list(SAVE[family]) or None,
        task_type="SEQ_CLS" if family == "bert" else "CAUSAL_LM",
    )  # fmt: skip
    theirs = peft.get_peft_model(base, config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_pretrained(str(tmp_path))
    lr.load_adapter(ours, tmp_path)
    assert lr.adapter_config(ours).method == "dora"
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)
    # A plain LoRA model refuses a DoRA file rather than dropping its magnitudes.
    plain = lr.attach(tiny_model(family), lr.LoraConfig(TARGETS[family], r=4, modules_to_save=SAVE[family]))
    with pytest.raises(lr.AdapterStateError, match="is a DoRA adapter; load it into a fresh copy"):
        lr.load_adapter(plain, tmp_path)


def test_dora_file_errors(tmp_path):
    model = dora("llama")
    lr.save_adapter(model, tmp_path / "ok")
    tensors, config = read_adapter(tmp_path / "ok")
    broken = {k: v for k, v in tensors.items() if not k.endswith("q_proj.lora_magnitude_vector")}
    from lowrank_rs.package import write_adapter

    write_adapter(tmp_path / "no-magnitude", broken, config)
    with pytest.raises(lr.AdapterFormatError, match="lora_magnitude_vector"):
        lr.load_adapter(tiny_model("llama"), tmp_path / "no-magnitude")
    wrong = dict(tensors)
    key = next(k for k in tensors if k.endswith("q_proj.lora_magnitude_vector"))
    wrong[key] = tensors[key][:-1]
    write_adapter(tmp_path / "short", wrong, config)
    fresh = tiny_model("llama")
    with pytest.raises(lr.ShapeError, match="lora_magnitude_vector"):
        lr.load_adapter(fresh, tmp_path / "short")
    assert not lr.lora_layers(fresh)  # nothing attached by a file that does not fit
    with pytest.raises(lr.InvalidArgumentError, match="vLLM"):
        lr.save_adapter(model, tmp_path / "vllm", vllm=True)


def test_trains_magnitude_and_factors():
    model = dora("bert", dropout=0.1)
    examples = [
        {"input_ids": torch.randint(1, 96, (6,), generator=torch.Generator().manual_seed(i)), "labels": i % 3}
        for i in range(24)
    ]
    layer = next(iter(lr.lora_layers(model).values()))
    m0, a0 = layer.lora_magnitude_vector.detach().clone(), layer.lora_A.weight.detach().clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_magnitude_vector") for n in trainable)
    assert not any("base_layer" in n for n in trainable)
    result = lr.train(model, examples, config=lr.TrainConfig(lr=5e-3, epochs=6, batch_size=8, seed=0), progress=False)
    assert result.losses[-1] < result.losses[0]
    assert not torch.equal(layer.lora_magnitude_vector.detach(), m0)
    assert not torch.equal(layer.lora_A.weight.detach(), a0)


def test_composes_with_a_tlora_plan():
    model = tiny_model("llama")
    config = lr.TLoraConfig(TARGETS["llama"], r=4, alpha=8, num_examples=4)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 96, (2, 8), generator=g)} for _ in range(2)]
    batches = [{**b, "labels": b["input_ids"]} for b in batches]
    plan = lr.calibrate(model, batches, config, progress=False)
    base = logits(model)
    lr.attach(model, lr.DoraConfig(TARGETS["llama"]), plan=plan)
    torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=0)
    for name, layer in lr.lora_layers(model).items():
        assert isinstance(layer, lr.DoraLinear)
        assert layer.r == plan.ranks[name]
        torch.testing.assert_close(layer.lora_A.weight.detach(), torch.as_tensor(plan.init_a[name]), atol=0, rtol=0)
        assert not layer.lora_A.weight.requires_grad
        assert layer.lora_B.weight.requires_grad and layer.lora_magnitude_vector.requires_grad
    assert lr.adapter_config(model).train_a is False


def test_a_new_method_needed_no_generic_change():
    # DoRA is found through the registry alone: by its config, by a model it adapted, by a file it wrote.
    from lowrank_rs.adapters import method_for, method_named

    assert method_for(lr.DoraConfig(["q"])).name == "dora" and method_named("dora").title == "DoRA"
    assert isinstance(method_named("dora"), type(method_named("lora")))


def test_merged_onnx_graph_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = dora("bert")
    randomise(model)
    inputs = batch()
    lr.export_onnx(model, tmp_path / "merged.onnx", inputs)
    got = lr.OrtModel(tmp_path / "merged.onnx")(**inputs).logits
    assert (torch.as_tensor(got) - logits(model, inputs)).abs().max() <= 1e-4
    with pytest.raises(lr.LowRankError, match="merged graphs only"):
        lr.export_onnx(model, tmp_path / "slots.onnx", inputs, mode="adapters")


def test_rejects_what_it_does_not_take():
    with pytest.raises(lr.InvalidArgumentError, match="batches"):
        lr.attach(tiny_model("llama"), lr.DoraConfig(["q_proj"]), batches=[])
    with pytest.raises(lr.ConfigError, match="train_a"):
        lr.DoraConfig(["q_proj"], train_a="no")
    assert isinstance(lr.DoraLinear(nn.Linear(4, 3), 2, 1.0), lr.LoraLinear)


def test_refuses_a_plans_warm_up_rather_than_dropping_it():
    model = tiny_model("llama")
    config = lr.TLoraConfig(TARGETS["llama"], r=4, alpha=8, num_examples=4, train_a_after=5)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 96, (2, 8), generator=g)} for _ in range(2)]
    plan = lr.calibrate(model, [{**b, "labels": b["input_ids"]} for b in batches], config, progress=False)
    with pytest.raises(lr.InvalidArgumentError, match="train_a_after"):
        lr.attach(model, lr.DoraConfig(TARGETS["llama"]), plan=plan)
