"""ONNX export and ONNX Runtime sessions, checked against the torch models as the oracle.

Every model is a tiny random-initialised transformers config (2 layers, hidden 32); nothing is downloaded. Exports
are the slow part (a few seconds each), so each family's graphs are exported once per module and shared.
"""

import argparse
import ast
import copy
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


from conftest import tiny_model  # noqa: E402
from torch import nn  # noqa: E402

import lowrank_rs as lr  # noqa: E402
from lowrank_rs import TargetError, lora_layers  # noqa: E402
from lowrank_rs.export import (  # noqa: E402
    GraphInput,
    GraphInputModule,
    MethodExport,
    MissingDependencyError,
    OrtModel,
    add_export_arguments,
    run_export,
    write_ort_adapter,
)
from lowrank_rs.export.adapter_file import adapter_tensors, read_ort_adapter  # noqa: E402

FAMILIES = ["bert", "deberta", "llama", "qwen2"]
TARGETS = {
    "bert": ["query", "value", "intermediate.dense"],
    "deberta": ["query_proj", "value_proj", "output.dense"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
}
SAVE = {"bert": ["classifier"], "deberta": ["classifier"], "llama": [], "qwen2": []}
TOL = 1e-4


def tiny(family, seed=0):
    deberta = family == "deberta"
    extra = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16) if deberta else {}
    return tiny_model(family, seed, **extra)


def batch(b=3, s=11, seed=1):
    """Another batch and length than the export's example (2 × 8), with right padding on one row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (b, s), generator=g)
    mask = torch.ones_like(ids)
    mask[b - 1, s - 3 :] = 0 if b > 1 else 1
    return {"input_ids": ids, "attention_mask": mask}


def example():
    return {"input_ids": torch.arange(16).reshape(2, 8) + 1, "attention_mask": torch.ones(2, 8, dtype=torch.long)}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


def adapted(base, family, seed=7, config=None, **attach_kwargs):
    """A copy of ``base`` with a non-trivial adapter (and, for classifiers, a changed head)."""
    model = copy.deepcopy(base)
    config = config or lr.LoraConfig(TARGETS[family], r=4, alpha=8, modules_to_save=SAVE[family])
    lr.attach(model, config, **attach_kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
        for name in config.modules_to_save:
            for p in model.get_submodule(name).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def max_diff(a, b):
    return (torch.as_tensor(a).float() - b.float()).abs().max().item()


class Family:
    """One family's models and files: a base, a LoRA-adapted copy, its merged graph, the base's adapters graph
    (slots on the targets, the classifier overridable) and the adapter as a directory and an .onnx_adapter."""

    def __init__(self, family, root):
        self.family = family
        self.root = root
        self.base = tiny(family)
        self.model = adapted(self.base, family)
        self.adapter_dir = root / "adapter"
        lr.save_adapter(self.model, self.adapter_dir)
        self.merged = root / "merged.onnx"
        self.graph = root / "adapters.onnx"
        self.adapter_file = root / "adapter.onnx_adapter"


def _build(family, root):
    fam = Family(family, root)
    if family == "bert":
        # One family goes through the CLI end to end: model and adapter directories in, graphs and adapter out.
        model_dir = root / "model"
        fam.base.save_pretrained(model_dir)
        parser = argparse.ArgumentParser()
        add_export_arguments(parser)
        run_export(parser.parse_args(["merged", str(model_dir), str(fam.adapter_dir), "-o", str(fam.merged)]))
        run_export(
            parser.parse_args(["adapters", str(model_dir), "-o", str(fam.graph), "--adapter", str(fam.adapter_dir)])
        )
        written = root / f"adapters.{fam.adapter_dir.name}.onnx_adapter"
        assert written.is_file()
        run_export(
            parser.parse_args(
                ["adapter-file", str(fam.adapter_dir), "-o", str(fam.adapter_file), "--graph", str(fam.graph)]
            )
        )
    else:
        lr.export_onnx(fam.model, fam.merged, example())
        lr.export_onnx(
            fam.base, fam.graph, example(), mode="adapters", targets=TARGETS[family], modules_to_save=SAVE[family]
        )
        write_ort_adapter(fam.adapter_dir, fam.adapter_file, graph=fam.graph)
    return fam


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _build(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


# --- parity ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_graph_matches_torch(families, family):
    fam = families(family)
    session = OrtModel(fam.merged)
    assert session.providers == ["CPUExecutionProvider"] and not session.adapter_inputs
    for inputs in (batch(), batch(1, 5, seed=2)):
        assert max_diff(session(**inputs).logits, logits(fam.model, inputs)) <= TOL
    # The merged graph is the base graph with new weights: no adapter inputs, no extra matrix products.
    proto = onnx.load(str(fam.merged))
    assert [i.name for i in proto.graph.input] == session.input_names
    assert session.input_names[:2] == ["input_ids", "attention_mask"] and len(proto.graph.input) <= 3


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_graph_runs_base_and_adapter(families, family):
    fam = families(family)
    session = OrtModel(fam.graph)
    name = session.load_adapter(fam.adapter_file)
    assert name == "adapter" and session.adapters == ["adapter"]
    inputs = batch()
    base, tuned = logits(fam.base, inputs), logits(fam.model, inputs)
    assert max_diff(tuned, base) > 0.05  # the adapter changes the output, so the checks below can tell
    assert max_diff(session(**inputs).logits, base) <= TOL  # no adapter active: the base model
    assert max_diff(session(**inputs, adapter=name).logits, tuned) <= TOL
    session.set_adapter(name)
    assert max_diff(session(inputs["input_ids"], inputs["attention_mask"]).logits, tuned) <= TOL
    assert max_diff(session(**inputs, adapter=None).logits, base) <= TOL
    # Every module has its own rank symbol, A and B of one module share it, and the defaults are empty.
    inputs_ = session.adapter_inputs
    slots = sorted(n[: -len(".lora_A")] for n in inputs_ if n.endswith(".lora_A"))
    assert slots == sorted(lora_layers(fam.model))
    symbols = [inputs_[f"{m}.lora_A"][1][1] for m in slots]
    assert len(set(symbols)) == len(slots) and all(inputs_[f"{m}.lora_B"][1][0] == s for m, s in zip(slots, symbols))
    assert all(inputs_[n][0] == "float32" for n in inputs_)
    proto = onnx.load(str(fam.graph))
    defaults = {t.name: list(t.dims) for t in proto.graph.initializer}
    assert all(0 in defaults[f"{m}.lora_{x}"] for m in slots for x in "AB")
    if SAVE[family]:
        assert "classifier.weight" in inputs_ and "classifier.weight" in defaults


def test_numpy_inputs_give_numpy_outputs_and_defaults_fill_the_mask(families):
    fam = families("llama")
    session = OrtModel(fam.merged)
    ids = batch()["input_ids"]
    out = session(ids.numpy())
    assert isinstance(out.logits, np.ndarray) and isinstance(out[0], np.ndarray)
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert max_diff(out.logits, logits(fam.model, full)) <= TOL
    assert isinstance(session(ids).logits, torch.Tensor)


# --- TLoRA adapters with different per-module ranks on one session --------------------------------------------------


def test_two_tlora_adapters_with_different_ranks_swap_on_one_session(families, tmp_path):
    fam = families("llama")
    names = sorted(lora_layers(fam.model))
    config = lr.TLoraConfig(TARGETS["llama"], r=4, alpha=8, min_rank=0)
    # Each module gets a different rank in each adapter; some get rank 1, some none (rank 0) at all.
    ranks_a = {n: [3, 1, 5, 0, 2, 6][i] for i, n in enumerate(names)}
    ranks_b = {n: [0, 4, 1, 7, 3, 2][i] for i, n in enumerate(names)}
    scales = {n: 0.3 + i / 7 for i, n in enumerate(names)}
    one = adapted(fam.base, "llama", seed=11, config=config, ranks=ranks_a, scales=scales)
    two = adapted(fam.base, "llama", seed=12, config=config, ranks=ranks_b)
    assert not any(layer.lora_A.weight.requires_grad for layer in lora_layers(one).values())  # TLoRA: A frozen
    files = {}
    for label, model in (("one", one), ("two", two)):
        lr.save_adapter(model, tmp_path / label)
        files[label] = lr.package.write_ort_adapter(
            tmp_path / label, tmp_path / f"{label}.onnx_adapter", graph=fam.graph
        )
    session = OrtModel(fam.graph, adapters=files)
    inputs = batch()
    want = {"one": logits(one, inputs), "two": logits(two, inputs), None: logits(fam.base, inputs)}
    assert max_diff(want["one"], want["two"]) > 0.05
    for label in ("one", "two", None, "two", "one", None):
        assert max_diff(session(**inputs, adapter=label).logits, want[label]) <= TOL, label
    # The file holds exactly the adapted modules, at their own ranks, with the scale folded into B.
    specs = read_ort_adapter(files["one"])
    assert {n[: -len(".lora_A")] for n in specs if n.endswith(".lora_A")} == {n for n in names if ranks_a[n]}
    for n in names:
        if ranks_a[n]:
            assert specs[f"{n}.lora_A"][1] == (lora_layers(one)[n].in_features, ranks_a[n])
    layer = lora_layers(one)[names[0]]
    folded = adapter_tensors(one)[f"{names[0]}.lora_B"]
    torch.testing.assert_close(folded, layer.lora_B.weight.t() * layer.scaling)


def test_peft_lora_directory_becomes_an_onnx_adapter(families, tmp_path):
    peft = pytest.importorskip("peft")
    fam = families("llama")
    layer0 = next(n for n in lora_layers(fam.model) if n.endswith("q_proj"))
    config = peft.LoraConfig(
        target_modules=["q_proj", "down_proj"],
        r=4,
        lora_alpha=8,
        rank_pattern={layer0: 2},
        alpha_pattern={"down_proj": 3},
    )
    theirs = peft.get_peft_model(copy.deepcopy(fam.base), config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_pretrained(str(tmp_path / "peft"))
    write_ort_adapter(tmp_path / "peft", tmp_path / "peft.onnx_adapter", graph=fam.graph)
    session = OrtModel(fam.graph)
    session.load_adapter(tmp_path / "peft.onnx_adapter", "peft")
    inputs = batch()
    assert max_diff(session(**inputs, adapter="peft").logits, logits(theirs, inputs)) <= TOL


# --- errors ---------------------------------------------------------------------------------------------------------


def test_corrupt_truncated_missing_and_foreign_adapter_files_are_clear_errors(families, tmp_path):
    fam = families("llama")
    session = OrtModel(fam.graph)
    good = fam.adapter_file.read_bytes()
    garbage, truncated = tmp_path / "garbage.onnx_adapter", tmp_path / "truncated.onnx_adapter"
    garbage.write_bytes(b"not an adapter" * 40)
    truncated.write_bytes(good[: len(good) // 2])
    for path in (garbage, truncated):
        with pytest.raises(lr.AdapterFormatError, match="not a valid ONNX Runtime adapter file"):
            session.load_adapter(path)
    with pytest.raises(lr.AdapterIOError, match="does not exist"):
        session.load_adapter(tmp_path / "missing.onnx_adapter")
    # An adapter of another model names modules this graph has no slots for.
    with pytest.raises(TargetError, match="not an adapter input"):
        session.load_adapter(families("bert").adapter_file)
    # The right names in another dtype, or with mismatched factors.
    half = tmp_path / "half.onnx_adapter"
    write_ort_adapter(fam.adapter_dir, half, dtype="float16")
    with pytest.raises(lr.DtypeError, match="float16"):
        session.load_adapter(half)
    name = next(iter(lora_layers(fam.model)))
    fmt = ort.AdapterFormat()
    bad = {
        f"{name}.lora_A": ort.OrtValue.ortvalue_from_numpy(np.zeros((32, 3), np.float32)),
        f"{name}.lora_B": ort.OrtValue.ortvalue_from_numpy(np.zeros((2, 32), np.float32)),
    }
    fmt.set_parameters(bad)
    fmt.export_adapter(str(tmp_path / "ranks.onnx_adapter"))
    with pytest.raises(lr.ShapeError, match="must agree"):
        session.load_adapter(tmp_path / "ranks.onnx_adapter")
    assert session.adapters == []  # nothing half-loaded
    with pytest.raises(lr.LowRankError, match="no adapter named"):
        session(**batch(), adapter="nope")
    # A merged graph has no slots at all.
    with pytest.raises(lr.LowRankError, match="no adapter inputs"):
        OrtModel(fam.merged).load_adapter(fam.adapter_file)


def test_writer_checks_against_the_graph_and_honours_dtype(families, tmp_path):
    fam = families("llama")
    with pytest.raises(TargetError, match="not an adapter input"):
        write_ort_adapter(families("bert").adapter_dir, tmp_path / "x.onnx_adapter", graph=fam.graph)
    assert not (tmp_path / "x.onnx_adapter").exists()
    out = write_ort_adapter(fam.model, tmp_path / "bf16.onnx_adapter", dtype="bfloat16")
    specs = read_ort_adapter(out)
    assert {d for d, _ in specs.values()} == {"bfloat16"}
    with pytest.raises(lr.DtypeError):
        write_ort_adapter(fam.model, tmp_path / "y.onnx_adapter", dtype="int8")
    with pytest.raises(lr.AdapterFormatError):
        write_ort_adapter(tmp_path, tmp_path / "z.onnx_adapter")  # not an adapter directory


def test_export_argument_errors_and_the_model_is_left_as_it_was(families, tmp_path):
    fam = families("llama")
    model = fam.model
    layers = lora_layers(model)
    model.train()
    with pytest.raises(lr.LowRankError, match="mode"):
        lr.export_onnx(model, tmp_path / "x.onnx", example(), mode="fused")
    with pytest.raises(lr.LowRankError, match="labels"):
        lr.export_onnx(model, tmp_path / "x.onnx", {**example(), "labels": example()["input_ids"]})
    with pytest.raises(lr.LowRankError, match="needs adapter slots"):
        lr.export_onnx(fam.base, tmp_path / "x.onnx", example(), mode="adapters")
    with pytest.raises(lr.LowRankError, match="matches no module"):
        lr.export_onnx(fam.base, tmp_path / "x.onnx", example(), mode="adapters", targets=["nope_proj"])
    with pytest.raises(lr.LowRankError, match="nn.Linear"):
        lr.export_onnx(fam.base, tmp_path / "x.onnx", example(), mode="adapters", targets=["embed_tokens"])
    with pytest.raises(lr.ShapeError, match="share batch"):
        lr.export_onnx(
            model,
            tmp_path / "x.onnx",
            {"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(3, 8, dtype=torch.long)},
        )
    lr.merge(model)
    try:
        with pytest.raises(lr.AdapterStateError, match="merged"):
            lr.export_onnx(model, tmp_path / "x.onnx", example(), mode="adapters")
    finally:
        lr.unmerge(model)
    assert lora_layers(model) == layers and model.training and not (tmp_path / "x.onnx").exists()
    model.eval()


def test_missing_onnx_packages_are_reported_and_never_imported_eagerly(monkeypatch):
    import sys

    # `import lowrank_rs` must work without the onnx extra: no export module imports it at module level.
    root = pathlib.Path(lr.__file__).parent / "export"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("onnx", "onnxruntime", "onnxscript") for n in names), path
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"lowrank-rs\[onnx\]"):
        OrtModel("whatever.onnx")


# --- the per-method hook, as LoRATRF and TA-LoRA will use it ----------------------------------------------------------


class Shift(nn.Module):
    """A toy adapter method: ``base(x) + shift``."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.shift = nn.Parameter(torch.randn(base.out_features) * 0.5)

    def forward(self, x):
        return self.base_layer(x) + self.shift


class ShiftSlot(GraphInputModule):
    """Reads ``<name>.shift`` (overridable, default zero) and a required per-example ``task_scale`` input."""

    def __init__(self, name, base):
        super().__init__()
        self.base_layer, self.key = base, f"{name}.shift"

    def graph_inputs(self, model_inputs):
        batch = next(iter(model_inputs.values())).shape[0]
        zero = torch.zeros(self.base_layer.out_features)
        return [
            GraphInput(self.key, zero, {}, zero),
            GraphInput("task_scale", torch.ones(batch), {0: "batch"}, None),
        ]

    def forward(self, x):
        return self.base_layer(x) + self.feed("task_scale")[:, None, None] * self.feed(self.key)


class ShiftExport(MethodExport):
    name, module_type = "shift", Shift

    def merged(self, name, module):
        return module  # kept as graph ops, as a LoRATRF filter is

    def slot(self, name, module):
        return ShiftSlot(name, module.base_layer if isinstance(module, Shift) else module)

    def model_tensors(self, name, module):
        return {f"{name}.shift": module.shift}


class ShiftConfig:
    pass


class ShiftMethod(lr.Method):
    """A toy method as a plug-in registers it: only what export needs."""

    name, title, config_type = "shift", "Shift", ShiftConfig
    hooks = (ShiftExport(),)

    def adapter_modules(self, model):
        return {n: m for n, m in model.named_modules() if isinstance(m, Shift)}

    def export_hooks(self):
        return self.hooks


@pytest.fixture
def shift_method():
    from lowrank_rs.adapters import registry

    registry.register(ShiftMethod())
    yield
    registry.unregister("shift")


def test_a_registered_method_exports_merged_and_as_slots(shift_method, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), Shift(nn.Linear(16, 4))).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        want, base = model(x), model[2].base_layer(model[1](model[0](x)))
    lr.export_onnx(model, tmp_path / "merged.onnx", {"input": torch.randn(2, 4, 8)})
    assert max_diff(OrtModel(tmp_path / "merged.onnx")(x).output, want) <= 1e-5
    lr.export_onnx(model, tmp_path / "slots.onnx", {"input": torch.randn(2, 4, 8)}, mode="adapters")
    write_ort_adapter(model, tmp_path / "shift.onnx_adapter", graph=tmp_path / "slots.onnx")
    session = OrtModel(tmp_path / "slots.onnx", adapters={"s": tmp_path / "shift.onnx_adapter"})
    assert session.input_names == ["input", "task_scale"] and list(session.adapter_inputs) == ["2.shift"]
    scale = torch.tensor([1.0, 0.0, 2.0])
    got = session(x, task_scale=scale, adapter="s").output
    assert max_diff(got, base + scale[:, None, None] * model[2].shift.detach()) <= 1e-5
    assert max_diff(session(x, task_scale=scale).output, base) <= 1e-5
    with pytest.raises(lr.LowRankError, match="task_scale"):
        session(x)
