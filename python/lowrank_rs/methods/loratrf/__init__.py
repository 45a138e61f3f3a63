"""LoRATRF (docs/methods.md): task-aware filters beside a LoRA (or TLoRA) part."""

from ...adapters.registry import register
from .config import TrfConfig
from .filters import init_task_vectors, trf_filters
from .layer import TaskFilter
from .method import TrfMethod

METHOD = register(TrfMethod())

__all__ = ["METHOD", "TaskFilter", "TrfConfig", "TrfMethod", "init_task_vectors", "trf_filters"]
