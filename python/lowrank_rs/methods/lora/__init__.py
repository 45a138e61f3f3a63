"""LoRA (docs/methods.md): the config, the layer, the method (the base of TLoRA, LoRATRF and DoRA) and its export."""

from ...adapters.registry import register
from .config import LoraConfig
from .layer import LoraLinear
from .method import LoraMethod, lora_layers

METHOD = register(LoraMethod())

__all__ = ["METHOD", "LoraConfig", "LoraLinear", "LoraMethod", "lora_layers"]
