"""Regression tests of issue 14's Python findings beyond the bad-input table (tests/bad_inputs.py): what must still
work, what a refusal must leave unchanged, and the measured bound on pattern-key matching."""

import os
import re
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from bad_inputs import jsonl, saved_adapter, tiny_bert

import lowrank_rs as lr
from lowrank_rs.adapters.peft_format import (
    MAX_PATTERN_KEY_LENGTH,
    MAX_REGEX_PATTERN_KEYS,
    pattern_key_problem,
    pattern_keys,
    peft_pattern_key,
)
from lowrank_rs.data import load_jsonl
from lowrank_rs.export import write_ort_adapter
from lowrank_rs.linalg import CovarianceAccumulator
from lowrank_rs.methods.lora.layer import LoraLinear


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    # NaN planted on purpose must compare equal to itself: the question is whether anything was written.
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=0, atol=0, equal_nan=True) for k in a
    )


# -- labels -----------------------------------------------------------------------------------------------------------


def test_an_outlier_integer_label_makes_one_class_not_a_billion(tmp_path):
    data = load_jsonl(jsonl(tmp_path, [{"text": "a", "label": 0}, {"text": "b", "label": 1_000_000_000}]))
    assert data.labels == ("0", "1000000000")
    assert [r["label"] for r in data.rows] == [0, 1]


def test_integer_labels_are_sorted_as_numbers_and_eval_files_reuse_them(tmp_path):
    train = load_jsonl(
        jsonl(tmp_path, [{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 2}])
    )
    assert train.labels == ("2", "10")
    test = load_jsonl(jsonl(tmp_path, [{"text": "d", "label": 10}], "eval.jsonl"), labels=train.labels)
    assert test.rows[0]["label"] == 1


# -- adapter files ----------------------------------------------------------------------------------------------------


def test_a_crafted_vllm_file_leaves_a_fresh_model_unchanged(tmp_path):
    path = saved_adapter(tmp_path, vllm=True, lowrank_rs__ranks={"bert.encoder.layer.0.attention.self.query": 4_000})
    model = tiny_bert()
    before = _state(model)
    with pytest.raises(lr.AdapterFormatError):
        lr.load_adapter(model, path)
    assert _same(before, model.state_dict())
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_a_non_finite_file_leaves_an_attached_model_unchanged(tmp_path):
    def nan_b(tensors):
        key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
        tensors[key] = np.full_like(tensors[key], np.inf)

    path = saved_adapter(tmp_path, tensor=nan_b)
    model = lr.attach(tiny_bert(), lr.LoraConfig(target_modules=["query", "value"], r=4, init_seed=1))
    before = _state(model)
    with pytest.raises(lr.NonFiniteError, match="lora_B"):
        lr.load_adapter(model, path)
    assert _same(before, model.state_dict())


def test_valid_files_still_load_with_patterns_rslora_and_vllm(tmp_path):
    model = lr.attach(tiny_bert(), lr.LoraConfig(target_modules=["query", "value"], r=4, init_seed=0, use_rslora=True))
    lr.save_adapter(model, tmp_path / "a", vllm=True)
    again = lr.load_adapter(tiny_bert(), tmp_path / "a")
    assert _same(lr.adapter_state(model), lr.adapter_state(again))
    # A PEFT-style regex key within the caps still applies.
    path = saved_adapter(tmp_path / "b", rank_pattern={r"layer\.0\..*query": 4}, alpha_pattern={"value": 2})
    loaded = lr.load_adapter(tiny_bert(), path)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, LoraLinear)}
    assert layers["bert.encoder.layer.0.attention.self.value"].scaling == 2 / 4


# -- pattern keys -----------------------------------------------------------------------------------------------------


def test_fast_path_matches_exactly_like_peft_regex():
    rng = np.random.default_rng(0)
    parts = ["q_proj", "layers", "0", "1", "self_attn", "proj", "inner", "x-y", "a"]
    names = [".".join(rng.choice(parts, size=rng.integers(1, 5))) for _ in range(300)]
    keys = [".".join(rng.choice(parts, size=rng.integers(1, 3))) for _ in range(60)]
    keys += ["^" + re.escape(n) for n in names[:40]] + ["q.proj", ".proj", "layers.0"]
    for key in keys:
        assert pattern_key_problem(key) is None, key
        for name in names:
            assert (peft_pattern_key([key], name) == key) == bool(re.match(rf"(.*\.)?({key})$", name)), (key, name)


def test_the_keys_we_write_are_accepted_and_pick_their_module():
    adapted = {"proj", "inner.proj", "a.inner.proj"}
    keys = pattern_keys(set(adapted), adapted)
    for name, key in keys.items():
        assert pattern_key_problem(key) is None
        assert peft_pattern_key([key], name) == key


@pytest.mark.parametrize(
    "key", ["(.*.*)*z", "(a|aa)+$", "(a+)+", "(ab){2,}", r"(\w+\s?)+$", r"(x)\1", "(?=a).*", "a*b*c*d", "x" * 1000, ""]
)
def test_catastrophic_or_oversized_keys_are_refused(key):
    assert pattern_key_problem(key) is not None


def test_pattern_key_worst_case_is_bounded():
    # The worst key the caps allow: two unbounded quantifiers that must fail at the end, on long module names; every
    # regex key (at most MAX_REGEX_PATTERN_KEYS) against every adapted module.
    keys = [f".{{0,{MAX_PATTERN_KEY_LENGTH}}}.*z{i}" for i in range(MAX_REGEX_PATTERN_KEYS)]
    names = [f"model.layers.{i}." + "a" * 200 for i in range(64)]
    for key in keys:
        assert pattern_key_problem(key) is None
    start = time.perf_counter()
    for name in names:
        assert peft_pattern_key(keys, name) is None
    elapsed = time.perf_counter() - start
    # Measured ≈ 0.2 s on a loaded 2-core machine for 16 keys × 64 names of 215 characters (≈ 0.2 ms per match).
    assert elapsed < 10, elapsed


def test_many_quantifier_free_regex_keys_load_and_many_quantified_ones_do_not(tmp_path):
    # PEFT users write anchored keys with unescaped dots; only keys with quantifiers count against the cap.
    anchored = {f"^bert.encoder.layer.{i}.attention.self.query": 4 for i in range(40)}
    lr.load_adapter(tiny_bert(), saved_adapter(tmp_path / "a", rank_pattern=anchored))
    quantified = {f"x{i}.*query": 4 for i in range(MAX_REGEX_PATTERN_KEYS + 1)}
    with pytest.raises(lr.AdapterFormatError, match="keys with quantifiers"):
        lr.load_adapter(tiny_bert(), saved_adapter(tmp_path / "b", rank_pattern=quantified))


def test_a_redos_key_is_refused_fast_by_load_and_export(tmp_path):
    path = saved_adapter(tmp_path, rank_pattern={"(.*.*)*" + "z" * 40: 4})
    start = time.perf_counter()
    with pytest.raises(lr.AdapterFormatError):
        lr.load_adapter(tiny_bert(), path)
    with pytest.raises(lr.AdapterFormatError):
        write_ort_adapter(path, tmp_path / "x.onnx_adapter")
    assert time.perf_counter() - start < 5


# -- merge ------------------------------------------------------------------------------------------------------------


def test_merge_refusal_leaves_every_layer_unmerged_and_unchanged():
    model = lr.attach(tiny_bert(), lr.LoraConfig(target_modules=["query", "value"], r=4, init_seed=0))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.weight.fill_(0.5)
        layers["bert.encoder.layer.0.attention.self.value"].lora_A.weight[0, 0] = float("nan")
    before = _state(model)
    with pytest.raises(lr.NonFiniteError, match="value"):
        lr.merge(model)
    assert not any(layer.merged for layer in layers.values())
    assert _same(before, model.state_dict())


def test_lora_merge_refuses_a_finite_update_that_overflows_a_half_weight():
    layer = LoraLinear(torch.nn.Linear(4, 4).half(), r=2, scaling=1e5)
    with torch.no_grad():
        layer.lora_A.weight.fill_(1.0)
        layer.lora_B.weight.fill_(1.0)
    before = layer.base_layer.weight.clone()
    with pytest.raises(lr.NonFiniteError):
        layer.merge()
    assert torch.equal(before, layer.base_layer.weight) and not layer.merged


def test_dora_merge_refuses_the_same_way():
    model = lr.attach(tiny_bert(), lr.DoraConfig(target_modules=["query"], r=4, init_seed=0))
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    with torch.no_grad():
        layer.lora_A.weight[0, 0] = float("inf")
        layer.lora_B.weight.fill_(1.0)
    before = _state(model)
    with pytest.raises(lr.NonFiniteError):
        lr.merge(model)
    assert _same(before, model.state_dict()) and not layer.merged


# -- masks ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [[True, False, True], [1, 0, 1], np.array([1, 0, 1], np.uint8), [1.0, 0.0, 1.0]])
def test_zero_one_masks_still_work(mask):
    acc = CovarianceAccumulator(4)
    acc.update(np.ones((3, 4), np.float32), mask=np.asarray(mask))
    assert acc.count == 2


@pytest.mark.parametrize("bad", [2, -1, 0.5, np.nan])
def test_every_mask_value_other_than_zero_or_one_is_refused(bad):
    acc = CovarianceAccumulator(4)
    with pytest.raises(lr.InvalidArgumentError, match="0 or 1"):
        acc.update(np.ones((3, 4), np.float32), mask=np.array([1, bad, 0]))


# -- configs -----------------------------------------------------------------------------------------------------------


def _config_cases():
    from lowrank_rs.adapters.registry import methods

    minimal = {"talora": {"tasks": ["a", "b"]}}
    return [(m.config_type, minimal.get(m.name, {"target_modules": ["query"]})) for m in methods()]


@pytest.mark.parametrize("config_type, minimal", _config_cases(), ids=lambda v: getattr(v, "__name__", ""))
def test_every_config_refuses_fuzzed_field_values_with_config_error(config_type, minimal):
    import dataclasses

    from fuzz.targets import JSON_VALUES
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fields = [f.name for f in dataclasses.fields(config_type)]
    config_type.from_dict(minimal)

    @settings(max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(fields), st.one_of(JSON_VALUES, st.sampled_from(["8", "false", 1e308, -1, 0, [], {}])))
    def case(field, value):
        try:
            config_type.from_dict({**minimal, field: value})
        except lr.ConfigError:
            pass

    case()
    for field, value in (("r", "8"), ("r", False), ("use_rslora", "false"), ("alpha", 1e308), ("alpha", -1.0)):
        if field in fields:
            with pytest.raises(lr.ConfigError, match=field):
                config_type.from_dict({**minimal, field: value})


# -- the ONNX Runtime adapter writer -----------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_ort_adapter_file_mode_follows_the_umask(tmp_path, umask, mode):
    source = saved_adapter(tmp_path)
    old = os.umask(umask)
    try:
        out = write_ort_adapter(source, tmp_path / "a.onnx_adapter")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == mode


def test_a_killed_writers_temporary_is_removed_by_the_next_write_and_a_live_ones_is_kept(tmp_path):
    source = saved_adapter(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".a.onnx_adapter.{dead.pid}.x1y2.tmp"
    live = tmp_path / f".a.onnx_adapter.{os.getpid()}.x3y4.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"in progress")
    write_ort_adapter(source, tmp_path / "a.onnx_adapter")
    assert not stale.exists() and live.exists()


def test_a_temporary_whose_pid_was_reused_is_removed(tmp_path):
    # pids wrap (32768 on many machines): a running process that started after the file was last written is not
    # its writer, so the leftover goes.
    source = saved_adapter(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        reused = tmp_path / f".a.onnx_adapter.{other.pid}.x5y6.tmp"
        reused.write_bytes(b"half")
        old = time.time() - 60
        os.utime(reused, (old, old))
        write_ort_adapter(source, tmp_path / "a.onnx_adapter")
        assert not reused.exists()
    finally:
        other.kill()
        other.wait()
