"""Calibration math, computed by the Rust core.

Every function accepts numpy arrays and CPU torch tensors; bfloat16 torch tensors are passed to the core as raw
bits, never converted on the Python side. Results are numpy arrays.

- :class:`CovarianceAccumulator` — streaming input-activation covariance (docs/methods.md).
- :func:`randomized_svd` — truncated SVD by Halko–Martinsson–Tropp.
- :func:`task_aware_basis` — top right singular vectors of ``W·C`` without forming the product.
- :func:`allocate_ranks`, :func:`allocate_alphas` — the TLoRA rank and scale budgets.
"""

from __future__ import annotations

import numbers
from typing import Any, List, Literal, Optional, Sequence, Tuple, Union, cast

import numpy as np

from ._arrays import bool_mask, float_matrix, float_view, is_torch

# Names, not the module: the layer checker (import-linter) cannot see into the compiled core.
from ._core import (
    CovarianceAccumulator as _core_CovarianceAccumulator,
)
from ._core import (
    allocate_alphas as _core_allocate_alphas,
)
from ._core import (
    allocate_ranks as _core_allocate_ranks,
)
from ._core import (
    get_num_threads as _core_get_num_threads,
)
from ._core import (
    randomized_svd as _core_randomized_svd,
)
from ._core import (
    set_num_threads as _core_set_num_threads,
)
from ._core import (
    task_aware_basis as _core_task_aware_basis,
)
from .errors import InvalidArgumentError, ShapeError

__all__ = [
    "CovarianceAccumulator",
    "allocate_alphas",
    "allocate_ranks",
    "get_num_threads",
    "randomized_svd",
    "set_num_threads",
    "task_aware_basis",
]


def set_num_threads(n: int) -> None:
    """Threads the core computes with; ``0`` means one per available core (the default)."""
    _core_set_num_threads(_non_negative_int(n, "num_threads"))


def get_num_threads() -> int:
    """Threads the next core call will use."""
    return _core_get_num_threads()


class CovarianceAccumulator:
    """Streaming covariance of a module's input activations.

    ``C = (1/n) Σ (x − μ)(x − μ)ᵀ`` over the ``n`` counted tokens, where ``μ`` depends on ``center``:

    - ``"sequence"`` (default, as the TLoRA reference): each sequence is centred on its own mean; the per-sequence
      scatter matrices are summed and divided by the total token count. A ``[tokens, dim]`` input is one sequence.
    - ``"global"``: the mean of every token accumulated so far (merged exactly with Chan's formula).
    - ``"none"``: no centring, the second moment ``(1/n) Σ x xᵀ``.

    Per-batch products run in float32 on the lower triangle; sums accumulate in float64. ``update`` releases the GIL,
    so a background thread can feed the accumulator while the model runs, and the object may be shared between
    threads. A rejected update leaves the accumulator unchanged.
    """

    def __init__(self, dim: int, center: str = "sequence") -> None:
        self._inner = _core_CovarianceAccumulator(_non_negative_int(dim, "dim"), center)

    @property
    def dim(self) -> int:
        return self._inner.dim

    @property
    def center(self) -> str:
        return self._inner.center

    @property
    def count(self) -> int:
        """Number of tokens counted so far (padding excluded)."""
        return self._inner.count

    def update(self, x: Any, mask: Any = None) -> None:
        """Add activations ``x`` of shape ``[tokens, dim]`` or ``[batch, seq, dim]``.

        ``x``: numpy float16/float32/float64 or a CPU torch tensor (bfloat16 included). ``mask``: ``[tokens]`` or
        ``[batch, seq]``, bool or 0/1 integers (an ``attention_mask`` works as is); zero entries are padding and never
        counted. Padding rows may hold anything, even NaN; counted rows must be finite.
        """
        arr, bits16 = float_view(x, "activations")
        if arr.ndim == 2:
            arr3 = arr.reshape(1, arr.shape[0], arr.shape[1])
        elif arr.ndim == 3:
            arr3 = arr
        else:
            raise ShapeError(f"activations must be [tokens, dim] or [batch, seq, dim], got shape {tuple(arr.shape)}")
        m = None
        if mask is not None:
            m = bool_mask(mask, tuple(arr.shape[:-1])).reshape(-1)
        # A copy only when the caller's array is not C-contiguous (e.g. a transposed view).
        self._inner.update(np.ascontiguousarray(arr3), bits16, m)

    def merge(self, other: CovarianceAccumulator) -> None:
        """Fold ``other``'s tokens into this accumulator, exactly as if they had been fed here."""
        if not isinstance(other, CovarianceAccumulator):
            raise InvalidArgumentError(f"can only merge another CovarianceAccumulator, not {type(other).__name__}")
        self._inner.merge(other._inner)

    def mean(self) -> np.ndarray:
        """float64 ``[dim]``: the mean of all counted tokens."""
        return self._inner.mean()

    def covariance(self, dtype: CovarianceDtype = "float64") -> np.ndarray:
        """``[dim, dim]``, exactly symmetric; ``dtype="float32"`` rounds each float64 entry once, without holding the
        float64 matrix (half the peak memory of converting afterwards)."""
        return self._inner.covariance(covariance_dtype(dtype))

    def __repr__(self) -> str:
        return f"CovarianceAccumulator(dim={self.dim}, center={self.center!r}, count={self.count})"


def randomized_svd(
    a: Any, rank: int, oversample: int = 10, power_iters: int = 4, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truncated SVD ``a ≈ u @ diag(s) @ vt`` by randomized range finding (Halko, Martinsson & Tropp 2011).

    ``a``: ``[m, n]`` float array. Returns ``u [m, rank]``, ``s [rank]`` (descending), ``vt [rank, n]`` in float64
    for float64 input and float32 otherwise. The sketch has ``rank + oversample`` columns and is re-orthonormalised
    after every product of the ``power_iters`` power iterations; results are deterministic for a ``seed``. Where the
    sketch would not be smaller than the matrix, an exact thin SVD is computed instead.
    """
    mat = float_matrix(a, "matrix")
    return _core_randomized_svd(
        mat,
        _non_negative_int(rank, "rank"),
        _non_negative_int(oversample, "oversample"),
        _non_negative_int(power_iters, "power_iters"),
        _seed(seed),
    )


def task_aware_basis(
    weight: Any, covariance: Any, rank: int, oversample: int = 10, power_iters: int = 4, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
    """The top ``rank`` right singular vectors and values of ``W·C``, never forming the product.

    ``weight``: ``[d_out, d_in]`` (a linear layer's weight). ``covariance``: ``[d_in, d_in]`` symmetric (the
    layer's input covariance). Returns ``vt [rank, d_in]`` with orthonormal rows — TLoRA's ``A`` — and ``s [rank]``
    descending. Computed in float64 when both inputs are float64, otherwise in float32 (a float64 covariance is
    rounded once to float32).
    """
    w = float_matrix(weight, "weight")
    c = float_matrix(covariance, "covariance")
    dtype = np.float64 if (w.dtype == np.float64 and c.dtype == np.float64) else np.float32
    w = np.ascontiguousarray(w, dtype=dtype)
    c = np.ascontiguousarray(c, dtype=dtype)
    return _core_task_aware_basis(
        w,
        c,
        _non_negative_int(rank, "rank"),
        _non_negative_int(oversample, "oversample"),
        _non_negative_int(power_iters, "power_iters"),
        _seed(seed),
    )


def allocate_ranks(
    scores: Any,
    budget: int,
    min_rank: int = 1,
    max_rank: Union[None, int, Sequence[int]] = None,
    multiple_of: int = 1,
) -> List[int]:
    """Integer ranks proportional to ``scores`` that sum exactly to ``budget``.

    Each rank lies in ``[min_rank, max_rank]`` (``max_rank`` may be one int or one per module, e.g.
    ``min(d_in, d_out)``) and is a multiple of ``multiple_of``. The bounded proportional solution is rounded by
    largest remainder. Rank 0 (allowed with ``min_rank=0``) means "no adapter on this module". An infeasible request
    raises :class:`~lowrank_rs.errors.InfeasibleError` saying which budgets would work.
    """
    values = _scores(scores)
    per_module: Optional[List[int]] = None
    uniform: Optional[int] = None
    if max_rank is not None:
        if isinstance(max_rank, numbers.Integral):
            uniform = _non_negative_int(max_rank, "max_rank")
        else:
            per_module = [_non_negative_int(m, f"max_rank[{i}]") for i, m in enumerate(cast(Sequence[int], max_rank))]
    return _core_allocate_ranks(
        values,
        _non_negative_int(budget, "budget"),
        _non_negative_int(min_rank, "min_rank"),
        uniform,
        per_module,
        _non_negative_int(multiple_of, "multiple_of"),
    )


def allocate_alphas(scores: Any, alpha: float) -> List[float]:
    """Per-module ``α_i = max(α, round(N·α·s_i / Σs))`` (round half to even, as the TLoRA reference).

    Important modules get a larger update magnitude; none gets less than the base ``alpha``.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise InvalidArgumentError(f"alpha must be a number, not {type(alpha).__name__}")
    return _core_allocate_alphas(_scores(scores), float(alpha))


def _scores(scores: Any) -> List[float]:
    if is_torch(scores):
        scores = scores.detach().cpu().double().numpy()
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"scores must be a sequence of numbers: {e}") from None
    if arr.ndim != 1:
        raise ShapeError(f"scores must be 1-D, got shape {tuple(arr.shape)}")
    return arr.tolist()


CovarianceDtype = Literal["float64", "float32"]


def covariance_dtype(dtype: Any) -> CovarianceDtype:
    """``"float64"`` or ``"float32"`` from either spelling (a string or a numpy dtype)."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = ""
    if name not in ("float64", "float32"):
        raise InvalidArgumentError(f"covariance dtype must be float64 or float32, not {dtype!r}")
    return cast(CovarianceDtype, name)


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an integer, not {type(value).__name__} {value!r}")
    if value < 0:
        raise InvalidArgumentError(f"{name} must be non-negative, got {value}")
    return int(value)


def _seed(seed: Any) -> int:
    seed = _non_negative_int(seed, "seed")
    if seed >= 2**64:
        raise InvalidArgumentError(f"seed must be below 2**64, got {seed}")
    return seed
