"""ONNX Runtime latency: base graph, merged graph, adapter-attached graph with an adapter active, and torch eager.

Two random-initialised models (nothing is downloaded): an encoder of BERT-base's shape with a sequence-
classification head and LoRA r=8 on the value projection and both FFN matrices (LoRATRF's encoder setting), and a
LLaMA-shaped decoder (hidden 1024, 8 layers, 155M parameters; logits) with LoRA r=16 on all seven projections
(TLoRA's setting). Each is exported three times with ``lowrank_rs.export_onnx``: the base model (``mode="merged"``
without an adapter: the plain graph), the adapted model merged, and the adapted model with adapter slots
(``mode="adapters"``), whose adapter is written as an ``.onnx_adapter`` and made active. Latency is the median over
many runs at batch 1 and 8, sequence 128, on the CPU (and on CUDA where ``onnxruntime-gpu`` and a GPU are present),
for the graphs in ONNX Runtime and for the adapted model (LoRA unmerged) in torch eager mode under
``torch.inference_mode``.

Targets (the design): merged ≤ 1.05× base; adapter-attached ≤ 1.3× merged. ``eager / merged`` is ONNX Runtime's
speed-up over torch eager.

A second table has the merged graphs of the two methods whose merged graphs are not the base graph's ops: LoRATRF
(its default config for the family: LoRA part folded, one filter per layer kept as graph ops) and TA-LoRA (three
tasks, prompt length 10, the last half of the layers; every task's prompt keys/values precomputed, a mixed-task
batch selecting them by ``task_id``), each against the same base graph and against its torch model in eager mode.

Usage: ``python bench/onnx.py [--quick] [--no-write]``. Writes its section of ``bench/RESULTS.md`` (``--quick``:
tiny models, a smoke run that writes nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

# This file is named like the `onnx` package: with its folder on sys.path, `import onnx` would import this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("_common", _HERE / "_common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
machine, median_time, table, write_section = _common.machine, _common.median_time, _common.table, _common.write_section

import lowrank_rs as lr  # noqa: E402
from lowrank_rs.export import OrtModel, write_ort_adapter  # noqa: E402
from lowrank_rs.export.runtime import default_providers  # noqa: E402


def models(quick: bool):
    import transformers

    if quick:
        enc = transformers.BertConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            num_labels=2,
        )  # fmt: skip
        dec = transformers.LlamaConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128,
        )  # fmt: skip
    else:
        enc = transformers.BertConfig(num_labels=2)  # BERT-base: 12 layers, hidden 768
        dec = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
            intermediate_size=2816,
        )  # fmt: skip
    torch.manual_seed(0)
    tag = " (tiny, --quick)" if quick else ""
    return [
        ("BERT-base enc. (seq. cls.)" + tag, transformers.BertForSequenceClassification(enc).eval(),
         lr.LoraConfig(["value", "intermediate.dense", "output.dense"], r=8, alpha=16)),
        ("LLaMA dec. 1024×8 layers (logits)" + tag, transformers.LlamaForCausalLM(dec).eval(),
         lr.LoraConfig(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=16, alpha=32)),
    ]  # fmt: skip


def inputs(batch: int, seq: int, vocab: int):
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def bench_model(label, base, config, shapes, repeats, providers, workdir):
    adapted = copy.deepcopy(base)
    lr.attach(adapted, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lr.lora_layers(adapted).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.02)
    example = inputs(2, 16, base.config.vocab_size)
    paths = {k: workdir / f"{k}.onnx" for k in ("base", "merged", "adapters")}
    print(f"  exporting {label} ...", flush=True)
    lr.export_onnx(base, paths["base"], example)
    lr.export_onnx(adapted, paths["merged"], example)
    lr.export_onnx(adapted, paths["adapters"], example, mode="adapters")
    adapter = write_ort_adapter(adapted, workdir / "adapter.onnx_adapter", graph=paths["adapters"])

    rows = []
    for device, provider in providers:
        sessions = {k: OrtModel(p, providers=provider) for k, p in paths.items()}
        sessions["adapters"].load_adapter(adapter, "a")
        sessions["adapters"].set_adapter("a")
        model = adapted.to(device)
        for batch, seq in shapes:
            feeds = {k: v.numpy() for k, v in inputs(batch, seq, base.config.vocab_size).items()}
            tensors = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
            # The adapter really is active: the attached graph answers like the torch model.
            with torch.inference_mode():
                want = model(**tensors).logits.float().cpu().numpy()
            got = sessions["adapters"].run(feeds).logits
            assert np.abs(got - want).max() < 1e-2 * max(1.0, np.abs(want).max()), "adapter not applied"
            t = {k: median_time(lambda s=s: s.run(feeds), repeats, warmup=3) for k, s in sessions.items()}

            def eager():
                with torch.inference_mode():
                    model(**tensors)
                if device == "cuda":
                    torch.cuda.synchronize()

            t["eager"] = median_time(eager, repeats, warmup=3)
            ms = {k: v * 1e3 for k, v in t.items()}
            rows.append(
                [
                    device,
                    label,
                    f"{batch}×{seq}",
                    f"{ms['base']:.3g}",
                    f"{ms['merged']:.3g}",
                    f"{ms['adapters']:.3g}",
                    f"{ms['eager']:.3g}",
                    _ratio(t["merged"] / t["base"], 1.05),
                    _ratio(t["adapters"] / t["merged"], 1.3),
                    f"{t['eager'] / t['merged']:.2f}×",
                ]
            )
            print("  " + " | ".join(rows[-1]), flush=True)
        adapted.to("cpu")
    return rows, paths["base"]


def method_models(base):
    """LoRATRF and TA-LoRA copies of ``base`` with non-trivial weights (filters and prompt branches active)."""
    g = torch.Generator().manual_seed(2)
    trf = lr.attach(copy.deepcopy(base), lr.TrfConfig(init_seed=0))
    talora = lr.attach(copy.deepcopy(base), lr.TaLoraConfig(tasks=["a", "b", "c"], init_seed=0))
    with torch.no_grad():
        for layer in lr.lora_layers(trf).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.02)
        for f in lr.trf_filters(trf).values():
            f.D.copy_(torch.randn(f.D.shape, generator=g) * 0.02)
        for layer in lr.talora_layers(talora).values():
            layer.gate.fill_(0.1)
            for v in layer.v:
                v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    return [("LoRATRF", trf.eval()), ("TA-LoRA", talora.eval())]


def bench_methods(label, base, base_graph, shapes, repeats, providers, workdir):
    """Merged LoRATRF and TA-LoRA graphs vs the base graph and vs their torch models."""
    vocab = base.config.vocab_size
    example = inputs(2, 16, vocab)
    rows = []
    for method, model in method_models(base):
        path = workdir / f"{method}.onnx"
        print(f"  exporting {label}, {method} merged ...", flush=True)
        lr.export_onnx(model, path, example)
        talora = method == "TA-LoRA"
        for device, provider in providers:
            sessions = {"base": OrtModel(base_graph, providers=provider), "merged": OrtModel(path, providers=provider)}
            model.to(device)
            for batch, seq in shapes:
                feeds = {k: v.numpy() for k, v in inputs(batch, seq, vocab).items()}
                tensors = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
                ids = torch.arange(batch) % 3  # a mixed-task batch
                method_feeds = {**feeds, "task_id": ids.numpy()} if talora else feeds
                context = (lambda: lr.use_tasks(model, ids.to(device))) if talora else contextlib.nullcontext

                def eager(context=context, tensors=tensors):
                    with torch.inference_mode(), context():
                        out = model(**tensors)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    return out

                want = eager().logits.float().cpu().numpy()
                got = sessions["merged"].run(method_feeds).logits
                assert np.abs(got - want).max() < 1e-2 * max(1.0, np.abs(want).max()), f"{method} graph differs"
                t = {
                    "base": median_time(lambda: sessions["base"].run(feeds), repeats, warmup=3),
                    "merged": median_time(lambda: sessions["merged"].run(method_feeds), repeats, warmup=3),
                    "eager": median_time(eager, repeats, warmup=3),
                }
                ms = {k: v * 1e3 for k, v in t.items()}
                rows.append(
                    [
                        device,
                        label,
                        method,
                        f"{batch}×{seq}",
                        f"{ms['base']:.3g}",
                        f"{ms['merged']:.3g}",
                        f"{ms['eager']:.3g}",
                        f"**{t['merged'] / t['base']:.2f}×**",
                        f"{t['eager'] / t['merged']:.2f}×",
                    ]
                )
                print("  " + " | ".join(rows[-1]), flush=True)
            model.to("cpu")
    return rows


def _ratio(x: float, target: float) -> str:
    return f"**{x:.2f}×** ({'met' if x <= target else 'NOT met'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, few runs (a smoke run; writes nothing)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    desc = machine()
    print(desc, flush=True)
    shapes, repeats = ([(1, 16), (2, 16)], 3) if args.quick else ([(1, 128), (8, 128)], 20)
    providers = [("cpu", ["CPUExecutionProvider"])]
    if "CUDAExecutionProvider" in default_providers():
        providers.append(("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    import onnxruntime

    header = [
        "device",
        "model",
        "batch×seq",
        "base graph (ms)",
        "merged (ms)",
        "adapters, active (ms)",
        "torch eager (ms)",
        "merged / base (≤ 1.05)",
        "adapters / merged (≤ 1.3)",
        "eager / merged",
    ]
    rows, method_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, model, config) in enumerate(models(args.quick)):
            workdir = Path(tmp) / str(i)
            workdir.mkdir()
            model_rows, base_graph = bench_model(label, model, config, shapes, repeats, providers, workdir)
            rows += model_rows
            method_rows += bench_methods(label, model, base_graph, shapes, repeats, providers, workdir)
    method_header = [
        "device",
        "model",
        "method",
        "batch×seq",
        "base graph (ms)",
        "merged (ms)",
        "torch eager (ms)",
        "merged / base",
        "eager / merged",
    ]
    body = (
        "## ONNX Runtime deployment (`bench/onnx.py`)\n\n"
        f"Machine: {desc}; onnxruntime {onnxruntime.__version__} ({', '.join(d for d, _ in providers)})\n\n"
        f"Medians of {repeats} runs after 3 warm-up runs; ONNX Runtime with its default threads and graph "
        "optimisations, inputs and outputs on the host; torch eager runs the adapted model with LoRA unmerged.\n\n"
        + table(header, rows)
        + "\n\nLoRATRF and TA-LoRA merged graphs (filters, and the prompt branch with precomputed per-task keys/values "
        "selected by a `task_id` input, as graph ops; a mixed-task batch for TA-LoRA), against the same base graph "
        "and their torch models in eager mode:\n\n" + table(method_header, method_rows)
    )
    if not args.quick and not args.no_write:
        write_section("onnx", body)
        print("wrote bench/RESULTS.md")
    else:
        print(body)


if __name__ == "__main__":
    main()
