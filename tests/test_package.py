"""Adapter directories: round trips, interop with the safetensors package, atomic writes, validation of reads."""

import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

import lowrank_rs
from lowrank_rs.package import CONFIG_FILE, WEIGHTS_FILE, read_adapter, write_adapter

CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "lowrank_rs": {"x": [1, 2]}}


def tensors(rng):
    return {
        "a.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
        "a.lora_B.weight": np.zeros((8, 4), np.float32),
        "half": rng.standard_normal((3, 5)).astype(np.float16),
        "double": rng.standard_normal(7),
        "scalar": np.array(2.5, np.float32),
        "cube": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_round_trip_and_peft_layout(tmp_path, rng):
    t = tensors(rng)
    d = tmp_path / "adapter"
    write_adapter(d, t, CONFIG)
    assert sorted(os.listdir(d)) == [CONFIG_FILE, WEIGHTS_FILE]
    back, config = read_adapter(d)
    assert config == CONFIG
    assert set(back) == set(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    # The independent reader agrees.
    other = load_file(str(d / WEIGHTS_FILE))
    for k, v in t.items():
        np.testing.assert_array_equal(other[k], v)
    assert json.loads((d / CONFIG_FILE).read_text()) == CONFIG


def test_bfloat16_torch_round_trip(tmp_path):
    t = {"w": torch.randn(5, 6, dtype=torch.bfloat16), "f": torch.randn(3)}
    write_adapter(tmp_path / "a", t, {"r": 1})
    back, _ = read_adapter(tmp_path / "a", framework="torch")
    assert back["w"].dtype == torch.bfloat16
    assert torch.equal(back["w"], t["w"]) and torch.equal(back["f"], t["f"])
    raw, _ = read_adapter(tmp_path / "a")
    assert raw["w"].dtype == np.uint16
    np.testing.assert_array_equal(raw["w"], t["w"].view(torch.int16).numpy().view(np.uint16))
    assert torch.equal(load_torch(str(tmp_path / "a" / WEIGHTS_FILE))["w"], t["w"])


def test_reads_files_written_by_the_safetensors_package(tmp_path):
    d = tmp_path / "peft"
    d.mkdir()
    t = {"x": torch.randn(3, 4), "y": torch.randn(2, dtype=torch.float16), "z": torch.randn(4, dtype=torch.bfloat16)}
    save_torch(t, str(d / WEIGHTS_FILE), metadata={"format": "pt"})
    (d / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA"}))
    back, config = read_adapter(d, framework="torch")
    assert config == {"peft_type": "LORA"}
    for k in t:
        assert torch.equal(back[k], t[k])


def test_overwrite_keeps_foreign_files_and_leaves_no_temporaries(tmp_path, rng):
    d = tmp_path / "adapter"
    write_adapter(d, {"old": np.ones(3, np.float32)}, {"v": 1})
    (d / "README.md").write_text("keep me")
    (d / "sub" / "deep").mkdir(parents=True)
    (d / "sub" / "deep" / "f.txt").write_text("me too")
    write_adapter(d, {"new": np.zeros(2, np.float32)}, {"v": 2})
    back, config = read_adapter(d)
    assert list(back) == ["new"] and config == {"v": 2}
    assert (d / "README.md").read_text() == "keep me"
    assert (d / "sub" / "deep" / "f.txt").read_text() == "me too"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_failed_write_leaves_existing_adapter_untouched(tmp_path):
    d = tmp_path / "adapter"
    write_adapter(d, {"w": np.ones(3, np.float32)}, {"v": 1})
    before = {f: (d / f).read_bytes() for f in os.listdir(d)}
    with pytest.raises(lowrank_rs.LowRankError):
        write_adapter(d, {"w": np.ones(3, np.float32)}, {"bad": float("nan")})
    with pytest.raises(lowrank_rs.DtypeError):
        write_adapter(d, {"w": np.ones(3, np.int32)}, {"v": 3})
    with pytest.raises(lowrank_rs.DtypeError):
        write_adapter(d, {"w": [1.0, 2.0]}, {"v": 3})
    with pytest.raises(lowrank_rs.LowRankError):
        write_adapter(d, {"__metadata__": np.ones(1, np.float32)}, {"v": 3})
    assert {f: (d / f).read_bytes() for f in os.listdir(d)} == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_write_into_a_file_path_is_an_error(tmp_path):
    f = tmp_path / "plain.txt"
    f.write_text("x")
    with pytest.raises(lowrank_rs.LowRankError):
        write_adapter(f, {"w": np.ones(1, np.float32)}, {})
    assert f.read_text() == "x"


def _write_raw(d, header, data=b"", header_len=None):
    d.mkdir(exist_ok=True)
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(h) if header_len is None else header_len
    (d / WEIGHTS_FILE).write_bytes(struct.pack("<Q", n) + h + data)
    if not (d / CONFIG_FILE).exists():
        (d / CONFIG_FILE).write_text("{}")


@pytest.mark.parametrize(
    "header,data,header_len,match",
    [
        (b"", b"", None, "header"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "a"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "a"),
        ({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "I64"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "a"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**9, "header"),
        (b"{not json", b"", None, "JSON|json"),
        (b"[1, 2]", b"", None, "object"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", None, "shape"),
        ({"__metadata__": {"k": 1}}, b"", None, "metadata"),
    ],
)
def test_corrupt_weights_are_clear_errors(tmp_path, header, data, header_len, match):
    d = tmp_path / "bad"
    _write_raw(d, header, data, header_len)
    with pytest.raises(lowrank_rs.AdapterFormatError if "I64" not in match else lowrank_rs.LowRankError, match=match):
        read_adapter(d)


def test_truncation_at_every_point_is_an_error(tmp_path, rng):
    good = tmp_path / "good"
    write_adapter(good, {"w": rng.standard_normal((4, 4)).astype(np.float32)}, {"r": 1})
    blob = (good / WEIGHTS_FILE).read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CONFIG_FILE).write_text("{}")
    for cut in [0, 3, 8, 20, len(blob) // 2, len(blob) - 1]:
        (bad / WEIGHTS_FILE).write_bytes(blob[:cut])
        with pytest.raises(lowrank_rs.AdapterFormatError):
            read_adapter(bad)


def test_random_garbage_never_crashes(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "g"
    d.mkdir()
    (d / CONFIG_FILE).write_text("{}")
    for _ in range(200):
        n = int(rng.integers(0, 64))
        (d / WEIGHTS_FILE).write_bytes(rng.integers(0, 256, size=n, dtype=np.uint8).tobytes())
        with pytest.raises(lowrank_rs.LowRankError):
            read_adapter(d)


@pytest.mark.parametrize("config", [b"{bad json", b"[1, 2]", b"\xff\xfe", b""])
def test_corrupt_config_is_a_clear_error(tmp_path, config, rng):
    d = tmp_path / "a"
    write_adapter(d, {"w": np.ones(2, np.float32)}, {})
    (d / CONFIG_FILE).write_bytes(config)
    with pytest.raises(lowrank_rs.AdapterFormatError, match=CONFIG_FILE):
        read_adapter(d)


def test_missing_files(tmp_path):
    with pytest.raises(lowrank_rs.LowRankError, match="missing|No such|not found|exist"):
        read_adapter(tmp_path / "nowhere")
    d = tmp_path / "half"
    write_adapter(d, {"w": np.ones(2, np.float32)}, {})
    os.remove(d / CONFIG_FILE)
    with pytest.raises(lowrank_rs.LowRankError, match=CONFIG_FILE):
        read_adapter(d)
    with pytest.raises(lowrank_rs.LowRankError):
        read_adapter(d, framework="jax")
