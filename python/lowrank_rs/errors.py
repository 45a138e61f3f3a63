"""The exception hierarchy of lowrank-rs: every class the package raises lives here.

Every error the package raises on bad input is a :class:`LowRankError`. Each subclass also derives from the
built-in exception a Python user would reach for first (``ValueError``, ``TypeError``, ``OSError``,
``MemoryError``, ...), so existing ``except ValueError`` code keeps working. The Rust core maps its one error enum
onto these classes (``rust/python/src/lib.rs``); ``docs/errors.md`` lists which input raises which.
"""

from __future__ import annotations

__all__ = [
    "AdapterFormatError",
    "AdapterIOError",
    "AdapterStateError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DtypeError",
    "EmptyInputError",
    "ExportError",
    "InfeasibleError",
    "InternalError",
    "InvalidArgumentError",
    "LowRankError",
    "MissingDependencyError",
    "NonFiniteError",
    "OutOfMemoryError",
    "RankError",
    "ShapeError",
    "TargetError",
    "TaskError",
]


class LowRankError(Exception):
    """Root of every error lowrank-rs raises on bad input."""


class InvalidArgumentError(LowRankError, ValueError):
    """An argument outside its domain (a negative score, an unknown mode, a zero dimension, ...)."""


class ShapeError(LowRankError, ValueError):
    """An array has the wrong number of dimensions, or shapes do not fit together."""


class DtypeError(LowRankError, TypeError):
    """An element type the operation does not support."""


class NonFiniteError(LowRankError, ValueError):
    """NaN or infinity in an input."""


class EmptyInputError(LowRankError, ValueError):
    """No data where some is needed."""


class RankError(LowRankError, ValueError):
    """A requested rank the matrix cannot have."""


class InfeasibleError(LowRankError, ValueError):
    """Allocation constraints that no integer assignment satisfies."""


class AdapterFormatError(LowRankError, ValueError):
    """A corrupt, truncated or inconsistent adapter file."""


class AdapterIOError(LowRankError, OSError):
    """The operating system refused to read or write an adapter file."""


class OutOfMemoryError(LowRankError, MemoryError):
    """An allocation the core could not make (the input is too large for this machine, or a limit is set)."""


class InternalError(LowRankError, RuntimeError):
    """A bug in lowrank-rs (a Rust panic caught at the boundary); please report it with the message."""


class TargetError(LowRankError, ValueError):
    """A target or ``modules_to_save`` name that matches no module, or matches a module that cannot be adapted."""


class ConfigError(LowRankError, ValueError):
    """A config field with a value it cannot take, or a config mapping with unknown or missing keys."""


class AdapterStateError(LowRankError, RuntimeError):
    """An operation that the adapter's current state forbids: attaching twice, merging a merged adapter, ..."""


class TaskError(LowRankError, ValueError):
    """A task name or id a multi-task model does not have, task ids that do not fit the batch, or none at all."""


class CheckpointError(LowRankError, ValueError):
    """A checkpoint that is missing, malformed, or does not fit the model, data or config it is resumed with."""


class DataError(LowRankError, ValueError):
    """A data file that cannot be read as classification or SFT examples."""


class ExportError(LowRankError, RuntimeError):
    """The exporter or ONNX Runtime could not handle this model or graph; the message says what failed."""


class MissingDependencyError(LowRankError, ImportError):
    """An optional dependency (``onnx``, ``onnxscript``, ``onnxruntime``, ``matplotlib``) is not installed."""
