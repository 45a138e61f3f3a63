"""The LoRA layer (METHODS.md §1): a frozen ``nn.Linear`` plus a scaled low-rank update.

Parameter names match Hugging Face PEFT's LoRA layer (``base_layer.weight``, ``lora_A.weight``, ``lora_B.weight``),
so state dicts translate to PEFT's adapter files by adding a prefix and nothing else.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ..errors import LowRankError, ShapeError

__all__ = ["AdapterStateError", "LoraLinear"]


class AdapterStateError(LowRankError, RuntimeError):
    """An operation that the adapter's current state forbids: attaching twice, merging a merged adapter, ..."""


class LoraLinear(nn.Module):
    """``y = base(x) + scaling · B(A(dropout(x)))`` with ``A: [r, d_in]``, ``B: [d_out, r]``.

    ``A`` starts Kaiming-uniform (a = √5, as PEFT and ``nn.Linear``) unless ``init_a`` gives it, ``B`` starts at zero,
    so the layer starts equal to ``base``. ``scaling`` is a plain float per module, which is what lets TLoRA give each
    module its own γ. The adapter takes the base weight's dtype and device; inputs may have any leading dimensions.

    ``merge()`` folds ``scaling · B A`` into the base weight (computed in float32, rounded once to the weight's dtype)
    and ``unmerge()`` takes it out again; while merged the forward pass is the base layer alone. Merging a merged
    layer, or unmerging an unmerged one, raises :class:`AdapterStateError`: doing it silently would either double
    the update or hide a bookkeeping bug in the caller. In 16-bit weights ``unmerge`` restores the base weight up to
    one rounding of the merged weight.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        scaling: float,
        *,
        dropout: float = 0.0,
        freeze_a: bool = False,
        init_a: Optional[Any] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise LowRankError(f"LoraLinear wraps an nn.Linear, not {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise LowRankError(f"rank r must be a positive integer, got {r!r}")
        weight = base_layer.weight
        if not weight.is_floating_point():
            raise LowRankError(f"the base layer's weight has dtype {weight.dtype}; LoRA needs a floating-point weight")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.scaling = float(scaling)
        self.merged = False
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_adapter(init_a=init_a, generator=generator)
        self.lora_A.weight.requires_grad_(not freeze_a)

    @torch.no_grad()
    def reset_adapter(self, init_a: Optional[Any] = None, generator: Optional[torch.Generator] = None) -> None:
        """``A`` from ``init_a`` (``[r, d_in]``) or Kaiming-uniform, ``B = 0``: the layer equals its base again."""
        if self.merged:
            raise AdapterStateError("reset_adapter on a merged layer would leave the old update in the base weight")
        if init_a is None:
            # Drawn on the CPU in float32 so a seed gives the same A on every device and in every dtype.
            a = torch.empty(self.r, self.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        else:
            a = torch.as_tensor(init_a)
            if tuple(a.shape) != (self.r, self.in_features):
                raise ShapeError(
                    f"init_a has shape {tuple(a.shape)}; expected [r, d_in] = [{self.r}, {self.in_features}]"
                )
            if not a.is_floating_point() or not torch.isfinite(a).all():
                raise LowRankError("init_a must be a finite floating-point array")
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.zero_()

    # Model code sometimes reads `proj.weight` (its dtype, its device); answer as the wrapped layer would, like PEFT.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        # Same operation order as PEFT, so the two agree to rounding on identical weights.
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` in float32, ``[d_out, d_in]``."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise AdapterStateError("this LoRA layer is already merged; unmerge() it first")
        self._add_to_base(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise AdapterStateError("this LoRA layer is not merged; there is nothing to unmerge")
        self._add_to_base(-self.delta_weight())
        self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        weight.copy_((weight.float() + delta).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"
