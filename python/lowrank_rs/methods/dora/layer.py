"""The DoRA layer: a :class:`~lowrank_rs.methods.lora.layer.LoraLinear` whose output rows are rescaled to a learned
magnitude (docs/methods.md), computed in PEFT's operation order so the two agree to rounding."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import AdapterStateError, NonFiniteError
from ..lora.layer import LoraLinear

__all__ = ["DoraLinear"]


class DoraLinear(LoraLinear):
    """``y = m / ‖W0 + γ B A‖ ⊙ (W0 x + γ B A x) + b``, the norm taken per output row and detached (DoRA §4.3).

    ``lora_magnitude_vector`` (``m``, ``[d_out]``, PEFT's name) starts at the row norms of ``W0``, so the layer starts
    equal to its base. ``merge()`` writes ``W'`` into the base weight and keeps the norm it divided by, which
    ``unmerge()`` needs to take it out again.
    """

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, **kwargs: Any) -> None:
        super().__init__(base_layer, r, scaling, **kwargs)
        weight = base_layer.weight
        with torch.no_grad():
            norm = torch.linalg.norm(weight.float() + self.delta_weight(), dim=1).to(weight.dtype)
        self.lora_magnitude_vector = nn.Parameter(norm)
        self._merged_norm: Optional[torch.Tensor] = None

    def reset_adapter(self, init_a: Optional[Any] = None, generator: Optional[torch.Generator] = None) -> None:
        super().reset_adapter(init_a=init_a, generator=generator)
        if hasattr(self, "lora_magnitude_vector"):  # B = 0 again, so the magnitude that keeps the base is ‖W0‖
            with torch.no_grad():
                weight = self.base_layer.weight
                self.lora_magnitude_vector.copy_(torch.linalg.norm(weight.float(), dim=1).to(weight.dtype))

    def _weight_norm(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self.base_layer.weight.to(dtype)
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).to(dtype)
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(dtype).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        result = base(x)
        if self.merged:
            return result
        dtype = result.dtype
        scale = (self.lora_magnitude_vector.to(dtype) / self._weight_norm(dtype)).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            x_adapted = x
            base_result = result if base.bias is None else result - base.bias.to(dtype)
        else:
            x_adapted = self.lora_dropout(x)
            base_result = F.linear(x_adapted.to(dtype), base.weight.to(dtype))
        lora_result = self.lora_B(self.lora_A(x_adapted.to(self.lora_A.weight.dtype))).to(dtype)
        return result + (scale - 1) * base_result + scale * lora_result * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """``W'`` in float32, ``[d_out, d_in]``."""
        v = self.base_layer.weight.float() + self.delta_weight()
        norm = torch.linalg.norm(v, dim=1, keepdim=True)
        return self.lora_magnitude_vector.float().unsqueeze(1) * v / norm

    def delta_weight(self) -> torch.Tensor:
        """``W' − W0`` in float32 once the magnitude exists (what a merged export adds to the base weight)."""
        lora = super().delta_weight()
        if not hasattr(self, "lora_magnitude_vector"):
            return lora
        v = self.base_layer.weight.float() + lora
        scale = self.lora_magnitude_vector.float() / torch.linalg.norm(v, dim=1)
        return scale.unsqueeze(1) * v - self.base_layer.weight.float()

    @torch.no_grad()
    def _merged(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.merged:
            raise AdapterStateError("this DoRA layer is already merged; unmerge() it first")
        weight = self.base_layer.weight
        v = weight.float() + LoraLinear.delta_weight(self)
        norm = torch.linalg.norm(v, dim=1)
        scale = self.lora_magnitude_vector.float() / norm
        # Checked after the cast: a finite float32 result can still overflow a 16-bit weight.
        merged = (scale.unsqueeze(1) * v).to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise NonFiniteError("merging this DoRA layer would write NaN or infinity into the base weight")
        return merged, norm

    def check_merge(self) -> None:
        self._merged()

    @torch.no_grad()
    def merge(self) -> None:
        merged, norm = self._merged()
        self.base_layer.weight.copy_(merged)
        self._merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged or self._merged_norm is None:
            raise AdapterStateError("this DoRA layer is not merged; there is nothing to unmerge")
        weight = self.base_layer.weight
        scale = self.lora_magnitude_vector.float() / self._merged_norm
        v = weight.float() / scale.unsqueeze(1)
        weight.copy_((v - LoraLinear.delta_weight(self)).to(weight.dtype))
        self._merged_norm = None
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
