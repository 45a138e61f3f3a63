"""Fuzz targets of the Python surface (issue 14): each takes hypothesis-drawn input and may raise only a
``LowRankError``; anything else (a built-in, a hang, a crash) is a finding.

Shared by the smoke run in the default suite (``tests/test_fuzz.py``) and the long run (``tests/fuzz/run_long.py``).
Inputs are mutations of valid artefacts (an adapter directory, a calibration plan, JSONL), so most cases get past
the first check and exercise the validation behind it.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Tuple

from hypothesis import strategies as st

MODULES = [
    "bert.encoder.layer.0.attention.self.query",
    "bert.encoder.layer.0.attention.self.value",
    "query",
    "value",
    "classifier",
]
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, 1, -1, 4, 8, 4_000_000, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 1e-308, 0.5, 0.0]),
    st.text(max_size=12),
    st.sampled_from(["8", "false", "true", "(.*.*)*z", "query", "^bert\\.x", "LORA", "none", "lora", "tlora"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(MODULES)), inner, max_size=4),
    ),
    max_leaves=8,
)

CONFIG_FIELDS = [
    "peft_type", "r", "lora_alpha", "use_rslora", "lora_dropout", "rank_pattern", "alpha_pattern", "modules_to_save",
    "target_modules", "bias", "use_dora", "task_type", "lowrank_rs",
]  # fmt: skip
EXTRA_FIELDS = ["vllm", "ranks", "scaling", "method", "config", "version", "filters", "modules", "model"]


def _tmp() -> pathlib.Path:
    return pathlib.Path(tempfile.mkdtemp(prefix="lowrank-fuzz-"))


@functools.cache
def _model() -> Any:
    from bad_inputs import tiny_bert

    return tiny_bert()


@functools.cache
def seed_adapters() -> List[Tuple[bytes, Dict[str, Any]]]:
    """Valid adapter directories to mutate: plain, rsLoRA + vLLM, and DoRA."""
    import lowrank_rs as lr

    out = []
    for config, options in (
        (lr.LoraConfig(target_modules=["query", "value"], r=4, init_seed=0), {}),
        (lr.LoraConfig(target_modules=["query"], r=2, use_rslora=True, init_seed=0),
         {"vllm": True}),
        (lr.DoraConfig(target_modules=["value"], r=2, init_seed=0, modules_to_save=["classifier"]), {}),
    ):  # fmt: skip
        tmp = _tmp()
        lr.save_adapter(lr.attach(copy.deepcopy(_model()), config), tmp / "a", **options)
        out.append(
            (
                (tmp / "a" / "adapter_model.safetensors").read_bytes(),
                json.loads((tmp / "a" / "adapter_config.json").read_text()),
            )
        )
        shutil.rmtree(tmp)
    return out


@functools.cache
def seed_plan() -> Tuple[bytes, Dict[str, Any]]:
    import torch

    import lowrank_rs as lr

    model = copy.deepcopy(_model())
    g = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(1, 64, (2, 6), generator=g), "attention_mask": torch.ones(2, 6, dtype=torch.long),
         "labels": torch.tensor([0, 1])}
        for _ in range(2)
    ]  # fmt: skip
    config = lr.TLoraConfig(target_modules=["query", "value"], r=2, alpha=4, num_examples=4)
    plan = lr.calibrate(model, batches, config, progress=False)
    tmp = _tmp()
    plan.save(tmp / "p")
    out = (
        (tmp / "p" / "adapter_model.safetensors").read_bytes(),
        json.loads((tmp / "p" / "adapter_config.json").read_text()),
    )
    shutil.rmtree(tmp)
    return out


# -- mutations ------------------------------------------------------------------------------------------------------


@st.composite
def mutated_bytes(draw: Any, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "header"]))
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        if kind == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            buf[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del buf[i:]
        elif kind == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del buf[i : i + draw(st.integers(1, 16))]
        else:  # the 8-byte header length and the JSON header right behind it
            j = draw(st.integers(0, min(len(buf), 200) - 1))
            buf[j] = draw(st.integers(0, 255))
    return bytes(buf)


@st.composite
def mutated_config(draw: Any, config: Dict[str, Any], fields: List[str], extras: List[str]) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(JSON_VALUES)  # not even a mapping
    out = copy.deepcopy(config)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["set", "delete", "extra", "extra_delete", "pattern"]))
        if action == "set":
            out[draw(st.sampled_from(fields))] = draw(JSON_VALUES)
        elif action == "delete" and out:
            out.pop(draw(st.sampled_from(sorted(out))), None)
        elif action in ("extra", "extra_delete") and isinstance(out.get("lowrank_rs"), dict):
            key = draw(st.sampled_from(extras))
            if action == "extra":
                out["lowrank_rs"][key] = draw(JSON_VALUES)
            else:
                out["lowrank_rs"].pop(key, None)
        elif action == "pattern":
            key = draw(st.one_of(st.sampled_from(MODULES), st.text(alphabet="().*+?|\\[]{}^$az._0", max_size=14)))
            out[draw(st.sampled_from(["rank_pattern", "alpha_pattern"]))] = {key: draw(JSON_SCALARS)}
    return out


def _write_dir(tensor_bytes: bytes, config: Any, config_text: Any = None) -> pathlib.Path:
    d = _tmp() / "a"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(tensor_bytes)
    (d / "adapter_config.json").write_text(config_text if config_text is not None else json.dumps(config))
    return d


def adapter_dirs() -> Any:
    """A mutated adapter directory: bytes, config or both changed."""

    @st.composite
    def build(draw: Any) -> pathlib.Path:
        tensors, config = draw(st.sampled_from(seed_adapters()))
        if draw(st.booleans()):
            tensors = draw(mutated_bytes(tensors))
        if draw(st.integers(0, 3)) > 0:
            config = draw(mutated_config(config, CONFIG_FIELDS, EXTRA_FIELDS))
        text = None
        if draw(st.integers(0, 9)) == 0:
            text = draw(mutated_bytes(json.dumps(config).encode())).decode("latin-1")
        return _write_dir(tensors, config, text)

    return build()


def plan_dirs() -> Any:
    @st.composite
    def build(draw: Any) -> pathlib.Path:
        tensors, config = seed_plan()
        if draw(st.booleans()):
            tensors = draw(mutated_bytes(tensors))
        if draw(st.integers(0, 3)) > 0:
            config = draw(mutated_config(config, sorted(config) + ["peft_type"], []))
            if (
                isinstance(config, dict)
                and isinstance(config.get("modules"), list)
                and config["modules"]
                and draw(st.booleans())
            ):
                entry = config["modules"][0]
                if isinstance(entry, dict) and entry:
                    entry[draw(st.sampled_from(sorted(entry)))] = draw(JSON_VALUES)
        return _write_dir(tensors, config)

    return build()


JSONL_ROWS = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "text": st.one_of(st.text(max_size=6), JSON_SCALARS),
                "label": st.one_of(st.integers(-5, 10**12), st.text(max_size=3), JSON_SCALARS),
            },
            optional={"task": JSON_SCALARS},
        ),
        st.fixed_dictionaries({"prompt": JSON_SCALARS, "response": JSON_SCALARS}, optional={"task": JSON_SCALARS}),
        JSON_VALUES,
    ),
    max_size=6,
)


def jsonl_files() -> Any:
    @st.composite
    def build(draw: Any) -> pathlib.Path:
        d = _tmp()
        path = d / "data.jsonl"
        if draw(st.integers(0, 4)) == 0:
            path.write_bytes(draw(st.binary(max_size=64)))
        else:
            text = "".join(json.dumps(r) + "\n" for r in draw(JSONL_ROWS))
            path.write_bytes(draw(mutated_bytes(text.encode())) if draw(st.booleans()) else text.encode())
        return path

    return build()


# -- the targets ------------------------------------------------------------------------------------------------------


def cleanup(path: pathlib.Path) -> None:
    shutil.rmtree(path.parent if path.name in ("a", "data.jsonl") else path, ignore_errors=True)


def run_load_adapter(path: pathlib.Path) -> None:
    import lowrank_rs as lr
    from lowrank_rs.methods.lora.layer import LoraLinear
    from lowrank_rs.package import read_adapter

    model = copy.deepcopy(_model())
    try:
        read_adapter(path, framework="torch")
        try:
            lr.load_adapter(model, path)
        except lr.LowRankError:
            # A refused file leaves the model as it was: no adapter layer half-attached.
            assert not any(isinstance(m, LoraLinear) for m in model.modules()), "a failed load left adapter layers"
            raise
    except lr.LowRankError:
        pass


def run_write_ort_adapter(path: pathlib.Path) -> None:
    import lowrank_rs as lr
    from lowrank_rs.export import write_ort_adapter

    try:
        write_ort_adapter(path, path.parent / "out.onnx_adapter")
    except lr.LowRankError:
        pass


def run_plan_load(path: pathlib.Path) -> None:
    import lowrank_rs as lr

    try:
        lr.CalibrationPlan.load(path)
    except lr.LowRankError:
        pass


def run_load_jsonl(path: pathlib.Path) -> None:
    import lowrank_rs as lr
    from lowrank_rs.data import load_jsonl

    try:
        data = load_jsonl(path)
        if data.kind == "classification":
            assert 2 <= len(data.labels) <= len(data.rows)
    except lr.LowRankError:
        pass


TARGETS: Dict[str, Tuple[Callable[[], Any], Callable[[pathlib.Path], None]]] = {
    "load_adapter": (adapter_dirs, run_load_adapter),
    "write_ort_adapter": (adapter_dirs, run_write_ort_adapter),
    "plan_load": (plan_dirs, run_plan_load),
    "load_jsonl": (jsonl_files, run_load_jsonl),
}

__all__ = ["TARGETS", "cleanup", "os"]
