"""Adapter modules: LoRA layers wrap a base layer and keep it as ``base_layer``; LoRATRF filters hook onto one."""

from .lora import AdapterStateError, LoraLinear
from .trf import TaskFilter

__all__ = ["AdapterStateError", "LoraLinear", "TaskFilter"]
