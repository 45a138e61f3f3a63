"""ONNX export and ONNX Runtime sessions (the ``onnx`` extra: ``pip install 'lowrank-rs[onnx]'``).

- :func:`export_onnx` — a torch model with adapters → an ONNX graph, merged or with hot-swappable adapter inputs.
- :func:`write_ort_adapter` — an adapter directory (ours or PEFT's) or attached model → an ``.onnx_adapter`` file.
- :class:`OrtModel` — an exported graph in an ONNX Runtime session, called like the torch model.
- :mod:`lowrank_rs.export.methods` — the hooks through which each adapter method joins the export (a method's
  ``export_hooks()``, found through the method registry).
- :func:`add_export_arguments`, :func:`run_export` — the ``lowrank-rs export`` command.

Importing this package needs torch only; ``onnx``, ``onnxscript`` and ``onnxruntime`` are imported when used.
"""

from __future__ import annotations

from ..errors import ExportError, MissingDependencyError
from .adapter_file import write_ort_adapter
from .cli import add_export_arguments, run_export
from .exporter import export_onnx
from .methods import EMPTY, TASK_INPUT, GraphInput, GraphInputModule, MethodExport
from .runtime import OrtModel, OrtOutput

__all__ = [
    "EMPTY",
    "ExportError",
    "GraphInput",
    "GraphInputModule",
    "MethodExport",
    "MissingDependencyError",
    "OrtModel",
    "OrtOutput",
    "TASK_INPUT",
    "add_export_arguments",
    "export_onnx",
    "run_export",
    "write_ort_adapter",
]
