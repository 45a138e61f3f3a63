"""Hardening of the Rust core and its binding (issue 14): allocation failures, panics, error classes, special
files, argument caps, scale invariance, Ctrl-C, and the temporary directories of interrupted writes.

Crash-prone cases run in a child interpreter, so that a regression fails the test instead of killing pytest.
"""

import os
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from lowrank_rs import _core
from lowrank_rs.errors import InternalError, InvalidArgumentError, LowRankError, OutOfMemoryError

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc, RLIMIT_AS)")


def run_child(body: str, timeout: float = 20.0, **kwargs) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        """
        import os, resource, signal, sys, threading, time
        import numpy as np
        import lowrank_rs, lowrank_rs.errors
        from lowrank_rs import _core

        def limit_memory(margin_mb):
            # Address space now plus a margin: inputs already exist, any large working buffer is refused.
            with open("/proc/self/status") as f:
                vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (vm + margin_mb * 2**20, resource.RLIM_INFINITY))

        def report(call):
            try:
                call()
                print("ok")
            except BaseException as e:
                print(type(e).__name__)
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, **kwargs
    )


OOM_CASES = {
    # The exact path materialises the 96 MB matrix again.
    "randomized_svd": """
        a = np.ones((4000, 3000))
        _core.randomized_svd(np.ones((20, 10)), 2, 2, 1, 0)
        limit_memory(48)
        report(lambda: _core.randomized_svd(a, 2990, 10, 1, 0))
    """,
    "task_aware_basis": """
        w = np.ones((3000, 3000)); c = np.eye(3000)
        _core.task_aware_basis(np.ones((20, 10)), np.eye(10), 2, 2, 1, 0)
        limit_memory(48)
        report(lambda: _core.task_aware_basis(w, c, 2990, 10, 1, 0))
    """,
    # The transposed batch is another 256 MB.
    "covariance_update": """
        acc = _core.CovarianceAccumulator(64, "none")
        acc.update(np.ones((1, 8, 64), np.float32))
        x = np.ones((1, 1_000_000, 64), np.float32)
        limit_memory(48)
        report(lambda: acc.update(x))
    """,
    "read_adapter": """
        import sys
        d = sys.argv[1]
        _core.write_adapter(d, [("w", "f32", [25_000_000], np.ones(100_000_000, np.uint8))], "{}")
        limit_memory(48)
        report(lambda: _core.read_adapter(d))
    """,
    "write_adapter": """
        import sys
        d = sys.argv[1]
        data = np.ones(100_000_000, np.uint8)
        _core.write_adapter(d, [("w", "f32", [2], np.ones(8, np.uint8))], "{}")
        limit_memory(48)
        report(lambda: _core.write_adapter(d, [("w", "f32", [25_000_000], data)], "{}"))
    """,
}


@linux_only
@pytest.mark.parametrize("case", sorted(OOM_CASES))
def test_out_of_memory_is_an_exception_not_a_crash(case, tmp_path):
    body = OOM_CASES[case].replace("sys.argv[1]", repr(str(tmp_path / "adapter")))
    child = run_child(body)
    assert child.returncode == 0, f"child died ({child.returncode}): {child.stderr[-2000:]}"
    assert child.stdout.strip() == "OutOfMemoryError", child.stderr[-2000:]


def test_out_of_memory_error_is_a_memory_error():
    assert issubclass(OutOfMemoryError, MemoryError) and issubclass(OutOfMemoryError, LowRankError)


def test_a_core_panic_is_an_internal_error():
    with pytest.raises(InternalError, match="deliberate"):
        _core._panic_for_testing("deliberate")
    # The interpreter and the core are still usable afterwards.
    u, s, vt = _core.randomized_svd(np.eye(4), 2, 0, 0, 0)
    assert np.allclose(s, 1.0)


def test_invalid_arguments_are_invalid_argument_errors():
    with pytest.raises(InvalidArgumentError, match="dimension must be positive"):
        _core.CovarianceAccumulator(0, "none")
    with pytest.raises(ValueError):
        _core.CovarianceAccumulator(3, "sideways")
    acc = _core.CovarianceAccumulator(3, "none")
    with pytest.raises(InvalidArgumentError):
        acc.merge(_core.CovarianceAccumulator(3, "global"))


def test_thread_count_is_capped():
    before = _core.get_num_threads()
    for n in (1025, 10_000, 2**63):
        with pytest.raises(InvalidArgumentError, match="1024"):
            _core.set_num_threads(n)
        assert _core.get_num_threads() == before
    _core.set_num_threads(1024)
    assert _core.get_num_threads() == 1024
    _core.set_num_threads(0)


def test_power_iterations_are_capped():
    a = np.random.default_rng(0).standard_normal((30, 20))
    with pytest.raises(InvalidArgumentError, match="power_iters 65"):
        _core.randomized_svd(a, 3, 2, 65, 0)
    with pytest.raises(InvalidArgumentError, match="power_iters"):
        _core.task_aware_basis(a, np.eye(20), 3, 2, 1000, 0)
    _core.randomized_svd(a, 3, 2, 64, 0)


@linux_only
def test_a_fifo_is_refused_not_waited_on(tmp_path):
    d = tmp_path / "adapter"
    _core.write_adapter(str(d), [("w", "f32", [2], np.ones(8, np.uint8))], "{}")
    (d / "adapter_model.safetensors").unlink()
    os.mkfifo(d / "adapter_model.safetensors")
    child = run_child(f"report(lambda: _core.read_adapter({str(d)!r}))", timeout=15)
    assert child.stdout.strip() == "AdapterFormatError", child.stderr[-2000:]


@linux_only
def test_a_device_behind_a_symlink_is_refused(tmp_path):
    d = tmp_path / "adapter"
    _core.write_adapter(str(d), [("w", "f32", [2], np.ones(8, np.uint8))], "{}")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        original = d / name
        original.rename(tmp_path / name)
        original.symlink_to("/dev/zero")
        # In a child with a memory limit: reading /dev/zero would otherwise take the machine's memory.
        child = run_child(f"limit_memory(256)\nreport(lambda: _core.read_adapter({str(d)!r}))", timeout=15)
        assert child.stdout.strip() == "AdapterFormatError", child.stderr[-2000:]
        original.unlink()
        (tmp_path / name).rename(original)
    _core.read_adapter(str(d))


def _spectrum_matrix(dtype):
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((120, 40)))
    v, _ = np.linalg.qr(rng.standard_normal((80, 40)))
    s = 0.8 ** np.arange(40)
    return ((u * s) @ v.T).astype(dtype)


@pytest.mark.parametrize(
    "dtype,factors,tol",
    [(np.float32, (1e-30, 1e-25, 1.0, 1e25), 1e-5), (np.float64, (1e-150, 1e154, 1e300), 1e-12)],
)
@pytest.mark.parametrize("rank,oversample", [(8, 6), (70, 10)])
def test_randomized_svd_is_scale_invariant(dtype, factors, tol, rank, oversample):
    a = _spectrum_matrix(dtype)
    _, s0, vt0 = _core.randomized_svd(a, rank, oversample, 3, 1)
    signal_rows = min(rank, 40)
    for f in factors:
        _, s, vt = _core.randomized_svd((a * dtype(f)).astype(dtype), rank, oversample, 3, 1)
        assert np.all(np.isfinite(s)), f
        np.testing.assert_allclose(s.astype(np.float64) / f, s0, rtol=0, atol=tol * s0[0], err_msg=f"×{f:g}")
        np.testing.assert_allclose(vt[:signal_rows], vt0[:signal_rows], atol=1e-3 if dtype == np.float32 else 1e-9)


@linux_only
def test_ctrl_c_interrupts_a_long_decomposition():
    child = run_child(
        """
        rng = np.random.default_rng(0)
        w = rng.standard_normal((1500, 1500)); g = rng.standard_normal((1500, 1500)); c = g @ g.T / 1500
        t = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
        start = time.monotonic(); t.start()
        try:
            _core.task_aware_basis(w, c, 100, 10, 64, 0)
            print("finished", time.monotonic() - start)
        except KeyboardInterrupt:
            print("interrupted", time.monotonic() - start)
        """,
        timeout=60,
    )
    outcome, elapsed = child.stdout.split()
    assert outcome == "interrupted", child.stderr[-2000:]
    assert float(elapsed) < 2.0


@linux_only
def test_stale_temporary_directories_are_removed(tmp_path):
    dead_old = tmp_path / ".adapter.tmp-2147483000-0"
    dead_fresh = tmp_path / ".adapter.tmp-2147483001-0"
    mine = tmp_path / f".adapter.tmp-{os.getpid()}-99"
    other = tmp_path / ".other.tmp-2147483000-0"
    for d in (dead_old, dead_fresh, mine, other):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"partial")
    old = time.time() - 600
    for d in (dead_old, mine, other):
        os.utime(d, (old, old))
    _core.write_adapter(str(tmp_path / "adapter"), [("w", "f32", [2], np.ones(8, np.uint8))], "{}")
    assert not dead_old.exists()
    # A writer that may still be running (fresh, or alive), and other targets' temporaries, are left alone.
    assert dead_fresh.exists() and mine.exists() and other.exists()
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


@linux_only
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o027])
def test_written_files_follow_the_umask(tmp_path, umask):
    d = tmp_path / "adapter"
    child = run_child(
        f"os.umask({umask:#o})\n"
        f"_core.write_adapter({str(d)!r}, [('w', 'f32', [2], np.ones(8, np.uint8))], '{{}}')\n"
        "print('ok')"
    )
    assert child.stdout.strip() == "ok", child.stderr[-2000:]
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
