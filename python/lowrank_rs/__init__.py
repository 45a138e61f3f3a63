"""lowrank-rs: LoRA-family adapters (LoRA, TLoRA, LoRATRF, TA-LoRA) with a Rust calibration core.

- :func:`calibrate` → :class:`CalibrationPlan` (TLoRA), :func:`attach`, :func:`train`, :func:`save_adapter`,
  :func:`load_adapter`, :func:`merge` / :func:`unmerge` — adapters on Hugging Face models.
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
from .config import ConfigError, LoraConfig, TLoraConfig
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
from .nn import AdapterStateError, LoraLinear
from .train import CheckpointError, EvalResult, TrainConfig, TrainResult, evaluate, train

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
    "TargetError",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "adapter_config",
    "adapter_state",
    "attach",
    "calibrate",
    "evaluate",
    "export_onnx",
    "get_num_threads",
    "load_adapter",
    "lora_layers",
    "merge",
    "save_adapter",
    "set_num_threads",
    "train",
    "trainable_parameters",
    "unmerge",
]
