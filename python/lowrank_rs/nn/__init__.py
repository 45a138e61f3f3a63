"""Adapter modules, each wrapping a base layer and keeping it as ``base_layer``."""

from .lora import AdapterStateError, LoraLinear
from .talora import TaLoraLayer, TaskError

__all__ = ["AdapterStateError", "LoraLinear", "TaLoraLayer", "TaskError"]
