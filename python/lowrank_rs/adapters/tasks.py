"""Task names and ids of multi-task adapters: the one place a task name or index becomes an id."""

from __future__ import annotations

import re
from typing import Any, Sequence, Tuple

import torch

from ..errors import ConfigError, TaskError
from .targets import nearest

__all__ = ["task_index", "task_names"]

_TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")


def task_names(value: Any, name: str) -> Tuple[str, ...]:
    """``value`` checked as a list of task names (letters, digits, ``_``, ``-``: they become tensor names)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{name} must be a list of task names, not {type(value).__name__} {value!r}")
    for item in value:
        if not isinstance(item, str) or not _TASK_NAME.fullmatch(item):
            raise ConfigError(f"{name}: task name {item!r} must be a non-empty string of letters, digits, '_' and '-'")
    if len(set(value)) != len(value):
        raise ConfigError(f"{name} lists a task twice: {list(value)}")
    return tuple(value)


def task_index(value: Any, names: Sequence[str], where: str) -> int:
    """The id of one task given by name, index, or a one-element integer tensor; ``where`` names it in errors."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.reshape(()))
    if isinstance(value, str):
        if value not in names:
            raise TaskError(
                f"{where}: {value!r} is not one of the model's tasks {list(names)}; nearest: {nearest(value, names)}"
            )
        return list(names).index(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(names):
            raise TaskError(f"{where}: task id {value} does not exist: the model has {len(names)} tasks {list(names)}")
        return value
    raise TaskError(f"{where} must be a task name or index, not {type(value).__name__} {value!r}")
