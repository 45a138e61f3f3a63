"""TA-LoRA (docs/methods.md): multi-task low-rank prompts with zero-initialised gated attention."""

from ...adapters.registry import register
from .config import TaLoraConfig
from .layer import TaLoraLayer
from .method import TaLoraMethod, add_task, orthogonality_penalty, talora_layers, task_names, use_tasks

METHOD = register(TaLoraMethod())

__all__ = [
    "METHOD",
    "TaLoraConfig",
    "TaLoraLayer",
    "TaLoraMethod",
    "add_task",
    "orthogonality_penalty",
    "talora_layers",
    "task_names",
    "use_tasks",
]
