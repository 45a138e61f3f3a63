"""TLoRA calibration across processes (``torchrun``): statistics reduced, not activations gathered.

Each rank measures its own share of the calibration examples (whole batches, dealt round-robin from the prefix of
``num_examples`` rows a single process would read). What adds up over examples is then reduced with collectives:

- per accumulator, one float64 vector ``[n, n·μ, upper triangle of n·C (+ n·μμᵀ for global centring)]`` — the
  count, the mean's terms and the scatter sum, ``d(d+3)/2 + 1`` numbers — ``reduce``d to one owner rank (largest
  accumulators first, each to the least-loaded rank), so after reduction a rank holds about ``1/W`` of them. While
  measuring, each rank still holds every accumulator for its own examples (``docs/distributed.md``, memory);
- per module, the score sum ``score · examples`` and the example and token counts, all-reduced (a few numbers);
- per module, when the gradient share is measured, the gradient sum ``Σ ∂L/∂W`` or its sketch
  (``memory.gradient_sum_shape``), appended to its accumulator's vector, so it reaches the rank that computes the
  module's ``A`` and share, and no other.

Ranks first agree on the accumulators' layout (names, sharing, dims, centring), so a mismatch is an error on every
rank, never a hang. Every rank then allocates ranks and scales from the same global scores (deterministic), each
owner computes its modules' bases with the core, and the bases are exchanged so every rank ends with the same plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ...errors import EmptyInputError, InvalidArgumentError
from ...linalg import CovarianceDtype
from ...training.distributed import Distributed, agree, all_reduce_sum, gather_owned, reduce_to_owners
from .calibrate import CalibrationPlan, CalibrationStatistics, collect_statistics, warn_low_gradient_share
from .config import TLoraConfig
from .memory import gradient_sum_shape

__all__ = ["calibrate_sharded", "reduce_statistics", "shard_batches"]


def shard_batches(batches: Iterable[Mapping[str, Any]], limit: int, ctx: Distributed) -> List[Mapping[str, Any]]:
    """This rank's batches among those holding the first ``limit`` rows (the last cut to fit), dealt round-robin."""
    taken: List[Mapping[str, Any]] = []
    seen = 0
    for batch in batches:
        rows = _rows(batch)
        if rows == 0:
            continue
        take = min(rows, limit - seen)
        if take < rows:
            batch = {k: v[:take] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
                     for k, v in batch.items()}  # fmt: skip
        taken.append(batch)
        seen += take
        if seen >= limit:
            break
    if len(taken) < ctx.world:
        raise EmptyInputError(
            f"{len(taken)} calibration batch(es) for {ctx.world} processes: each process needs at least one; pass "
            "smaller batches (one example each, as calibration_batches makes them) or fewer processes"
        )
    return taken[ctx.rank :: ctx.world]


def _rows(batch: Mapping[str, Any]) -> int:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if isinstance(ids, torch.Tensor):
        return int(ids.shape[0]) if ids.dim() > 1 else 1
    # Anything else is left for collect_statistics to explain.
    return 1


class _Reduced(CalibrationStatistics):
    """Statistics summed over the ranks: global scores and counts everywhere, covariances (and gradient sums) on their
    owners only."""

    def __init__(
        self, local: CalibrationStatistics, scores: Mapping[str, float], examples: int, tokens: int, gradients: bool
    ) -> None:
        super().__init__(local.modules, local.shapes, [], scores, examples, tokens, {} if gradients else None)
        self.covariances: Dict[str, np.ndarray] = {}
        self.groups: List[Tuple[str, ...]] = []

    def covariance(self, name: str, dtype: CovarianceDtype = "float64") -> np.ndarray:
        return self.covariances[name].astype(dtype, copy=False)

    def prepare(self, name: str) -> None:
        """Nothing to merge: the reduced covariances are final."""


def reduce_statistics(local: CalibrationStatistics, ctx: Distributed) -> Tuple[_Reduced, Dict[str, int]]:
    """``local`` summed over the ranks; returns the statistics and each module's owner rank."""
    groups: Dict[int, Tuple[Any, List[str]]] = {}
    for name in local.modules:
        accumulator = local.accumulator(name)
        groups.setdefault(id(accumulator), (accumulator, []))[1].append(name)
    ordered = sorted(groups.values(), key=lambda g: g[1])
    layout = [list(local.modules), [[names, acc.dim, acc.center] for acc, names in ordered]]
    # Before the first collective: ranks measuring other targets would otherwise sum mismatched vectors, or hang.
    agree("the calibration targets and their accumulators", layout, ctx, InvalidArgumentError)

    # Scores are means over a rank's examples: their sums over all examples add up.
    names = list(local.modules)
    sums = all_reduce_sum(
        [local.num_examples, local.num_tokens, local.gradients is not None]
        + [local.scores[n] * local.num_examples for n in names],
        ctx,
    )
    examples, tokens = int(sums[0]), int(sums[1])
    # A rank that ran out of memory dropped its gradient sums: then no rank has the whole sum, and none sends its own.
    gradients = local.gradients if int(sums[2]) == ctx.world else None
    scores = {n: s / examples for n, s in zip(names, sums[3:])}
    reduced = _Reduced(local, scores, examples, tokens, gradients is not None)

    keys = {" ".join(group): (acc, group) for acc, group in ordered}

    def additive(key: str) -> torch.Tensor:
        acc = keys[key][0]
        n = float(acc.count)
        mean = np.asarray(acc.mean(), dtype=np.float64)
        second = np.asarray(acc.covariance(), dtype=np.float64) * n
        if acc.center == "global":
            # Chan's merge in additive form: Σ(M2_r + n_r μ_r μ_rᵀ) − n μ μᵀ.
            second = second + n * np.outer(mean, mean)
        # The matrix is symmetric: its upper triangle is all that needs to travel (half the bytes).
        parts: List[np.ndarray] = [np.array([n]), n * mean, second[np.triu_indices(acc.dim)]]
        if gradients is not None:
            parts += [_gradient_of(gradients, name, gradient_sum_shape(*local.shapes[name])) for name in keys[key][1]]
        return torch.from_numpy(np.concatenate(parts))

    # Where this rank's sums live (the model's device); the reduced ones go back there.
    device = next((g.device for g in (gradients or {}).values()), torch.device("cpu"))
    sizes = {key: acc.dim * (acc.dim + 1) // 2 for key, (acc, _) in keys.items()}
    module_owner: Dict[str, int] = {}
    for key, owner, packed in reduce_to_owners(layout, sizes, additive, ctx, InvalidArgumentError):
        acc, group = keys[key]
        module_owner.update((name, owner) for name in group)
        if packed is None:
            continue
        d = acc.dim
        total = float(packed[0])
        end = 1 + d + d * (d + 1) // 2
        if reduced.gradients is not None:
            at = end
            for name in group:
                rows, d_in = gradient_sum_shape(*local.shapes[name])
                block = packed[at : at + rows * d_in].reshape(rows, d_in)
                reduced.gradients[name] = block.to(device=device, dtype=torch.float32)
                at += rows * d_in
        scatter = np.zeros((d, d))
        scatter[np.triu_indices(d)] = packed[1 + d : end].numpy()
        scatter = scatter + np.triu(scatter, 1).T
        if acc.center == "global":
            mu = packed[1 : 1 + d].numpy() / total
            scatter = scatter - total * np.outer(mu, mu)
        covariance = scatter / total if total > 0 else np.zeros((d, d))
        for name in group:
            reduced.covariances[name] = covariance
    return reduced, module_owner


def calibrate_sharded(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    config: TLoraConfig,
    ctx: Distributed,
    *,
    loss_fn: Optional[Any] = None,
    progress: bool = True,
    build: Any = None,
) -> CalibrationPlan:
    """:func:`~lowrank_rs.methods.tlora.calibrate.calibrate` on ``ctx.world`` processes; every rank returns the same
    plan. ``build`` is ``build_plan`` (passed in so this module needs none of its private helpers)."""
    mine = shard_batches(batches, config.num_examples, ctx)
    local = collect_statistics(model, mine, config, loss_fn=loss_fn, progress=progress and ctx.rank == 0)
    reduced, owner = reduce_statistics(local, ctx)
    del local
    owned = {name for name, rank in owner.items() if rank == ctx.rank}
    plan = build(model, reduced, config, progress=progress and ctx.rank == 0, owned=owned)
    bases = {
        m.name: (m.a, m.singular_values, m.energy, m.energy_exact, m.gradient_share)
        for m in plan.modules.values()
        if m.rank > 0
    }
    every = gather_owned(bases, owner, ctx)
    modules = []
    for module in plan.modules.values():
        if module.rank > 0:
            a, singular, energy, exact, share = every[module.name]
            module = dataclasses.replace(
                module, a=a, singular_values=singular, energy=energy, energy_exact=exact, gradient_share=share
            )
        modules.append(module)
    whole = CalibrationPlan(config, modules, reduced.num_examples, reduced.num_tokens)
    if ctx.rank == 0:
        warn_low_gradient_share(whole, stacklevel=4)
    return whole


def _gradient_of(gradients: Mapping[str, torch.Tensor], name: str, shape: Tuple[int, int]) -> np.ndarray:
    # A module whose output never reached this rank's loss has no sum: it adds zero.
    g = gradients.get(name)
    if g is None:
        return np.zeros(shape[0] * shape[1])
    return g.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
