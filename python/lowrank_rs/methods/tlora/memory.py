"""What a TLoRA calibration's covariance statistics will cost in memory, known from the targets' shapes alone.

:func:`plan_memory` runs before any forward: :func:`~lowrank_rs.methods.tlora.calibrate` prints its estimate and
refuses to start when it exceeds ``config.max_covariance_bytes``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from torch import nn

from ...adapters.targets import resolve_modules_to_save, resolve_targets
from ...errors import InvalidArgumentError, ShapeError
from ...statistics import resolve_backend
from .config import TLoraConfig

__all__ = [
    "MemoryPlan",
    "default_basis_workers",
    "energy_is_exact",
    "gradient_sum_shape",
    "gradient_sums_bytes",
    "measures_gradient_share",
    "plan_memory",
    "format_bytes",
]

# gradient_share=None measures the share when the gradient sums (float32, one per target, sketched as below) take
# at most this much: 20 MiB for all-MiniLM-L6-v2's 36 block linears, 1.09 GiB for LLaMA-7B's 224 and 1.7 GiB for
# LLaMA-13B's 280 — beside the 20 GiB and more their covariances take.
GRADIENT_SUMS_AUTO_BYTES = 2 << 30

# A target with more outputs keeps a sketch Ψ·Σ∂L/∂W of this many rows instead of the whole [d_out, d_in] sum
# (Ψ: scaled orthonormal rows, shared by the targets of one width); the share ‖ΨG Aᵀ‖²/‖ΨG‖² is then an estimate of
# ‖G Aᵀ‖²/‖G‖² (docs/methods.md, the gradient share's cost, gives its measured error). Narrower targets keep G
# itself: exact.
GRADIENT_SKETCH_ROWS = 256


def gradient_sum_shape(d_out: int, d_in: int) -> Tuple[int, int]:
    """Shape of the gradient sum kept for a ``[d_out, d_in]`` target: ``G`` itself, or its sketch's."""
    return min(d_out, GRADIENT_SKETCH_ROWS), d_in


# build_plan checks the energy its bases capture exactly (forming W·C in float64) up to d_out·d_in² multiply-adds of
# this: exactly, it costs several times the randomized SVD itself on a 7B model's MLP. Above it the part of W·C
# outside A's row space is estimated (Hutch++-style, calibrate._captured_energy), in float32 like the basis.
EXACT_ENERGY_LIMIT = 1 << 30


def energy_is_exact(d_out: int, d_in: int) -> bool:
    """Whether the plan's energy check for a ``[d_out, d_in]`` weight is exact (float64 ``W·C``)."""
    return d_out * d_in * d_in <= EXACT_ENERGY_LIMIT


# Sibling modules that read one tensor in the architectures this project knows (LLaMA/Qwen/Mistral attention and
# MLP, BERT, DeBERTa, Mixtral-style experts, GPT-NeoX-like "q/k/v"); they share one accumulator at run time, where
# sharing is detected by tensor identity. Any other target is counted alone, so the estimate can only be high.
SHARED_INPUTS: Tuple[Tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("query_proj", "key_proj", "value_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("wq", "wk", "wv"),
    ("q", "k", "v"),
)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The covariance memory of a calibration.

    - ``groups``: the accumulators, each ``(modules, d_in)``;
    - ``accumulator_bytes``: their f64 sums, held from the first forward until the plan is built (the core keeps the
      lower triangle, the torch backend the full square on the model's device);
    - ``transient_bytes``: the largest extra working memory at a time: one update's f32 product on the torch
      backend, and while bases are computed one ``[d_in, d_in]`` float32 covariance per basis worker (float64 plus
      its float32 copy for the small modules whose energy is checked exactly);
    - ``backend``: ``"core"`` or ``"torch"``;
    - ``gradient_bytes``: the float32 gradient sums ``Σ ∂L/∂W`` the gradient share needs (as much as the target
      weights in float32, on the model's device), 0 when it is not measured. Not part of :attr:`total_bytes` nor of
      ``max_covariance_bytes``: ``gradient_share=False`` is how to save it.
    """

    groups: Tuple[Tuple[Tuple[str, ...], int], ...]
    accumulator_bytes: int
    transient_bytes: int
    backend: str
    device: str
    gradient_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.accumulator_bytes + self.transient_bytes

    def __str__(self) -> str:
        shared = sum(1 for names, _ in self.groups if len(names) > 1)
        modules = sum(len(names) for names, _ in self.groups)
        return (
            f"TLoRA covariance memory: {len(self.groups)} accumulators for {modules} modules ({shared} shared), "
            f"{format_bytes(self.accumulator_bytes)} of f64 sums on {self.device} ({self.backend}) + up to "
            f"{format_bytes(self.transient_bytes)} working memory = {format_bytes(self.total_bytes)}"
            + (f"; gradient sums {format_bytes(self.gradient_bytes)}" if self.gradient_bytes else "")
        )


def default_basis_workers() -> int:
    """Bases computed at once by default: half the cores, at most 4. Each basis's products already use every core
    of the core's pool, so concurrent bases only overlap their serial parts, and each holds its own covariance.
    Measured on 2 cores (all-MiniLM-L6-v2, 36 modules, quiet machine): one worker 1.09 s, two 0.92 s, while the bases
    phase's addition to the peak memory fell from 58 to 20 MiB with one (bench/RESULTS.md); at LLM widths the
    covariances held are what limits a calibration, so small hosts get one worker.
    """
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"  # pragma: no cover - the loop returns at GiB


def plan_memory(
    model_or_shapes: Union[nn.Module, Mapping[str, Tuple[int, int]]],
    config: TLoraConfig,
    *,
    device: Any = None,
    basis_workers: Optional[int] = None,
) -> MemoryPlan:
    """The covariance memory ``config``'s targets need, from shapes alone (nothing runs).

    ``model_or_shapes``: the model (targets resolved as calibration resolves them) or a mapping
    ``module name → (d_out, d_in)`` (e.g. LLaMA-7B's without loading it). ``device``: where the activations will
    live (default: the model's, or the CPU for shapes); with ``config.statistics_backend="auto"`` it picks the
    backend. ``basis_workers``: bases computed at once (each holds one covariance); default as
    :func:`~lowrank_rs.methods.tlora.build_plan`'s, :func:`default_basis_workers`.

    Modules known to read one tensor (:data:`SHARED_INPUTS`: q/k/v, gate/up under one parent) share an accumulator;
    others are counted alone, so the estimate is an upper bound when a model shares more.
    """
    if not isinstance(config, TLoraConfig):
        raise InvalidArgumentError(f"plan_memory needs a TLoraConfig, not {type(config).__name__}")
    shapes = _shapes(model_or_shapes, config)
    if device is None:
        device = _device(model_or_shapes)
    backend = resolve_backend(config.statistics_backend, device)
    plan_groups = _groups(shapes)
    if backend == "core":
        accumulators = sum(8 * (d * (d + 1) // 2 + d) for _, d in plan_groups)
        update = 0
    else:
        accumulators = sum(8 * (d * d + d) for _, d in plan_groups)
        update = max((4 * d * d for _, d in plan_groups), default=0)
    # A basis worker holds its module's covariance in float32, or in float64 plus the float32 copy the core makes
    # where the energy check is exact (small modules).
    held = sorted(((12 if energy_is_exact(d_out, d_in) else 4) * d_in * d_in for d_out, d_in in shapes.values()))
    workers = default_basis_workers() if basis_workers is None else basis_workers
    basis = sum(held[::-1][: max(1, workers)])
    gradients = gradient_sums_bytes(shapes) if measures_gradient_share(config, shapes) else 0
    return MemoryPlan(plan_groups, accumulators, max(update, basis), backend, str(device), gradients)


def _groups(shapes: Mapping[str, Tuple[int, int]]) -> Tuple[Tuple[Tuple[str, ...], int], ...]:
    """The accumulators calibration will make: modules known to read one tensor share one (see SHARED_INPUTS)."""
    groups: Dict[Tuple[Any, ...], List[str]] = {}
    dims: Dict[Tuple[Any, ...], int] = {}
    for name, (_, d_in) in shapes.items():
        parent, _, leaf = name.rpartition(".")
        family = next((i for i, group in enumerate(SHARED_INPUTS) if leaf in group), None)
        key: Tuple[Any, ...] = (parent, family, d_in) if family is not None else (name,)
        groups.setdefault(key, []).append(name)
        dims[key] = d_in
    return tuple((tuple(names), dims[key]) for key, names in groups.items())


def gradient_sums_bytes(shapes: Mapping[str, Tuple[int, int]]) -> int:
    """Memory of the float32 gradient sums (or sketches) for targets of these ``(d_out, d_in)`` shapes."""
    return sum(4 * math.prod(gradient_sum_shape(d_out, d_in)) for d_out, d_in in shapes.values())


def measures_gradient_share(config: TLoraConfig, shapes: Mapping[str, Tuple[int, int]]) -> bool:
    """Whether calibration with ``config`` on targets of these shapes keeps the gradient sums its share needs."""
    if config.gradient_share is not None:
        return config.gradient_share
    return gradient_sums_bytes(shapes) <= GRADIENT_SUMS_AUTO_BYTES


def check_memory(plan: MemoryPlan, config: TLoraConfig) -> None:
    """Refuse a calibration whose covariance memory exceeds ``config.max_covariance_bytes``."""
    cap = config.max_covariance_bytes
    if cap is not None and plan.total_bytes > cap:
        widest = max(plan.groups, key=lambda g: g[1])
        raise InvalidArgumentError(
            f"calibration would need {format_bytes(plan.total_bytes)} for covariances "
            f"({format_bytes(plan.accumulator_bytes)} of accumulators + {format_bytes(plan.transient_bytes)} working "
            f"memory), above max_covariance_bytes = {format_bytes(cap)}. The widest input is {widest[1]} "
            f"({widest[0][0]!r}): leave such modules out of target_modules, calibrate fewer layers, or raise the cap"
        )


def _shapes(model_or_shapes: Any, config: TLoraConfig) -> Dict[str, Tuple[int, int]]:
    if isinstance(model_or_shapes, nn.Module):
        modules = dict(model_or_shapes.named_modules())
        keep = resolve_modules_to_save(modules, config.modules_to_save)
        names = resolve_targets(modules, config.target_modules, keep, type(model_or_shapes).__name__)
        return {n: (modules[n].out_features, modules[n].in_features) for n in names}
    if not isinstance(model_or_shapes, Mapping):
        raise InvalidArgumentError(
            f"plan_memory needs a model or a mapping of module names to (d_out, d_in), not "
            f"{type(model_or_shapes).__name__}"
        )
    shapes: Dict[str, Tuple[int, int]] = {}
    for name, shape in model_or_shapes.items():
        try:
            d_out, d_in = (int(v) for v in shape)
        except (TypeError, ValueError):
            raise ShapeError(f"module {name!r}: shape must be (d_out, d_in), got {shape!r}") from None
        if d_out <= 0 or d_in <= 0:
            raise ShapeError(f"module {name!r}: shape must be positive, got {shape!r}")
        shapes[str(name)] = (d_out, d_in)
    if not shapes:
        raise InvalidArgumentError("plan_memory got no modules")
    return shapes


def _device(model_or_shapes: Any) -> Any:
    import torch

    if isinstance(model_or_shapes, nn.Module):
        for p in model_or_shapes.parameters():
            return p.device
    return torch.device("cpu")
