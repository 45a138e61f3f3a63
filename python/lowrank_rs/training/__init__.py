"""Training: :class:`TrainConfig`, the loop (:func:`train`, :func:`evaluate`), batching and the checkpoint format.

The loop asks the adapted model's method for its :class:`~lowrank_rs.adapters.TrainingHooks` through the registry.
"""

from .collate import calibration_batches, collate
from .config import TrainConfig
from .loop import evaluate, train
from .results import EvalResult, TrainResult

__all__ = ["EvalResult", "TrainConfig", "TrainResult", "calibration_batches", "collate", "evaluate", "train"]
