"""TLoRA's one-call API: calibration in one process, or sharded across the processes of a torchrun job."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from torch import nn

from ...training.distributed import detect
from .calibrate import CalibrationPlan, LossFn, build_plan, collect_statistics
from .config import TLoraConfig
from .sharded import calibrate_sharded

__all__ = ["calibrate"]


def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    config: TLoraConfig,
    *,
    loss_fn: Optional[LossFn] = None,
    progress: bool = True,
) -> CalibrationPlan:
    """Calibrate TLoRA on ``model``: per target module a rank, a scale and a task-aware frozen ``A`` (docs/methods.md).

    - ``model``: a torch model (transformers or any ``nn.Module``) without adapters, on any device and in any float
      dtype (bf16/fp16 activations reach the core as they are; weights are upcast to float32 for the basis only).
      Targets are found as :func:`~lowrank_rs.attach` finds them.
    - ``batches``: an iterable of dicts of tensors as the model takes them; calibration stops after
      ``config.num_examples`` examples (rows), cutting the last batch if needed. Padding never enters a covariance;
      with ``count_prompt_tokens=False`` tokens labelled -100 do not either.
    - ``loss_fn(outputs, batch)``: the loss to score with; by default the model's ``outputs.loss`` (so the batches
      need ``labels``). To score several examples per pass it returns one loss per example (shape ``[batch]``); a
      scalar is accepted and scores one example per pass.
    - ``progress``: tqdm bars over the calibration examples and over the bases, and the covariance memory estimate
      (:func:`~lowrank_rs.methods.tlora.plan_memory`) printed to stderr before the pass.

    Covariance: each target's input tokens (``config.center`` centring), accumulated by the Rust core on a background
    thread for a CPU model, by torch on the model's device otherwise (``config.statistics_backend``); modules reading
    one tensor (q/k/v, gate/up) share one accumulator. Sensitivity: the mean over examples of ``config.score``'s
    reduction of each example's gradient (``"fisher"``, the default: ``Σ (∂L/∂W)²``; ``"reference"``: the TLoRA
    authors' ``Σ|W ⊙ ∂L/∂W| / |W|``; ``"grad"``: ``Σ|∂L/∂W|``), per example (``per_example_scores``, the reference's
    way) with ``calibration_batch_size`` examples per forward and backward and per-example losses summed, so each
    example's gradient ``Gₙᵀ Xₙ`` is formed from its own tokens; or one batch (weighted by its rows). Each gradient
    is formed and reduced a block of rows at a time, so no weight-sized gradient exists (except ``G`` itself for the
    gradient share of modules with at most 256 outputs). Then :func:`build_plan`.
    """
    first = next(iter(model.parameters()), None)
    ctx = detect(first.device if first is not None else None)
    if ctx.active:
        # Under torchrun: each process measures its share and the statistics are reduced (sharded.py).
        return calibrate_sharded(model, batches, config, ctx, loss_fn=loss_fn, progress=progress, build=build_plan)
    statistics = collect_statistics(model, batches, config, loss_fn=loss_fn, progress=progress)
    return build_plan(model, statistics, config, progress=progress)
