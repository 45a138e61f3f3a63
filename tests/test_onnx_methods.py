"""ONNX export of LoRATRF and TA-LoRA, checked against the torch models as the oracle.

Tiny random-initialised BERT and LLaMA configs (2 layers, hidden 32). Exports dominate the run time (seconds each),
so the fast set exports four graphs, which cover each method in both families and both modes:

- LoRATRF, BERT, filters on the adapted linears' inputs: merged;
- LoRATRF, LLaMA, filters on the layers' outputs: adapters;
- TA-LoRA, LLaMA (rotary queries, grouped-query attention): merged, with a task_id input;
- TA-LoRA, BERT with a classifier head: adapters, through the CLI.

The other four combinations are slow tests (``LOWRANK_SLOW=1``); the LoRATRF BERT adapters graph goes through the
CLI there.
"""

import argparse
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from conftest import tiny_model  # noqa: E402

import lowrank_rs as lr  # noqa: E402
from lowrank_rs.export import OrtModel, add_export_arguments, run_export, write_ort_adapter  # noqa: E402
from lowrank_rs.export.adapter_file import read_ort_adapter  # noqa: E402

TOL = 1e-4
TASKS = ["alpha", "beta", "gamma"]


def tiny(family):
    model = tiny_model(family)
    if family == "bert":
        with torch.no_grad():
            # The head's init (std 0.02) gives logits near 0 that hide what the adapters change; this one does not.
            model.classifier.weight.normal_(0.0, 3.0)
    return model


def batch(b=3, s=11, seed=1):
    """Another batch size and length than the export's example (2 × 8), with right padding on the last row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (b, s), generator=g)
    mask = torch.ones_like(ids)
    if b > 1:
        mask[b - 1, s - 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def example():
    return {"input_ids": torch.arange(16).reshape(2, 8) + 1, "attention_mask": torch.ones(2, 8, dtype=torch.long)}


def logits(model, inputs, tasks=None):
    with torch.no_grad():
        if tasks is None:
            return model(**inputs).logits.float()
        with lr.use_tasks(model, tasks):
            return model(**inputs).logits.float()


def max_diff(a, b):
    return (torch.as_tensor(a).float() - b.float()).abs().max().item()


def cli(*argv):
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    run_export(parser.parse_args([str(a) for a in argv]))


# --- models ---------------------------------------------------------------------------------------------------------


def trf_model(base, site, seed=3):
    """LoRATRF with trained-looking LoRA factors and filters (D ≠ 0, so every filter acts)."""
    model = lr.attach(copy.deepcopy(base), lr.TrfConfig(r=4, filter_rank=3, filter_site=site, init_seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lr.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.5)
        for f in lr.trf_filters(model).values():
            f.D.copy_(torch.randn(f.D.shape, generator=g) * 2.0)
            f.task_vector.copy_(torch.randn(f.task_vector.shape, generator=g))
    return model.eval()


def without_filters(model):
    """The same model with every filter the identity: what an export that dropped the filters would compute."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for f in lr.trf_filters(other).values():
            f.D.zero_()
    return other


def talora_model(base, seed=4, modules_to_save=()):
    """TA-LoRA with three tasks whose prompts differ and an open gate, so the branch changes every output."""
    config = lr.TaLoraConfig(
        tasks=TASKS, layers=[0, 1], prompt_length=4, init_seed=seed, modules_to_save=modules_to_save
    )
    model = lr.attach(copy.deepcopy(base), config)
    randomize_talora(model, seed)
    return model.eval()


def randomize_talora(model, seed, tasks=None):
    """Random task directions ``v`` (for ``tasks``; for all, with the gates and saved heads too, by default)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lr.talora_layers(model).values():
            if tasks is None:
                layer.gate.copy_(torch.randn(layer.gate.shape, generator=g) + 1.0)
            for name in tasks or layer.task_names:
                u, v = layer.task_parameters(name)
                v.copy_(torch.randn(v.shape, generator=g) * 2.0)
        for name in lr.adapter_config(model).modules_to_save if tasks is None else ():
            for p in model.get_submodule(name).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


class Built:
    pass


@pytest.fixture(scope="module")
def trf_bert(tmp_path_factory):
    """BERT, filters on the LoRA layers' inputs: merged graph."""
    root = tmp_path_factory.mktemp("trf_bert")
    b = Built()
    b.base = tiny("bert")
    b.model = trf_model(b.base, "linear_input")
    b.merged = root / "merged.onnx"
    lr.export_onnx(b.model, b.merged, example())
    return b


@pytest.fixture(scope="module")
def trf_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("trf_llama")
    b = Built()
    b.root = root
    b.base = tiny("llama")
    b.model = trf_model(b.base, "layer_output")
    b.graph = root / "adapters.onnx"
    lr.export_onnx(b.model, b.graph, example(), mode="adapters")
    return b


@pytest.fixture(scope="module")
def talora_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("talora_llama")
    b = Built()
    b.root = root
    b.base = tiny("llama")
    b.model = talora_model(b.base)
    b.merged = root / "merged.onnx"
    lr.export_onnx(b.model, b.merged, example())
    return b


@pytest.fixture(scope="module")
def talora_bert(tmp_path_factory):
    """BERT with a trained classifier, adapters graph from the CLI: one task's adapter directory in, graph and
    .onnx_adapter out."""
    root = tmp_path_factory.mktemp("talora_bert")
    b = Built()
    b.root = root
    b.base = tiny("bert")
    b.model = talora_model(b.base, modules_to_save=["classifier"])
    b.model_dir, b.adapter_dir = root / "model", root / "beta"
    b.base.save_pretrained(b.model_dir)
    lr.save_adapter(b.model, b.adapter_dir, tasks=["beta"])
    b.graph = root / "adapters.onnx"
    cli("adapters", b.model_dir, "-o", b.graph, "--adapter", b.adapter_dir)
    b.adapter_file = root / "adapters.beta.onnx_adapter"
    return b


# --- LoRATRF --------------------------------------------------------------------------------------------------------


def test_trf_merged_graph_folds_lora_and_keeps_input_filters(trf_bert):
    session = OrtModel(trf_bert.merged)
    assert not session.adapter_inputs and session.metadata["methods"] == ["loratrf"]
    inputs = batch()
    want = logits(trf_bert.model, inputs)
    # The filters matter here, so a graph that lost them (their hook lived on the replaced LoRA layer) would fail.
    assert max_diff(logits(without_filters(trf_bert.model), inputs), want) > 0.05
    for x in (inputs, batch(1, 5, seed=2)):
        assert max_diff(session(**x).logits, logits(trf_bert.model, x)) <= TOL
    # LoRA folded: no factor survives as a weight of its own, the filters' C and D do.
    names = {t.name for t in onnx.load(str(trf_bert.merged)).graph.initializer}
    assert not any("lora_" in n for n in names) and any(n.endswith("trf_filter.C") for n in names)


@pytest.mark.slow
def test_trf_adapters_graph_with_input_filters_from_the_cli(trf_bert, tmp_path):
    trf_bert.base.save_pretrained(tmp_path / "model")
    lr.save_adapter(trf_bert.model, tmp_path / "trf")
    graph = tmp_path / "adapters.onnx"
    cli("adapters", tmp_path / "model", "-o", graph, "--adapter", tmp_path / "trf")
    adapter_file = tmp_path / "adapters.trf.onnx_adapter"
    session = OrtModel(graph, adapters={"trf": adapter_file})
    inputs = batch()
    base, tuned = logits(trf_bert.base, inputs), logits(trf_bert.model, inputs)
    assert max_diff(session(**inputs).logits, base) <= TOL  # no adapter: the base model
    assert max_diff(session(**inputs, adapter="trf").logits, tuned) <= TOL
    # Each LoRA layer has its LoRA inputs and its input filter's t, C, D; C and D share their own rank symbol.
    specs = session.adapter_inputs
    lora = sorted(lr.lora_layers(trf_bert.model))
    assert {n for n in specs if n.endswith(".lora_A")} == {f"{m}.lora_A" for m in lora}
    for m in lora:
        f = f"{m}.trf_filter"
        assert specs[f"{f}.task_vector"][1] == (lr.trf_filters(trf_bert.model)[m].dim,)
        symbol = specs[f"{f}.C"][1][1]
        assert isinstance(symbol, str) and specs[f"{f}.D"][1][0] == symbol and symbol != specs[f"{m}.lora_A"][1][1]
    defaults = {t.name: t for t in onnx.load(str(graph)).graph.initializer}
    m = lora[0]
    assert list(defaults[f"{m}.trf_filter.C"].dims)[1] == 0 and list(defaults[f"{m}.trf_filter.D"].dims)[0] == 0
    assert np.all(onnx.numpy_helper.to_array(defaults[f"{m}.trf_filter.task_vector"]) == 1)  # no zero norm
    written = read_ort_adapter(adapter_file)
    assert written[f"{m}.trf_filter.C"][1] == (lr.trf_filters(trf_bert.model)[m].dim, 3)


def test_trf_layer_filters_are_adapter_inputs_and_a_lora_only_adapter_leaves_them_identity(trf_llama, tmp_path):
    model, base = trf_llama.model, trf_llama.base
    session = OrtModel(trf_llama.graph)
    lr.save_adapter(model, tmp_path / "dir")
    session.load_adapter(write_ort_adapter(tmp_path / "dir", tmp_path / "trf.onnx_adapter", graph=trf_llama.graph))
    session.load_adapter(write_ort_adapter(model, tmp_path / "model.onnx_adapter"))  # from the model: the same
    inputs = batch()
    want = logits(model, inputs)
    assert max_diff(session(**inputs, adapter="trf").logits, want) <= TOL
    assert max_diff(session(**inputs, adapter="model").logits, want) <= TOL
    assert max_diff(session(**inputs, adapter=None).logits, logits(base, inputs)) <= TOL
    filters = sorted(lr.trf_filters(model))
    assert filters == ["model.layers.0", "model.layers.1"]
    assert all(f"{layer}.trf_filter.D" in session.adapter_inputs for layer in filters)
    # A plain LoRA adapter of the same modules runs on the same graph, its filters at their identity defaults.
    full = ort.AdapterFormat.read_adapter(str(tmp_path / "trf.onnx_adapter")).get_parameters()
    lora_only = ort.AdapterFormat()
    lora_only.set_adapter_version(1)
    lora_only.set_model_version(1)
    lora_only.set_parameters({n: v for n, v in full.items() if ".lora_" in n})
    lora_only.export_adapter(str(tmp_path / "lora.onnx_adapter"))
    session.load_adapter(tmp_path / "lora.onnx_adapter", "lora")
    plain = without_filters(model)
    assert max_diff(logits(plain, inputs), want) > 0.05
    assert max_diff(session(**inputs, adapter="lora").logits, logits(plain, inputs)) <= TOL


@pytest.mark.slow
def test_trf_merged_graph_keeps_layer_filters(trf_llama):
    path = trf_llama.root / "merged.onnx"
    lr.export_onnx(trf_llama.model, path, example())
    inputs = batch()
    want = logits(trf_llama.model, inputs)
    assert max_diff(logits(without_filters(trf_llama.model), inputs), want) > 0.05
    assert max_diff(OrtModel(path)(**inputs).logits, want) <= TOL


# --- TA-LoRA --------------------------------------------------------------------------------------------------------


def test_talora_merged_graph_selects_each_examples_task(talora_llama):
    model, base = talora_llama.model, talora_llama.base
    session = OrtModel(talora_llama.merged)
    assert session.input_names == ["input_ids", "attention_mask", "task_id"] and session.tasks == TASKS
    assert not session.adapter_inputs
    inputs = batch(4, 9)
    mixed = torch.tensor([2, 0, 1, 0])
    want = logits(model, inputs, mixed)
    assert max_diff(want, logits(model, inputs, 0)) > 0.05  # the tasks differ, so a wrong row would show
    assert max_diff(logits(base, inputs), logits(model, inputs, 0)) > 0.05
    assert max_diff(session(**inputs, task_ids=mixed).logits, want) <= TOL
    assert max_diff(session(**inputs, task_ids=["gamma", "alpha", "beta", "alpha"]).logits, want) <= TOL
    assert max_diff(session(**inputs, task_ids="beta").logits, logits(model, inputs, "beta")) <= TOL
    one = batch(1, 6, seed=3)
    assert max_diff(session(**one, task_ids=[1]).logits, logits(model, one, [1])) <= TOL
    # The keys/values are constants: none of the prompt's trainable tensors is left in the graph.
    names = {t.name for t in onnx.load(str(talora_llama.merged)).graph.initializer}
    assert any(n.endswith("talora.keys") for n in names) and not any(n.endswith((".theta0", ".B")) for n in names)


def test_talora_bad_task_ids_are_clear_errors(talora_llama):
    session = OrtModel(talora_llama.merged)
    inputs = batch()
    with pytest.raises(lr.TaskError, match="pass task_ids"):
        session(**inputs)
    with pytest.raises(lr.TaskError, match="task id 3 does not exist"):
        session(**inputs, task_ids=[0, 3, 1])
    with pytest.raises(lr.TaskError, match="task id -1 does not exist"):
        session(**inputs, task_id=np.array([0, -1, 1]))
    with pytest.raises(lr.TaskError, match="'delta' is not one of the graph's tasks"):
        session(**inputs, task_ids=["alpha", "delta", "beta"])
    with pytest.raises(lr.TaskError, match="2 examples, but the batch has 3"):
        session(**inputs, task_ids=[0, 1])


def test_talora_adapters_graph_swaps_tasks_as_adapter_files(talora_bert, tmp_path):
    model, base = talora_bert.model, talora_bert.base
    session = OrtModel(talora_bert.graph, adapters={"beta": talora_bert.adapter_file})
    assert "task_id" not in session.input_names
    inputs = batch()
    # No adapter: the base model, its own classifier included (the CLI put back the head the adapter replaced).
    assert max_diff(session(**inputs).logits, logits(base, inputs)) <= TOL
    assert max_diff(session(**inputs, adapter="beta").logits, logits(model, inputs, "beta")) <= TOL
    layers = sorted(lr.talora_layers(model))
    specs = read_ort_adapter(talora_bert.adapter_file)
    assert specs[f"{layers[0]}.prompt"][1] == (4, 32) and specs[f"{layers[0]}.gate"][1] == (4,)
    assert "classifier.weight" in specs
    # A task added after the graph was exported is one more adapter file for the same session.
    lr.add_task(model, "delta", init="random")
    randomize_talora(model, 9, tasks=["delta"])
    lr.save_adapter(model, tmp_path / "delta", tasks=["delta"])
    session.load_adapter(
        write_ort_adapter(tmp_path / "delta", tmp_path / "delta.onnx_adapter", graph=talora_bert.graph)
    )
    want = logits(model, inputs, "delta")
    assert max_diff(want, logits(model, inputs, "beta")) > 100 * TOL  # tasks share θ0 and B: closer than others
    assert max_diff(session(**inputs, adapter="delta").logits, want) <= TOL
    assert max_diff(session(**inputs, adapter="beta").logits, logits(model, inputs, "beta")) <= TOL
    # One .onnx_adapter is one task; a file with several says how to write one.
    lr.save_adapter(model, tmp_path / "all")
    with pytest.raises(lr.TaskError, match=r"tasks=\[name\]"):
        write_ort_adapter(tmp_path / "all", tmp_path / "all.onnx_adapter", graph=talora_bert.graph)
    with pytest.raises(lr.TaskError, match="no task_id input"):
        session(**inputs, task_ids=[0, 0, 0], adapter="beta")


def test_talora_slots_need_an_attached_model(tmp_path):
    with pytest.raises(lr.LowRankError, match="attached TA-LoRA model"):
        lr.export_onnx(
            tiny("llama"), tmp_path / "x.onnx", example(), mode="adapters", targets=["o_proj"], method="talora"
        )
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_talora_adapters_graph_on_llama(talora_llama, tmp_path):
    model = talora_llama.model
    path = tmp_path / "adapters.onnx"
    lr.export_onnx(model, path, example(), mode="adapters")
    lr.save_adapter(model, tmp_path / "gamma", tasks=["gamma"])
    session = OrtModel(
        path, adapters={"g": write_ort_adapter(tmp_path / "gamma", tmp_path / "g.onnx_adapter", graph=path)}
    )
    inputs = batch()
    assert max_diff(session(**inputs).logits, logits(talora_llama.base, inputs)) <= TOL
    assert max_diff(session(**inputs, adapter="g").logits, logits(model, inputs, "gamma")) <= TOL


@pytest.mark.slow
def test_talora_merged_graph_on_bert(talora_bert, tmp_path):
    path = tmp_path / "merged.onnx"
    lr.export_onnx(talora_bert.model, path, example())
    inputs = batch()
    ids = torch.tensor([1, 2, 0])
    assert max_diff(OrtModel(path)(**inputs, task_ids=ids).logits, logits(talora_bert.model, inputs, ids)) <= TOL
