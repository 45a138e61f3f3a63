"""The DoRA config (docs/methods.md): LoRA's fields; ``train_a`` as TLoRA's for a task-aware frozen ``A``."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import bool_field
from ..lora.config import LoraConfig

__all__ = ["DoraConfig"]


@dataclasses.dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """DoRA, weight-decomposed LoRA: ``W' = m ⊙ (W0 + γ B A) / ‖W0 + γ B A‖`` row-wise, ``m`` trainable and
    initialised to the row norms of ``W0`` (PEFT's ``use_dora=True``).

    Every :class:`~lowrank_rs.LoraConfig` field means what it means there. ``train_a=False`` freezes ``A``: with
    ``lr.attach(model, DoraConfig(...), plan=plan)`` the ranks, scales and task-aware ``A`` come from a TLoRA
    calibration plan and only ``B`` and ``m`` train (the plan's ``train_a`` is taken).
    """

    method: ClassVar[str] = "dora"

    train_a: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("train_a", bool_field(self.train_a, "train_a"))
