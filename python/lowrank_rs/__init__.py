"""lowrank-rs: LoRA-family adapters (LoRA, TLoRA, LoRATRF, TA-LoRA) with a Rust calibration core.

- :func:`calibrate` → :class:`CalibrationPlan` (TLoRA), :func:`attach`, :func:`train`, :func:`save_adapter`,
  :func:`load_adapter`, :func:`merge` / :func:`unmerge` — adapters on Hugging Face models.
- TA-LoRA (:class:`TaLoraConfig`): :func:`use_tasks` around a forward, :func:`add_task`, :func:`task_names`,
  :func:`orthogonality_penalty`.
- :mod:`lowrank_rs.linalg` — the calibration math of the Rust core; :mod:`lowrank_rs.package` — adapter files.
- :func:`export_onnx`, :class:`OrtModel` — ONNX export and ONNX Runtime sessions (:mod:`lowrank_rs.export`; the
  ``onnx`` extra, imported only when used).
- Every error raised on bad input is a :class:`LowRankError`.
"""

from __future__ import annotations

from ._core import __version__
from .attach import (
    TargetError,
    adapter_config,
    adapter_state,
    attach,
    load_adapter,
    lora_layers,
    merge,
    save_adapter,
    trainable_parameters,
    unmerge,
)
from .calibrate import CalibrationPlan, calibrate
from .config import ConfigError, LoraConfig, TaLoraConfig, TLoraConfig, TrfConfig
from .errors import (
    AdapterFormatError,
    AdapterIOError,
    DtypeError,
    EmptyInputError,
    InfeasibleError,
    LowRankError,
    NonFiniteError,
    RankError,
    ShapeError,
)
from .export import ExportError, OrtModel, export_onnx
from .linalg import get_num_threads, set_num_threads
from .nn import AdapterStateError, LoraLinear, TaskFilter
from .talora import TaLoraLayer, TaskError, add_task, orthogonality_penalty, talora_layers, task_names, use_tasks
from .train import CheckpointError, EvalResult, TrainConfig, TrainResult, evaluate, train
from .trf import init_task_vectors, trf_filters

__all__ = [
    "AdapterFormatError",
    "AdapterIOError",
    "AdapterStateError",
    "CalibrationPlan",
    "CheckpointError",
    "ConfigError",
    "DtypeError",
    "EmptyInputError",
    "EvalResult",
    "ExportError",
    "InfeasibleError",
    "LoraConfig",
    "LoraLinear",
    "LowRankError",
    "NonFiniteError",
    "OrtModel",
    "RankError",
    "ShapeError",
    "TLoraConfig",
    "TaLoraConfig",
    "TaLoraLayer",
    "TaskError",
    "TargetError",
    "TaskFilter",
    "TrainConfig",
    "TrainResult",
    "TrfConfig",
    "__version__",
    "adapter_config",
    "adapter_state",
    "add_task",
    "attach",
    "calibrate",
    "evaluate",
    "export_onnx",
    "get_num_threads",
    "init_task_vectors",
    "load_adapter",
    "lora_layers",
    "merge",
    "orthogonality_penalty",
    "save_adapter",
    "set_num_threads",
    "talora_layers",
    "task_names",
    "train",
    "trainable_parameters",
    "trf_filters",
    "unmerge",
    "use_tasks",
]
