"""Errors, optional-dependency checks and dtype names shared by the export modules."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Dict

from ..errors import MissingDependencyError

__all__ = ["require"]


def require(name: str) -> ModuleType:
    """Import ``name`` (``onnx``, ``onnxscript``, ``onnxruntime``), or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingDependencyError(
            f"ONNX export and ONNX Runtime sessions need the {name!r} package ({e}); "
            "install them with: pip install 'lowrank-rs[onnx]'"
        ) from None


# ONNX TensorProto element types, ONNX Runtime's type strings and torch dtypes, all named the same way.
ONNX_TYPES: Dict[int, str] = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
ORT_TYPES: Dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16",
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)
