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

**Adapter methods** may add to the loop through the :class:`~lowrank_rs.adapters.TrainingHooks` their method's
``training_hooks(model)`` returns (TA-LoRA does; LoRA needs none): ``convert_example(example, where)`` rewrites
each example before collation (TA-LoRA
turns a ``task`` name into ``task_ids``); ``param_groups(names)`` gives ``(label, parameter names, lr)`` groups with
learning rates of their own, scheduled like ``lr`` (every other trainable parameter gets ``lr``);
``regularizer()`` is a term added to each micro-batch's loss (so once per optimizer step, and included in the
recorded losses); ``model_inputs(batch)`` is what of a batch goes to ``model(**...)`` and ``context(batch)`` a context
manager around each forward and backward; ``before_optimizer_step(step)`` runs after a step's backward passes and
before clipping, so a method may drop gradients of parameters that must not move yet (TLoRA's ``train_a_after``), and
the clipped norm is that of the gradients applied. Groups are saved in checkpoints by parameter name, like the rest.

**Several processes.** Under ``torchrun`` (or with a process group already initialised) the loop runs on every
process: each takes its share of every step's micro-batches (:mod:`lowrank_rs.training.distributed`), the model is
wrapped in DDP or FSDP2 (``TrainConfig.distributed``), gradients are reduced once per step, and losses, token counts
and evaluations are summed over the processes, so what is printed and returned is the global figure on every rank.
``batch_size`` is per process: ``W`` processes with ``grad_accum = k`` take the micro-batches one process takes with
``grad_accum = k·W``. Rank 0 prints and writes checkpoints; a checkpoint resumes on the same number of processes.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Mapping as MappingABC
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._loss import model_loss
from ..adapters.method import TrainingHooks
from ..adapters.registry import method_or_none
from ..errors import EmptyInputError, InvalidArgumentError
from .checkpoint import History, Position, checkpoint_path, load_checkpoint, save_checkpoint
from .collate import IGNORE_INDEX, collate_named
from .config import TrainConfig, lr_factor
from .distributed import Distributed, Wrapped, agree, all_reduce_sum, detect, round_robin, wrap
from .results import EvalResult, TrainResult

__all__ = ["evaluate", "train"]

PathLike = Union[str, "os.PathLike[str]"]
LossFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]


# -- data --------------------------------------------------------------------------------------------------------------


class _Examples:
    """A sequence of examples, checked to be indexable and non-empty."""

    def __init__(self, data: Any, what: str, convert: Optional[Callable[[Any, str], Any]] = None) -> None:
        if isinstance(data, (torch.Tensor, str, bytes, MappingABC)) or not (
            hasattr(data, "__len__") and hasattr(data, "__getitem__")
        ):
            hint = " (pass its .dataset instead)" if hasattr(data, "dataset") and hasattr(data, "batch_size") else ""
            raise InvalidArgumentError(
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
        return collate_named(examples, pad_token_id, names)


def _tokens(batch: Mapping[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    ids = batch.get("input_ids")
    return ids.numel() if isinstance(ids, torch.Tensor) else 0


# -- the loop ------------------------------------------------------------------------------------------------------


def _method_hooks(model: nn.Module) -> TrainingHooks:
    method = method_or_none(model)
    return method.training_hooks(model) if method is not None else TrainingHooks()


def train(
    model: nn.Module,
    train_data: Any,
    *,
    eval_data: Any = None,
    config: Optional[TrainConfig] = None,
    loss_fn: Optional[LossFn] = None,
    resume_from: Optional[PathLike] = None,
    progress: bool = True,
    on_step: Optional[Callable[[int], None]] = None,
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
    - ``on_step(step)``: called after each ``optimizer.step()`` with the 1-based step number, while the step's
      gradients are still on the parameters (before ``zero_grad``), e.g. PEFT's AdaLoRA
      ``on_step=lambda step: model.base_model.update_and_allocate(step)``. It runs on every process; state it keeps
      is not in the loop's checkpoints, so after ``resume_from`` the numbers go on from the checkpoint's step.

    The model is left in the train/eval mode it came in.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"train needs a torch.nn.Module, not {type(model).__name__}")
    if config is None:
        config = TrainConfig()
    if not isinstance(config, TrainConfig):
        raise InvalidArgumentError(f"config must be a TrainConfig, not {type(config).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise InvalidArgumentError(f"loss_fn must be callable as loss_fn(outputs, batch), not {type(loss_fn).__name__}")
    if on_step is not None and not callable(on_step):
        raise InvalidArgumentError(f"on_step must be callable as on_step(step), not {type(on_step).__name__}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise InvalidArgumentError(
            f"no parameter of this {type(model).__name__} requires grad, so there is nothing to train; call "
            "lr.attach(model, config) first (it freezes the base model and makes the adapters trainable)"
        )
    hooks = _method_hooks(model)
    train_set = _Examples(train_data, "train_data", hooks.convert_example)
    eval_set = _Examples(eval_data, "eval_data", hooks.convert_example) if eval_data is not None else None
    pad_token_id = _pad_token_id(model)
    device = named[0][1].device
    ctx = detect(device)
    agree(
        "the run (config, data sizes, trainable parameters)",
        [config.to_dict(), train_set.size, eval_set.size if eval_set else None, [(n, list(p.shape)) for n, p in named]],
        ctx,
        InvalidArgumentError,
    )
    total_steps = config.total_steps(train_set.size, ctx.world)
    if ctx.active and config.distributed == "fsdp" and hooks.regularizer() is not None:
        # A regulariser reads parameters outside the forward pass, where FSDP2 holds only this rank's shard; its
        # gradient would bypass FSDP2's reduction. Refused on every rank alike, before any collective.
        raise InvalidArgumentError(
            "this adapter adds a regularisation term to the loss, which FSDP2 cannot reduce (it reads parameters "
            "outside the forward pass, where each rank holds only a shard); train it with distributed='ddp', or set "
            "the regulariser's weight to 0"
        )
    method = method_or_none(model)
    runner = wrap(model, config.distributed, ctx, device, multitask=method is not None and method.multitask)
    # FSDP2 swaps every parameter for a sharded one: the optimizer and checkpoints must see the new objects.
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    optimizer = _adamw(named, config, hooks.param_groups([n for n, _ in named]))
    factor = _schedule(config, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order_generator = torch.Generator()
    position = Position()
    history = History()
    resumed_from: Optional[int] = None
    # The newest checkpoint of this run, and its step: a resumed run starts with the one it came from.
    last_checkpoint: Optional[str] = None
    saved_step: Optional[int] = None
    if resume_from is not None:
        last_checkpoint = checkpoint_path(resume_from)
        position, history = load_checkpoint(
            last_checkpoint, model, named, optimizer, scheduler, order_generator, config, train_set.size,
            total_steps, ctx,
        )  # fmt: skip
        resumed_from = saved_step = position.step
    else:
        # Dropout differs between ranks, as it would between the examples of one process; the data order must not.
        torch.manual_seed(config.seed + ctx.rank)
        order_generator.manual_seed(config.seed)

    use_bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
    forward = _Forward(model, loss_fn, device, use_bf16, hooks, runner)
    tokens = 0
    train_seconds = 0.0
    from tqdm.auto import tqdm

    was_training = model.training
    bar = tqdm(
        total=total_steps, initial=position.step, unit="step", desc="training", disable=not progress or ctx.rank != 0
    )
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
            step_size = config.batch_size * config.grad_accum * ctx.world
            step_indices = position.order[position.offset : position.offset + step_size]
            rows = len(step_indices)
            step_loss, step_tokens = _backward_step(
                step_indices, train_set, config, ctx, pad_token_id, runner, hooks, forward, position.step + 1
            )
            step_loss_sum, step_tokens_sum = all_reduce_sum([step_loss, step_tokens], ctx)
            tokens += int(step_tokens_sum)
            # What the schedule gives TrainConfig.lr (LambdaLR's own product); method groups scale by the same factor.
            learning_rate = config.lr * factor(position.step)
            hooks.before_optimizer_step(position.step + 1)
            grad_norm = _clip(named, config.max_grad_norm)
            optimizer.step()
            if on_step is not None:
                # Before the scheduler moves on, so the callback sees the learning rates this step used.
                on_step(position.step + 1)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position.step += 1
            position.offset += rows
            if position.offset >= train_set.size:
                position.epoch += 1
                position.order = None
            history.losses.append(step_loss_sum)
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
                history.evals.append(_run_eval(forward, eval_set, config, pad_token_id, position.step, ctx))
            if config.checkpoint_every and position.step % config.checkpoint_every == 0:
                last_checkpoint = save_checkpoint(
                    config, position, history, named, optimizer, scheduler, order_generator, train_set.size,
                    total_steps, ctx,
                )  # fmt: skip
                saved_step = position.step
        if eval_set is not None and not (history.evals and history.evals[-1].step == position.step):
            history.evals.append(_run_eval(forward, eval_set, config, pad_token_id, position.step, ctx))
        if config.checkpoint_dir is not None and saved_step != position.step:
            last_checkpoint = save_checkpoint(
                config, position, history, named, optimizer, scheduler, order_generator, train_set.size, total_steps,
                ctx,
            )  # fmt: skip
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


def _schedule(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of each scheduler step (warmup, then cosine to ``min_lr_ratio``)."""
    warmup = config.warmup_for(total_steps)

    def factor(index: int) -> float:
        # LambdaLR passes the 0-based number of scheduler steps taken; the lr it sets is used by the next step. The
        # scheduler also steps after the last step, to a step that is never taken (and that, with warmup over the
        # whole run, would divide by T - W = 0): it gets the last step's factor.
        return lr_factor(min(index + 1, total_steps), total_steps, warmup, config.min_lr_ratio)

    return factor


def _backward_step(
    step_indices: torch.Tensor,
    train_set: _Examples,
    config: TrainConfig,
    ctx: Any,
    pad_token_id: int,
    runner: Any,
    hooks: TrainingHooks,
    forward: _Forward,
    step: int,
) -> Tuple[float, int]:
    """Forward and backward of this rank's micro-batches of one optimizer step; returns this rank's share of the
    step's loss (weighted by examples) and its token count."""
    rows = len(step_indices)
    mine, passes = round_robin(step_indices, config.batch_size, ctx)
    step_loss = torch.zeros((), dtype=torch.float64)
    step_tokens = 0
    for index in range(passes):
        # A rank out of micro-batches (end of an epoch) still runs the pass its peers' collectives wait for.
        micro = mine[index] if index < len(mine) else step_indices[:1]
        share = len(micro) / rows if index < len(mine) else 0.0
        batch = train_set.batch(micro.tolist(), pad_token_id)
        if share:
            step_tokens += _tokens(batch)
        # Backward inside the method's context too: gradient checkpointing recomputes the forward there.
        with runner.accumulating(sync=index == passes - 1), hooks.context(batch):
            loss = forward.loss(batch, f"step {step}")
            penalty = hooks.regularizer()
            if penalty is not None:
                loss = loss + penalty.to(loss.device, loss.dtype)
            # DDP and FSDP2 average gradients over the ranks; scaling by W makes that the sum over the step.
            (loss * (share * ctx.world)).backward()
        step_loss += loss.detach().double().cpu() * share
    return float(step_loss), step_tokens


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
        raise InvalidArgumentError(f"evaluate needs a torch.nn.Module, not {type(model).__name__}")
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
        self,
        model: nn.Module,
        loss_fn: Optional[LossFn],
        device: torch.device,
        bf16: bool,
        hooks: Any,
        runner: Optional[Wrapped] = None,
    ) -> None:
        self.model = model
        # What forward is called on: the DDP wrapper when there is one (FSDP2 shards the model in place).
        self.runner = runner.module if runner is not None else model
        self.loss_fn = loss_fn
        self.device = device
        self.bf16 = bf16
        self.hooks = hooks

    def outputs(self, batch: Dict[str, torch.Tensor]) -> Any:
        with self.hooks.context(batch):
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return self.runner(**self.hooks.model_inputs(batch))

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


def _run_eval(
    forward: _Forward,
    data: _Examples,
    config: TrainConfig,
    pad_token_id: int,
    step: int,
    ctx: Optional[Distributed] = None,
) -> EvalResult:
    ctx = ctx or Distributed()
    size = config.eval_batch_size or config.batch_size
    total_loss = 0.0
    correct = 0
    counted = 0
    unclassified = 0
    # Batches are dealt round-robin like training micro-batches, with weight-0 passes where a rank runs out.
    mine, passes = round_robin(torch.arange(data.size), size, ctx)
    forward.model.eval()
    try:
        with torch.no_grad():
            for index in range(passes):
                real = index < len(mine)
                indices = (mine[index] if real else torch.arange(1)).tolist()
                batch = {k: v.to(forward.device) for k, v in data.batch(indices, pad_token_id).items()}
                outputs = forward.outputs(batch)
                loss = forward.loss_of(outputs, batch, f"evaluation after step {step}")
                if not real:
                    continue
                total_loss += float(loss.double()) * len(indices)
                hits = _hits(outputs, batch.get("labels"), len(indices))
                if hits is None:
                    unclassified += 1
                else:
                    correct += hits[0]
                    counted += hits[1]
    finally:
        forward.model.train()
    total_loss, correct_sum, counted_sum, unclassified_sum = all_reduce_sum(
        [total_loss, correct, counted, unclassified], ctx
    )
    correct, counted = int(correct_sum), int(counted_sum)
    classified = unclassified_sum == 0
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
    for group_label, group_lr, params in sets:
        for subset, wd in (
            ([p for p in params if p.dim() >= 2], config.weight_decay),
            ([p for p in params if p.dim() < 2], 0.0),
        ):
            if subset:
                group: Dict[str, Any] = {"params": subset, "weight_decay": wd, "lr": group_lr}
                if group_label is not None:
                    group["name"] = group_label
                groups.append(group)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def _clip(named: Sequence[Tuple[str, nn.Parameter]], max_norm: Optional[float]) -> float:
    grads = [p for _, p in named if p.grad is not None]
    if not grads:
        return 0.0
    if any(hasattr(p.grad, "full_tensor") for p in grads):
        # FSDP2's sharded gradients: torch computes the global norm across shards; scaling by min(1, inf) is exact.
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm is not None else float("inf"))
        full = getattr(norm, "full_tensor", None)
        return float(full() if callable(full) else norm)
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))


def _pad_token_id(model: nn.Module) -> int:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return int(pad) if isinstance(pad, numbers.Integral) and not isinstance(pad, bool) else 0


# -- checkpoints ---------------------------------------------------------------------------------------------------
