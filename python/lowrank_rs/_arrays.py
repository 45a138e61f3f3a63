"""Turning user arrays (numpy, CPU torch) into what the core accepts, without copies where the layout allows."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from .errors import DtypeError, InvalidArgumentError, ShapeError

try:  # torch is a dependency, but the array helpers must not make `import lowrank_rs.linalg` pay for it.
    import torch as _torch
except ImportError:  # pragma: no cover - torch is installed with the package
    _torch = None  # type: ignore[assignment]


def is_torch(x: Any) -> bool:
    return _torch is not None and isinstance(x, _torch.Tensor)


def float_view(x: Any, what: str) -> Tuple[np.ndarray, Optional[str]]:
    """A numpy view of a float array and the 16-bit format tag the core needs (``"f16"``, ``"bf16"`` or None).

    float16 and bfloat16 come back as uint16 bit patterns; float32/float64 as themselves. CUDA tensors are refused
    rather than silently copied to the host.
    """
    if is_torch(x):
        if x.device.type != "cpu":
            raise ShapeError(f"{what} is on {x.device}; pass a CPU tensor (call .cpu() first)")
        t = x.detach()
        if t.dtype == _torch.bfloat16:
            return t.view(_torch.int16).numpy().view(np.uint16), "bf16"
        if t.dtype == _torch.float16:
            return t.numpy().view(np.uint16), "f16"
        if t.dtype in (_torch.float32, _torch.float64):
            return t.numpy(), None
        raise DtypeError(f"{what} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
    if not isinstance(x, np.ndarray):
        raise DtypeError(f"{what} must be a numpy array or a CPU torch tensor, not {type(x).__name__}")
    if x.dtype == np.float16:
        return x.view(np.uint16), "f16"
    if x.dtype in (np.float32, np.float64):
        return x, None
    raise DtypeError(f"{what} has dtype {x.dtype}; expected float16, float32 or float64 (or a bfloat16 torch tensor)")


def float_matrix(x: Any, what: str, dtype: Optional[np.dtype] = None) -> np.ndarray:
    """A C-contiguous 2-D float32/float64 numpy array (16-bit inputs widen to float32)."""
    arr, bits16 = float_view(x, what)
    if bits16 is not None:
        arr = _widen16(x, arr, bits16)
    if arr.ndim != 2:
        raise ShapeError(f"{what} must be 2-D, got shape {tuple(arr.shape)}")
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    return np.ascontiguousarray(arr)


def _widen16(original: Any, bits: np.ndarray, tag: str) -> np.ndarray:
    if tag == "f16":
        return bits.view(np.float16).astype(np.float32)
    # bfloat16 is the top half of a float32.
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bool_mask(mask: Any, expected_shape: Tuple[int, ...]) -> np.ndarray:
    """A C-contiguous bool array of exactly ``expected_shape``; nonzero means the token counts."""
    if is_torch(mask):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
            raise DtypeError(f"mask has dtype {m.dtype}; expected bool or 0/1 integers")
        # 2, -1, 0.5 or NaN would otherwise count as "keep": a mask of weights or a corrupted one, read as all ones.
        if m.size and (
            (m.min() < 0 or m.max() > 1) if np.issubdtype(m.dtype, np.integer) else bool(np.any((m != 0) & (m != 1)))
        ):
            bad = m.reshape(-1)[np.flatnonzero((m.reshape(-1) != 0) & (m.reshape(-1) != 1))[0]]
            raise InvalidArgumentError(f"mask holds {bad!r}; a mask's entries must be 0 or 1 (or bool)")
        m = m != 0
    if tuple(m.shape) != tuple(expected_shape):
        raise ShapeError(f"mask has shape {tuple(m.shape)}; expected {tuple(expected_shape)} to match the activations")
    return np.ascontiguousarray(m)
