"""Examples to batches: right padding with each field's pad value, masks made where padding needs one."""

from __future__ import annotations

from collections.abc import Mapping as MappingABC
from typing import Any, Dict, Iterator, List, Mapping, Sequence

import torch

from ..errors import EmptyInputError, InvalidArgumentError, ShapeError

__all__ = ["IGNORE_INDEX", "batch_iterator", "calibration_batches", "collate", "collate_named"]


IGNORE_INDEX = -100


def collate(examples: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """One batch from a list of examples, padded on the right.

    Scalars (0-d) are stacked to ``[batch]``; 1-D and higher fields are padded along their first dimension to the
    longest example, with ``pad_token_id`` for ``input_ids``, -100 for ``labels`` and 0 for anything else (the other
    dimensions must agree). Without an ``attention_mask`` in the examples, one is added when the batch needs padding.
    """
    return collate_named(examples, pad_token_id, [f"example {i}" for i in range(len(examples))])


def collate_named(
    examples: Sequence[Mapping[str, Any]], pad_token_id: int, names: Sequence[str]
) -> Dict[str, torch.Tensor]:
    # `names` says how errors refer to each example: its place in the list, or its index in the dataset.
    if not examples:
        raise EmptyInputError("collate needs at least one example")
    keys = None
    converted: List[Dict[str, torch.Tensor]] = []
    for i, example in enumerate(examples):
        if not isinstance(example, MappingABC):
            raise InvalidArgumentError(
                f"{names[i]} is a {type(example).__name__}; each example must be a dict of tensors for one example "
                "(input_ids, attention_mask, labels, ...)"
            )
        if keys is None:
            keys = list(example)
        elif set(example) != set(keys):
            raise InvalidArgumentError(
                f"{names[i]} has fields {sorted(example)}, but {names[0]}, in the same batch, has {sorted(keys)}; "
                "every example needs the same fields"
            )
        converted.append({key: _as_tensor(value, key, names[i]) for key, value in example.items()})
    assert keys is not None
    input_ids = [ex.get("input_ids") for ex in converted]
    for i, ids in enumerate(input_ids):
        if ids is not None and ids.dim() != 1:
            raise ShapeError(
                f"{names[i]}: input_ids has shape {list(ids.shape)}; an example holds one sequence, a 1-D tensor "
                "(lr.train does the batching)"
            )
    batch: Dict[str, torch.Tensor] = {}
    for key in keys:
        values = [ex[key] for ex in converted]
        batch[key] = _pad_stack(key, values, _pad_value(key, pad_token_id))
    if "attention_mask" not in batch and "input_ids" in batch:
        lengths = [len(ids) for ids in input_ids if ids is not None]
        if len(set(lengths)) > 1:
            mask = torch.zeros(batch["input_ids"].shape, dtype=torch.long)
            for row, length in enumerate(lengths):
                mask[row, :length] = 1
            batch["attention_mask"] = mask
    return batch


def _as_tensor(value: Any, key: str, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidArgumentError(
            f"{name}: field {key!r} is a {type(value).__name__}, which is not a tensor or a number list; "
            "drop fields the model does not take (text, ids) before training"
        ) from None
    return tensor


def _pad_value(key: str, pad_token_id: int) -> int:
    if key == "input_ids":
        return pad_token_id
    if key == "labels":
        return IGNORE_INDEX
    return 0


def _pad_stack(key: str, values: List[torch.Tensor], pad: int) -> torch.Tensor:
    dims = {v.dim() for v in values}
    if len(dims) != 1:
        raise ShapeError(f"field {key!r} has tensors of different ranks in one batch: {sorted(dims)} dimensions")
    if dims == {0}:
        return torch.stack(values)
    trailing = {tuple(v.shape[1:]) for v in values}
    if len(trailing) != 1:
        raise ShapeError(
            f"field {key!r}: examples differ beyond their first (sequence) dimension: "
            f"{sorted(list(v.shape) for v in values)}"
        )
    longest = max(v.shape[0] for v in values)
    out = values[0].new_full((len(values), longest, *values[0].shape[1:]), pad)
    for row, v in enumerate(values):
        out[row, : v.shape[0]] = v
    return out


def calibration_batches(
    examples: Sequence[Mapping[str, Any]], count: int, pad: int, batch_size: int = 8
) -> List[Dict[str, torch.Tensor]]:
    """The first ``count`` examples as padded batches, the way a calibration pass (:func:`lowrank_rs.calibrate`)
    takes them."""
    chosen = list(examples[:count])
    return [collate(chosen[i : i + batch_size], pad) for i in range(0, len(chosen), batch_size)]


def batch_iterator(batches: Any) -> Iterator[Any]:
    """An iterator over ``batches`` (calibration or statistics passes), or a clear error for something that is not
    an iterable of batch dicts."""
    try:
        return iter(batches)
    except TypeError:
        raise InvalidArgumentError(
            f"batches must be an iterable of batch dicts, not {type(batches).__name__}"
        ) from None
