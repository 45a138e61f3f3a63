"""How :func:`lowrank_rs.train` trains: :class:`TrainConfig`, validated, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Optional, Sequence, Tuple, Union

from ..config import JsonConfig, float_field, int_field, positive_float
from ..errors import ConfigError, InvalidArgumentError

__all__ = ["DISTRIBUTED_MODES", "RESUMABLE_CHANGES", "TrainConfig", "lr_factor"]

PathLike = Union[str, "os.PathLike[str]"]


# Fields that only say when to evaluate or save, or how to run, not what the run computes; a resumed run may change
# them. bf16 is among them so that a run can move between machines, at the price of exactness.
RESUMABLE_CHANGES = frozenset(
    {"eval_every", "eval_batch_size", "checkpoint_dir", "checkpoint_every", "bf16", "distributed"}
)

# How a run on several processes wraps the model (``None``: DDP when there is more than one process).
DISTRIBUTED_MODES = (None, "ddp", "fsdp")


@dataclasses.dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """How :func:`train` trains. A frozen, validated dataclass with a JSON round trip, like the adapter configs.

    - ``lr``, ``weight_decay``, ``betas``, ``eps``: AdamW's. Weight decay applies to matrices only, never to biases
      or norm weights (1-D parameters) — what Hugging Face ``Trainer`` excludes by name.
    - ``warmup_ratio`` *or* ``warmup_steps``: linear warmup over ``W = ceil(warmup_ratio · T)`` (or
      ``warmup_steps``) of the ``T`` optimizer steps, then cosine decay to ``lr · min_lr_ratio`` at the last step;
      :meth:`lr_at` is the closed form.
    - ``epochs`` *or* ``max_steps``: the run's length; neither means one epoch. With ``max_steps`` the data is cycled,
      reshuffled each epoch.
    - ``batch_size`` examples per micro-batch, ``grad_accum`` micro-batches per optimizer step. An epoch ends with
      a short step rather than carrying examples into the next epoch.
    - ``max_grad_norm``: clip the global gradient norm to this before each step; ``None`` turns clipping off.
    - ``bf16``: ``None`` autocasts to bf16 on CUDA only, ``True`` on any device, ``False`` never.
    - ``seed``: seeds torch's global RNG (dropout) at the start of a fresh run and a ``torch.Generator`` for the
      data order, so a seed fixes the run.
    - ``shuffle``: reshuffle the training examples every epoch (otherwise they go in order).
    - ``eval_every``: evaluate every so many steps, and always at the end, when ``eval_data`` is given.
    - ``eval_batch_size``: defaults to ``batch_size``.
    - ``checkpoint_dir``: write checkpoints there, every ``checkpoint_every`` steps and at the end.
    - ``distributed``: under ``torchrun`` (or an initialised process group), ``"ddp"`` or ``"fsdp"`` (FSDP2's
      ``fully_shard`` per transformer block); ``None`` means DDP. Ignored in a single process. ``batch_size`` is per
      process, so the global batch is ``batch_size · grad_accum · world_size`` (see ``docs/distributed.md``).
    """

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.0
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.0
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    bf16: Optional[bool] = None
    seed: int = 0
    shuffle: bool = True
    eval_every: Optional[int] = None
    eval_batch_size: Optional[int] = None
    checkpoint_dir: Optional[str] = None
    checkpoint_every: Optional[int] = None
    distributed: Optional[str] = None

    def __post_init__(self) -> None:
        self._set("lr", positive_float(self.lr, "lr"))
        weight_decay = float_field(self.weight_decay, "weight_decay")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be at least 0, got {weight_decay}")
        self._set("weight_decay", weight_decay)
        given = self.betas
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence) or len(given) != 2:
            raise ConfigError(f"betas must be a pair of numbers (beta1, beta2), got {given!r}")
        betas = (float_field(given[0], "betas"), float_field(given[1], "betas"))
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"betas must lie in [0, 1), got {list(betas)}")
        self._set("betas", betas)
        self._set("eps", positive_float(self.eps, "eps"))
        warmup_ratio = float_field(self.warmup_ratio, "warmup_ratio")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must lie in [0, 1), got {warmup_ratio}")
        self._set("warmup_ratio", warmup_ratio)
        if self.warmup_steps is not None:
            self._set("warmup_steps", int_field(self.warmup_steps, "warmup_steps", minimum=0))
            if warmup_ratio > 0:
                raise ConfigError("give warmup_steps or warmup_ratio, not both")
        min_lr_ratio = float_field(self.min_lr_ratio, "min_lr_ratio")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
        self._set("min_lr_ratio", min_lr_ratio)
        if self.epochs is not None:
            self._set("epochs", int_field(self.epochs, "epochs", minimum=1))
        if self.max_steps is not None:
            self._set("max_steps", int_field(self.max_steps, "max_steps", minimum=1))
            if self.epochs is not None:
                raise ConfigError("give epochs or max_steps, not both (max_steps cycles through the data as needed)")
        self._set("batch_size", int_field(self.batch_size, "batch_size", minimum=1))
        self._set("grad_accum", int_field(self.grad_accum, "grad_accum", minimum=1))
        if self.max_grad_norm is not None:
            self._set("max_grad_norm", positive_float(self.max_grad_norm, "max_grad_norm"))
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise ConfigError(f"bf16 must be true, false or null (bf16 on CUDA only), not {self.bf16!r}")
        self._set("seed", int_field(self.seed, "seed", minimum=0))
        if not isinstance(self.shuffle, bool):
            raise ConfigError(f"shuffle must be true or false, not {self.shuffle!r}")
        if self.eval_every is not None:
            self._set("eval_every", int_field(self.eval_every, "eval_every", minimum=1))
        if self.eval_batch_size is not None:
            self._set("eval_batch_size", int_field(self.eval_batch_size, "eval_batch_size", minimum=1))
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)) or not os.fspath(self.checkpoint_dir):
                raise ConfigError(f"checkpoint_dir must be a directory path, not {self.checkpoint_dir!r}")
            # Stored as a string so that the config stays JSON and hashable.
            self._set("checkpoint_dir", os.fspath(self.checkpoint_dir))
        if self.checkpoint_every is not None:
            self._set("checkpoint_every", int_field(self.checkpoint_every, "checkpoint_every", minimum=1))
            if self.checkpoint_dir is None:
                raise ConfigError("checkpoint_every needs checkpoint_dir, the directory to write checkpoints to")
        if self.distributed not in DISTRIBUTED_MODES:
            raise ConfigError(f"distributed must be one of {list(DISTRIBUTED_MODES)}, not {self.distributed!r}")

    # -- the schedule -----------------------------------------------------------------------------------------------

    def steps_per_epoch(self, num_examples: int, world_size: int = 1) -> int:
        """Optimizer steps in one pass over ``num_examples`` examples, with ``world_size`` processes each taking
        ``grad_accum`` micro-batches per step."""
        micro_batches = math.ceil(num_examples / self.batch_size)
        return math.ceil(micro_batches / (self.grad_accum * world_size))

    def total_steps(self, num_examples: int, world_size: int = 1) -> int:
        """``T``: ``max_steps``, or ``epochs`` (default 1) times :meth:`steps_per_epoch`."""
        if self.max_steps is not None:
            return self.max_steps
        return (self.epochs or 1) * self.steps_per_epoch(num_examples, world_size)

    def warmup_for(self, total_steps: int) -> int:
        """``W``: ``warmup_steps``, or ``ceil(warmup_ratio · T)``."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * total_steps)

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of optimizer step ``step`` (1-based) of ``T = total_steps``.

        ``lr · step / W`` for ``step ≤ W``, then ``lr · (m + (1 - m) · (1 + cos(π · (step - W) / (T - W))) / 2)``
        with ``m = min_lr_ratio``: ``lr`` at the end of warmup, ``lr · m`` at the last step. Without warmup the
        cosine starts from a step 0 that is never taken, so step 1 is already a hair below ``lr``.
        """
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise InvalidArgumentError(f"total_steps must be a positive integer, got {total_steps!r}")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 1 <= step <= total_steps:
            raise InvalidArgumentError(f"step must be an integer from 1 to total_steps = {total_steps}, got {step!r}")
        return self.lr * lr_factor(step, total_steps, self.warmup_for(total_steps), self.min_lr_ratio)


def lr_factor(step: int, total_steps: int, warmup: int, min_ratio: float) -> float:
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / (total_steps - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
