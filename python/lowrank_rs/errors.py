"""The exception hierarchy of lowrank-rs.

Every error the package raises on bad input is a :class:`LowRankError`. Each subclass also derives from the
built-in exception a Python user would reach for first (``ValueError``, ``TypeError``, ``OSError``), so existing
``except ValueError`` code keeps working. The Rust core maps its one error enum onto these classes.
"""

from __future__ import annotations

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
    "TargetError",
]


class LowRankError(Exception):
    """Root of every error lowrank-rs raises on bad input."""


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


class TargetError(LowRankError, ValueError):
    """A target or ``modules_to_save`` name that matches no module, or matches a module that cannot be adapted."""
