"""LoRATRF as a method (docs/methods.md): the LoRA (or TLoRA) part plus task-aware filters.

It is :class:`~lowrank_rs.methods.lora.method.LoraMethod` with its seams filled in: ``attach`` resolves the
per-family defaults (and takes a TLoRA plan for the LoRA part), the filters are built beside the LoRA layers and
saved in the same file, and export hooks add the filters' ops to the graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ...adapters.method import TrainingHooks
from ...adapters.peft_format import PEFT_PREFIX
from ...adapters.recipe import Prepared, Settings, settings_targets
from ...adapters.record import attachment_of
from ...errors import ConfigError, InvalidArgumentError
from ...training.collate import calibration_batches
from ..lora.method import LoraMethod, Overrides
from ..tlora.method import FrozenAWarmup, plan_overrides
from . import filters as trf
from .config import TrfConfig
from .export import TRF_EXPORTS
from .layer import TaskFilter

__all__ = ["TrfMethod"]


class TrfMethod(LoraMethod):
    name = "loratrf"
    title = "LoRATRF"
    config_type = TrfConfig
    default_job_order: ClassVar[Optional[int]] = None
    description = (
        "LoRA plus task-aware filters h ← h + clamp(cos(h, t), 0, 1)·h C D per layer (the paper's per-family "
        "targets and rank unless --targets is given)"
    )

    def attach(self, model: nn.Module, config: Any, **options: Any) -> nn.Module:
        """LoRA's ``attach`` for a :class:`TrfConfig`, plus its options: ``plan`` (a TLoRA
        :class:`~lowrank_rs.CalibrationPlan` that makes the LoRA part TLoRA: its ranks, scales and ``A``) and
        ``batches`` (calibration batches for ``task_vector_init="mean"``)."""
        return super().attach(model, config, **options)

    def resolve(
        self,
        model: nn.Module,
        config: Any,
        ranks: Optional[Mapping[str, int]],
        scales: Optional[Mapping[str, float]],
        init_a: Optional[Mapping[str, Any]],
        options: Mapping[str, Any],
    ) -> Overrides:
        unknown = sorted(set(options) - {"plan", "batches"})
        if unknown:
            raise InvalidArgumentError(
                f"attach got option(s) {unknown} that a TrfConfig does not take; LoRATRF's are plan, batches, "
                "ranks, scales and init_a"
            )
        plan = options.get("plan")
        if plan is not None:
            tlora, ranks, scales, init_a = plan_overrides(plan, ranks, scales, init_a)
            if config.tlora is None:
                config = dataclasses.replace(config, tlora=tlora)
            elif config.tlora != tlora:
                raise ConfigError(
                    "the TrfConfig's tlora differs from the plan's config; leave tlora unset to take the plan's"
                )
        return trf.resolve(config, model), ranks, scales, init_a, plan is not None

    def freezes_a(self, config: Any) -> bool:
        return config.tlora is not None and not config.tlora.train_a

    def training_hooks(self, model: nn.Module) -> TrainingHooks:
        # A TLoRA plan's train_a_after holds here as in TLoRA itself: A waits out the warm-up, then trains.
        attachment = attachment_of(model)
        tlora = getattr(attachment.config, "tlora", None) if attachment is not None else None
        steps = getattr(tlora, "train_a_after", None)
        if not steps:
            return super().training_hooks(model)
        return FrozenAWarmup(list(self.layers(model).values()), steps)

    def build_extras(
        self, model: nn.Module, config: Any, adapted: Sequence[str], kept: Sequence[str], options: Mapping[str, Any]
    ) -> Dict[str, TaskFilter]:
        return trf.build_filters(model, config, adapted, kept, options.get("batches"))

    def install_extras(self, model: nn.Module, extras: Any) -> None:
        trf.install(model, extras)

    def adapter_modules(self, model: nn.Module) -> Dict[str, nn.Module]:
        found: Dict[str, nn.Module] = dict(super().adapter_modules(model))
        found.update({f"{name}.{trf.FILTER_ATTR}": f for name, f in trf.trf_filters(model).items()})
        return found

    # -- files ----------------------------------------------------------------------------------------------------

    def extra_state(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        return trf.filter_state(model, PEFT_PREFIX)

    def describe(self, model: nn.Module) -> Dict[str, Any]:
        return trf.describe(model)

    def vllm_refusal(self, model: nn.Module) -> Optional[str]:
        return "vLLM serves LoRA only and cannot run LoRATRF's filters; save without vllm=True"

    def hidden_modules(self, model: nn.Module) -> List[str]:
        return [f"{name}.{trf.FILTER_ATTR}" for name in trf.trf_filters(model)]

    def split_extras(
        self, tensors: Mapping[str, torch.Tensor], extras: Optional[Mapping[str, Any]], path: Any
    ) -> Tuple[Any, Mapping[str, torch.Tensor]]:
        return trf.split_tensors(tensors, extras, PEFT_PREFIX, path)

    def expected_extras(self, model: nn.Module, config: Any, adapted: Sequence[str], kept: Sequence[str]) -> Any:
        return trf.expected_filters(model, config, adapted, kept)

    def present_extras(self, model: nn.Module) -> Any:
        return trf.present_filters(model)

    def check_extras(self, expected: Any, weights: Any, path: Any) -> None:
        trf.check_weights(expected, weights, path)

    def load_extras(self, model: nn.Module, weights: Any) -> None:
        trf.load_weights(model, weights)

    def config_for_loading(self, config: Any) -> Any:
        # The file supplies every t, so attach must not ask for calibration batches while rebuilding the filters.
        if config.task_vector_init == "mean":
            return dataclasses.replace(config, task_vector_init="normal")
        return config

    def reads_file(self, peft_config: Mapping[str, Any]) -> bool:
        return False  # LoRATRF files name their method

    # -- export, the job ----------------------------------------------------------------------------------------

    def export_hooks(self) -> Sequence[Any]:
        return TRF_EXPORTS

    def prepare(self, model: nn.Module, examples: Sequence[Dict[str, Any]], settings: Settings, pad: int) -> Prepared:
        _, heads = settings_targets(model, settings)
        # The LoRA part takes the paper's per-family targets and rank unless the user named targets.
        lora: Dict[str, Any] = {}
        if settings.targets:
            lora = {"target_modules": list(settings.targets), "r": settings.rank, "alpha": settings.lora_alpha}
        config = TrfConfig(modules_to_save=heads, init_seed=settings.seed, task_vector_init="mean", **lora)
        batches = calibration_batches(examples, settings.calibration_examples, pad)
        return Prepared(self.attach(model, config, batches=batches))
