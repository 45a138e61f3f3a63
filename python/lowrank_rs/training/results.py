"""What :func:`lowrank_rs.train` and :func:`lowrank_rs.evaluate` return."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

__all__ = ["EvalResult", "TrainResult"]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """One evaluation: mean loss over the examples, and accuracy for classification (``None`` otherwise).

    Accuracy is computed when the model returns ``logits`` of shape ``[batch, classes]`` and the batch has integer
    ``labels`` of shape ``[batch]``; labels of -100 are left out of it.
    """

    step: int
    loss: float
    accuracy: Optional[float]
    examples: int

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did.

    ``losses``, ``learning_rates`` (``TrainConfig.lr`` as scheduled; a method's own parameter groups follow the same
    schedule from their own rates) and ``grad_norms`` (before clipping) have one entry per optimizer step of the
    whole run, steps before a resumed checkpoint included, so ``losses[k:]`` of a resumed run can be compared with an
    uninterrupted one. ``tokens``, ``tokens_per_second`` and ``wall_time`` cover this call only; tokens are
    ``attention_mask`` sums (``input_ids`` elements without a mask), and tokens per second count training time, not
    evaluation or checkpoint writes. ``checkpoint`` is the run's newest checkpoint directory (with
    ``checkpoint_dir``, the one written at the last step; after a resume that trained nothing, the one resumed from).
    """

    steps: int
    losses: List[float]
    learning_rates: List[float]
    grad_norms: List[float]
    evals: List[EvalResult]
    tokens: int
    tokens_per_second: float
    wall_time: float
    resumed_from: Optional[int] = None
    checkpoint: Optional[str] = None

    @property
    def final_loss(self) -> float:
        return self.losses[-1]

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["evals"] = [e.to_dict() for e in self.evals]
        return out
