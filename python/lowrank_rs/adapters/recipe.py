"""What the fine-tuning job hands every method's recipe: the shared settings, and what comes back."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

from torch import nn

from ..errors import InvalidArgumentError

__all__ = ["Plan", "Prepared", "Settings", "default_targets", "settings_targets"]


class Plan(Protocol):
    """What the job does with a data-aware method's calibration result: save it, print it, plot it."""

    def save(self, directory: Any) -> None: ...

    def table(self) -> str: ...

    def plot(self, path: Any) -> None: ...


# Linear layers whose names mark them as a task head rather than part of a transformer block.
_HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs")


def default_targets(model: nn.Module) -> Tuple[List[str], List[str]]:
    """``(target_modules, modules_to_save)`` for a model: every ``nn.Linear`` inside the transformer blocks (as
    name suffixes below the block index, e.g. ``attention.self.query``), and the task head for classification."""
    suffixes: Dict[str, None] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is not None and index + 1 < len(parts):
            suffixes.setdefault(".".join(parts[index + 1 :]), None)
    if not suffixes:
        raise InvalidArgumentError(
            f"found no nn.Linear inside numbered transformer blocks of this {type(model).__name__}; "
            "name the target modules yourself (--targets)"
        )
    heads = [name for name in _HEAD_NAMES if name != "lm_head" and isinstance(getattr(model, name, None), nn.Module)]
    return list(suffixes), heads


@dataclasses.dataclass
class Settings:
    """The knobs every method shares in one job."""

    rank: int = 8
    alpha: Optional[float] = None  # None: alpha = 2 r
    targets: Optional[Sequence[str]] = None
    calibration_examples: int = 64
    max_length: int = 128
    seed: int = 0
    progress: bool = True
    # Task names of multi-task data (TA-LoRA's tasks); single-task data trains one task, "default".
    tasks: Tuple[str, ...] = ("default",)

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank


@dataclasses.dataclass
class Prepared:
    model: nn.Module
    plan: Optional[Plan] = None  # a data-aware method's calibration result, saved and plotted by the job
    calibration_seconds: float = 0.0


def settings_targets(model: nn.Module, settings: Settings) -> Tuple[List[str], List[str]]:
    targets, heads = default_targets(model)
    return (list(settings.targets) if settings.targets else targets), heads
