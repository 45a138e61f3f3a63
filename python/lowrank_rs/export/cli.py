"""``lowrank-rs export``: the three exports from files.

- ``export merged MODEL ADAPTER -o model.onnx``: the adapter folded into the weights.
- ``export adapters MODEL -o base.onnx (--adapter DIR ... | --targets NAME ...)``: the base model with adapter
  inputs (slots for the union of the adapters' modules, or for the named targets); each ``--adapter`` is also
  written beside the graph as ``base.<adapter dir name>.onnx_adapter``.
- ``export adapter-file ADAPTER -o x.onnx_adapter [--graph base.onnx]``: one adapter directory as an ONNX Runtime
  adapter file.

Models load from local directories only (``local_files_only=True``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path
from typing import Any, Dict, List, Set

from ..adapters.registry import baseline
from ..errors import InvalidArgumentError
from ._common import FLOAT_DTYPES
from .methods import method_named

__all__ = ["add_export_arguments", "run_export"]


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``export`` command's arguments (three kinds, each a sub-command) to ``parser``."""
    kinds = parser.add_subparsers(dest="export_kind", metavar="KIND")
    kinds.required = True

    merged = kinds.add_parser("merged", help="model + adapter → one graph with the adapter folded into the weights")
    merged.add_argument("model", help="Hugging Face model directory (config.json and weights)")
    merged.add_argument("adapter", help="adapter directory (lowrank-rs or PEFT LoRA)")
    merged.add_argument("-o", "--out", required=True, help=".onnx file to write")

    adapters = kinds.add_parser(
        "adapters", help="base model → one graph whose adapter inputs .onnx_adapter files fill per request"
    )
    adapters.add_argument("model", help="Hugging Face model directory of the base model")
    adapters.add_argument("-o", "--out", required=True, help=".onnx file to write")
    adapters.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR",
        help="adapter directory whose modules get slots (repeatable: the union is taken); each is also written as "
        "OUT_STEM.<dir name>.onnx_adapter",
    )
    adapters.add_argument(
        "--targets",
        nargs="+",
        metavar="NAME",
        help="module-name suffixes that get slots (with --adapter or alone)",
    )
    adapters.add_argument(
        "--method", help="adapter method of the --targets slots (default: the baseline method, plain LoRA)"
    )
    adapters.add_argument(
        "--modules-to-save", nargs="+", default=[], metavar="NAME", help="modules whose parameters adapters may replace"
    )

    for p in (merged, adapters):
        p.add_argument("--dtype", choices=FLOAT_DTYPES[:3], default="float32", help="weights' dtype (default float32)")
        p.add_argument("--batch", type=int, default=2, help="example batch size for tracing (default 2)")
        p.add_argument("--seq-len", type=int, default=16, help="example sequence length for tracing (default 16)")
        p.add_argument("--opset", type=int, default=20, help="ONNX opset (default 20)")

    file = kinds.add_parser("adapter-file", help="adapter directory → .onnx_adapter file for an adapters-mode graph")
    file.add_argument("adapter", help="adapter directory (lowrank-rs or PEFT LoRA)")
    file.add_argument("-o", "--out", required=True, help=".onnx_adapter file to write")
    file.add_argument("--graph", help="the adapters-mode .onnx graph: checks names and shapes, takes its dtype")
    file.add_argument("--dtype", choices=FLOAT_DTYPES, help="tensor dtype without --graph (default float32)")


def run_export(args: argparse.Namespace) -> None:
    """Run the ``export`` command parsed by :func:`add_export_arguments`; bad input raises a LowRankError."""
    from .adapter_file import adapter_contents, write_ort_adapter

    if args.export_kind == "adapter-file":
        out = write_ort_adapter(args.adapter, args.out, graph=args.graph, dtype=args.dtype)
        print(f"wrote {out}")
        return
    from .exporter import export_onnx

    model = load_model(args.model, args.dtype)
    inputs = example_inputs(model, args.batch, args.seq_len)
    if args.export_kind == "merged":
        from ..adapters import load_adapter

        load_adapter(model, args.adapter)
        out = export_onnx(model, args.out, inputs, mode="merged", opset=args.opset)
        print(f"wrote {out} (merged; inputs {list(inputs)})")
        return
    if args.export_kind != "adapters":  # pragma: no cover - argparse restricts the choices
        raise InvalidArgumentError(f"unknown export kind {args.export_kind!r}")
    targets: List[str] = list(args.targets or [])
    saved: Set[str] = set(args.modules_to_save)
    methods: Set[str] = {args.method or baseline().name} if targets else set()
    for adapter in args.adapter:
        contents = adapter_contents(adapter)
        methods.add(contents.method)
        targets += list(contents.modules)
        saved |= {p.rpartition(".")[0] for p in contents.saved}
    if not targets:
        raise InvalidArgumentError(
            "export adapters needs --adapter DIR or --targets NAME ... to know which modules get slots"
        )
    if len(methods) > 1:
        raise InvalidArgumentError(
            f"the slots would mix adapter methods {sorted(methods)}; export one method per graph"
        )
    method = methods.pop()
    if args.adapter and method_named(method).slots_from_model:
        targets = _attach_for_slots(model, args.adapter[0], saved, targets)
    out = export_onnx(
        model,
        args.out,
        inputs,
        mode="adapters",
        targets=sorted(set(targets)) or None,
        method=method,
        modules_to_save=sorted(saved) or None,
        opset=args.opset,
    )
    print(f"wrote {out} (adapter slots; inputs {list(inputs)})")
    names = [Path(os.fspath(a).rstrip("/\\")).name for a in args.adapter]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"--adapter directories must have distinct names to name their files, got {names}")
    for adapter, name in zip(args.adapter, names):
        path = write_ort_adapter(adapter, out.with_name(f"{out.stem}.{name}.onnx_adapter"), graph=out)
        print(f"wrote {path}")


def _attach_for_slots(model: Any, adapter: str, saved: Set[str], targets: List[str]) -> List[str]:
    """Attach ``adapter`` so its method's slots take its shape; returns the targets it does not cover.

    The saved modules get their base values back: they are the graph's defaults, which must be the base model.
    """
    from ..adapters import load_adapter
    from .methods import adapter_modules

    modules = dict(model.named_modules())
    base = {n: {k: v.clone() for k, v in modules[n].state_dict().items()} for n in saved if n in modules}
    load_adapter(model, adapter)
    for name, state in base.items():
        model.get_submodule(name).load_state_dict(state)
    present = set(adapter_modules(model))
    return [t for t in targets if t not in present]


def load_model(directory: str, dtype: str) -> Any:
    """A transformers model from a local directory, as the class its config names (``architectures``)."""
    import torch
    import transformers
    from safetensors import SafetensorError

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise InvalidArgumentError(f"{directory!r} is not a Hugging Face model directory (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
        names = list(getattr(config, "architectures", None) or [])
        cls = getattr(transformers, names[0], None) if names else None
        cls = cls or transformers.AutoModel
        model = cls.from_pretrained(directory, local_files_only=True, dtype=getattr(torch, dtype))
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        # A truncated or corrupt weights file surfaces as safetensors' own error class, or torch's RuntimeError.
        raise InvalidArgumentError(f"cannot load a model from {directory!r}: {e}") from None
    return model.eval()


def example_inputs(model: Any, batch: int, seq_len: int) -> Dict[str, Any]:
    """Token ids (within the vocabulary), an all-ones mask and, for models with token types, zero type ids."""
    import torch

    if batch < 1 or seq_len < 1:
        raise InvalidArgumentError(f"--batch and --seq-len must be positive, got {batch} and {seq_len}")
    config = model.config
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    ids = torch.arange(batch * seq_len).reshape(batch, seq_len) % max(vocab - 1, 1) + (1 if vocab > 1 else 0)
    out: Dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
    params = inspect.signature(model.forward).parameters
    if "token_type_ids" in params and int(getattr(config, "type_vocab_size", 0) or 0) > 1:
        out["token_type_ids"] = torch.zeros(batch, seq_len, dtype=torch.long)
    return out
