"""Adapter modules: LoRA wraps a base layer and keeps it as ``base_layer``; a TA-LoRA layer sits beside the attention
module it extends and reaches it through hooks."""

from .lora import AdapterStateError, LoraLinear
from .talora import TaLoraLayer, TaskError

__all__ = ["AdapterStateError", "LoraLinear", "TaLoraLayer", "TaskError"]
