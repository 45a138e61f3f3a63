"""TLoRA calibration (docs/methods.md): input covariances and sensitivity scores → ranks, scales and a frozen ``A``.

``calibrate(model, batches, config)`` runs the model on a few training examples and returns a
:class:`CalibrationPlan`; ``lowrank_rs.attach(model, plan)`` then wraps every target with ``A`` from the plan and
``B = 0``. The pipeline has two stages, each usable on its own:

- :func:`collect_statistics` runs the model once per example (once per batch with ``per_example_scores=False``),
  forward and backward. Forward hooks hand each target's input to a core :class:`~lowrank_rs.linalg.
  CovarianceAccumulator` on a background thread; hooks on the target outputs reduce ``Σ|W ⊙ Gᵀ X|`` during the
  backward pass.
- :func:`build_plan` turns those statistics into integer ranks (:func:`~lowrank_rs.linalg.allocate_ranks`), scales
  (:func:`~lowrank_rs.linalg.allocate_alphas`) and bases (:func:`~lowrank_rs.linalg.task_aware_basis`).

The model is left as it was: hooks removed, ``requires_grad`` flags and train/eval modes restored, no ``.grad``
written. The model must not modify a target's input in place after the target has read it (transformers models do
not): the scores read that input again during the backward pass.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import math
import os
import queue
import re
import sys
import threading
import warnings
from typing import AbstractSet, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..._core import __version__
from ..._loss import describe, model_loss, per_example_losses
from ...adapters.registry import has_adapter
from ...adapters.targets import nearest, resolve_modules_to_save, resolve_targets
from ...errors import (
    AdapterFormatError,
    AdapterStateError,
    ConfigError,
    EmptyInputError,
    InfeasibleError,
    InvalidArgumentError,
    MissingDependencyError,
    NonFiniteError,
    OutOfMemoryError,
    ShapeError,
)
from ...linalg import CovarianceDtype, allocate_alphas, allocate_ranks, task_aware_basis
from ...package import read_adapter, write_adapter
from ...statistics import StatisticsAccumulator, empty_like, make_accumulator, merge_into, resolve_backend
from ...training.collate import batch_iterator
from .config import TLoraConfig
from .memory import (
    check_memory,
    default_basis_workers,
    energy_is_exact,
    format_bytes,
    gradient_sum_shape,
    measures_gradient_share,
    plan_memory,
)

__all__ = [
    "GRADIENT_SHARE_WARNING",
    "CalibrationPlan",
    "CalibrationStatistics",
    "ModulePlan",
    "build_plan",
    "collect_statistics",
]

PathLike = Union[str, "os.PathLike[str]"]
LossFn = Callable[[Any, Mapping[str, Any]], torch.Tensor]

PLAN_FORMAT = "lowrank_rs.calibration_plan"
PLAN_FORMAT_VERSION = 1

# Probes of the residual energy outside A's row space where the check is not exact (memory.EXACT_ENERGY_LIMIT).
_ENERGY_PROBES = 64
# Forwards whose activations may wait for the covariance thread; bounds host memory while letting the model run on.
_QUEUE_FORWARDS = 2
_IGNORE_INDEX = -100
# Below this share of the calibration gradient inside A's row space, B alone cannot follow most of the first steps'
# descent direction. On issue 13's teacher–student test (a planted rank-4 change) the frozen A held 27–50% of the
# change and TLoRA plateaued at 0.45 of the initial error where LoRA reached 0.09. Calibration warns below it.
GRADIENT_SHARE_WARNING = 0.5


# --- statistics -----------------------------------------------------------------------------------------------------


class CalibrationStatistics:
    """What :func:`collect_statistics` measured: per-module input covariances and sensitivity scores.

    Modules that read the same tensor share one accumulator (``accumulator(name)`` returns the same object for
    them; :attr:`shared` lists the groups). ``scores[name]`` is ``mean over examples of Σ|W ⊙ ∂L/∂W| / |W|`` (or
    the ``config.score`` variant). ``gradients[name]``: ``Σ ∂L/∂W`` over the examples, float32 ``[d_out, d_in]`` on
    the model's device — for a module with more than ``GRADIENT_SKETCH_ROWS`` outputs its sketch ``Ψ Σ ∂L/∂W``
    (:func:`gradient_sketch`) — or ``None`` when the gradient share is not measured (``config.gradient_share``).
    """

    def __init__(
        self,
        modules: Sequence[str],
        shapes: Mapping[str, Tuple[int, int]],
        accumulators: Sequence[Tuple[Tuple[str, ...], StatisticsAccumulator]],
        scores: Mapping[str, float],
        num_examples: int,
        num_tokens: int,
        gradients: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> None:
        self.modules: Tuple[str, ...] = tuple(modules)
        self.shapes: Dict[str, Tuple[int, int]] = dict(shapes)
        self.scores: Dict[str, float] = dict(scores)
        self.gradients: Optional[Dict[str, torch.Tensor]] = None if gradients is None else dict(gradients)
        self.num_examples = num_examples
        self.num_tokens = num_tokens
        self._accumulators = list(accumulators)
        self._merged: Dict[str, StatisticsAccumulator] = {}

    @property
    def covariance_bytes(self) -> int:
        """Memory the accumulators' sums hold (the core's packed triangles, or the torch backend's full squares)."""
        total = 0
        for _, acc in self._accumulators:
            d = acc.dim
            total += int(getattr(acc, "nbytes", 8 * (d * (d + 1) // 2 + d)))
        return total

    @property
    def shared(self) -> List[Tuple[str, ...]]:
        """The groups of modules (two or more) whose covariance came from one shared accumulator."""
        return [readers for readers, _ in self._accumulators if len(readers) > 1]

    def accumulator(self, name: str) -> StatisticsAccumulator:
        """The accumulator holding ``name``'s input statistics (shared with the modules that read the same tensor)."""
        if name not in self.shapes:
            raise InvalidArgumentError(f"no statistics for module {name!r}; nearest: {nearest(name, self.modules)}")
        mine = [acc for readers, acc in self._accumulators if name in readers]
        if len(mine) == 1:
            return mine[0]
        # A module that read tensors together with different modules in different forwards, or several token tensors
        # per forward, has its statistics spread over several accumulators; merging them is exact.
        if name not in self._merged:
            merged = empty_like(mine[0])
            for acc in mine:
                merge_into(merged, acc)
            self._merged[name] = merged
        return self._merged[name]

    def covariance(self, name: str, dtype: CovarianceDtype = "float64") -> np.ndarray:
        """``[d_in, d_in]``: the covariance of ``name``'s input tokens (float64, or float32 rounded once from it)."""
        return self.accumulator(name).covariance(dtype)

    def prepare(self, name: str) -> None:
        """Merge ``name``'s split statistics now (before the bases run in threads, which must not merge at once)."""
        self.accumulator(name)

    def __repr__(self) -> str:
        return (
            f"CalibrationStatistics({len(self.modules)} modules, {len(self._accumulators)} accumulators, "
            f"{self.num_examples} examples, {self.num_tokens} tokens)"
        )


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    config: TLoraConfig,
    *,
    loss_fn: Optional[LossFn] = None,
    progress: bool = True,
) -> CalibrationStatistics:
    """Run ``model`` on up to ``config.num_examples`` examples and measure each target's covariance and score.

    ``batches``: dicts of tensors as the model takes them (``input_ids``, ``attention_mask``, ``labels``, ...), on any
    device; they are moved to the model's. Padding (``attention_mask == 0``) never enters a covariance; with
    ``count_prompt_tokens=False`` neither do tokens labelled -100 (``labels`` must then be token-aligned, as causal-LM
    labels are). A batch without ``attention_mask`` is all tokens. The loss is ``outputs.loss``, or
    ``loss_fn(outputs, batch)``. See :func:`calibrate` for the rest.
    """
    _check_config(config)
    if loss_fn is not None and not callable(loss_fn):
        raise InvalidArgumentError(f"loss_fn must be callable as loss_fn(outputs, batch), not {type(loss_fn).__name__}")
    targets = _targets(model, config)
    memory = plan_memory(model, config)
    check_memory(memory, config)
    if progress:
        print(memory, file=sys.stderr)
    with _Session(model, targets, config, loss_fn) as session:
        session.run(batches, progress)
        return session.statistics()


class _Session:
    """One calibration run: owns the hooks, the covariance thread and the model state it must restore."""

    def __init__(
        self, model: nn.Module, targets: Mapping[str, nn.Linear], config: TLoraConfig, loss_fn: Optional[LossFn]
    ) -> None:
        self.model = model
        self.targets = dict(targets)
        self.names = {id(m): n for n, m in self.targets.items()}
        self.config = config
        self.loss_fn = loss_fn
        self.accumulators: Dict[Tuple[Tuple[str, ...], str], StatisticsAccumulator] = {}
        self.score_parts: Dict[str, List[torch.Tensor]] = {n: [] for n in self.targets}
        # Σ ∂L/∂W per module for the gradient share; dropped (None) when not measured or memory ran out.
        shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
        self.gradients: Optional[Dict[str, torch.Tensor]] = {} if measures_gradient_share(config, shapes) else None
        self.sketches: Dict[int, torch.Tensor] = {}  # Ψ per output width (gradient_sketch)
        self.seen: Dict[str, bool] = dict.fromkeys(self.targets, False)
        self.warned: Dict[str, bool] = {}
        self.num_examples = 0
        self.num_tokens = 0
        self.forward: Optional[_Forward] = None
        self.worker = _CovarianceWorker()
        self.handles: List[Any] = []
        self.device = _device(model)
        self.backend = resolve_backend(config.statistics_backend, self.device)
        # Examples per forward when scoring per example; lowered for good when an example cannot be split off a batch
        # (split_reason) or the device runs out of memory.
        self.batch_size = config.calibration_batch_size or (1 if self.device.type == "cpu" else 8)
        self.split_reason = ""
        try:
            takes_cache = "use_cache" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes_cache = False
        # A KV cache would be built on every forward and never read.
        self.extra_kwargs = {"use_cache": False} if takes_cache else {}

    def __enter__(self) -> _Session:
        self.modes = {m: m.training for m in self.model.modules()}
        self.flags = {p: p.requires_grad for p in self.model.parameters()}
        try:
            # Dropout off; and no parameter requires grad, so backward never allocates a weight gradient: each
            # module's gradient is formed from its own Gᵀ X and reduced at once (the memory rule of docs/methods.md).
            self.model.eval()
            for m in self.model.modules():
                if getattr(m, "gradient_checkpointing", False) is True:
                    # transformers checkpoints only in training mode; dropout modules stay in eval.
                    m.training = True
            for p in self.flags:
                p.requires_grad_(False)
            for module in self.targets.values():
                self.handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._post_hook, with_kwargs=True))
            if self.backend == "core":
                self.worker.start()
        except BaseException:
            self._restore(failed=True)
            raise
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        self._restore(failed=kind is not None)

    def _restore(self, failed: bool) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for p, flag in self.flags.items():
            p.requires_grad_(flag)
        for m, mode in self.modes.items():
            m.training = mode
        self.forward = None
        self.worker.stop(discard=failed)

    # -- driving the model ------------------------------------------------------------------------------------------

    def run(self, batches: Iterable[Mapping[str, Any]], progress: bool) -> None:
        from tqdm.auto import tqdm

        if isinstance(batches, Mapping):
            raise InvalidArgumentError("batches must be an iterable of batch dicts, not one dict; wrap it in a list")
        limit = self.config.num_examples
        bar = tqdm(total=limit, unit="example", desc="TLoRA calibration", disable=not progress, leave=False)
        with bar, torch.inference_mode(False), torch.enable_grad():
            for batch in _take_examples(batches, limit):
                if self.config.per_example_scores:
                    self._run_examples(batch)
                else:
                    self._step(batch, per_example=False)
                self.num_examples += batch.rows
                bar.update(batch.rows)
        if self.num_examples == 0:
            raise EmptyInputError("batches is empty: calibration needs at least one example")
        self.worker.finish()
        never = [n for n, seen in self.seen.items() if not seen]
        if never:
            raise InvalidArgumentError(
                f"{len(never)} target module(s) never ran during calibration, e.g. {never[0]!r}: "
                "they have no input statistics; leave them out of target_modules"
            )

    def _run_examples(self, batch: _Batch) -> None:
        """Score every row of ``batch`` as its own example, ``batch_size`` rows per forward and backward."""
        start = 0
        while start < batch.rows:
            size = min(self.batch_size, batch.rows - start)
            failed = False
            try:
                self._step(batch.select(start, start + size), per_example=True)
            except torch.OutOfMemoryError:
                failed = True
            if not failed:
                start += size
                continue
            # Handled outside the except block, whose traceback would keep the failed pass's tensors alive.
            self.forward = None
            if self.gradients is not None:
                # The failed pass may have added to some sums already, and they hold as much as the weights: the
                # diagnostic goes, which also frees that memory for the retry.
                self.gradients = None
                warnings.warn(
                    "calibration ran out of device memory; the gradient share (TLoraConfig.gradient_share) is not "
                    "measured in this plan",
                    stacklevel=3,
                )
            _release_cached_memory(self.device)
            if size == 1:
                raise OutOfMemoryError(
                    "calibration ran out of device memory on a single example; use shorter calibration examples, "
                    "a smaller dtype (bf16) or gradient checkpointing"
                )
            self.batch_size = max(1, size // 2)
            warnings.warn(
                f"calibration ran out of device memory at {size} examples per pass; retrying with {self.batch_size}",
                stacklevel=3,
            )

    def _step(self, batch: _Batch, per_example: bool, covariance: bool = True) -> None:
        """One forward and backward: covariance of ``batch``'s tokens and its examples' scores.

        Nothing is added to the statistics unless the pass completes, so a pass that runs out of memory can be
        retried. With ``per_example`` each row is scored as its own example (the per-example losses are summed, so
        each row's output gradient is its own); otherwise the batch is scored as one, weighted by its rows.
        """
        batch = batch.trimmed()
        mask = batch.token_mask(self.config.count_prompt_tokens)
        inputs = {k: v.detach().to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.data.items()}
        split = per_example and batch.rows > 1
        valid = batch.attention().to(self.device) if split else None
        forward = self.forward = _Forward(batch.rows, batch.seq_len, mask, self.backend, valid)
        try:
            outputs = self.model(**{**self.extra_kwargs, **inputs})
            loss: Optional[torch.Tensor] = None
            if not split:
                loss = self._loss(outputs, inputs, batch.rows)
            else:
                losses, why = self._example_losses(outputs, inputs)
                if losses is not None and not forward.unsplittable:
                    loss = losses.sum()
                else:
                    self._give_up_splitting(forward.unsplittable or why)
                del losses
            del outputs
            updates = forward.covariance_updates(self._accumulator) if covariance else []
            forward.drop_reads()
            if loss is None:
                # This pass's activations are good for the covariance; its examples are scored one at a time.
                self.forward = forward = None  # type: ignore[assignment]
                self._commit(updates, mask, {})
                for i in range(batch.rows):
                    self._step(batch.select(i, i + 1), per_example=True, covariance=False)
                return
            if not loss.requires_grad:
                raise InvalidArgumentError(
                    "the loss does not depend on any target module's output, so no sensitivity score can be computed"
                )
            forward.weight = 1.0 if per_example else float(batch.rows)
            loss.backward()
            for name in list(forward.inputs):
                self._reduce(name)
            self._commit(updates, mask if covariance else None, forward.scores)
        finally:
            self.forward = None
            if self.device.type == "cpu":
                _trim_host_heap()

    def _commit(self, updates: List[Any], mask: Optional[np.ndarray], scores: Mapping[str, torch.Tensor]) -> None:
        if mask is not None:
            self.num_tokens += int(mask.sum())
        if self.backend == "core":
            self.worker.submit(updates)
        else:
            for acc, x, m in updates:
                acc.update(x, m)
        for name, score in scores.items():
            self.score_parts[name].append(score)

    def _give_up_splitting(self, why: str) -> None:
        self.batch_size = 1
        if not self.split_reason:
            self.split_reason = why
            warnings.warn(
                f"calibration scores one example per forward and backward: {why}. With loss_fn, return one loss per "
                "example (shape [batch]) to let examples share a pass",
                stacklevel=4,
            )

    def _example_losses(self, outputs: Any, batch: Mapping[str, Any]) -> Tuple[Optional[torch.Tensor], str]:
        rows = self.forward.rows if self.forward is not None else 0
        if self.loss_fn is None:
            model_loss(self.model, outputs, batch, None, caller="calibrate", **_LOSS_HINTS)  # the missing-loss error
            losses, why = per_example_losses(self.model, outputs, batch)
        else:
            value = self.loss_fn(outputs, batch)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and tuple(value.shape) == (rows,):
                losses, why = value, ""
            else:
                model_loss(self.model, outputs, batch, lambda *_: value, caller="calibrate", **_LOSS_HINTS)
                return None, f"loss_fn returned {describe(value)}, not one loss per example ([{rows}])"
        if losses is not None and not torch.isfinite(losses.detach()).all():
            bad = int((~torch.isfinite(losses.detach())).nonzero()[0, 0])
            raise NonFiniteError(
                f"the loss is {float(losses[bad])} on a calibration example; scores need a finite loss"
            )
        return losses, why

    def _loss(self, outputs: Any, batch: Mapping[str, Any], rows: int) -> torch.Tensor:
        loss_fn = self.loss_fn
        if loss_fn is not None:
            user = loss_fn

            def loss_fn(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
                value = user(outputs, batch)
                # One loss per example is the batch's mean loss when scoring per batch.
                if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == rows and rows > 1:
                    return value.mean()
                return value

        return model_loss(self.model, outputs, batch, loss_fn, caller="calibrate", **_LOSS_HINTS)

    def _accumulator(self, readers: Tuple[str, ...], center: str, dim: int, device: Any) -> StatisticsAccumulator:
        key = (readers, center)
        if key not in self.accumulators:
            self.accumulators[key] = make_accumulator(dim, center, device=device, backend=self.backend)
        return self.accumulators[key]

    # -- hooks ------------------------------------------------------------------------------------------------------

    def _pre_hook(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        forward = self.forward
        if forward is None or not torch.is_grad_enabled():
            return None
        x, put = _linear_input(args, kwargs)
        if x is None or x.requires_grad:
            return None
        # With no parameter requiring grad, nothing upstream of the first targets carries a graph; a leaf here lets
        # the backward pass reach every target output. Readers of one tensor share one leaf.
        key = _tensor_key(x)
        leaf = forward.leaves.get(key)
        if leaf is None:
            leaf = forward.leaves[key] = x.detach().requires_grad_(True)
        return put(leaf)

    def _post_hook(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        forward = self.forward
        if forward is None or torch._C._current_graph_task_id() != -1:
            # Not a forward of ours, or gradient checkpointing recomputing this module inside the backward pass:
            # its input was read, and its output hooked, the first time.
            return
        name = self.names[id(module)]
        x, _ = _linear_input(args, kwargs)
        if x is None:
            return
        self.seen[name] = True
        if not forward.read(name, x, self._center_for(x, forward)):
            self._warn_not_tokens(name, x, forward)
        if isinstance(output, torch.Tensor) and output.requires_grad:
            if forward.valid is not None and (x.dim() < 2 or x.shape[0] != forward.rows) and not forward.unsplittable:
                # Its gradient is summed over the batch's examples before it reaches this module.
                forward.unsplittable = (
                    f"{name!r} reads a tensor of shape {tuple(x.shape)} shared by the batch's examples"
                )
            call = len(forward.inputs.setdefault(name, []))
            forward.inputs[name].append(x)
            output.register_hook(lambda g, name=name, call=call: self._on_grad(name, call, g))

    def _center_for(self, x: torch.Tensor, forward: _Forward) -> Optional[str]:
        lead = tuple(x.shape[:-1])
        if lead == (forward.rows, forward.seq_len):
            # Shape is all there is to go by: a batch-independent input of exactly this shape (DeBERTa's relative
            # embeddings on a one-example forward exactly 2 × span long) would be counted as tokens.
            return self.config.center
        if lead == (forward.rows,):
            # One row per example (BERT's pooler): a one-token "sequence" centred on itself is zero, so such a module
            # is centred on the mean over examples instead.
            return "global" if self.config.center == "sequence" else self.config.center
        return None

    def _warn_not_tokens(self, name: str, x: torch.Tensor, forward: _Forward) -> None:
        if self.warned.get(name):
            return
        self.warned[name] = True
        warnings.warn(
            f"{name!r} was also called on a tensor of shape {tuple(x.shape)}, which does not line up with the batch's "
            f"[{forward.rows}, {forward.seq_len}] tokens (e.g. DeBERTa's relative position embeddings); those calls "
            "count towards its sensitivity score but not its covariance",
            stacklevel=2,
        )

    def _on_grad(self, name: str, call: int, grad: torch.Tensor) -> None:
        forward = self.forward
        if forward is None:
            return
        grads = forward.grads.setdefault(name, {})
        grads[call] = grad
        if len(grads) == len(forward.inputs.get(name, ())):
            self._reduce(name)

    def _reduce(self, name: str) -> None:
        """Add ``Σ|W ⊙ ∂L/∂W|`` (or the ``config.score`` variant) of this pass's examples to the module's score, and
        the gradient to its sum when the gradient share is measured.

        The score is reduced tile by tile (:func:`_tiled_score`): no ``[d_out, d_in]`` gradient exists, unless the
        gradient share keeps ``G`` itself (modules with at most ``GRADIENT_SKETCH_ROWS`` outputs, whose ``G`` is
        small); wider modules' sketches ``Ψ G`` are formed from the tokens."""
        forward = self.forward
        assert forward is not None
        inputs = forward.inputs.pop(name, [])
        grads = forward.grads.pop(name, {})
        if not grads:
            return  # this module's output did not reach the loss on this pass: it adds zero
        weight = self.targets[name].weight.detach()
        d_out, d_in = weight.shape
        calls = sorted(grads)
        # float64 sums where the device has them (MPS does not).
        total_dtype = torch.float32 if weight.device.type == "mps" else torch.float64
        kind = self.config.score
        sums = self.gradients
        whole = sums is not None and gradient_sum_shape(d_out, 1)[0] == d_out

        def add(pairs: List[Tuple[torch.Tensor, torch.Tensor]], weight_of_pass: float) -> torch.Tensor:
            if whole:
                assert sums is not None
                gradient = _weight_gradient(pairs)
                _add_gradient(sums, name, gradient, weight_of_pass)
                return _score(kind, weight, gradient, total_dtype)
            if sums is not None:
                _add_gradient(sums, name, self._sketched_gradient(pairs, d_out, weight.device), weight_of_pass)
            return _tiled_score(kind, weight, pairs, total_dtype)

        if forward.valid is None:
            # ∂L/∂W = Σ_calls Gᵀ X; concatenating the calls' tokens makes it one product.
            pairs = [(inputs[c].detach().reshape(-1, d_in), grads[c].reshape(-1, d_out)) for c in calls]
            # A per-batch pass's loss is the batch's mean: times its rows, the sum of its examples' gradients.
            score = add(pairs, forward.weight) * forward.weight
        else:
            # Example n's gradient is Σ_calls G[n]ᵀ X[n] over its own tokens (padding zeroed: its values are not
            # the example's), reduced before the next example's is formed.
            score = torch.zeros((), dtype=total_dtype, device=weight.device)
            for n in range(forward.rows):
                pairs = []
                for c in calls:
                    x, g = inputs[c].detach()[n], grads[c][n]
                    if x.dim() == 2 and x.shape[0] == forward.seq_len:
                        keep = forward.valid[n].unsqueeze(1)
                        x, g = torch.where(keep, x, 0), torch.where(keep, g, 0)
                    pairs.append((x.reshape(-1, d_in), g.reshape(-1, d_out)))
                score += add(pairs, 1.0)
        forward.scores[name] = forward.scores.get(name, 0) + score

    def _sketched_gradient(
        self, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]], d_out: int, device: torch.device
    ) -> torch.Tensor:
        """What one pass adds to the gradient sum of a module with more than ``GRADIENT_SKETCH_ROWS`` outputs: the
        sketch ``Ψ G = Σ (g Ψᵀ)ᵀ x``, formed from the tokens (``k·T·(d_out + d_in)`` multiply-adds, against
        ``k·d_out·d_in`` from ``G``, which is never formed)."""
        psi = self.sketches.get(d_out)
        if psi is None:
            psi = self.sketches[d_out] = gradient_sketch(d_out, device)
        return _weight_gradient([(x, g.float() @ psi.T) for x, g in pairs])

    def statistics(self) -> CalibrationStatistics:
        shapes = {n: (m.out_features, m.in_features) for n, m in self.targets.items()}
        scores: Dict[str, float] = {}
        for name, parts in self.score_parts.items():
            total = float(torch.stack([p.double().cpu() for p in parts]).sum()) if parts else 0.0
            d_out, d_in = shapes[name]
            scores[name] = total / (d_out * d_in) / self.num_examples
        accumulators = [(readers, acc) for (readers, _), acc in self.accumulators.items()]
        untokened = [n for n in self.targets if not any(n in r for r, _ in accumulators)]
        if untokened:
            raise InvalidArgumentError(
                f"{untokened[0]!r} ({len(untokened)} module(s) in all) only ran on tensors that do not line up with "
                "the batch's [batch, seq] tokens, so its input covariance is unknown; leave it out of target_modules"
            )
        empty = [n for n in self.targets if not any(n in r and acc.count > 0 for r, acc in accumulators)]
        if empty:
            raise EmptyInputError(
                f"no token of the calibration data reached {empty[0]!r} ({len(empty)} module(s) in all): every token "
                "was padding" + ("" if self.config.count_prompt_tokens else " or a prompt token (label -100)")
            )
        return CalibrationStatistics(
            list(self.targets), shapes, accumulators, scores, self.num_examples, self.num_tokens, self.gradients
        )


_LOSS_HINTS = dict(
    no_labels_hint="put labels in the calibration batches",
    non_finite_hint="on a calibration example; scores need a finite loss",
)


def _stacked(pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pairs' tokens ``(X, G)`` as two float32 ``[tokens, d]`` matrices, so ``Σ_pairs Gᵀ X`` is one product."""
    if len(pairs) == 1:
        return pairs[0][0].float(), pairs[0][1].float()
    return torch.cat([x.float() for x, _ in pairs]), torch.cat([g.float() for _, g in pairs])


def _weight_gradient(pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``Σ_pairs Gᵀ X`` as one float32 ``[d_out, d_in]`` buffer, which the caller may overwrite."""
    xs, gs = _stacked(pairs)
    return gs.T @ xs


def gradient_sketch(d_out: int, device: Any = "cpu") -> torch.Tensor:
    """``Ψ``: ``[GRADIENT_SKETCH_ROWS, d_out]`` float32 with orthonormal rows scaled by ``√(d_out / k)``, so that
    ``E‖Ψ M‖² = ‖M‖²``. Fixed by ``d_out`` alone: every module of a width, every run and every rank of a sharded
    calibration use the same one (sketches of one module add across ranks)."""
    rows = gradient_sum_shape(d_out, 1)[0]
    gen = torch.Generator().manual_seed(0x5EED + d_out)
    q, _ = torch.linalg.qr(torch.randn(d_out, rows, generator=gen, dtype=torch.float64))
    return (q.T * math.sqrt(d_out / rows)).to(device=device, dtype=torch.float32).contiguous()


def _add_gradient(sums: Dict[str, torch.Tensor], name: str, gradient: torch.Tensor, weight: float) -> None:
    total = sums.get(name)
    if total is None:
        sums[name] = gradient * weight
    else:
        total.add_(gradient, alpha=weight)


def _score(kind: str, weight: torch.Tensor, gradient: torch.Tensor, dtype: Any) -> Any:
    """One example's unnormalised score from its gradient ``G``, computed in ``G``'s buffer (which it overwrites):
    ``Σ|W ⊙ G|`` (``"reference"``), ``Σ|G|`` (``"grad"``) or ``Σ G²`` (``"fisher"``)."""
    if kind == "reference":
        gradient.mul_(weight)
        return _wide_sum(gradient.abs_(), dtype)
    if kind == "grad":
        return _wide_sum(gradient.abs_(), dtype)
    return _wide_sum(gradient.square_(), dtype)


# Elements of one tile of _tiled_score. On the CPU 1 MiB of float32, so the tile is still in cache when it is
# reduced: measured on a 5632 × 2048 target with 96 tokens (one thread), the score took 27 ms tiled against 65 ms
# from the whole gradient, less than forming the whole gradient alone (35 ms). Elsewhere large enough that most
# modules are one product (an accelerator wants few, large kernels) yet bounded (256 MiB) on a 70B model's MLP.
_TILE_ELEMENTS_CPU = 1 << 18
_TILE_ELEMENTS_DEVICE = 1 << 26


def _tiled_score(
    kind: str, weight: torch.Tensor, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]], dtype: Any
) -> torch.Tensor:
    """:func:`_score` of ``G = Σ_pairs gᵀ x``, formed and reduced a block of output rows at a time.

    On the CPU each tile (at most 2¹⁸ terms) is summed in float32 — a pairwise sum, within about 1e-7 relative
    (1e-8 measured) — and the tiles' sums in ``dtype``; a float64 cast of each tile would cost more than its product.
    """
    d_out, d_in = weight.shape
    xs, gs = _stacked(pairs)
    on_cpu = weight.device.type == "cpu"
    rows = max(1, (_TILE_ELEMENTS_CPU if on_cpu else _TILE_ELEMENTS_DEVICE) // d_in)
    if rows >= d_out:
        return _score(kind, weight, gs.T @ xs, dtype)
    tile_dtype = torch.float32 if on_cpu else dtype
    total = torch.zeros((), dtype=dtype, device=weight.device)
    for start in range(0, d_out, rows):
        stop = min(start + rows, d_out)
        total += _score(kind, weight[start:stop], gs[:, start:stop].T @ xs, tile_dtype)
    return total


# Elements per block of _wide_sum: an 8 MiB float64 temporary at most.
_SUM_BLOCK = 1 << 20


def _wide_sum(values: torch.Tensor, dtype: Any) -> torch.Tensor:
    """``values.sum(dtype=dtype)`` in blocks: torch casts the whole tensor to ``dtype`` first (measured: an 88 MiB
    float64 copy of a 5632 × 2048 float32 gradient), which was the largest transient of a LLaMA-shaped pass."""
    flat = values.reshape(-1)
    if flat.numel() <= _SUM_BLOCK:
        return flat.sum(dtype=dtype)
    total = torch.zeros((), dtype=dtype, device=values.device)
    for block in flat.split(_SUM_BLOCK):
        total += block.sum(dtype=dtype)
    return total


def _trim_host_heap() -> None:
    """Give the heap's free pages back to the OS (glibc only; elsewhere a no-op).

    Measured on all-MiniLM-L6-v2 (32 examples, one per pass, fresh process): the pass's peak resident memory above
    the loaded model was 1.1 GiB without this and 0.21 GiB with it (a 4 MiB fixed mmap threshold instead: 0.59
    GiB). The cause is glibc's: each freed activation buffer raises its mmap threshold, so later ones come from
    per-thread arenas (torch's, the core's) and stay resident once freed, a pass's worth per arena.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        try:
            import ctypes
            import ctypes.util

            name = ctypes.util.find_library("c")
            libc = ctypes.CDLL(name) if name else None
            if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "gnu_get_libc_version"):
                _MALLOC_TRIM = libc.malloc_trim
        except OSError:
            pass
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclasses.dataclass
class _Read:
    """A tensor some targets read during one forward, and the modules that read it."""

    source: torch.Tensor  # held so its memory is not reused within the forward: identity is its address
    data: torch.Tensor  # what the accumulator reads: a host copy for the core, the tensor itself for torch
    mask: Optional[np.ndarray]
    center: str
    readers: Dict[str, None]


class _Forward:
    """Per-forward bookkeeping of the hooks."""

    def __init__(
        self, rows: int, seq_len: int, mask: np.ndarray, backend: str, valid: Optional[torch.Tensor] = None
    ) -> None:
        self.rows = rows
        self.seq_len = seq_len
        self.mask = mask
        self.backend = backend
        # Scoring each row as its own example: the [rows, seq] attention mask on the device, else None.
        self.valid = valid
        self.unsplittable = ""
        self.weight = 1.0
        self.reads: Dict[Tuple[Any, ...], _Read] = {}
        self.leaves: Dict[Tuple[Any, ...], torch.Tensor] = {}
        self.inputs: Dict[str, List[torch.Tensor]] = {}
        self.grads: Dict[str, Dict[int, torch.Tensor]] = {}
        self.scores: Dict[str, torch.Tensor] = {}

    def read(self, name: str, x: torch.Tensor, center: Optional[str]) -> bool:
        if center is None:
            return False
        key = _tensor_key(x)
        read = self.reads.get(key)
        if read is None:
            # Read where it is, after the backward pass (which does not modify it), by the torch backend or by the
            # core when it is already on the host: holding the tensor keeps its memory from reuse. Only device tensors
            # bound for the core are copied to the host.
            data = x.detach().to("cpu", copy=True) if self.backend == "core" and x.device.type != "cpu" else x.detach()
            mask = self.mask if data.dim() == 3 else None
            read = self.reads[key] = _Read(x, data, mask, center, {})
        read.readers[name] = None
        return True

    def covariance_updates(
        self, accumulator: Callable[[Tuple[str, ...], str, int, Any], StatisticsAccumulator]
    ) -> List[Tuple[StatisticsAccumulator, torch.Tensor, Optional[np.ndarray]]]:
        # Known only now that the forward is over: which modules read each tensor, hence which accumulator it feeds.
        return [
            (accumulator(tuple(r.readers), r.center, r.data.shape[-1], r.data.device), r.data, r.mask)
            for r in self.reads.values()
        ]

    def drop_reads(self) -> None:
        self.reads.clear()
        self.leaves.clear()


class _CovarianceWorker:
    """Feeds the core accumulators on a background thread (the core releases the GIL) while the model runs on."""

    _DONE = object()

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=_QUEUE_FORWARDS)
        self.error: Optional[BaseException] = None
        self.discard = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="lowrank-rs-covariance", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is self._DONE:
                return
            if self.error is not None or self.discard.is_set():
                continue  # keep draining so a producer blocked on a full queue is released
            try:
                for acc, x, mask in item:
                    acc.update(x, mask)
            except BaseException as e:  # handed to the caller's thread by _raise_error
                self.error = e

    def submit(self, updates: Any) -> None:
        self._raise_error()
        self.queue.put(updates)

    def finish(self) -> None:
        """Wait until every submitted update is in its accumulator; raise what the thread raised."""
        self.stop(discard=False)
        self._raise_error()

    def stop(self, discard: bool) -> None:
        if not self.thread.is_alive():
            return
        if discard:
            self.discard.set()
        self.queue.put(self._DONE)
        self.thread.join()

    def _raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


# --- batches --------------------------------------------------------------------------------------------------------


class _Batch:
    """A calibration batch: its tensors, row count and sequence length."""

    def __init__(self, data: Dict[str, Any], rows: int, seq_len: int, index: int) -> None:
        self.data = data
        self.rows = rows
        self.seq_len = seq_len
        self.index = index

    @classmethod
    def parse(cls, batch: Any, index: int) -> _Batch:
        if not isinstance(batch, Mapping):
            raise InvalidArgumentError(
                f"calibration batch {index} is a {type(batch).__name__}; each batch must be a dict of tensors as the "
                "model takes them (input_ids, attention_mask, labels, ...)"
            )
        for key in ("input_ids", "inputs_embeds", "attention_mask"):
            value = batch.get(key)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.dim() < 2:
                raise ShapeError(
                    f"calibration batch {index}: {key} must be a torch tensor of shape [batch, seq, ...], "
                    f"got {describe(value)}"
                )
            rows, seq_len = value.shape[:2]
            break
        else:
            raise InvalidArgumentError(
                f"calibration batch {index} has none of input_ids, inputs_embeds, attention_mask "
                f"(its keys: {sorted(batch)})"
            )
        mask = batch.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (rows, seq_len)):
            raise ShapeError(
                f"calibration batch {index}: attention_mask must be a [batch, seq] = [{rows}, {seq_len}] tensor, got "
                f"{describe(mask)}"
            )
        return cls(dict(batch), int(rows), int(seq_len), index)

    def select(self, start: int, stop: int) -> _Batch:
        """Rows ``start:stop`` of every tensor that has one row per example."""
        data = {
            k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.rows else v
            for k, v in self.data.items()
        }
        return _Batch(data, stop - start, self.seq_len, self.index)

    def attention(self) -> torch.Tensor:
        mask = self.data.get("attention_mask")
        if mask is None:
            return torch.ones(self.rows, self.seq_len, dtype=torch.bool)
        return mask.detach().cpu() != 0

    def trimmed(self) -> _Batch:
        """Without the trailing positions that are padding in every row (right padding costs nothing then)."""
        valid = self.attention()
        columns = valid.any(dim=0).nonzero()
        if columns.numel() == 0:
            raise EmptyInputError(
                f"calibration batch {self.index}: attention_mask is 0 everywhere, so there is no token to calibrate on"
            )
        keep = int(columns[-1]) + 1
        if keep == self.seq_len:
            return self
        token_aligned = {
            k
            for k, v in self.data.items()
            if isinstance(v, torch.Tensor) and v.dim() in (2, 3) and tuple(v.shape[:2]) == (self.rows, self.seq_len)
        }
        others = [
            k
            for k, v in self.data.items()
            if k not in token_aligned and isinstance(v, torch.Tensor) and self.seq_len in tuple(v.shape[1:])
        ]
        if others:
            return self  # a tensor like a 4-D attention mask would have to be cut too, in a way only the model knows
        data = {k: (v[:, :keep] if k in token_aligned else v) for k, v in self.data.items()}
        return _Batch(data, self.rows, keep, self.index)

    def token_mask(self, count_prompt_tokens: bool) -> np.ndarray:
        """bool ``[rows, seq]``: the tokens that enter the covariances."""
        mask = self.attention()
        if not count_prompt_tokens:
            labels = self.data.get("labels")
            if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (self.rows, self.seq_len):
                raise InvalidArgumentError(
                    f"count_prompt_tokens=False needs token-aligned labels ([batch, seq] = [{self.rows}, "
                    f"{self.seq_len}], -100 on prompt tokens), but calibration batch {self.index} has labels "
                    f"{describe(labels)}"
                )
            mask = mask & (labels.detach().cpu() != _IGNORE_INDEX)
        return mask.numpy()


def _take_examples(batches: Iterable[Mapping[str, Any]], limit: int) -> Iterator[_Batch]:
    """The batches up to ``limit`` examples in all; the last is cut to fit, and no batch beyond it is drawn."""
    iterator = batch_iterator(batches)
    seen = 0
    for index, raw in enumerate(iterator):
        batch = _Batch.parse(raw, index)
        if batch.rows == 0:
            continue
        take = min(batch.rows, limit - seen)
        yield batch if take == batch.rows else batch.select(0, take)
        seen += take
        if seen >= limit:
            return


# --- hooks' helpers -------------------------------------------------------------------------------------------------


def _linear_input(
    args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Tuple[Optional[torch.Tensor], Callable[[torch.Tensor], Tuple[Tuple[Any, ...], Dict[str, Any]]]]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], lambda t: ((t,) + tuple(args[1:]), kwargs)
    x = kwargs.get("input")
    if isinstance(x, torch.Tensor):
        return x, lambda t: (args, {**kwargs, "input": t})
    return None, lambda t: (args, kwargs)


def _tensor_key(x: torch.Tensor) -> Tuple[Any, ...]:
    # Modules that read one tensor see the same memory, shape and strides; within a forward that memory is not reused
    # because the first reader's tensor is held until the forward ends.
    return (x.data_ptr(), x.device, x.dtype, tuple(x.shape), tuple(x.stride()))


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_config(config: Any) -> None:
    if not isinstance(config, TLoraConfig):
        raise ConfigError(
            f"calibration needs a TLoraConfig (rank budget, scaling, centring), not {type(config).__name__}"
        )


def _targets(model: nn.Module, config: TLoraConfig) -> Dict[str, nn.Linear]:
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"calibrate needs a torch.nn.Module, not {type(model).__name__}")
    if has_adapter(model):
        raise AdapterStateError("the model already has adapters attached; calibrate the base model, then attach")
    modules = dict(model.named_modules())
    keep = resolve_modules_to_save(modules, config.modules_to_save)
    names = resolve_targets(modules, config.target_modules, keep, type(model).__name__)
    return {n: modules[n] for n in names}


# --- the plan -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    """One target module's share of the plan.

    ``a`` is float32 ``[rank, d_in]`` with orthonormal rows (``[0, d_in]`` for rank 0: no adapter);
    ``singular_values`` are the top ``rank`` singular values of ``W·C``; ``energy`` is the share
    ``‖W C Aᵀ‖²_F / ‖W C‖²_F`` of ``W·C``'s energy that ``A``'s row space captures, computed exactly when
    ``energy_exact`` and otherwise estimated (see :func:`build_plan`).

    ``gradient_share`` is ``‖G Aᵀ‖²_F / ‖G‖²_F`` with ``G = Σ ∂L/∂W`` over the calibration examples: the share of
    the loss's steepest-descent direction for ``W`` that ``γ B A`` can follow with ``A`` fixed (``B``'s gradient at
    ``B = 0`` is ``γ G Aᵀ``, so a first step decreases the loss by ``‖G Aᵀ‖²`` where a full update of ``W`` would by
    ``‖G‖²``). 0 for rank 0 (no adapter), 1 when ``G = 0``, ``None`` when not measured.
    """

    name: str
    shape: Tuple[int, int]
    rank: int
    scale: float
    alpha: float
    score: float
    a: np.ndarray
    singular_values: np.ndarray
    energy: float
    energy_exact: bool
    gradient_share: Optional[float] = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModulePlan):
            return NotImplemented
        plain = ("name", "shape", "rank", "scale", "alpha", "score", "energy", "energy_exact", "gradient_share")
        return all(getattr(self, f) == getattr(other, f) for f in plain) and all(
            np.array_equal(getattr(self, f), getattr(other, f)) for f in ("a", "singular_values")
        )

    __hash__ = None  # type: ignore[assignment]


class CalibrationPlan:
    """The outcome of :func:`calibrate`: per target module a rank, a scale γ, its base ``A``, and why.

    ``lowrank_rs.attach(model, plan)`` wraps each module with ``rank > 0`` as ``W0 x + γ B A x`` with ``A`` from the
    plan (frozen unless ``config.train_a``) and ``B = 0``. ``plan.save(dir)`` / ``CalibrationPlan.load(dir)`` store it,
    ``plan.table()`` (also ``str(plan)``) prints it and ``plan.plot(path)`` draws it.
    """

    def __init__(
        self,
        config: TLoraConfig,
        modules: Sequence[ModulePlan],
        num_examples: int,
        num_tokens: int,
        covariance_bytes: Optional[int] = None,
    ) -> None:
        _check_config(config)
        # Memory the covariance sums held during calibration (unknown for plans saved before it was recorded).
        self.covariance_bytes = None if covariance_bytes is None else int(covariance_bytes)
        self.config = config
        self.modules: Dict[str, ModulePlan] = {m.name: m for m in modules}
        if len(self.modules) != len(modules):
            raise InvalidArgumentError("a calibration plan lists a module twice")
        self.num_examples = int(num_examples)
        self.num_tokens = int(num_tokens)

    @property
    def ranks(self) -> Dict[str, int]:
        return {n: m.rank for n, m in self.modules.items()}

    @property
    def scales(self) -> Dict[str, float]:
        return {n: m.scale for n, m in self.modules.items()}

    @property
    def alphas(self) -> Dict[str, float]:
        return {n: m.alpha for n, m in self.modules.items()}

    @property
    def scores(self) -> Dict[str, float]:
        return {n: m.score for n, m in self.modules.items()}

    @property
    def gradient_shares(self) -> Dict[str, Optional[float]]:
        """Per module, the share of the calibration gradient inside ``A``'s row space (see :class:`ModulePlan`)."""
        return {n: m.gradient_share for n, m in self.modules.items()}

    def low_gradient_share(self, threshold: Optional[float] = None) -> List[str]:
        """The adapted modules whose gradient share was measured and lies below ``threshold`` (default
        :data:`GRADIENT_SHARE_WARNING`)."""
        if threshold is None:
            threshold = GRADIENT_SHARE_WARNING
        return [
            n
            for n, m in self.modules.items()
            if m.rank > 0 and m.gradient_share is not None and m.gradient_share < threshold
        ]

    @property
    def init_a(self) -> Dict[str, np.ndarray]:
        return {n: m.a for n, m in self.modules.items() if m.rank > 0}

    @property
    def budget(self) -> int:
        """The total rank, Σ r_i."""
        return sum(m.rank for m in self.modules.values())

    @property
    def trainable_parameters(self) -> int:
        """Parameter elements an attached adapter trains: ``B`` only, plus ``A`` with ``train_a``."""
        return sum(m.rank * (m.shape[0] + (m.shape[1] if self.config.train_a else 0)) for m in self.modules.values())

    def attach_arguments(self) -> Tuple[TLoraConfig, Dict[str, int], Dict[str, float], Dict[str, np.ndarray]]:
        """``(config, ranks, scales, init_a)``: what ``lowrank_rs.attach`` builds the adapters from."""
        return self.config, self.ranks, self.scales, self.init_a

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CalibrationPlan):
            return NotImplemented
        return (
            self.config == other.config
            and list(self.modules.items()) == list(other.modules.items())
            and (self.num_examples, self.num_tokens) == (other.num_examples, other.num_tokens)
        )

    __hash__ = None  # type: ignore[assignment]

    # -- files ------------------------------------------------------------------------------------------------------

    def save(self, directory: PathLike) -> None:
        """Write the plan to ``directory`` atomically: ``A`` tensors as safetensors plus a JSON description.

        The container is the adapter-file one (``adapter_model.safetensors``, ``adapter_config.json``); the JSON has
        ``"format": "lowrank_rs.calibration_plan"`` and no ``peft_type``, so neither PEFT nor ``load_adapter`` mistake
        it for an adapter.
        """
        description = {
            "format": PLAN_FORMAT,
            "format_version": PLAN_FORMAT_VERSION,
            "lowrank_rs_version": __version__,
            "method": self.config.method,
            "config": self.config.to_dict(),
            "num_examples": self.num_examples,
            "num_tokens": self.num_tokens,
            **({} if self.covariance_bytes is None else {"covariance_bytes": self.covariance_bytes}),
            "modules": [
                {
                    "name": m.name,
                    "shape": list(m.shape),
                    "rank": m.rank,
                    "scale": m.scale,
                    "alpha": m.alpha,
                    "score": m.score,
                    "energy": m.energy,
                    "energy_exact": m.energy_exact,
                    **({} if m.gradient_share is None else {"gradient_share": m.gradient_share}),
                    "singular_values": [float(s) for s in m.singular_values],
                }
                for m in self.modules.values()
            ],
        }
        tensors = {f"{m.name}.A": m.a for m in self.modules.values() if m.rank > 0}
        write_adapter(directory, tensors, description)

    @classmethod
    def load(cls, directory: PathLike) -> CalibrationPlan:
        """Read a plan written by :meth:`save`, validating every field and tensor shape."""
        where = os.fspath(directory)
        tensors, description = read_adapter(directory)
        if description.get("format") != PLAN_FORMAT:
            hint = " (it is an adapter: use lowrank_rs.load_adapter)" if "peft_type" in description else ""
            raise AdapterFormatError(f"{where!r} is not a calibration plan{hint}")
        version = description.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise AdapterFormatError(
                f"{where!r} is a calibration plan of format version {version!r}; this lowrank-rs reads version "
                f"{PLAN_FORMAT_VERSION}"
            )
        try:
            config = TLoraConfig.from_dict(description["config"])
            modules = [_module_from_json(entry, tensors) for entry in description["modules"]]
            num_examples, num_tokens = int(description["num_examples"]), int(description["num_tokens"])
            covariance_bytes = description.get("covariance_bytes")
            covariance_bytes = None if covariance_bytes is None else int(covariance_bytes)
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise AdapterFormatError(f"{where!r}: a malformed calibration plan: {type(e).__name__}: {e}") from None
        extra = sorted(set(tensors) - {f"{m.name}.A" for m in modules if m.rank > 0})
        if extra:
            raise AdapterFormatError(f"{where!r}: tensor {extra[0]!r} belongs to no module of the plan")
        return cls(config, modules, num_examples, num_tokens, covariance_bytes)

    # -- showing it -------------------------------------------------------------------------------------------------

    def table(self) -> str:
        """A per-module table: shape, rank, scale γ, α_i, sensitivity score, captured energy and gradient share."""
        rows = [("module", "d_out×d_in", "rank", "scale", "alpha", "score", "energy", "grad share")]
        for m in self.modules.values():
            energy = "-" if m.rank == 0 else ("" if m.energy_exact else "≈") + f"{100 * m.energy:.2f}%"
            share = "-" if m.rank == 0 or m.gradient_share is None else f"{100 * m.gradient_share:.1f}%"
            rows.append(
                (
                    m.name,
                    f"{m.shape[0]}×{m.shape[1]}",
                    str(m.rank),
                    f"{m.scale:.4g}",
                    f"{m.alpha:g}",
                    f"{m.score:.4e}",
                    energy,
                    share,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

        def line(r: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

        adapted = sum(1 for m in self.modules.values() if m.rank > 0)
        head = (
            f"TLoRA calibration plan: {len(self.modules)} modules ({adapted} adapted), total rank {self.budget}, "
            f"{self.trainable_parameters:,} trainable parameters; {self.num_examples} examples, "
            f"{self.num_tokens} tokens; score {self.config.score!r}, scaling {self.config.scaling!r}, "
            f"centring {self.config.center!r}"
        )
        if self.covariance_bytes is not None:
            head += f"; covariance memory {format_bytes(self.covariance_bytes)}"
        head += "; " + self._share_summary()
        rule = "-" * len(line(rows[0]))
        return "\n".join([head, line(rows[0]), rule] + [line(r) for r in rows[1:]])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"CalibrationPlan({len(self.modules)} modules, total rank {self.budget}, "
            f"{self.num_examples} examples, {self.num_tokens} tokens, {self._share_summary()})"
        )

    def _share_summary(self) -> str:
        shares = [m.gradient_share for m in self.modules.values() if m.rank > 0 and m.gradient_share is not None]
        if not shares:
            return "gradient share not measured"
        low = len(self.low_gradient_share())
        return (
            f"gradient share in A {100 * min(shares):.1f}–{100 * max(shares):.1f}%, {low} module(s) below "
            f"{100 * GRADIENT_SHARE_WARNING:.0f}%"
        )

    def plot(self, path: PathLike, *, dpi: int = 110) -> None:
        """Draw the plan as a PNG: rank and scale heatmaps (layer × module type) and the singular-value spectra.

        Needs matplotlib (``pip install 'lowrank-rs[plot]'``). Draws on its own figure with the Agg canvas, so it
        neither needs a display nor touches pyplot's global state.
        """
        try:
            import matplotlib
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise MissingDependencyError(
                "CalibrationPlan.plot needs matplotlib; install it with: pip install 'lowrank-rs[plot]'"
            ) from None
        layers, kinds, cells = _layer_grid(self.modules)
        rank_grid = np.full((len(layers), len(kinds)), np.nan)
        scale_grid = np.full((len(layers), len(kinds)), np.nan)
        for name, (i, j) in cells.items():
            rank_grid[i, j] = self.modules[name].rank
            scale_grid[i, j] = self.modules[name].scale

        height = max(4.0, 0.32 * len(layers) + 2.0)
        fig = Figure(figsize=(max(12.0, 1.1 * len(kinds) * 2 + 6.0), height), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [max(len(kinds), 2), max(len(kinds), 2), 4]})
        for ax, grid, title, fmt in (
            (axes[0], rank_grid, "rank r_i", "{:.0f}"),
            (axes[1], scale_grid, "scale γ_i", "{:.3g}"),
        ):
            image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_title(title)
            ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(layers)), layers, fontsize=8)
            ax.set_ylabel("layer")
            fig.colorbar(image, ax=ax, shrink=0.8)
            if grid.size <= 400:
                # viridis is light at the top: dark text there, light text on the dark end.
                middle = (np.nanmin(grid) + np.nanmax(grid)) / 2
                for (i, j), value in np.ndenumerate(grid):
                    if not np.isnan(value):
                        colour = "k" if value > middle else "w"
                        ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=7, color=colour)

        ax = axes[2]
        palette = matplotlib.colormaps["tab10"]
        colours = {kind: palette(k % 10) for k, kind in enumerate(kinds)}
        labelled = set()
        for name, m in self.modules.items():
            if m.rank == 0 or m.singular_values.size == 0 or m.singular_values[0] <= 0:
                continue
            kind = kinds[cells[name][1]]
            ax.plot(
                np.arange(1, m.singular_values.size + 1),
                m.singular_values / m.singular_values[0],
                color=colours[kind],
                alpha=0.6,
                linewidth=1.0,
                marker="." if m.singular_values.size < 12 else None,
                label=None if kind in labelled else kind,
            )
            labelled.add(kind)
        ax.set_yscale("log")
        ax.set_xlabel("index j (up to the module's rank)")
        ax.set_ylabel("σ_j / σ_1 of W·C")
        ax.set_title("singular-value spectra")
        if labelled:
            ax.legend(fontsize=7)
        fig.suptitle(f"TLoRA plan: {len(self.modules)} modules, total rank {self.budget}, {self.num_examples} examples")
        fig.savefig(os.fspath(path), dpi=dpi, format="png")


def _layer_grid(modules: Mapping[str, ModulePlan]) -> Tuple[List[str], List[str], Dict[str, Tuple[int, int]]]:
    """Rows (layer indices, then ``other``) and columns (the module path after the layer index) of the heatmaps."""
    placed: Dict[str, Tuple[str, str]] = {}
    for name in modules:
        found = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)
        placed[name] = (found.group(1), found.group(2)) if found else ("other", name)
    layer_names = sorted({layer for layer, _ in placed.values() if layer != "other"}, key=int)
    if any(layer == "other" for layer, _ in placed.values()):
        layer_names.append("other")
    kinds = list(dict.fromkeys(kind for _, kind in placed.values()))
    cells = {name: (layer_names.index(layer), kinds.index(kind)) for name, (layer, kind) in placed.items()}
    return layer_names, kinds, cells


def _module_from_json(entry: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> ModulePlan:
    name = str(entry["name"])
    d_out, d_in = (int(v) for v in entry["shape"])
    rank = int(entry["rank"])
    if rank < 0 or rank > min(d_out, d_in):
        raise AdapterFormatError(f"module {name!r} has rank {rank}, outside [0, {min(d_out, d_in)}]")
    if rank > 0:
        a = tensors.get(f"{name}.A")
        if a is None:
            raise AdapterFormatError(f"the plan has no tensor {name}.A for module {name!r} of rank {rank}")
        if a.dtype != np.float32 or a.shape != (rank, d_in):
            raise AdapterFormatError(f"tensor {name}.A is {a.dtype} {a.shape}; expected float32 ({rank}, {d_in})")
    else:
        a = np.zeros((0, d_in), dtype=np.float32)
    singular = np.asarray(entry["singular_values"], dtype=np.float32)
    if singular.shape != (rank,):
        raise AdapterFormatError(f"module {name!r} has {singular.size} singular values for rank {rank}")
    # Plans written before the diagnostic existed have none.
    share = entry.get("gradient_share")
    if share is not None:
        share = float(share)
        if not 0.0 <= share <= 1.0:
            raise AdapterFormatError(f"module {name!r} has gradient share {share}, outside [0, 1]")
    return ModulePlan(
        name=name,
        shape=(d_out, d_in),
        rank=rank,
        scale=float(entry["scale"]),
        alpha=float(entry["alpha"]),
        score=float(entry["score"]),
        a=a,
        singular_values=singular,
        energy=float(entry["energy"]),
        energy_exact=bool(entry["energy_exact"]),
        gradient_share=share,
    )


# --- from statistics to a plan --------------------------------------------------------------------------------------


def build_plan(
    model: nn.Module,
    statistics: CalibrationStatistics,
    config: TLoraConfig,
    *,
    progress: bool = True,
    owned: Optional[AbstractSet[str]] = None,
    basis_workers: Optional[int] = None,
) -> CalibrationPlan:
    """Ranks, scales and bases from ``statistics`` measured on ``model``'s targets (docs/methods.md).

    - ranks: :func:`~lowrank_rs.linalg.allocate_ranks` over the scores, budget ``config.budget`` or ``r × N``, each
      within ``[min_rank, min(d_in, d_out, max_rank)]`` and a multiple of ``multiple_of``;
    - scales: ``α_i`` from :func:`~lowrank_rs.linalg.allocate_alphas`; ``γ_i = α_i / r`` (``scaling="reference"``)
      or ``α_i / r_i`` (``"per_rank"``), with ``√`` of the denominator under ``use_rslora``; 0 for rank-0 modules;
    - ``A_i``: :func:`~lowrank_rs.linalg.task_aware_basis` of the weight (as float32) and the input covariance;
    - energy: ``‖W C Aᵀ‖²_F`` is computed exactly; ``‖W C‖²_F`` too when that costs at most 2³⁰ multiply-adds,
      otherwise it is ``‖W C Aᵀ‖²_F`` plus an unbiased Gaussian-probe estimate of the rest ``‖W C (I − AᵀA)‖²_F``
      (64 probes; the top part being exact is what keeps the estimate tight, as in Hutch++);
    - gradient share: ``‖G Aᵀ‖²_F / ‖G‖²_F`` from the statistics' gradient sums, when they were kept. Adapted modules
      below :data:`GRADIENT_SHARE_WARNING` get a warning naming them, unless ``A`` trains (``train_a``).

    The bases of several modules are computed at once on ``basis_workers`` threads (default: half the cores, at most
    4), widest inputs first; the plan does not depend on how many. Reusing one ``statistics`` with several configs
    (other budgets or scalings) skips the model runs.
    ``owned`` (sharded calibration): compute the bases of these modules only; the others get an empty placeholder
    that :mod:`~lowrank_rs.methods.tlora.sharded` replaces with their owner's.
    """
    from tqdm.auto import tqdm

    _check_config(config)
    names = list(statistics.modules)
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise InvalidArgumentError(
            f"the statistics are for module {missing[0]!r}, which this model has not as an nn.Linear; "
            f"nearest names: {nearest(missing[0], modules)}"
        )
    for n in names:
        weight_shape = tuple(modules[n].weight.shape)
        if weight_shape != statistics.shapes[n]:
            raise ShapeError(f"{n!r} is {weight_shape} in the model but {statistics.shapes[n]} in the statistics")
    scores = [statistics.scores[n] for n in names]
    budget = config.budget if config.budget is not None else config.r * len(names)
    caps = [
        min(statistics.shapes[n]) if config.max_rank is None else min(*statistics.shapes[n], config.max_rank)
        for n in names
    ]
    try:
        ranks = allocate_ranks(scores, budget, min_rank=config.min_rank, max_rank=caps, multiple_of=config.multiple_of)
    except InfeasibleError as e:
        raise InfeasibleError(_name_modules(str(e), names)) from None
    alphas = allocate_alphas(scores, config.alpha)

    def denominator(r: int) -> float:
        return math.sqrt(r) if config.use_rslora else float(r)

    seed = config.init_seed if config.init_seed is not None else 0

    def mine(name: str, rank: int) -> bool:
        return rank > 0 and (owned is None or name in owned)

    for name, rank in zip(names, ranks):
        if mine(name, rank):
            statistics.prepare(name)

    gradients = statistics.gradients

    def basis(name: str, rank: int) -> Tuple[np.ndarray, np.ndarray, float, bool, Optional[float]]:
        d_in = statistics.shapes[name][1]
        if rank == 0:
            share = None if gradients is None else 0.0
            return np.zeros((0, d_in), dtype=np.float32), np.zeros(0, dtype=np.float32), 0.0, True, share
        weight = modules[name].weight.detach().to(device="cpu", dtype=torch.float32).numpy()
        # The basis is computed in float32 (the weight is); float64 only where the energy is checked exactly. Read
        # straight into float32, a worker holds one f32 matrix per wide module instead of its f64 form plus the f32
        # copy the core would make: LLaMA-shaped down_proj (5632 wide) 127 MiB at its peak, not 381.
        covariance = statistics.covariance(name, "float64" if energy_is_exact(*statistics.shapes[name]) else "float32")
        a, singular = task_aware_basis(
            weight, covariance, rank, oversample=config.oversample, power_iters=config.power_iters, seed=seed
        )
        a = np.ascontiguousarray(a, dtype=np.float32)
        energy, exact = _captured_energy(weight, covariance, a, seed)
        share = None if gradients is None else _gradient_share(gradients.get(name), a)
        return a, np.asarray(singular, dtype=np.float32), energy, exact, share

    todo = sum(1 for n, r in zip(names, ranks) if mine(n, r))
    workers = _basis_workers(basis_workers, todo)
    bar = tqdm(total=todo, unit="module", desc="TLoRA basis", disable=not progress, leave=False)
    with bar, concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowrank-rs-basis") as pool:
        # The core and numpy release the GIL, so modules' bases overlap (the biggest first, so the tail is short);
        # each worker holds one covariance at a time.
        adapted = sorted(
            (i for i, r in enumerate(ranks) if mine(names[i], r)), key=lambda i: -statistics.shapes[names[i]][1]
        )
        futures = {i: pool.submit(basis, names[i], ranks[i]) for i in adapted}
        for future in concurrent.futures.as_completed(futures.values()):
            future.result()
            bar.update(1)
        plans: List[ModulePlan] = []
        for i, (name, rank, alpha, score) in enumerate(zip(names, ranks, alphas, scores)):
            if config.scaling == "reference":
                scale = alpha / denominator(config.r)
            else:
                scale = alpha / denominator(rank) if rank > 0 else 0.0
            a, singular, energy, exact, share = futures[i].result() if i in futures else basis(name, 0)
            if i not in futures and rank > 0:
                share = None  # another rank's module (sharded): its owner's arrives with its basis
            plans.append(
                ModulePlan(
                    name=name,
                    shape=statistics.shapes[name],
                    rank=int(rank),
                    scale=float(scale),
                    alpha=float(alpha),
                    score=float(score),
                    a=a,
                    singular_values=singular,
                    energy=energy,
                    energy_exact=exact,
                    gradient_share=share,
                )
            )
    plan = CalibrationPlan(config, plans, statistics.num_examples, statistics.num_tokens, statistics.covariance_bytes)
    if owned is None:
        warn_low_gradient_share(plan, stacklevel=4)
    return plan


def warn_low_gradient_share(plan: CalibrationPlan, stacklevel: int = 3) -> None:
    """Warn about the adapted modules whose frozen ``A`` holds less than :data:`GRADIENT_SHARE_WARNING` of the
    calibration gradient (nothing when ``A`` trains, or the share was not measured)."""
    if plan.config.train_a:
        return
    low = plan.low_gradient_share()
    if not low:
        return
    shown = ", ".join(f"{n!r} ({100 * float(plan.modules[n].gradient_share or 0):.0f}%)" for n in low[:5])
    more = f" and {len(low) - 5} more" if len(low) > 5 else ""
    warnings.warn(
        f"TLoRA's frozen A holds less than {100 * GRADIENT_SHARE_WARNING:.0f}% of the calibration gradient in "
        f"{len(low)} of {sum(1 for m in plan.modules.values() if m.rank > 0)} adapted modules: {shown}{more}. "
        "Training B alone may plateau there; TLoraConfig(train_a_after=N) lets A train after N steps",
        stacklevel=stacklevel,
    )


def _basis_workers(requested: Optional[int], modules: int) -> int:
    if requested is None:
        requested = default_basis_workers()
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise InvalidArgumentError(f"basis_workers must be a positive integer, not {requested!r}")
    return max(1, min(requested, modules))


def _captured_energy(weight: np.ndarray, covariance: np.ndarray, a: np.ndarray, seed: int) -> Tuple[float, bool]:
    """``(‖W C Aᵀ‖²_F / ‖W C‖²_F, exact)``; see :func:`build_plan` for when the denominator is estimated."""
    d_out, d_in = weight.shape
    exact = energy_is_exact(d_out, d_in)
    dtype = np.float64 if exact else np.float32
    w = weight.astype(dtype, copy=False)
    c = covariance.astype(dtype, copy=False)
    basis = a.astype(dtype, copy=False)
    captured = float(np.sum(np.square(w @ (c @ basis.T)), dtype=np.float64))
    if exact:
        total = float(np.sum(np.square(w @ c), dtype=np.float64))
    else:
        # E‖M g‖² = ‖M‖²_F for g ~ N(0, I); with M = W C (I − AᵀA) only the small residual is left to chance.
        probes = np.random.default_rng(seed).standard_normal((d_in, _ENERGY_PROBES)).astype(dtype)
        probes -= basis.T @ (basis @ probes)
        residual = float(np.sum(np.square(w @ (c @ probes)), dtype=np.float64)) / _ENERGY_PROBES
        total = captured + residual
    # W·C = 0 (a constant input) has no energy to miss.
    return (min(captured / total, 1.0) if total > 0 else 1.0), exact


def _gradient_share(gradient: Optional[torch.Tensor], a: np.ndarray) -> float:
    """``‖G Aᵀ‖²_F / ‖G‖²_F`` (``A``'s rows are orthonormal, so the numerator is ``G``'s energy in their span); with
    a sketch ``Ψ G`` for ``G``, its estimate ``‖Ψ G Aᵀ‖² / ‖Ψ G‖²``."""
    if gradient is None:
        return 1.0  # the module's output never reached the loss: G = 0
    basis = torch.from_numpy(a).to(device=gradient.device, dtype=gradient.dtype)
    inside = float(torch.sum(torch.square(gradient @ basis.T), dtype=torch.float64))
    # Squared block by block: neither the squares nor their float64 cast exist at full size.
    blocks = gradient.reshape(-1).split(_SUM_BLOCK)
    total = float(sum(float(_wide_sum(torch.square(b), torch.float64)) for b in blocks))
    # A module the loss does not depend on has nothing to miss.
    return min(inside / total, 1.0) if total > 0 else 1.0


def _name_modules(message: str, names: Sequence[str]) -> str:
    return re.sub(r"module (\d+)", lambda m: f"module {m.group(1)} ({names[int(m.group(1))]!r})", message)
