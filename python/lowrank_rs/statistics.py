"""Input-covariance statistics with one interface and two backends: the Rust core on the host, torch on a device.

A calibration accumulates, per group of modules reading one tensor, ``C = (1/n) Σ (x − μ)(x − μ)ᵀ`` over the
counted tokens (docs/methods.md). Where the activations are produced decides where that work belongs: for a model on
the CPU the core's :class:`~lowrank_rs.linalg.CovarianceAccumulator` (blocked f32 products, f64 sums, GIL released);
for a model on an accelerator :class:`TorchCovarianceAccumulator`, which keeps its sums on that device, so no
activation crosses to the host and only the final ``[d, d]`` matrix does.

Both follow the same contract (:class:`StatisticsAccumulator`): the three centring modes, masks that drop padding,
per-batch products in f32 (TF32 off), sums in f64 (compensated f32 sums on devices without f64), an exact
``merge``, and ``count`` / ``mean()`` / ``covariance()`` returned as Python int / float64 numpy.

The torch backend exposes its additive state (:meth:`TorchCovarianceAccumulator.state`) as device tensors so that
several processes can combine their statistics with collective operations: for ``"sequence"`` and ``"none"``
centring ``count``, ``total`` and ``scatter`` are plain sums (an all-reduce of each is exact); for ``"global"`` the
scatter is about each part's own mean, and parts combine with :meth:`~TorchCovarianceAccumulator.merge_state`
(Chan et al.'s pairwise formula), e.g. after an all-gather.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional, Protocol

import numpy as np

from ._arrays import bool_mask, is_torch
from .errors import DtypeError, EmptyInputError, InvalidArgumentError, NonFiniteError, ShapeError
from .linalg import CovarianceAccumulator, CovarianceDtype, covariance_dtype

__all__ = [
    "AccumulatorState",
    "StatisticsAccumulator",
    "TorchCovarianceAccumulator",
    "make_accumulator",
    "resolve_backend",
]

BACKENDS = ("auto", "core", "torch")
CENTERS = ("sequence", "global", "none")


class StatisticsAccumulator(Protocol):
    """What calibration asks of a covariance accumulator, whichever backend computes it."""

    @property
    def dim(self) -> int: ...

    @property
    def center(self) -> str: ...

    @property
    def count(self) -> int: ...

    def update(self, x: Any, mask: Any = None) -> None: ...

    def mean(self) -> np.ndarray: ...

    def covariance(self, dtype: CovarianceDtype = "float64") -> np.ndarray: ...


def resolve_backend(backend: str, device: Any) -> str:
    """``"core"`` or ``"torch"``: ``"auto"`` picks the core for CPU tensors and torch for every other device."""
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"statistics backend must be one of {BACKENDS}, not {backend!r}")
    if backend != "auto":
        return backend
    kind = getattr(device, "type", str(device))
    return "core" if kind == "cpu" else "torch"


def make_accumulator(dim: int, center: str, device: Any = "cpu", backend: str = "auto") -> Any:
    """A new accumulator of ``backend`` (see :func:`resolve_backend`) for activations living on ``device``."""
    if resolve_backend(backend, device) == "core":
        return CovarianceAccumulator(dim, center)
    return TorchCovarianceAccumulator(dim, center, device=device)


def empty_like(acc: Any) -> Any:
    """An empty accumulator of the same backend, dimension, centring (and device) as ``acc``."""
    if isinstance(acc, TorchCovarianceAccumulator):
        return TorchCovarianceAccumulator(acc.dim, acc.center, device=acc.device, f64=acc.f64)
    return CovarianceAccumulator(acc.dim, acc.center)


def merge_into(target: Any, other: Any) -> None:
    """``target.merge(other)`` across backends (a core accumulator is read through its count, mean and covariance)."""
    if isinstance(target, TorchCovarianceAccumulator):
        target.merge(other)
    elif isinstance(other, CovarianceAccumulator):
        target.merge(other)
    else:
        raise InvalidArgumentError(
            f"cannot merge a {type(other).__name__} into a core CovarianceAccumulator; merge into the torch one"
        )


@dataclasses.dataclass
class AccumulatorState:
    """The additive state of a :class:`TorchCovarianceAccumulator` (device tensors, f64 or f32).

    ``count`` tokens; ``total`` ``[d]`` their sum; ``scatter`` ``[d, d]`` the centred scatter ``M`` (``covariance
    = M / count``): about each sequence's own mean (``"sequence"``), about the mean of these tokens (``"global"``)
    or uncentred (``"none"``). On devices without f64, ``total_comp`` / ``scatter_comp`` hold the Kahan
    compensation terms (``None`` otherwise).
    """

    center: str
    count: int
    total: Any
    scatter: Any
    total_comp: Any = None
    scatter_comp: Any = None


class TorchCovarianceAccumulator:
    """Streaming input covariance computed with torch on the activations' own device (see the module docstring).

    - ``update(x, mask)``: ``x`` ``[tokens, d]`` or ``[batch, seq, d]`` (any float dtype, moved to ``device`` if
      elsewhere), ``mask`` ``[tokens]`` / ``[batch, seq]`` (bool or 0/1, torch or numpy; zero = not counted).
      Counted rows are gathered, centred in f64 (per sequence, on the batch mean, or not at all), rounded once to
      f32, multiplied as ``Xᵀ X`` in f32 with TF32 off, and added to f64 sums.
    - ``f64``: whether the sums are f64; ``None`` means "where the device supports it" (not MPS). Without f64 the
      sums are Kahan-compensated f32.

    Non-finite counted values are detected when the result is read (checking each update would synchronise the
    device on every forward) and raise :class:`~lowrank_rs.errors.NonFiniteError` there.
    """

    def __init__(self, dim: int, center: str = "sequence", *, device: Any = "cpu", f64: Optional[bool] = None) -> None:
        import torch

        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise InvalidArgumentError(f"dim must be a positive integer, not {dim!r}")
        if center not in CENTERS:
            raise InvalidArgumentError(f"center must be one of {CENTERS}, not {center!r}")
        self._dim = dim
        self._center = center
        self.device = torch.device(device)
        self.f64 = (self.device.type != "mps") if f64 is None else bool(f64)
        self._sum_dtype = torch.float64 if self.f64 else torch.float32
        self._count = 0

        def zeros(*shape: int) -> Any:
            return torch.zeros(*shape, dtype=self._sum_dtype, device=self.device)

        self._total = zeros(dim)
        self._scatter = zeros(dim, dim)
        self._total_comp = None if self.f64 else zeros(dim)
        self._scatter_comp = None if self.f64 else zeros(dim, dim)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def center(self) -> str:
        return self._center

    @property
    def count(self) -> int:
        """Number of tokens counted so far (padding excluded)."""
        return self._count

    @property
    def nbytes(self) -> int:
        """Device memory the sums hold."""
        # f64 sums, or f32 sums plus their f32 compensation: 8 bytes per entry either way.
        return 8 * (self._dim * self._dim + self._dim)

    # -- updates ----------------------------------------------------------------------------------------------------

    def update(self, x: Any, mask: Any = None) -> None:
        import torch

        if not is_torch(x):
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(x)
            else:
                raise DtypeError(f"activations must be a torch tensor or numpy array, not {type(x).__name__}")
        if not x.is_floating_point():
            raise DtypeError(f"activations have dtype {x.dtype}; expected a floating-point tensor")
        if x.dim() not in (2, 3):
            raise ShapeError(f"activations must be [tokens, dim] or [batch, seq, dim], got shape {tuple(x.shape)}")
        if x.shape[-1] != self._dim:
            raise ShapeError(
                f"batch has {x.shape[-1]} features per token but the accumulator was created for dim {self._dim}"
            )
        lead = tuple(x.shape[:-1])
        sequences, seq_len = (1, lead[0]) if x.dim() == 2 else lead
        if sequences * seq_len == 0:
            raise EmptyInputError(f"batch has no tokens ({sequences} sequences × {seq_len} tokens)")
        keep = _host_mask(mask, lead).reshape(sequences, seq_len)
        per_sequence = keep.sum(axis=1)
        n_b = int(per_sequence.sum())
        if n_b == 0:
            return
        x = x.detach().to(self.device).reshape(sequences * seq_len, self._dim)
        # Indices rather than a boolean mask: they are built on the host, so the device never waits for a count.
        index = torch.from_numpy(np.flatnonzero(keep.reshape(-1))).to(self.device)
        rows = x.index_select(0, index).to(self._sum_dtype)
        batch_total = rows.sum(0)
        if self._center == "none":
            centred = rows
        elif self._center == "global":
            centred = rows - batch_total / n_b
        else:
            kept = per_sequence[per_sequence > 0]
            segment = torch.from_numpy(np.repeat(np.arange(kept.size), kept)).to(self.device)
            sums = torch.zeros(kept.size, self._dim, dtype=self._sum_dtype, device=self.device)
            sums.index_add_(0, segment, rows)
            counts = torch.from_numpy(kept.astype(np.float64)).to(device=self.device, dtype=self._sum_dtype)
            centred = rows - (sums / counts[:, None]).index_select(0, segment)
        del rows
        centred32 = centred.to(torch.float32)
        del centred
        with _full_precision():
            product = centred32.T @ centred32
        del centred32
        if self._center == "global" and self._count > 0:
            # Chan et al.: M += S_b + δδᵀ·n_a·n_b/n with δ the difference of the two means.
            n_a = self._count
            delta = batch_total / n_b - self._total / n_a
            self._add_scatter(product.to(self._sum_dtype) + torch.outer(delta, delta) * (n_a * n_b / (n_a + n_b)))
        else:
            self._add_scatter(product)
        self._add_total(batch_total)
        self._count += n_b

    def merge(self, other: Any) -> None:
        """Fold ``other``'s tokens in exactly (another torch accumulator, or a core one read through its results)."""
        if isinstance(other, TorchCovarianceAccumulator):
            state = other.state()
        elif isinstance(other, CovarianceAccumulator):
            state = _state_of_core(other, self.device, self._sum_dtype)
        else:
            raise InvalidArgumentError(f"can only merge a covariance accumulator, not {type(other).__name__}")
        if other.dim != self._dim:
            raise ShapeError(f"cannot merge a dim {other.dim} accumulator into a dim {self._dim} one")
        self.merge_state(state)

    def merge_state(self, state: AccumulatorState) -> None:
        """Fold an :class:`AccumulatorState` (e.g. another process's) in exactly."""
        import torch

        if state.center != self._center:
            raise InvalidArgumentError(
                f"cannot merge a {state.center!r}-centred accumulator into a {self._center!r}-centred one"
            )
        if state.count == 0:
            return
        total = state.total.to(device=self.device, dtype=self._sum_dtype)
        scatter = state.scatter.to(device=self.device, dtype=self._sum_dtype)
        if state.total_comp is not None:
            total = total - state.total_comp.to(device=self.device, dtype=self._sum_dtype)
        if state.scatter_comp is not None:
            scatter = scatter - state.scatter_comp.to(device=self.device, dtype=self._sum_dtype)
        if self._center == "global" and self._count > 0:
            n_a, n_b = self._count, state.count
            delta = total / n_b - self._total / n_a
            scatter = scatter + torch.outer(delta, delta) * (n_a * n_b / (n_a + n_b))
        self._add_scatter(scatter)
        self._add_total(total)
        self._count += state.count

    def state(self) -> AccumulatorState:
        """The additive state as device tensors (live views: copy before modifying)."""
        return AccumulatorState(
            self._center, self._count, self._total, self._scatter, self._total_comp, self._scatter_comp
        )

    def _add_scatter(self, value: Any) -> None:
        if self._scatter_comp is None:
            self._scatter.add_(value)
        else:
            _kahan_add(self._scatter, self._scatter_comp, value)

    def _add_total(self, value: Any) -> None:
        if self._total_comp is None:
            self._total.add_(value)
        else:
            _kahan_add(self._total, self._total_comp, value)

    # -- results ----------------------------------------------------------------------------------------------------

    def mean(self) -> np.ndarray:
        """float64 ``[dim]``: the mean of all counted tokens."""
        import torch

        self._require_tokens()
        return _settled(self._total, self._total_comp, torch.float64).numpy() / self._count

    def covariance(self, dtype: CovarianceDtype = "float64") -> np.ndarray:
        """``[dim, dim]`` (float64, or float32 rounded from it), exactly symmetric (the mean of the sum and its
        transpose)."""
        import torch

        dtype = covariance_dtype(dtype)

        self._require_tokens()
        scatter = _settled(self._scatter, self._scatter_comp, torch.float64).numpy()
        if not np.isfinite(scatter).all():
            raise NonFiniteError(
                "the covariance sums are not finite: a counted activation was NaN or infinite, or beyond the f32 "
                "range the products are computed in"
            )
        out = scatter + scatter.T
        out /= 2.0 * self._count
        return out if dtype == "float64" else out.astype(np.float32)

    def _require_tokens(self) -> None:
        if self._count == 0:
            raise EmptyInputError("no tokens were accumulated (every update so far was empty or fully masked)")

    def __repr__(self) -> str:
        return (
            f"TorchCovarianceAccumulator(dim={self._dim}, center={self._center!r}, count={self._count}, "
            f"device={str(self.device)!r})"
        )


def _settled(total: Any, comp: Any, dtype: Any) -> Any:
    """The compensated sum ``total − comp`` on the host in ``dtype``."""
    value = total.detach().to("cpu", dtype)
    return value if comp is None else value - comp.detach().to("cpu", dtype)


def _kahan_add(total: Any, comp: Any, value: Any) -> None:
    # comp holds what the rounded running sum lost; it is subtracted from the next addend.
    y = value.to(total.dtype) - comp
    t = total + y
    comp.copy_((t - total) - y)
    total.copy_(t)


def _state_of_core(acc: CovarianceAccumulator, device: Any, dtype: Any) -> AccumulatorState:
    import torch

    if acc.count == 0:
        return AccumulatorState(acc.center, 0, None, None)
    n = acc.count
    total = torch.from_numpy(acc.mean() * n).to(device=device, dtype=dtype)
    scatter = torch.from_numpy(acc.covariance() * n).to(device=device, dtype=dtype)
    return AccumulatorState(acc.center, n, total, scatter)


def _host_mask(mask: Any, shape: tuple) -> np.ndarray:
    # The core's mask rules (bool, or exactly 0/1 values) hold for the torch backend too.
    if mask is None:
        return np.ones(shape, dtype=bool)
    return bool_mask(mask, tuple(shape))


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """f32 products in f32: TF32 (CUDA) and reduced-precision CPU matmuls off for the duration."""
    import torch

    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    precision = torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
        torch.set_float32_matmul_precision(precision)
