"""lowrank-rs: LoRA-family adapters (LoRA, TLoRA, LoRATRF, TA-LoRA) with a Rust calibration core.

The calibration math lives in :mod:`lowrank_rs.linalg`, adapter files in :mod:`lowrank_rs.package`; every error
raised on bad input is a :class:`LowRankError`.
"""

from __future__ import annotations

from ._core import __version__
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
from .linalg import get_num_threads, set_num_threads

__all__ = [
    "AdapterFormatError",
    "AdapterIOError",
    "DtypeError",
    "EmptyInputError",
    "InfeasibleError",
    "LowRankError",
    "NonFiniteError",
    "RankError",
    "ShapeError",
    "__version__",
    "get_num_threads",
    "set_num_threads",
]

# Adapters on torch models. Imported after the core names: these modules import torch.
from .attach import (  # noqa: E402
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
from .calibrate import CalibrationPlan, calibrate  # noqa: E402
from .config import ConfigError, LoraConfig, TLoraConfig  # noqa: E402
from .nn import AdapterStateError, LoraLinear  # noqa: E402

__all__ += [
    "AdapterStateError",
    "CalibrationPlan",
    "ConfigError",
    "LoraConfig",
    "LoraLinear",
    "TLoraConfig",
    "TargetError",
    "adapter_config",
    "adapter_state",
    "attach",
    "calibrate",
    "load_adapter",
    "lora_layers",
    "merge",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
]

from .train import CheckpointError, EvalResult, TrainConfig, TrainResult, evaluate, train  # noqa: E402

__all__ += ["CheckpointError", "EvalResult", "TrainConfig", "TrainResult", "evaluate", "train"]
