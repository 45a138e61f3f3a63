"""The one place a model's forward output becomes a scalar loss (calibration scores and training both need it)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Tuple

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


_IGNORE_INDEX = -100


def per_example_losses(model: torch.nn.Module, outputs: Any, batch: Mapping[str, Any]) -> Tuple[Optional[Any], str]:
    """The model's own loss split per example: ``(losses [batch], "")``, or ``(None, why not)``.

    Each ``losses[n]`` is what the model would return as ``outputs.loss`` on example ``n`` alone, so that
    ``losses.sum()`` gives every example its own output gradient. Recognised, as transformers defines them:
    causal LMs (``*ForCausalLM``, ``*LMHeadModel``: next-token cross-entropy, labels shifted, -100 ignored, mean
    over the example's tokens), masked LMs and token classifiers (the same without the shift) and sequence
    classifiers (regression, single- and multi-label as ``config.problem_type`` says or transformers infers it,
    DeBERTa's soft labels). The split is checked: recombined the way the model reduces its batch, it must give back
    ``outputs.loss``; anything else (label smoothing, a custom loss) is reported as not splittable.
    """
    labels = batch.get("labels")
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if not isinstance(labels, torch.Tensor) or not isinstance(logits, torch.Tensor) or loss is None:
        return None, "the model's output has no logits and loss, or the batch no labels"
    kind = type(model).__name__
    lg = logits if logits.dtype == torch.float64 else logits.float()
    rows = lg.shape[0]
    token_loss = kind.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForTokenClassification"))
    if token_loss:
        if lg.dim() != 3 or tuple(labels.shape) != tuple(lg.shape[:2]):
            return None, f"{kind}'s logits {tuple(lg.shape)} do not line up with labels {tuple(labels.shape)}"
        if kind.endswith(("ForCausalLM", "LMHeadModel")):
            lg, labels = lg[:, :-1], labels[:, 1:]
        per_token = torch.nn.functional.cross_entropy(
            lg.reshape(-1, lg.shape[-1]), labels.reshape(-1).long(), ignore_index=_IGNORE_INDEX, reduction="none"
        ).reshape(labels.shape)
        counts = (labels != _IGNORE_INDEX).sum(1).to(per_token.dtype)
        losses = per_token.sum(1) / counts  # 0/0 = NaN, as the model's own loss on an all-ignored example
        combined = per_token.sum() / counts.sum()
    elif kind.endswith("ForSequenceClassification"):
        split = _sequence_classification_losses(model, lg, labels)
        if split is None:
            return None, f"{kind}'s labels {tuple(labels.shape)} {labels.dtype} are not a case this splits"
        losses, combined = split, split.mean()
    else:
        return None, f"{kind} is not a transformers causal LM, masked LM, token or sequence classifier"
    if losses.shape != (rows,):
        return None, f"{kind}'s per-example losses came out as {tuple(losses.shape)}"
    expected = loss.detach().to(combined.dtype)
    rtol = 1e-4 if logits.dtype in (torch.float32, torch.float64) else 3e-2
    if torch.isfinite(expected) and not torch.isclose(combined.detach(), expected, rtol=rtol, atol=1e-6):
        return None, (
            f"{kind}'s outputs.loss ({float(expected):.6g}) is not the reduction of standard per-example losses "
            f"({float(combined):.6g}): a loss this cannot split"
        )
    return losses, ""


def _sequence_classification_losses(model: torch.nn.Module, logits: Any, labels: Any) -> Optional[Any]:
    config = getattr(model, "config", None)
    num_labels = int(getattr(config, "num_labels", logits.shape[-1]))
    problem = getattr(config, "problem_type", None)
    deberta = type(model).__name__.startswith("DebertaV2") or type(model).__name__.startswith("Deberta")
    f = torch.nn.functional
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif deberta:
            if labels.dim() == 1 or labels.shape[-1] == 1:
                if bool((labels < 0).any()):
                    return None  # DeBERTa drops such examples from its mean: not a per-example sum
                problem = "single_label_classification"
            else:
                return -(torch.log_softmax(logits, -1) * labels.to(logits.dtype)).sum(-1)
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        diff = logits.reshape(logits.shape[0], -1) - labels.to(logits.dtype).reshape(logits.shape[0], -1)
        return diff.square().mean(1)
    if problem == "single_label_classification":
        return f.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1).long(), reduction="none")
    if problem == "multi_label_classification":
        return f.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(-1)
    return None
