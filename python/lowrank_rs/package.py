"""Adapter directories in Hugging Face PEFT's layout, read and written by the Rust core.

A directory holds ``adapter_model.safetensors`` (the tensors) and ``adapter_config.json`` (the config). Writes are
atomic: both files go to a temporary directory beside the target, which is then renamed into place, and any other
files already in the target directory are kept. Reads validate every byte of the safetensors header and the config
before anything is returned; a defect raises :class:`~lowrank_rs.errors.AdapterFormatError` naming the file and the
problem. Reading never executes code.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Tuple, Union

import numpy as np

from ._arrays import is_torch

# Names, not the module: the layer checker (import-linter) cannot see into the compiled core.
from ._core import (
    read_adapter as _core_read_adapter,
)
from ._core import (
    write_adapter as _core_write_adapter,
)
from .errors import DtypeError, InvalidArgumentError

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "read_adapter", "write_adapter"]

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

PathLike = Union[str, "os.PathLike[str]"]

_NUMPY_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}
_NUMPY_FROM_TAG = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16}


def write_adapter(directory: PathLike, tensors: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Write ``tensors`` and ``config`` as a PEFT-layout adapter directory, atomically.

    ``tensors``: name → numpy float16/float32/float64 array or torch tensor (any device; bfloat16 included).
    ``config``: a JSON-serialisable mapping (NaN and infinity are rejected: JSON has no spelling for them).
    """
    if not isinstance(config, Mapping):
        raise InvalidArgumentError(f"config must be a mapping, not {type(config).__name__}")
    try:
        config_json = json.dumps(dict(config), allow_nan=False, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"config is not JSON-serialisable: {e}") from None
    if not isinstance(tensors, Mapping):
        raise InvalidArgumentError(f"tensors must be a mapping of name to array, not {type(tensors).__name__}")
    raw = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise InvalidArgumentError(f"tensor names must be strings, got {name!r}")
        tag, arr = _to_bytes(name, value)
        raw.append((name, tag, list(arr.shape), np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
    _core_write_adapter(os.fspath(directory), raw, config_json)


def read_adapter(directory: PathLike, framework: str = "numpy") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Read and validate an adapter directory; returns ``(tensors, config)``.

    ``framework="numpy"`` gives numpy arrays (bfloat16 tensors as ``uint16`` arrays of their raw bits, since numpy has
    no bfloat16); ``framework="torch"`` gives CPU torch tensors in their stored dtype.
    """
    if framework not in ("numpy", "torch"):
        raise InvalidArgumentError(f"framework must be 'numpy' or 'torch', not {framework!r}")
    raw, config_json = _core_read_adapter(os.fspath(directory))
    out: Dict[str, Any] = {}
    for name, tag, shape, data in raw:
        arr = np.frombuffer(data, dtype=_NUMPY_FROM_TAG[tag]).reshape(shape)
        if framework == "torch":
            import torch

            t = torch.from_numpy(arr.copy())
            out[name] = t.view(torch.bfloat16) if tag == "BF16" else t
        else:
            out[name] = arr.copy() if not arr.flags.writeable else arr
    return out, json.loads(config_json)


def _to_bytes(name: str, value: Any) -> Tuple[str, np.ndarray]:
    if is_torch(value):
        import torch

        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return "BF16", t.view(torch.int16).numpy()
        if t.dtype in (torch.float16, torch.float32, torch.float64):
            return _NUMPY_DTYPES[np.dtype(t.numpy().dtype)], t.numpy()
        raise DtypeError(f"tensor {name!r} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    if isinstance(value, np.ndarray):
        if value.dtype in _NUMPY_DTYPES:
            return _NUMPY_DTYPES[value.dtype], value
        if value.dtype.name == "bfloat16":  # ml_dtypes' numpy bfloat16
            return "BF16", value.view(np.uint16)
        raise DtypeError(f"tensor {name!r} has dtype {value.dtype}; supported: float16, float32, float64, bfloat16")
    raise DtypeError(f"tensor {name!r} must be a numpy array or a torch tensor, not {type(value).__name__}")
