"""DoRA in ONNX: merged graphs only (the merged weight is ``m ⊙ V / ‖V‖``); adapter slots would need the magnitude
and a row norm per request, which the ``.onnx_adapter`` LoRA slots do not carry."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ...errors import ExportError
from ...export.methods import GraphInputModule
from ..lora.export import LoraExport
from .layer import DoraLinear

__all__ = ["DORA_EXPORTS", "DoraExport"]

_NO_SLOTS = (
    "DoRA exports merged graphs only (mode='merged'): an adapter slot would need the magnitude vector and a row "
    "norm of W0 + γBA per request"
)


class DoraExport(LoraExport):
    """LoRA's merged export (the layer's ``delta_weight`` is ``W' − W0``); no adapter slots."""

    name = "dora"
    module_type = DoraLinear

    def slot(self, name: str, module: nn.Module) -> GraphInputModule:
        raise ExportError(_NO_SLOTS)

    def slot_target(self, name: str, module: nn.Module) -> Optional[str]:
        return _NO_SLOTS

    def model_tensors(self, name: str, module: nn.Module) -> Dict[str, torch.Tensor]:
        raise ExportError(_NO_SLOTS)

    def file_tensors(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str
    ) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        raise ExportError(_NO_SLOTS)


DORA_EXPORTS = (DoraExport(),)
