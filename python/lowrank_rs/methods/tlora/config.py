"""The TLoRA config (docs/methods.md): LoRA's fields plus calibration, allocation and basis settings."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional

from ...config import bool_field, choice, int_field
from ...errors import ConfigError
from ..lora.config import LoraConfig

__all__ = ["SCORES", "TLoraConfig"]

# The sensitivity scores calibration can allocate by (TLoraConfig.score).
SCORES = ("reference", "grad", "fisher")


@dataclasses.dataclass(frozen=True)
class TLoraConfig(LoraConfig):
    """TLoRA (docs/methods.md): task-aware frozen ``A``, budgeted rank and scale per module.

    - ``budget``: total rank over the ``N`` target modules; ``None`` means ``r × N`` (LoRA's parameter count).
    - ``min_rank``, ``max_rank``, ``multiple_of``: bounds and rounding of each module's rank; rank 0 (allowed with
      ``min_rank=0``) leaves a module without adapter.
    - ``center``: covariance centring, ``"sequence"`` (the reference's), ``"global"`` or ``"none"``.
    - ``num_examples``: calibration examples; ``count_prompt_tokens``: whether tokens labelled -100 enter ``C``.
    - ``scaling``: ``"reference"`` gives ``γ_i = α_i / r`` with the base ``r`` (what the reference computes),
      ``"per_rank"`` gives ``γ_i = α_i / r_i``.
    - ``train_a``: train ``A`` too (the paper freezes it; the released code forgot to). Set whenever
      ``train_a_after`` is.
    - ``train_a_after``: ``None`` (default, the paper's) keeps ``A`` frozen, unless ``train_a``; ``0`` trains ``A``
      from the first step; ``N > 0`` keeps it frozen for the first ``N`` optimizer steps of :func:`lowrank_rs.train`
      (its gradient is dropped, so AdamW neither moves nor decays it) and trains it after. ``A`` is in the optimizer
      from the start either way, so it counts in ``trainable_parameters``. A frozen task-aware ``A`` may be unable to
      express the change the task needs (see ``gradient_share``); freeing it is the remedy.
    - ``score``: the sensitivity score that allocates ranks and scales: ``"fisher"`` (default) ``Σ G²`` (the
      empirical Fisher's diagonal), ``"reference"`` ``Σ|W ⊙ G|`` (the TLoRA paper's and its code's; use it to
      reproduce them), ``"grad"`` ``Σ|G|``, each divided by ``|W|`` and averaged over the calibration examples,
      ``G = ∂L/∂W`` of one example. The default is chosen by measurement: on two real-text tasks the Fisher score
      beat the reference's by about 4 points at the same rank budget (docs/methods.md, "Sensitivity scores").
    - ``gradient_share``: measure each module's share of the calibration gradient inside ``A``'s row space
      (``ModulePlan.gradient_share``). It holds ``Σ G`` per module in float32 on the model's device until the plan
      is built — for a module with more than 256 outputs a 256-row sketch ``Ψ Σ G`` instead, whose share is an
      estimate (within 0.012 of the exact one on all-MiniLM-L6-v2's 36 modules, mean 0.003). ``None`` (default):
      measured when those sums take at most 2 GiB (LLaMA-7B's seven projections: 1.09 GiB); ``True``: always;
      ``False``: never.
    - ``oversample``, ``power_iters``: randomized SVD settings for the basis.
    - ``per_example_scores``: sensitivity per example, as the reference, or per batch.
    - ``calibration_batch_size``: examples per forward and backward when scoring per example (each example's
      gradient stays its own; see :func:`~lowrank_rs.methods.tlora.calibrate`); 1 is the reference's way. Halved
      automatically on out-of-memory. ``None`` (default): 1 for a model on the CPU, where batching measured no
      faster (all-MiniLM-L6-v2, 32 examples: 3.2 s CPU at 1, 3.2–3.8 s at 4–32, the padding costing what the
      larger products save), and 8 on an accelerator, where one example per pass leaves the device idle.
    - ``statistics_backend``: where covariances accumulate: ``"core"`` (the Rust core, on the host), ``"torch"`` (on
      the model's device) or ``"auto"`` (the core for CPU models, torch otherwise). The plan does not depend on it
      beyond float rounding.
    - ``max_covariance_bytes``: refuse to calibrate when the covariance sums would need more memory than this
      (``None``: no cap); see :func:`~lowrank_rs.methods.tlora.plan_memory`.
    """

    method: ClassVar[str] = "tlora"

    budget: Optional[int] = None
    min_rank: int = 1
    max_rank: Optional[int] = None
    multiple_of: int = 1
    center: str = "sequence"
    num_examples: int = 32
    count_prompt_tokens: bool = True
    scaling: str = "reference"
    train_a: bool = False
    train_a_after: Optional[int] = None
    score: str = "fisher"
    gradient_share: Optional[bool] = None
    oversample: int = 10
    power_iters: int = 4
    per_example_scores: bool = True
    calibration_batch_size: Optional[int] = None
    statistics_backend: str = "auto"
    max_covariance_bytes: Optional[int] = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TLoraConfig:
        # A file written before ``score`` existed was allocated by the reference's score, not by today's default.
        if isinstance(data, Mapping) and "score" not in data:
            data = {**data, "score": "reference"}
        return super().from_dict(data)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is not None:
            self._set("budget", int_field(self.budget, "budget", minimum=1))
        self._set("min_rank", int_field(self.min_rank, "min_rank", minimum=0))
        if self.max_rank is not None:
            max_rank = int_field(self.max_rank, "max_rank", minimum=1)
            if max_rank < self.min_rank:
                raise ConfigError(f"max_rank ({max_rank}) must be at least min_rank ({self.min_rank})")
            self._set("max_rank", max_rank)
        self._set("multiple_of", int_field(self.multiple_of, "multiple_of", minimum=1))
        self._set("center", choice(self.center, "center", ("sequence", "global", "none")))
        self._set("num_examples", int_field(self.num_examples, "num_examples", minimum=1))
        self._set("count_prompt_tokens", bool_field(self.count_prompt_tokens, "count_prompt_tokens"))
        self._set("scaling", choice(self.scaling, "scaling", ("reference", "per_rank")))
        self._set("train_a", bool_field(self.train_a, "train_a"))
        if self.train_a_after is not None:
            self._set("train_a_after", int_field(self.train_a_after, "train_a_after", minimum=0))
            # A must be in the optimizer from the start for its warm-up to end; train_a is what puts it there.
            self._set("train_a", True)
        self._set("score", choice(self.score, "score", SCORES))
        if self.gradient_share is not None:
            self._set("gradient_share", bool_field(self.gradient_share, "gradient_share"))
        self._set("oversample", int_field(self.oversample, "oversample", minimum=0))
        self._set("power_iters", int_field(self.power_iters, "power_iters", minimum=0))
        self._set("per_example_scores", bool_field(self.per_example_scores, "per_example_scores"))
        if self.calibration_batch_size is not None:
            size = int_field(self.calibration_batch_size, "calibration_batch_size", minimum=1)
            self._set("calibration_batch_size", size)
        self._set(
            "statistics_backend", choice(self.statistics_backend, "statistics_backend", ("auto", "core", "torch"))
        )
        if self.max_covariance_bytes is not None:
            self._set("max_covariance_bytes", int_field(self.max_covariance_bytes, "max_covariance_bytes", minimum=1))
