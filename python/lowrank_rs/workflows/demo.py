"""A short TLoRA calibration on generated activations, end to end through the Rust core.

There is no model and no loss here, so the per-module sensitivity is a stand-in (``‖W·C‖_F / ‖W‖_F``, how strongly
the layer responds to the activations it sees); everything else is the real pipeline: masked streaming covariance
fed from a background thread, budgeted rank and scale allocation, the task-aware basis of ``W·C`` per module, and a
PEFT-layout adapter written atomically and read back.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Dict, List, Tuple

import numpy as np
from tqdm import tqdm

from ..errors import AdapterFormatError
from ..linalg import CovarianceAccumulator, allocate_alphas, allocate_ranks, task_aware_basis
from ..package import read_adapter, write_adapter

# LLaMA-style projections, grouped by the tensor they read: q/k/v share one accumulator, gate/up another.
_GROUPS: Dict[str, Tuple[str, ...]] = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}


def _activations(rng: np.random.Generator, batch: int, seq: int, dim: int, outliers: np.ndarray) -> np.ndarray:
    # A few dominant outlier channels, as real transformer activations have.
    x = rng.standard_normal((batch, seq, dim), dtype=np.float32)
    x[..., outliers] *= 20.0
    return x


def _weight(rng: np.random.Generator, d_out: int, d_in: int) -> np.ndarray:
    # Power-law singular values, like pretrained projections.
    k = min(d_out, d_in)
    u, _ = np.linalg.qr(rng.standard_normal((d_out, k)))
    v, _ = np.linalg.qr(rng.standard_normal((d_in, k)))
    s = (np.arange(1, k + 1) ** -0.7).astype(np.float64)
    return ((u * s) @ v.T).astype(np.float32)


def run_demo(out: str, layers: int, dim: int, rank: int, batches: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ffn = int(dim * 8 / 3) // 64 * 64 or 64
    in_dims = {"attn_in": dim, "attn_out": dim, "mlp_in": dim, "mlp_out": ffn}
    out_dims = {"self_attn.q_proj": dim, "self_attn.k_proj": dim, "self_attn.v_proj": dim, "self_attn.o_proj": dim}
    out_dims.update({"mlp.gate_proj": ffn, "mlp.up_proj": ffn, "mlp.down_proj": dim})
    print(f"lowrank-rs demo: {layers} layers, hidden {dim}, FFN {ffn}, {batches} calibration batches")

    accs = {(i, g): CovarianceAccumulator(in_dims[g], center="sequence") for i in range(layers) for g in _GROUPS}
    outliers = {g: rng.choice(d, size=4, replace=False) for g, d in in_dims.items()}

    # The core releases the GIL, so a feeder thread accumulates while the "model" produces the next batch.
    work: queue.Queue = queue.Queue(maxsize=4)

    def feed() -> None:
        while True:
            item = work.get()
            if item is None:
                return
            acc, x, mask = item
            acc.update(x, mask=mask)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    t0 = time.perf_counter()
    tokens = 0
    for _ in tqdm(range(batches), desc="calibration batches", unit="batch"):
        lengths = rng.integers(16, 64, size=4)
        seq = int(lengths.max())
        mask = np.arange(seq)[None, :] < lengths[:, None]  # right padding, never counted
        tokens += int(mask.sum())
        for (_, group), acc in accs.items():
            work.put((acc, _activations(rng, 4, seq, in_dims[group], outliers[group]), mask))
    work.put(None)
    feeder.join()
    t_cov = time.perf_counter() - t0

    names: List[str] = []
    weights: Dict[str, np.ndarray] = {}
    covs: Dict[str, np.ndarray] = {}
    for i in range(layers):
        for group, members in _GROUPS.items():
            c = accs[(i, group)].covariance()
            for m in members:
                name = f"model.layers.{i}.{m}"
                names.append(name)
                weights[name] = _weight(rng, out_dims[m], in_dims[group])
                covs[name] = c.astype(np.float32)
    scores = [
        float(np.linalg.norm(weights[n] @ covs[n]) / np.linalg.norm(weights[n])) for n in names
    ]  # stand-in score, see module docstring
    budget = rank * len(names)
    caps = [min(weights[n].shape) for n in names]
    ranks = allocate_ranks(scores, budget, min_rank=0, max_rank=caps, multiple_of=1)
    alphas = allocate_alphas(scores, alpha=float(rank))

    t0 = time.perf_counter()
    tensors: Dict[str, np.ndarray] = {}
    energies = []
    for n, r in tqdm(list(zip(names, ranks)), desc="task-aware bases", unit="module"):
        if r == 0:
            energies.append(float("nan"))
            continue
        vt, s = task_aware_basis(weights[n], covs[n], r, seed=seed)
        total = float(np.linalg.norm(weights[n] @ covs[n]) ** 2)
        energies.append(float((s.astype(np.float64) ** 2).sum() / total))
        prefix = f"base_model.model.{n}"
        tensors[f"{prefix}.lora_A.weight"] = vt
        tensors[f"{prefix}.lora_B.weight"] = np.zeros((weights[n].shape[0], r), dtype=np.float32)
    t_basis = time.perf_counter() - t0

    short = {n: n.removeprefix("model.") if hasattr(n, "removeprefix") else n for n in names}
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": float(rank),
        "target_modules": sorted({m.split(".")[-1] for ms in _GROUPS.values() for m in ms}),
        # alpha_pattern stores γ_i·r_i so that PEFT's alpha/r_i reproduces γ_i = α_i / r (docs/methods.md).
        "rank_pattern": {short[n]: r for n, r in zip(names, ranks) if r > 0},
        "alpha_pattern": {short[n]: a / rank * r for n, a, r in zip(names, alphas, ranks) if r > 0},
        "lowrank_rs": {"method": "tlora", "demo": True, "budget": budget, "scores": dict(zip(names, scores))},
    }
    write_adapter(out, tensors, config)
    back, _ = read_adapter(out)
    if set(back) != set(tensors):
        raise AdapterFormatError(f"{out!r} read back with tensors {sorted(back)}, not the {len(tensors)} written")

    print(f"\n{'module':<34} {'rank':>5} {'alpha':>6} {'score':>9} {'energy':>8}")
    for n, r, a, score, share in zip(names, ranks, alphas, scores, energies):
        print(f"{n:<34} {r:>5} {a:>6.0f} {score:>9.3f} {share:>8.1%}")
    print(
        f"\n{tokens:,} tokens (padding excluded) into {len(accs)} shared accumulators in {t_cov:.2f} s; "
        f"{len(names)} bases in {t_basis:.2f} s; budget {budget} = {sum(ranks)} allocated"
    )
    print(f"adapter written to {out} ({len(tensors)} tensors); inspect it with: lowrank-rs inspect {out}")
