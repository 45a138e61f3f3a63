"""TLoRA (docs/methods.md): calibration (covariance, sensitivity, budgeted ranks and scales, task-aware ``A``), the
calibration plan, and the method — LoRA with the plan's frozen ``A``."""

from ...adapters.registry import register
from .api import calibrate
from .calibrate import CalibrationPlan, ModulePlan, build_plan, collect_statistics
from .config import TLoraConfig
from .memory import MemoryPlan, plan_memory
from .method import TLoraMethod

METHOD = register(TLoraMethod())

__all__ = [
    "METHOD",
    "CalibrationPlan",
    "MemoryPlan",
    "ModulePlan",
    "TLoraConfig",
    "TLoraMethod",
    "build_plan",
    "calibrate",
    "collect_statistics",
    "plan_memory",
]
