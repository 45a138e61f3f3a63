"""The published bad-input table: each row is an input, what the user sees, and the exception class.

``tests/test_bad_inputs.py`` runs every row (the call must raise exactly that class with that message) and checks that
``docs/errors.md`` is this table rendered by :func:`render`; ``python tests/bad_inputs.py`` rewrites the doc. So the
doc cannot say anything the tests do not prove.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from typing import Any, Callable, List, Optional

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "errors.md"


@dataclasses.dataclass(frozen=True)
class Case:
    area: str
    input: str
    sees: str  # a fragment of the message, as the user reads it
    error: str  # the class's name in lowrank_rs.errors
    run: Callable[[pathlib.Path], Any]
    cli: Optional[Callable[[pathlib.Path], List[str]]] = None  # argv whose exit must be 2 with the same message


# -- fixtures the rows share ----------------------------------------------------------------------------------------


def tiny_bert(seed: int = 0) -> Any:
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=2,
        architectures=["BertForSequenceClassification"],
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def saved_adapter(tmp: pathlib.Path, **edits: Any) -> pathlib.Path:
    """A LoRA adapter of :func:`tiny_bert` (r = 4 on query/value), its config edited: ``key=value`` sets a
    top-level field, ``lowrank_rs__key=value`` one of our extras; ``tensor`` = a function of the tensors dict."""
    import lowrank_rs as lr
    from lowrank_rs.package import read_adapter, write_adapter

    model = lr.attach(tiny_bert(), lr.LoraConfig(target_modules=["query", "value"], r=4, init_seed=0))
    out = tmp / "adapter"
    lr.save_adapter(model, out, vllm=bool(edits.pop("vllm", False)))
    tensor_edit = edits.pop("tensor", None)
    if edits or tensor_edit:
        tensors, config = read_adapter(out, framework="numpy")
        for key, value in edits.items():
            if key.startswith("lowrank_rs__"):
                config["lowrank_rs"][key[len("lowrank_rs__") :]] = value
            else:
                config[key] = value
        if tensor_edit:
            tensor_edit(tensors)
        import shutil

        shutil.rmtree(out)
        write_adapter(out, tensors, config)
    return out


def load_into_fresh(tmp: pathlib.Path, **edits: Any) -> Any:
    import lowrank_rs as lr

    return lr.load_adapter(tiny_bert(), saved_adapter(tmp, **edits))


def first_a(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))


def with_nan(tensors: dict) -> None:
    key = first_a(tensors)
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] = np.nan


def jsonl(tmp: pathlib.Path, rows: List[Any], name: str = "data.jsonl") -> pathlib.Path:
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def model_dir(tmp: pathlib.Path, truncate: bool = False) -> pathlib.Path:
    out = tmp / "model"
    tiny_bert().save_pretrained(out)
    if truncate:
        weights = out / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])
    return out


def merge_nan(tmp: pathlib.Path) -> Any:
    import torch

    import lowrank_rs as lr

    model = lr.attach(tiny_bert(), lr.LoraConfig(target_modules=["query", "value"], r=4, init_seed=0))
    layer = dict(model.named_modules())["bert.encoder.layer.0.attention.self.value"]
    with torch.no_grad():
        layer.lora_B.weight.fill_(1.0)
        layer.lora_A.weight[0, 0] = float("inf")
    return lr.merge(model)


def covariance(mask: Any) -> Any:
    from lowrank_rs.linalg import CovarianceAccumulator

    acc = CovarianceAccumulator(4)
    return acc.update(np.ones((3, 4), np.float32), mask=np.asarray(mask))


def binary_data(tmp: pathlib.Path) -> pathlib.Path:
    path = tmp / "data.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def config_json(tmp: pathlib.Path) -> pathlib.Path:
    d = tmp / "cfg-model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    return d


def out_file(tmp: pathlib.Path) -> pathlib.Path:
    path = tmp / "taken"
    path.write_text("a file, not a directory")
    return path


def _finetune_out_is_file(tmp: pathlib.Path) -> Any:
    from lowrank_rs.workflows.finetune import finetune

    return finetune(model=config_json(tmp), out=out_file(tmp))


def _load_task(tmp: pathlib.Path, data: pathlib.Path) -> Any:
    from lowrank_rs.workflows.finetune import load_task

    return load_task(config_json(tmp), data)


def _export_model(tmp: pathlib.Path) -> Any:
    from lowrank_rs.export.cli import load_model

    return load_model(str(model_dir(tmp, truncate=True)), "float32")


def _write_ort(source: pathlib.Path, out: pathlib.Path) -> Any:
    from lowrank_rs.export import write_ort_adapter

    return write_ort_adapter(source, out)


def _lora(**fields: Any) -> Any:
    import lowrank_rs as lr

    return lr.LoraConfig(**{"target_modules": ["query"], **fields})


def _load_jsonl(path: pathlib.Path) -> Any:
    from lowrank_rs.data import load_jsonl

    return load_jsonl(path)


# -- the table ------------------------------------------------------------------------------------------------------

CASES: List[Case] = [
    # data
    Case(
        "data",
        "JSONL whose rows all have one label",
        "classification needs at least two distinct labels",
        "DataError",
        lambda t: _load_jsonl(jsonl(t, [{"text": "a", "label": 1}, {"text": "b", "label": 1}])),
    ),
    Case(
        "data",
        "binary file as `--data`",
        "is not UTF-8 text",
        "DataError",
        lambda t: _load_task(t, binary_data(t)),
        cli=lambda t: ["finetune", "--model", str(config_json(t)), "--data", str(binary_data(t))],
    ),
    Case(
        "data",
        "a directory (or FIFO, device) as the data file",
        "is not a regular file",
        "DataError",
        lambda t: _load_jsonl(t),
    ),
    Case(
        "data",
        "a label of 5000 digits",
        "unreadable JSON",
        "DataError",
        lambda t: (
            _load_jsonl(t / "d.jsonl")
            if (t / "d.jsonl").write_text('{"text":"a","label":' + "9" * 5000 + "}\n")
            else None
        ),
    ),
    # adapter configs read from files
    Case(
        "adapter file",
        '`"use_rslora": "false"` (a string)',
        "use_rslora must be true or false",
        "AdapterFormatError",
        lambda t: load_into_fresh(t, use_rslora="false"),
    ),
    Case(
        "adapter file",
        "`lora_alpha` 0 or negative",
        "lora_alpha must be a positive number",
        "AdapterFormatError",
        lambda t: load_into_fresh(t, lora_alpha=-1),
    ),
    Case(
        "adapter file",
        "`lora_alpha: 1e308`",
        "lora_alpha must be a positive number up to 1e+06",
        "AdapterFormatError",
        lambda t: load_into_fresh(t, lora_alpha=1e308),
    ),
    Case(
        "adapter file", '`"r": "8"`', "r must be an integer", "AdapterFormatError", lambda t: load_into_fresh(t, r="8")
    ),
    Case(
        "adapter file",
        "`r: false`",
        "r must be an integer",
        "AdapterFormatError",
        lambda t: load_into_fresh(t, r=False),
    ),
    Case(
        "adapter file",
        "`alpha_pattern: 8`",
        "alpha_pattern must be a mapping",
        "AdapterFormatError",
        lambda t: load_into_fresh(t, alpha_pattern=8),
    ),
    Case(
        "adapter file",
        "list-valued `rank_pattern`",
        "rank_pattern must be a mapping",
        "AdapterFormatError",
        lambda t: load_into_fresh(t, rank_pattern=["query"]),
    ),
    Case(
        "adapter file",
        "`rank_pattern` key `(.*.*)*z` (catastrophic backtracking)",
        "repeats a group",
        "AdapterFormatError",
        lambda t: load_into_fresh(t, rank_pattern={"(.*.*)*z": 4}),
        cli=lambda t: [
            "export",
            "adapter-file",
            str(saved_adapter(t, rank_pattern={"(.*.*)*z": 4})),
            "-o",
            str(t / "x"),
        ],
    ),
    Case(
        "adapter file",
        "`rank_pattern` key with three quantifiers or a backreference",
        "at most 2 are allowed",
        "AdapterFormatError",
        lambda t: load_into_fresh(t, rank_pattern={"a*b*c*": 4}),
    ),
    Case(
        "adapter file",
        "`lowrank_rs.vllm: true` with `ranks: {module: 4000000}`",
        "lowrank_rs.ranks",
        "AdapterFormatError",
        lambda t: load_into_fresh(
            t, vllm=True, lowrank_rs__ranks={"bert.encoder.layer.0.attention.self.query": 4_000_000}
        ),
    ),
    Case(
        "adapter file",
        "`lowrank_rs.vllm: true` with a true rank above the tensors' rows",
        "the file's lora_A has 4 rows",
        "AdapterFormatError",
        lambda t: load_into_fresh(t, vllm=True, lowrank_rs__ranks={"bert.encoder.layer.0.attention.self.query": 9}),
    ),
    Case(
        "adapter file",
        "`lowrank_rs.method` not a string (found by fuzzing: a list raised TypeError)",
        "which this version does not have",
        "AdapterFormatError",
        lambda t: load_into_fresh(t, lowrank_rs__method=["lora"]),
    ),
    Case(
        "adapter file",
        "NaN or infinity in an adapter tensor",
        "holds NaN or infinity",
        "NonFiniteError",
        lambda t: load_into_fresh(t, tensor=with_nan),
    ),
    Case(
        "adapter file",
        "NaN in an adapter tensor, written as an ONNX Runtime adapter",
        "holds NaN or infinity",
        "NonFiniteError",
        lambda t: _write_ort(saved_adapter(t, tensor=with_nan), t / "x.onnx_adapter"),
    ),
    # model state
    Case(
        "model",
        "`merge` of an adapter whose update is not finite",
        "would write NaN or infinity into the base weight",
        "NonFiniteError",
        merge_nan,
    ),
    # configs built in Python
    Case("config", "`LoraConfig(r='8')`", "r must be an integer", "ConfigError", lambda t: _lora(r="8")),
    Case(
        "config",
        "`LoraConfig(alpha=1e308)`",
        "alpha must be at most 1e+06",
        "ConfigError",
        lambda t: _lora(alpha=1e308),
    ),
    Case(
        "config",
        "`LoraConfig(use_rslora='false')`",
        "use_rslora must be true or false",
        "ConfigError",
        lambda t: _lora(use_rslora="false"),
    ),
    Case(
        "config",
        "`target_modules='(.*.*)*z'` (a regex that backtracks catastrophically)",
        "repeats a group",
        "ConfigError",
        lambda t: _lora(target_modules="(.*.*)*z"),
    ),
    # arrays
    Case(
        "covariance",
        "mask values 2, -1, 0.5 or NaN",
        "a mask's entries must be 0 or 1",
        "InvalidArgumentError",
        lambda t: covariance([1, 2, 0]),
    ),
    Case(
        "covariance",
        "a float mask holding NaN",
        "a mask's entries must be 0 or 1",
        "InvalidArgumentError",
        lambda t: covariance([1.0, np.nan, 0.0]),
    ),
    # CLI
    Case(
        "cli",
        "a truncated model weights file",
        "cannot load a model from",
        "InvalidArgumentError",
        _export_model,
        cli=lambda t: ["export", "merged", str(model_dir(t, truncate=True)), str(t), "-o", str(t / "m.onnx")],
    ),
    Case(
        "cli",
        "`--out` naming an existing file",
        "cannot use",
        "InvalidArgumentError",
        _finetune_out_is_file,
        cli=lambda t: ["finetune", "--model", str(config_json(t)), "--out", str(out_file(t))],
    ),
]


def render() -> str:
    lines = [
        "# Bad input: what you see",
        "",
        "Every error raised on bad input is a `lowrank_rs.LowRankError` subclass (`lowrank_rs/errors.py`); on the",
        "command line it prints `lowrank-rs: error: <message>` and exits with status 2. This table is generated from",
        "`tests/bad_inputs.py` (`python tests/bad_inputs.py` rewrites it) and each row is run by",
        "`tests/test_bad_inputs.py`, which also fails when this file differs from the table.",
        "",
        "| area | input | the message says | exception class |",
        "|---|---|---|---|",
    ]
    for c in CASES:
        cli = " (CLI: exit 2)" if c.cli else ""
        lines.append(f"| {c.area} | {c.input} | “…{c.sees}…”{cli} | `{c.error}` |")
    lines += [
        "",
        "## Beyond the table",
        "",
        "- **Fuzzing** (`tests/fuzz/targets.py`): mutated adapter directories (safetensors bytes, JSON configs)",
        "  into `read_adapter` / `load_adapter` and `write_ort_adapter`, mutated calibration-plan directories into",
        "  `CalibrationPlan.load`, and arbitrary JSONL into `load_jsonl`; any exception other than a `LowRankError` is",
        "  a failure, and a refused `load_adapter` must leave no adapter layer behind. `tests/test_fuzz.py` runs a",
        "  derandomized smoke set in the default suite (`LOWRANK_FUZZ_EXAMPLES` sets its size); the long run is",
        "  `nice -n 19 python tests/fuzz/run_long.py --examples 1000000 --hours 8` (failures go to",
        "  `fuzz-failures.jsonl`).",
        "- **Fault injection** (`tests/test_fault_injection.py`): SIGKILL at random points (fixed seed) while",
        "  `save_adapter`, `CalibrationPlan.save` and `write_ort_adapter` overwrite their targets; each target must be",
        "  the complete old or the complete new content, byte for byte, and a rerun must succeed.",
        "- **Pattern keys**: `rank_pattern` / `alpha_pattern` keys as lowrank-rs writes them (plain module paths, or",
        "  `^` + an escaped path) are matched without a regex; other keys must be at most 256 characters with at most",
        "  two quantifiers, no repeated group, backreference or lookaround, and at most 16 keys with quantifiers per",
        "  mapping. The worst allowed case (16 keys like `.{0,256}.*z` against 215-character names) costs about",
        "  1.2 ms per key and module on a loaded 2-core machine and is measured by",
        "  `tests/test_hardening.py::test_pattern_key_worst_case_is_bounded`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(HERE.parent / "python"))
    DOC.write_text(render())
    print(f"wrote {DOC}")
