"""TLoRA as a method (docs/methods.md): LoRA whose ``A`` comes from a calibration plan and stays frozen."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from ...adapters.method import TrainingHooks
from ...adapters.recipe import Prepared, Settings
from ...adapters.record import attachment_of
from ...errors import InvalidArgumentError
from ...training.collate import calibration_batches
from ..lora.layer import LoraLinear
from ..lora.method import LoraMethod, Overrides
from .api import calibrate
from .calibrate import PLAN_FORMAT, CalibrationPlan
from .config import TLoraConfig

__all__ = ["FrozenAWarmup", "TLoraMethod", "plan_overrides"]


def plan_overrides(
    plan: Any,
    ranks: Optional[Mapping[str, int]],
    scales: Optional[Mapping[str, float]],
    init_a: Optional[Mapping[str, Any]],
) -> Tuple[TLoraConfig, Dict[str, int], Dict[str, float], Dict[str, Any]]:
    """A calibration plan's ``(config, ranks, scales, init_a)`` for attach; explicit overrides beside a plan are an
    error rather than a silent choice between the two (TLoRA, and the variants that take a plan)."""
    if not isinstance(plan, CalibrationPlan):
        raise InvalidArgumentError(f"plan must be a CalibrationPlan (lowrank_rs.calibrate), not {type(plan).__name__}")
    if ranks is not None or scales is not None or init_a is not None:
        raise InvalidArgumentError("attach with a plan takes ranks, scales and init_a from the plan; pass none of them")
    return plan.attach_arguments()


class FrozenAWarmup(TrainingHooks):
    """``train_a_after = N``: ``A`` is in the optimizer, but its gradients are dropped for the first ``N`` steps."""

    def __init__(self, layers: Sequence[LoraLinear], steps: int) -> None:
        # Layers, not parameters: FSDP2 swaps the parameter objects after the hooks are made.
        self.layers: List[LoraLinear] = list(layers)
        self.steps = steps

    def before_optimizer_step(self, step: int) -> None:
        if step > self.steps:
            return
        for layer in self.layers:
            # None, not zeros: AdamW skips the parameter, so neither weight decay nor its moment estimates move it,
            # and its bias correction starts at the step A first trains.
            layer.lora_A.weight.grad = None


class TLoraMethod(LoraMethod):
    name = "tlora"
    title = "TLoRA"
    config_type = TLoraConfig
    accepts = (CalibrationPlan,)
    default_job_order: ClassVar[Optional[int]] = 0
    calibrates = True
    description = "task-aware frozen A from W0·C, rank and scale per module from a sensitivity budget"

    def resolve(
        self,
        model: nn.Module,
        config: Any,
        ranks: Optional[Mapping[str, int]],
        scales: Optional[Mapping[str, float]],
        init_a: Optional[Mapping[str, Any]],
        options: Mapping[str, Any],
    ) -> Overrides:
        if not isinstance(config, CalibrationPlan):
            return super().resolve(model, config, ranks, scales, init_a, options)
        super().resolve(model, config.config, None, None, None, options)
        tlora, plan_ranks, plan_scales, plan_init_a = plan_overrides(config, ranks, scales, init_a)
        return tlora, plan_ranks, plan_scales, plan_init_a, True

    def freezes_a(self, config: Any) -> bool:
        return not config.train_a

    def reads_file(self, peft_config: Mapping[str, Any]) -> bool:
        # A PEFT file has no plan; TLoRA files name their method.
        return False

    def training_hooks(self, model: nn.Module) -> TrainingHooks:
        attachment = attachment_of(model)
        steps = getattr(attachment.config, "train_a_after", None) if attachment is not None else None
        if not steps:
            return super().training_hooks(model)
        return FrozenAWarmup(list(self.layers(model).values()), steps)

    def config_for_job(self, model: nn.Module, settings: Settings) -> TLoraConfig:
        config = super().config_for_job(model, settings)
        return TLoraConfig(**{**config.to_dict(), "num_examples": settings.calibration_examples})

    def calibrate(
        self, model: nn.Module, examples: Sequence[Dict[str, Any]], settings: Settings, pad: int, **limits: Any
    ) -> CalibrationPlan:
        config = self.config_for_job(model, settings)
        if limits:
            config = dataclasses.replace(config, **limits)
        batches = calibration_batches(examples, settings.calibration_examples, pad)
        return calibrate(model, batches, config, progress=settings.progress)

    def is_plan(self, config: Mapping[str, Any]) -> bool:
        return config.get("format") == PLAN_FORMAT

    def load_plan(self, path: Any) -> CalibrationPlan:
        return CalibrationPlan.load(path)

    def prepare(self, model: nn.Module, examples: Sequence[Dict[str, Any]], settings: Settings, pad: int) -> Prepared:
        started = time.perf_counter()
        plan = self.calibrate(model, examples, settings, pad)
        seconds = time.perf_counter() - started
        return Prepared(self.attach(model, plan), plan, seconds)

    def rank_budget(self, model: nn.Module, prepared: Prepared) -> Optional[int]:
        # TLoRA's budget counts what it distributed, rank-0 modules included.
        if isinstance(prepared.plan, CalibrationPlan):
            return prepared.plan.budget
        return super().rank_budget(model, prepared)
