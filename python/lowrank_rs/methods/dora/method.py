"""DoRA as a method (docs/methods.md): LoRA with DoRA layers, PEFT's ``use_dora`` files, and a TLoRA plan's ``A``.

Everything but the layer, the magnitude tensor in the file and ``use_dora: true`` is LoRA's, inherited.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ...errors import AdapterFormatError, InvalidArgumentError, ShapeError
from ..lora.layer import LoraLinear
from ..lora.method import UNSUPPORTED_PEFT_FIELDS, LoraMethod, Overrides
from ..tlora.method import plan_overrides
from .config import DoraConfig
from .export import DORA_EXPORTS
from .layer import DoraLinear

__all__ = ["DoraMethod"]

MAGNITUDE = "lora_magnitude_vector"  # PEFT's tensor name, below the module


class DoraMethod(LoraMethod):
    name = "dora"
    title = "DoRA"
    config_type = DoraConfig
    layer_type = DoraLinear
    default_job_order: ClassVar[Optional[int]] = None
    description = "weight-decomposed LoRA: a trainable magnitude per output row times the adapted direction"
    unsupported_peft_fields = tuple(f for f in UNSUPPORTED_PEFT_FIELDS if f != "use_dora")

    def attach(self, model: nn.Module, config: Any, **options: Any) -> nn.Module:
        """LoRA's ``attach`` with DoRA layers; ``plan=`` (a TLoRA :class:`~lowrank_rs.CalibrationPlan`) gives the
        ranks, scales and task-aware ``A`` (frozen unless the plan's config trains it)."""
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
        plan = options.get("plan")
        rest = {k: v for k, v in options.items() if k != "plan"}
        if plan is None:
            return super().resolve(model, config, ranks, scales, init_a, rest)
        super().resolve(model, config, None, None, None, rest)
        tlora, ranks, scales, init_a = plan_overrides(plan, ranks, scales, init_a)
        if tlora.train_a_after:
            # DoRA's config has no warm-up; dropping it silently would train A from the first step.
            raise InvalidArgumentError(
                f"DoRA with a TLoRA plan cannot keep A frozen for a warm-up (the plan's train_a_after is "
                f"{tlora.train_a_after}); calibrate with train_a_after=None (A frozen) or 0 (A trained from the start)"
            )
        lora_fields = ("target_modules", "r", "alpha", "use_rslora", "dropout", "modules_to_save", "init_seed")
        merged = DoraConfig(**{f: getattr(tlora, f) for f in lora_fields}, train_a=tlora.train_a)
        return merged, ranks, scales, init_a, True

    def freezes_a(self, config: Any) -> bool:
        return not config.train_a

    # -- files ----------------------------------------------------------------------------------------------------

    def layer_tensors(self, layer: LoraLinear) -> Dict[str, torch.Tensor]:
        return {MAGNITUDE: getattr(layer, MAGNITUDE).detach()}

    def layer_state_keys(self) -> Tuple[str, ...]:
        return (MAGNITUDE,)

    def peft_fields(self) -> Dict[str, Any]:
        return {"use_dora": True}

    def vllm_refusal(self, model: nn.Module) -> Optional[str]:
        return "vLLM serves plain LoRA and cannot apply DoRA's magnitude; save without vllm=True (or merge first)"

    def reads_file(self, peft_config: Mapping[str, Any]) -> bool:
        return peft_config.get("peft_type") == "LORA" and bool(peft_config.get("use_dora"))

    def check_file(self, peft_config: Mapping[str, Any], path: Any) -> None:
        super().check_file(peft_config, path)
        if not peft_config.get("use_dora"):
            raise AdapterFormatError(f"{os.fspath(path)!r} is a plain LoRA adapter (use_dora is not set), not DoRA")

    def check_layer_tensors(self, name: str, base: nn.Linear, tensors: Mapping[str, torch.Tensor], path: Any) -> None:
        if MAGNITUDE not in tensors:
            raise AdapterFormatError(f"{os.fspath(path)!r}: the DoRA module {name!r} has no {MAGNITUDE} tensor")
        shape = tuple(tensors[MAGNITUDE].shape)
        if shape != (base.out_features,):
            raise ShapeError(
                f"{os.fspath(path)!r}: {name}.{MAGNITUDE} has shape {shape}; expected ({base.out_features},)"
            )

    def load_layer_tensors(self, layer: LoraLinear, tensors: Mapping[str, torch.Tensor], name: str) -> None:
        getattr(layer, MAGNITUDE).copy_(tensors[MAGNITUDE])

    def export_hooks(self) -> Sequence[Any]:
        return DORA_EXPORTS
