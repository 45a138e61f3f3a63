"""The training loop: AdamW, linear warmup + cosine decay, gradient accumulation, clipping, bf16 autocast on CUDA,
evaluation, a progress bar, and checkpoints that resume exactly.

``lr.train`` trains whatever requires grad — after :func:`lowrank_rs.attach` that is the adapters and
``modules_to_save`` only. An attached model is an ordinary ``nn.Module`` and also trains under Hugging Face
``Trainer`` unchanged; this loop exists for what ``Trainer`` does not promise: bit-exact resume, and no pickle in
checkpoints.

**Data.** ``train_data`` and ``eval_data`` are *sequences of examples* — a list, or a map-style
``torch.utils.data.Dataset`` (``len`` and integer indexing) — each example a dict of tensors as the model takes them
for one example: 1-D per-token fields (``input_ids``, ``attention_mask``, ``token_type_ids``, token-level
``labels``) and 0-d scalars (a class ``labels``). Ints and lists are turned into tensors. The loop does the shuffling
and batching itself, because only then does a seed fix the data order and a checkpoint know where in the epoch it
stopped; a ``DataLoader`` or a generator of ready batches is refused with that explanation. :func:`collate` pads on
the right: ``input_ids`` with ``model.config.pad_token_id`` (0 when unset), ``labels`` with -100 (ignored by every
Hugging Face loss), ``attention_mask`` and every other field with 0. Examples without ``attention_mask`` get one
whenever a batch needs padding, so padding is never attended.

**Loss.** ``outputs.loss`` (Hugging Face models compute it when the batch has ``labels``), or
``loss_fn(outputs, batch)``. The loss of an optimizer step is the mean over its examples: each micro-batch's loss is
weighted by its share of the step's examples (``1 / grad_accum`` when the micro-batches are full), so for a loss that
is a mean over examples (classification) ``grad_accum=k`` with ``batch_size=b`` equals one batch of ``k·b``, a short
last batch included. A token-level loss (causal LM) is already a mean over the micro-batch's non-ignored tokens; the
micro-batches are still weighted by examples, not tokens, so with uneven numbers of label tokens per micro-batch
accumulation is close to, not equal to, one big batch (as with Hugging Face ``Trainer`` before 4.46, which gave
every micro-batch the same weight).

**Precision.** With ``bf16=None`` (the default) forward passes run under bf16 autocast on CUDA and in float32 on the
CPU, where bf16 autocast is slow on most processors and changes results; ``bf16=True`` asks for it on the CPU too,
``bf16=False`` never uses it. Parameters and optimizer state keep their own dtype either way.

**Checkpoints.** ``checkpoint_dir/step-NNNNNNNN/`` holds ``model.safetensors`` (every parameter that requires grad,
by ``named_parameters`` name), ``optimizer.safetensors`` (AdamW's tensors as ``optimizer/<parameter name>/<state
key>``, e.g. ``optimizer/bert.encoder.layer.0.attention.self.query.lora_B.weight/exp_avg``), ``rng.safetensors``
(``rng/torch_cpu``, ``rng/cuda/<device index>``, ``rng/data_order`` and the current epoch's ``rng/epoch_order``) and
``trainer_state.json`` (step, epoch position, scheduler state, optimizer hyperparameters by parameter name, the
config and the loss/eval history). Nothing is pickled, so reading one never executes code. Each is written to a
temporary directory and renamed into place, so a crash leaves either the whole checkpoint or none.
``resume_from`` restores all of it; a run interrupted after a checkpoint and resumed on the same device then gives
the same losses and parameters, bit for bit, as a run that never stopped.

**Adapter methods** may add to the loop through the object their attachment's ``training_hooks(model)`` returns
(TA-LoRA does; LoRA needs none): ``convert_example(example, where)`` rewrites each example before collation (TA-LoRA
turns a ``task`` name into ``task_ids``); ``param_groups(names)`` gives ``(label, parameter names, lr)`` groups with
learning rates of their own, scheduled like ``lr`` (every other trainable parameter gets ``lr``);
``regularizer()`` is a term added to each micro-batch's loss (so once per optimizer step, and included in the
recorded losses); ``model_inputs(batch)`` is what of a batch goes to ``model(**...)`` and ``context(batch)`` a context
manager around each forward and backward. Groups are saved in checkpoints by parameter name, like the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping as MappingABC
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._core import __version__
from ._loss import model_loss
from .attach import _STATE_ATTR
from .config import ConfigError, JsonConfig, _float, _int, _positive_float
from .errors import CheckpointError, EmptyInputError, LowRankError, ShapeError

__all__ = [
    "CheckpointError",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "collate",
    "evaluate",
    "train",
]

PathLike = Union[str, "os.PathLike[str]"]
LossFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]

IGNORE_INDEX = -100
CHECKPOINT_FORMAT = "lowrank_rs.train_checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
_CHECKPOINT_PREFIX = "step-"

# Fields that only say when to evaluate or save, or how to run, not what the run computes; a resumed run may change
# them. bf16 is among them so that a run can move between machines, at the price of exactness.
_RESUMABLE_CHANGES = frozenset({"eval_every", "eval_batch_size", "checkpoint_dir", "checkpoint_every", "bf16"})



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

    def __post_init__(self) -> None:
        self._set("lr", _positive_float(self.lr, "lr"))
        weight_decay = _float(self.weight_decay, "weight_decay")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be at least 0, got {weight_decay}")
        self._set("weight_decay", weight_decay)
        given = self.betas
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence) or len(given) != 2:
            raise ConfigError(f"betas must be a pair of numbers (beta1, beta2), got {given!r}")
        betas = (_float(given[0], "betas"), _float(given[1], "betas"))
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"betas must lie in [0, 1), got {list(betas)}")
        self._set("betas", betas)
        self._set("eps", _positive_float(self.eps, "eps"))
        warmup_ratio = _float(self.warmup_ratio, "warmup_ratio")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must lie in [0, 1), got {warmup_ratio}")
        self._set("warmup_ratio", warmup_ratio)
        if self.warmup_steps is not None:
            self._set("warmup_steps", _int(self.warmup_steps, "warmup_steps", minimum=0))
            if warmup_ratio > 0:
                raise ConfigError("give warmup_steps or warmup_ratio, not both")
        min_lr_ratio = _float(self.min_lr_ratio, "min_lr_ratio")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
        self._set("min_lr_ratio", min_lr_ratio)
        if self.epochs is not None:
            self._set("epochs", _int(self.epochs, "epochs", minimum=1))
        if self.max_steps is not None:
            self._set("max_steps", _int(self.max_steps, "max_steps", minimum=1))
            if self.epochs is not None:
                raise ConfigError("give epochs or max_steps, not both (max_steps cycles through the data as needed)")
        self._set("batch_size", _int(self.batch_size, "batch_size", minimum=1))
        self._set("grad_accum", _int(self.grad_accum, "grad_accum", minimum=1))
        if self.max_grad_norm is not None:
            self._set("max_grad_norm", _positive_float(self.max_grad_norm, "max_grad_norm"))
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise ConfigError(f"bf16 must be true, false or null (bf16 on CUDA only), not {self.bf16!r}")
        self._set("seed", _int(self.seed, "seed", minimum=0))
        if not isinstance(self.shuffle, bool):
            raise ConfigError(f"shuffle must be true or false, not {self.shuffle!r}")
        if self.eval_every is not None:
            self._set("eval_every", _int(self.eval_every, "eval_every", minimum=1))
        if self.eval_batch_size is not None:
            self._set("eval_batch_size", _int(self.eval_batch_size, "eval_batch_size", minimum=1))
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)) or not os.fspath(self.checkpoint_dir):
                raise ConfigError(f"checkpoint_dir must be a directory path, not {self.checkpoint_dir!r}")
            # Stored as a string so that the config stays JSON and hashable.
            self._set("checkpoint_dir", os.fspath(self.checkpoint_dir))
        if self.checkpoint_every is not None:
            self._set("checkpoint_every", _int(self.checkpoint_every, "checkpoint_every", minimum=1))
            if self.checkpoint_dir is None:
                raise ConfigError("checkpoint_every needs checkpoint_dir, the directory to write checkpoints to")

    # -- the schedule -----------------------------------------------------------------------------------------------

    def steps_per_epoch(self, num_examples: int) -> int:
        """Optimizer steps in one pass over ``num_examples`` examples."""
        micro_batches = math.ceil(num_examples / self.batch_size)
        return math.ceil(micro_batches / self.grad_accum)

    def total_steps(self, num_examples: int) -> int:
        """``T``: ``max_steps``, or ``epochs`` (default 1) times :meth:`steps_per_epoch`."""
        if self.max_steps is not None:
            return self.max_steps
        return (self.epochs or 1) * self.steps_per_epoch(num_examples)

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
            raise LowRankError(f"total_steps must be a positive integer, got {total_steps!r}")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 1 <= step <= total_steps:
            raise LowRankError(f"step must be an integer from 1 to total_steps = {total_steps}, got {step!r}")
        return self.lr * _lr_factor(step, total_steps, self.warmup_for(total_steps), self.min_lr_ratio)


def _lr_factor(step: int, total_steps: int, warmup: int, min_ratio: float) -> float:
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / (total_steps - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


# -- data --------------------------------------------------------------------------------------------------------------


def collate(examples: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """One batch from a list of examples, padded on the right.

    Scalars (0-d) are stacked to ``[batch]``; 1-D and higher fields are padded along their first dimension to the
    longest example, with ``pad_token_id`` for ``input_ids``, -100 for ``labels`` and 0 for anything else (the other
    dimensions must agree). Without an ``attention_mask`` in the examples, one is added when the batch needs padding.
    """
    return _collate(examples, pad_token_id, [f"example {i}" for i in range(len(examples))])


def _collate(examples: Sequence[Mapping[str, Any]], pad_token_id: int, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    # `names` says how errors refer to each example: its place in the list, or its index in the dataset.
    if not examples:
        raise EmptyInputError("collate needs at least one example")
    keys = None
    converted: List[Dict[str, torch.Tensor]] = []
    for i, example in enumerate(examples):
        if not isinstance(example, MappingABC):
            raise LowRankError(
                f"{names[i]} is a {type(example).__name__}; each example must be a dict of tensors for one example "
                "(input_ids, attention_mask, labels, ...)"
            )
        if keys is None:
            keys = list(example)
        elif set(example) != set(keys):
            raise LowRankError(
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
        raise LowRankError(
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


class _Examples:
    """A sequence of examples, checked to be indexable and non-empty."""

    def __init__(self, data: Any, what: str, convert: Optional[Callable[[Any, str], Any]] = None) -> None:
        if isinstance(data, (torch.Tensor, str, bytes, MappingABC)) or not (
            hasattr(data, "__len__") and hasattr(data, "__getitem__")
        ):
            hint = " (pass its .dataset instead)" if hasattr(data, "dataset") and hasattr(data, "batch_size") else ""
            raise LowRankError(
                f"{what} must be a sequence of examples — a list or map-style Dataset of dicts of 1-D tensors — not a "
                f"{type(data).__name__}{hint}; lr.train shuffles, batches and pads itself so that a seed fixes the "
                "data order and a checkpoint can resume mid-epoch"
            )
        self.data = data
        self.what = what
        self.convert = convert
        self.size = len(data)
        if self.size == 0:
            raise EmptyInputError(f"{what} is empty; training and evaluation need at least one example")

    def batch(self, indices: Sequence[int], pad_token_id: int) -> Dict[str, torch.Tensor]:
        indices = [int(i) for i in indices]
        names = [f"{self.what}[{i}]" for i in indices]
        examples = [self.data[i] for i in indices]
        if self.convert is not None:
            examples = [self.convert(example, name) for example, name in zip(examples, names)]
        return _collate(examples, pad_token_id, names)


def _tokens(batch: Mapping[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    ids = batch.get("input_ids")
    return ids.numel() if isinstance(ids, torch.Tensor) else 0


# -- the loop ------------------------------------------------------------------------------------------------------


class _NoMethodHooks:
    """The hooks of a method that adds nothing to the loop (see "Adapter methods" in the module docs)."""

    def convert_example(self, example: Any, where: str) -> Any:
        return example

    def param_groups(self, names: Sequence[str]) -> List[Tuple[str, List[str], float]]:
        return []

    def regularizer(self) -> Optional[torch.Tensor]:
        return None

    def model_inputs(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        return batch

    def context(self, batch: Mapping[str, Any]) -> Any:
        return nullcontext()


def _method_hooks(model: nn.Module) -> Any:
    make = getattr(getattr(model, _STATE_ATTR, None), "training_hooks", None)
    return make(model) if callable(make) else _NoMethodHooks()


@dataclasses.dataclass
class _Position:
    """Where the run is: the next step, the epoch and its order, and how far into that order the steps have got."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    order: Optional[torch.Tensor] = None


@dataclasses.dataclass
class _History:
    losses: List[float] = dataclasses.field(default_factory=list)
    learning_rates: List[float] = dataclasses.field(default_factory=list)
    grad_norms: List[float] = dataclasses.field(default_factory=list)
    evals: List[EvalResult] = dataclasses.field(default_factory=list)


def train(
    model: nn.Module,
    train_data: Any,
    *,
    eval_data: Any = None,
    config: Optional[TrainConfig] = None,
    loss_fn: Optional[LossFn] = None,
    resume_from: Optional[PathLike] = None,
    progress: bool = True,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad on ``train_data``; returns a :class:`TrainResult`.

    - ``model``: typically one :func:`lowrank_rs.attach` has prepared, so only adapters (and ``modules_to_save``)
      train; any model with trainable parameters works (full fine-tuning too). It trains on the device it is on;
      batches are moved there.
    - ``train_data``, ``eval_data``: sequences of examples (see the module docs); ``eval_data`` is evaluated every
      ``config.eval_every`` steps and at the end.
      For a TA-LoRA model each example also carries its task: ``task`` (a name) or ``task_ids`` (an index); a batch
      may mix tasks.
    - ``config``: a :class:`TrainConfig` (defaults if ``None``).
    - ``loss_fn(outputs, batch)``: the loss, when ``outputs.loss`` is not it (or is absent).
    - ``resume_from``: a checkpoint directory (``.../step-NNNNNNNN``) or a ``checkpoint_dir`` (its latest checkpoint).
      Trainable parameters, optimizer, scheduler, RNG states, data order and history are restored, so the run goes on
      exactly as if it had never stopped. The config must match the checkpoint's, except for the fields that only
      say when to evaluate or checkpoint (and ``bf16``); the data must have as many examples.
    - ``progress``: a tqdm bar with loss, learning rate and tokens per second.

    The model is left in the train/eval mode it came in.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise LowRankError(f"train needs a torch.nn.Module, not {type(model).__name__}")
    if config is None:
        config = TrainConfig()
    if not isinstance(config, TrainConfig):
        raise LowRankError(f"config must be a TrainConfig, not {type(config).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise LowRankError(f"loss_fn must be callable as loss_fn(outputs, batch), not {type(loss_fn).__name__}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise LowRankError(
            f"no parameter of this {type(model).__name__} requires grad, so there is nothing to train; call "
            "lr.attach(model, config) first (it freezes the base model and makes the adapters trainable)"
        )
    hooks = _method_hooks(model)
    train_set = _Examples(train_data, "train_data", hooks.convert_example)
    eval_set = _Examples(eval_data, "eval_data", hooks.convert_example) if eval_data is not None else None
    pad_token_id = _pad_token_id(model)
    device = named[0][1].device
    total_steps = config.total_steps(train_set.size)

    optimizer = _adamw(named, config, hooks.param_groups([n for n, _ in named]))
    warmup = config.warmup_for(total_steps)

    def factor(index: int) -> float:
        # LambdaLR passes the 0-based number of scheduler steps taken; the lr it sets is used by the next step. The
        # scheduler also steps after the last step, to a step that is never taken (and that, with warmup over the
        # whole run, would divide by T - W = 0): it gets the last step's factor.
        return _lr_factor(min(index + 1, total_steps), total_steps, warmup, config.min_lr_ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order_generator = torch.Generator()
    position = _Position()
    history = _History()
    resumed_from: Optional[int] = None
    # The newest checkpoint of this run, and its step: a resumed run starts with the one it came from.
    last_checkpoint: Optional[str] = None
    saved_step: Optional[int] = None
    if resume_from is not None:
        last_checkpoint = _checkpoint_path(resume_from)
        position, history = _load_checkpoint(
            last_checkpoint, model, named, optimizer, scheduler, order_generator, config, train_set.size
        )
        resumed_from = saved_step = position.step
    else:
        torch.manual_seed(config.seed)
        order_generator.manual_seed(config.seed)

    use_bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
    forward = _Forward(model, loss_fn, device, use_bf16, hooks)
    tokens = 0
    train_seconds = 0.0
    from tqdm.auto import tqdm

    was_training = model.training
    bar = tqdm(total=total_steps, initial=position.step, unit="step", desc="training", disable=not progress)
    try:
        model.train()
        while position.step < total_steps:
            tick = time.perf_counter()
            if position.order is None:
                position.order = (
                    torch.randperm(train_set.size, generator=order_generator)
                    if config.shuffle
                    else torch.arange(train_set.size)
                )
                position.offset = 0
            step_indices = position.order[position.offset : position.offset + config.batch_size * config.grad_accum]
            rows = len(step_indices)
            step_loss = torch.zeros((), dtype=torch.float64)
            for micro in torch.split(step_indices, config.batch_size):
                batch = train_set.batch(micro.tolist(), pad_token_id)
                tokens += _tokens(batch)
                # Backward inside the method's context too: gradient checkpointing recomputes the forward there.
                with hooks.context(batch):
                    loss = forward.loss(batch, f"step {position.step + 1}")
                    penalty = hooks.regularizer()
                    if penalty is not None:
                        loss = loss + penalty.to(loss.device, loss.dtype)
                    weight = len(micro) / rows
                    (loss * weight).backward()
                step_loss += loss.detach().double().cpu() * weight
            # What the schedule gives TrainConfig.lr (LambdaLR's own product); method groups scale by the same factor.
            learning_rate = config.lr * factor(position.step)
            grad_norm = _clip(named, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position.step += 1
            position.offset += rows
            if position.offset >= train_set.size:
                position.epoch += 1
                position.order = None
            history.losses.append(float(step_loss))
            history.learning_rates.append(learning_rate)
            history.grad_norms.append(grad_norm)
            train_seconds += time.perf_counter() - tick
            bar.update(1)
            bar.set_postfix(
                loss=f"{history.losses[-1]:.4f}",
                lr=f"{learning_rate:.3g}",
                **({"tok/s": f"{tokens / train_seconds:.0f}"} if tokens else {}),
            )
            if eval_set is not None and config.eval_every and position.step % config.eval_every == 0:
                history.evals.append(_run_eval(forward, eval_set, config, pad_token_id, position.step))
            if config.checkpoint_every and position.step % config.checkpoint_every == 0:
                last_checkpoint = _save_checkpoint(
                    config, position, history, named, optimizer, scheduler, order_generator, train_set.size,
                    total_steps,
                )  # fmt: skip
                saved_step = position.step
        if eval_set is not None and not (history.evals and history.evals[-1].step == position.step):
            history.evals.append(_run_eval(forward, eval_set, config, pad_token_id, position.step))
        if config.checkpoint_dir is not None and saved_step != position.step:
            last_checkpoint = _save_checkpoint(
                config, position, history, named, optimizer, scheduler, order_generator, train_set.size, total_steps
            )
    finally:
        bar.close()
        model.train(was_training)

    return TrainResult(
        steps=position.step,
        losses=history.losses,
        learning_rates=history.learning_rates,
        grad_norms=history.grad_norms,
        evals=history.evals,
        tokens=tokens,
        tokens_per_second=tokens / train_seconds if train_seconds > 0 else 0.0,
        wall_time=time.perf_counter() - started,
        resumed_from=resumed_from,
        checkpoint=last_checkpoint,
    )


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 8,
    loss_fn: Optional[LossFn] = None,
    bf16: Optional[bool] = None,
) -> EvalResult:
    """Mean loss (and accuracy, for classification) of ``model`` on a sequence of examples, in eval mode.

    The same evaluation :func:`train` runs; ``step`` of the result is 0. ``bf16`` as in :class:`TrainConfig`.
    """
    if not isinstance(model, nn.Module):
        raise LowRankError(f"evaluate needs a torch.nn.Module, not {type(model).__name__}")
    config = TrainConfig(eval_batch_size=batch_size, bf16=bf16)
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    use_bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
    was_training = model.training
    try:
        hooks = _method_hooks(model)
        forward = _Forward(model, loss_fn, device, use_bf16, hooks)
        return _run_eval(forward, _Examples(data, "data", hooks.convert_example), config, _pad_token_id(model), 0)
    finally:
        model.train(was_training)


class _Forward:
    """The model's forward pass under the run's autocast, and the loss taken from its outputs."""

    def __init__(
        self, model: nn.Module, loss_fn: Optional[LossFn], device: torch.device, bf16: bool, hooks: Any
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.device = device
        self.bf16 = bf16
        self.hooks = hooks

    def outputs(self, batch: Dict[str, torch.Tensor]) -> Any:
        with self.hooks.context(batch):
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return self.model(**self.hooks.model_inputs(batch))

    def loss(self, batch: Dict[str, torch.Tensor], where: str) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self.loss_of(self.outputs(batch), batch, where)

    def loss_of(self, outputs: Any, batch: Mapping[str, torch.Tensor], where: str) -> torch.Tensor:
        return model_loss(
            self.model,
            outputs,
            batch,
            self.loss_fn,
            caller="train",
            no_labels_hint="give the examples labels",
            non_finite_hint=f"at {where}; lower the learning rate or check the data",
        )


def _run_eval(forward: _Forward, data: _Examples, config: TrainConfig, pad_token_id: int, step: int) -> EvalResult:
    size = config.eval_batch_size or config.batch_size
    total_loss = 0.0
    correct = 0
    counted = 0
    classified = True
    forward.model.eval()
    try:
        with torch.no_grad():
            for start in range(0, data.size, size):
                indices = list(range(start, min(start + size, data.size)))
                batch = {k: v.to(forward.device) for k, v in data.batch(indices, pad_token_id).items()}
                outputs = forward.outputs(batch)
                loss = forward.loss_of(outputs, batch, f"evaluation after step {step}")
                total_loss += float(loss.double()) * len(indices)
                hits = _hits(outputs, batch.get("labels"), len(indices))
                if hits is None:
                    classified = False
                else:
                    correct += hits[0]
                    counted += hits[1]
    finally:
        forward.model.train()
    accuracy = correct / counted if classified and counted else None
    return EvalResult(step=step, loss=total_loss / data.size, accuracy=accuracy, examples=data.size)


def _hits(outputs: Any, labels: Optional[torch.Tensor], rows: int) -> Optional[Tuple[int, int]]:
    logits = outputs.get("logits") if isinstance(outputs, MappingABC) else getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return None
    if labels.shape != (rows,) or labels.is_floating_point() or logits.dim() != 2 or logits.shape[0] != rows:
        return None
    counted = labels != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == labels) & counted
    return int(correct.sum()), int(counted.sum())


def _adamw(
    named: Sequence[Tuple[str, nn.Parameter]],
    config: TrainConfig,
    method_groups: Sequence[Tuple[str, Sequence[str], float]] = (),
) -> torch.optim.AdamW:
    # Parameters a method puts in a group of its own (with its own lr) leave the default group; within every group,
    # matrices get weight decay and 1-D parameters none.
    claimed = {name for _, names, _ in method_groups for name in names}
    sets: List[Tuple[Optional[str], float, List[nn.Parameter]]] = [
        (None, config.lr, [p for n, p in named if n not in claimed])
    ]
    for label, names, group_lr in method_groups:
        chosen = set(names)
        sets.append((label, float(group_lr), [p for n, p in named if n in chosen]))
    groups: List[Dict[str, Any]] = []
    for label, group_lr, params in sets:
        for subset, wd in (
            ([p for p in params if p.dim() >= 2], config.weight_decay),
            ([p for p in params if p.dim() < 2], 0.0),
        ):
            if subset:
                group: Dict[str, Any] = {"params": subset, "weight_decay": wd, "lr": group_lr}
                if label is not None:
                    group["name"] = label
                groups.append(group)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def _clip(named: Sequence[Tuple[str, nn.Parameter]], max_norm: Optional[float]) -> float:
    grads = [p for _, p in named if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))


def _pad_token_id(model: nn.Module) -> int:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return int(pad) if isinstance(pad, numbers.Integral) and not isinstance(pad, bool) else 0


# -- checkpoints ---------------------------------------------------------------------------------------------------


def _save_checkpoint(
    config: TrainConfig,
    position: _Position,
    history: _History,
    named: Sequence[Tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    order_generator: torch.Generator,
    num_examples: int,
    total_steps: int,
) -> str:
    from safetensors.torch import save_file

    assert config.checkpoint_dir is not None
    root = config.checkpoint_dir
    os.makedirs(root, exist_ok=True)
    name = f"{_CHECKPOINT_PREFIX}{position.step:08d}"
    final = os.path.join(root, name)

    params = {n: p.detach() for n, p in named}
    optimizer_tensors, optimizer_json = _optimizer_state(optimizer, named)
    rng = {"rng/torch_cpu": torch.get_rng_state(), "rng/data_order": order_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"rng/cuda/{index}"] = cuda_state
    if position.order is not None:
        rng["rng/epoch_order"] = position.order
    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "lowrank_rs_version": __version__,
        "step": position.step,
        "total_steps": total_steps,
        "epoch": position.epoch,
        "offset": position.offset,
        "num_examples": num_examples,
        "config": config.to_dict(),
        "trainable": {n: list(p.shape) for n, p in named},
        "optimizer": optimizer_json,
        "scheduler": scheduler.state_dict(),
        "history": {
            "losses": history.losses,
            "learning_rates": history.learning_rates,
            "grad_norms": history.grad_norms,
            "evals": [e.to_dict() for e in history.evals],
        },
    }
    metadata = {"format": CHECKPOINT_FORMAT}
    temporary = tempfile.mkdtemp(prefix=f".{name}.", dir=root)
    try:
        for file, tensors in ((MODEL_FILE, params), (OPTIMIZER_FILE, optimizer_tensors), (RNG_FILE, rng)):
            path = os.path.join(temporary, file)
            save_file({k: _cpu(v) for k, v in tensors.items()}, path, metadata=metadata)
            _fsync(path)
        path = os.path.join(temporary, STATE_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _replace_directory(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def _optimizer_state(
    optimizer: torch.optim.Optimizer, named: Sequence[Tuple[str, nn.Parameter]]
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    # torch keys optimizer state by position; positions are meaningless to a reader, so state and groups are keyed by
    # parameter name. Tensors go to safetensors, anything else (a plain-number step, say) to the JSON.
    state = optimizer.state_dict()
    position_names = [name for group in _group_names(optimizer, named) for name in group]
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for index, entries in state["state"].items():
        name = position_names[index]
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    groups = []
    for group in state["param_groups"]:
        entry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        entry["params"] = [position_names[i] for i in group["params"]]
        groups.append(entry)
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def _group_names(optimizer: torch.optim.Optimizer, named: Sequence[Tuple[str, nn.Parameter]]) -> List[List[str]]:
    by_param = {id(p): n for n, p in named}
    return [[by_param[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses views into shared storage; a contiguous CPU copy is always safe to write.
    return t.detach().to("cpu").contiguous().clone()


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _replace_directory(temporary: str, final: str) -> None:
    if not os.path.exists(final):
        os.rename(temporary, final)
        return
    # A re-run writing the same step: move the old one aside first, so some complete checkpoint is always there.
    stale = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old.", dir=os.path.dirname(final))
    os.rename(final, os.path.join(stale, "checkpoint"))
    os.rename(temporary, final)
    shutil.rmtree(stale, ignore_errors=True)


def _checkpoint_path(path: PathLike) -> str:
    where = os.fspath(path)
    if os.path.isfile(os.path.join(where, STATE_FILE)):
        return where
    if not os.path.isdir(where):
        raise CheckpointError(f"resume_from={where!r} does not exist")
    steps = sorted(
        entry
        for entry in os.listdir(where)
        if entry.startswith(_CHECKPOINT_PREFIX) and os.path.isfile(os.path.join(where, entry, STATE_FILE))
    )
    if not steps:
        raise CheckpointError(
            f"resume_from={where!r} is neither a checkpoint (no {STATE_FILE}) nor a checkpoint_dir holding "
            f"{_CHECKPOINT_PREFIX}NNNNNNNN checkpoints"
        )
    return os.path.join(where, steps[-1])


def _load_checkpoint(
    where: str,
    model: nn.Module,
    named: Sequence[Tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    order_generator: torch.Generator,
    config: TrainConfig,
    num_examples: int,
) -> Tuple[_Position, _History]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(os.path.join(where, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where!r}: cannot read {STATE_FILE}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where!r} is not a lowrank-rs training checkpoint")
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{where!r} has checkpoint format version {state.get('format_version')!r}; this lowrank-rs reads "
            f"version {CHECKPOINT_FORMAT_VERSION}"
        )
    try:
        saved_config = TrainConfig.from_dict(state["config"])
        tensors = {}
        for file in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE):
            tensors[file] = load_file(os.path.join(where, file))
        step, epoch, offset = int(state["step"]), int(state["epoch"]), int(state["offset"])
        history_json = state["history"]
        history = _History(
            losses=[float(x) for x in history_json["losses"]],
            learning_rates=[float(x) for x in history_json["learning_rates"]],
            grad_norms=[float(x) for x in history_json["grad_norms"]],
            evals=[EvalResult(**e) for e in history_json["evals"]],
        )
        saved_examples = int(state["num_examples"])
        optimizer_json = state["optimizer"]
        scheduler_state = state["scheduler"]
    except (KeyError, TypeError, ValueError, OSError, SafetensorError) as e:
        raise CheckpointError(f"{where!r}: a malformed checkpoint: {type(e).__name__}: {e}") from None

    changed = [
        f"{field} ({getattr(saved_config, field)!r} → {getattr(config, field)!r})"
        for field in (f.name for f in dataclasses.fields(TrainConfig))
        if field not in _RESUMABLE_CHANGES and getattr(saved_config, field) != getattr(config, field)
    ]
    if changed:
        raise CheckpointError(
            f"{where!r} was written by a run with a different config: {', '.join(changed)}; resuming it with these "
            f"would not continue the same run (only {sorted(_RESUMABLE_CHANGES)} may change)"
        )
    if saved_examples != num_examples:
        raise CheckpointError(
            f"{where!r} was written training on {saved_examples} examples; train_data has {num_examples}"
        )

    params = tensors[MODEL_FILE]
    names = [n for n, _ in named]
    missing = [n for n in names if n not in params]
    extra = sorted(set(params) - set(names))
    if missing or extra:
        detail = f"it lacks {missing[:3]}" if missing else f"it has {extra[:3]}, which do not require grad here"
        raise CheckpointError(
            f"{where!r} does not hold this model's trainable parameters: {detail}; resume into the same model, "
            "attached with the same config"
        )
    for n, p in named:
        if tuple(params[n].shape) != tuple(p.shape):
            raise CheckpointError(
                f"{where!r}: parameter {n!r} has shape {list(params[n].shape)} there and {list(p.shape)} here"
            )

    optimizer_state = _optimizer_state_dict(
        where, optimizer_json, tensors[OPTIMIZER_FILE], _group_names(optimizer, named)
    )
    with torch.no_grad():
        for n, p in named:
            p.copy_(params[n])
    try:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where!r}: optimizer or scheduler state does not fit: {e}") from None

    rng = tensors[RNG_FILE]
    try:
        torch.set_rng_state(rng["rng/torch_cpu"])
        order_generator.set_state(rng["rng/data_order"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{where!r}: bad RNG state: {type(e).__name__}: {e}") from None
    cuda_states = sorted((k for k in rng if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda_states:
        if torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda_states):
            torch.cuda.set_rng_state_all([rng[k] for k in cuda_states])
        else:
            warnings.warn(
                f"{where!r} holds RNG states of {len(cuda_states)} CUDA device(s), which this machine lacks; dropout "
                "on CUDA will not repeat the interrupted run",
                stacklevel=3,
            )
    order = rng.get("rng/epoch_order")
    if order is not None and (order.dtype != torch.int64 or tuple(order.shape) != (num_examples,)):
        raise CheckpointError(f"{where!r}: the saved data order does not fit {num_examples} examples")
    return _Position(step=step, epoch=epoch, offset=offset, order=order), history


def _optimizer_state_dict(
    where: str, saved: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], groups_here: Sequence[Sequence[str]]
) -> Dict[str, Any]:
    try:
        groups_json = list(saved["param_groups"])
        scalars = dict(saved["scalar_state"])
        groups_saved = [list(group["params"]) for group in groups_json]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where!r}: malformed optimizer state: {type(e).__name__}: {e}") from None
    # torch's load_state_dict pairs saved and live parameters by position, so the groups must list the same names in
    # the same order; the same model, attached the same way, always does.
    if groups_saved != [list(group) for group in groups_here]:
        raise CheckpointError(
            f"{where!r}: the optimizer state is for other parameters than this model's trainable ones"
        )
    index = {name: i for i, name in enumerate(name for group in groups_here for name in group)}
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        prefix, _, rest = key.partition("/")
        name, _, state_key = rest.rpartition("/")
        if prefix != "optimizer" or name not in index or not state_key:
            raise CheckpointError(f"{where!r}: unexpected optimizer tensor {key!r}")
        state.setdefault(index[name], {})[state_key] = value
    for name, entries in scalars.items():
        if name not in index or not isinstance(entries, dict):
            raise CheckpointError(f"{where!r}: optimizer state for unknown parameter {name!r}")
        state.setdefault(index[name], {}).update(entries)
    groups = []
    for group in groups_json:
        entry = dict(group)
        if isinstance(entry.get("betas"), list):
            entry["betas"] = tuple(entry["betas"])
        entry["params"] = [index[name] for name in group["params"]]
        groups.append(entry)
    return {"state": state, "param_groups": groups}
