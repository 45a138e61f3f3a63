"""lowrank-rs: LoRA-family adapters (LoRA, TLoRA, LoRATRF, TA-LoRA, DoRA) with a Rust calibration core.

- :func:`calibrate` → :class:`CalibrationPlan` (TLoRA), :func:`attach`, :func:`train`, :func:`save_adapter`,
  :func:`load_adapter`, :func:`merge` / :func:`unmerge` — adapters on Hugging Face models.
- TA-LoRA (:class:`TaLoraConfig`): :func:`use_tasks` around a forward, :func:`add_task`, :func:`task_names`,
  :func:`orthogonality_penalty`.
- :mod:`lowrank_rs.linalg` — the calibration math of the Rust core; :mod:`lowrank_rs.package` — adapter files.
- :func:`export_onnx`, :class:`OrtModel` — ONNX export and ONNX Runtime sessions (:mod:`lowrank_rs.export`; the
  ``onnx`` extra, imported only when used).
- Every error raised on bad input is a :class:`LowRankError` (:mod:`lowrank_rs.errors`).

This module is a facade: names only. The layers behind it are described in ``docs/architecture.md``.
"""

from __future__ import annotations

from . import methods as _methods  # noqa: F401  (registers every method)
from . import package
from ._core import __version__
from .adapters import (
    Method,
    adapter_config,
    adapter_state,
    attach,
    load_adapter,
    merge,
    save_adapter,
    trainable_parameters,
    unmerge,
)
from .errors import (
    AdapterFormatError,
    AdapterIOError,
    AdapterStateError,
    CheckpointError,
    ConfigError,
    DataError,
    DtypeError,
    EmptyInputError,
    ExportError,
    InfeasibleError,
    InternalError,
    InvalidArgumentError,
    LowRankError,
    MissingDependencyError,
    NonFiniteError,
    OutOfMemoryError,
    RankError,
    ShapeError,
    TargetError,
    TaskError,
)
from .export import OrtModel, export_onnx, write_ort_adapter
from .linalg import get_num_threads, set_num_threads
from .methods.dora import DoraConfig, DoraLinear
from .methods.lora import LoraConfig, LoraLinear, lora_layers
from .methods.loratrf import TaskFilter, TrfConfig, init_task_vectors, trf_filters
from .methods.talora import (
    TaLoraConfig,
    TaLoraLayer,
    add_task,
    orthogonality_penalty,
    talora_layers,
    task_names,
    use_tasks,
)
from .methods.tlora import CalibrationPlan, TLoraConfig, calibrate
from .training import EvalResult, TrainConfig, TrainResult, evaluate, train

# `lowrank_rs.package.write_ort_adapter`, the name from before the export package existed, stays an alias. It is
# set here, at the top, because `package` sits below `export` and must not import it.
setattr(package, "write_ort_adapter", write_ort_adapter)  # noqa: B010

__all__ = [
    "AdapterFormatError",
    "AdapterIOError",
    "AdapterStateError",
    "CalibrationPlan",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DoraConfig",
    "DoraLinear",
    "DtypeError",
    "EmptyInputError",
    "EvalResult",
    "ExportError",
    "InfeasibleError",
    "InternalError",
    "InvalidArgumentError",
    "LoraConfig",
    "LoraLinear",
    "LowRankError",
    "Method",
    "MissingDependencyError",
    "NonFiniteError",
    "OrtModel",
    "OutOfMemoryError",
    "RankError",
    "ShapeError",
    "TLoraConfig",
    "TaLoraConfig",
    "TaLoraLayer",
    "TargetError",
    "TaskError",
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
