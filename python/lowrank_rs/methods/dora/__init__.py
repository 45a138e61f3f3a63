"""DoRA (docs/methods.md): weight-decomposed LoRA, PEFT's ``use_dora=True``, as a LoRA variant."""

from ...adapters.registry import register
from .config import DoraConfig
from .layer import DoraLinear
from .method import DoraMethod

METHOD = register(DoraMethod())

__all__ = ["METHOD", "DoraConfig", "DoraLinear", "DoraMethod"]
