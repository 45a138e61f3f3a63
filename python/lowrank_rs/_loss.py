"""The one place a model's forward output becomes a scalar loss (calibration scores and training both need it)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

from .errors import InvalidArgumentError, NonFiniteError

LossFn = Callable[[Any, Mapping[str, Any]], torch.Tensor]


def model_loss(
    model: torch.nn.Module,
    outputs: Any,
    batch: Mapping[str, Any],
    loss_fn: Optional[LossFn],
    *,
    caller: str,
    no_labels_hint: str,
    non_finite_hint: str,
) -> torch.Tensor:
    """``loss_fn(outputs, batch)`` if given, else the model's ``outputs.loss``, checked to be a finite scalar.

    ``caller`` names the function the user called (for the ``loss_fn=`` hint); the two hints finish the messages for
    a missing loss and for NaN/infinity, since what to do about either depends on the caller.
    """
    loss: Any
    if loss_fn is not None:
        loss = loss_fn(outputs, batch)
        source = "loss_fn(outputs, batch)"
    else:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        source = "the model's outputs.loss"
        if loss is None:
            raise InvalidArgumentError(
                f"{type(model).__name__} returned no loss: {no_labels_hint}, or pass "
                f"loss_fn=lambda outputs, batch: ... to {caller}"
            )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise InvalidArgumentError(f"{source} must be a scalar floating-point tensor, got {describe(loss)}")
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteError(f"{source} is {loss.item()} {non_finite_hint}")
    return loss.reshape(())


def describe(value: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return f"a {type(value).__name__}"
