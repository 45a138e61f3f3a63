"""The extension matches its typed stubs; the CLI's demo and inspect run end to end; threads setting."""

import subprocess
import sys

import numpy as np
import pytest

import lowrank_rs
from lowrank_rs.cli import main


def test_stubs_match_extension():
    pytest.importorskip("mypy")
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "lowrank_rs._core", "--ignore-missing-stub"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_error_is_a_lowrank_error():
    for name in lowrank_rs.errors.__all__:
        assert issubclass(getattr(lowrank_rs, name), lowrank_rs.LowRankError)
    assert issubclass(lowrank_rs.ShapeError, ValueError)
    assert issubclass(lowrank_rs.DtypeError, TypeError)
    assert issubclass(lowrank_rs.AdapterIOError, OSError)


def test_num_threads_setting():
    lowrank_rs.set_num_threads(1)
    assert lowrank_rs.get_num_threads() == 1
    lowrank_rs.set_num_threads(0)
    assert lowrank_rs.get_num_threads() >= 1
    with pytest.raises(lowrank_rs.LowRankError):
        lowrank_rs.set_num_threads(-1)


def test_core_works_after_fork():
    from lowrank_rs.linalg import randomized_svd

    a = np.random.default_rng(0).standard_normal((300, 200))
    randomized_svd(a, 5)  # the parent's pool exists before the fork
    code = (
        "import os, numpy as np\n"
        "from lowrank_rs.linalg import randomized_svd\n"
        "a = np.random.default_rng(0).standard_normal((300, 200))\n"
        "randomized_svd(a, 5)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    randomized_svd(a, 5); os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], timeout=120)
    assert out.returncode == 0


def test_demo_and_inspect(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--layers", "1", "--dim", "64", "--rank", "4", "--batches", "3"]) == 0
    printed = capsys.readouterr().out
    assert "budget 28 = 28 allocated" in printed
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lora_A.weight" in printed and '"peft_type": "LORA"' in printed


def test_cli_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "lowrank-rs: error:" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "demo" in capsys.readouterr().out
