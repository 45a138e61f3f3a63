"""Adapter modules: LoRA layers wrap a base layer and keep it as ``base_layer``; LoRATRF filters hook onto one; a
TA-LoRA layer sits beside the attention module it extends and reaches it through hooks."""

from .lora import AdapterStateError, LoraLinear
from .talora import TaLoraLayer, TaskError
from .trf import TaskFilter

__all__ = ["AdapterStateError", "LoraLinear", "TaLoraLayer", "TaskError", "TaskFilter"]
