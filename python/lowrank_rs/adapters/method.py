"""The ``Method`` interface: everything generic code may ask of an adapter method.

A method is one object, registered once (:func:`lowrank_rs.adapters.registry.register`), that owns its config type,
its modules, attach / merge / unmerge, its adapter-file codec, its training hooks, its export hooks and its recipe
for the fine-tuning job. Generic code (``lr.attach``, ``lr.train``, ``lr.export_onnx``, ``finetune``, the CLI) finds
the method through the registry — by the config's type, the model's attachment record or the file's config — and
never names one. ``docs/architecture.md`` shows how to add one.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from ..errors import AdapterStateError, InvalidArgumentError
from .recipe import Plan, Prepared, Settings

__all__ = ["Method", "TrainingHooks"]

PathLike = Union[str, "os.PathLike[str]"]


class TrainingHooks:
    """What :func:`lowrank_rs.train` asks of an adapted model's method; these defaults add nothing to the loop."""

    def convert_example(self, example: Any, where: str) -> Any:
        """One training example as the loop's collate takes it (TA-LoRA turns a task name into ``task_ids``)."""
        return example

    def param_groups(self, names: Sequence[str]) -> List[Tuple[str, List[str], float]]:
        """Optimizer groups ``(label, parameter names, learning rate)`` among the trainable ``names``; parameters in
        no group take ``TrainConfig.lr``."""
        return []

    def regularizer(self) -> Optional[torch.Tensor]:
        """A term added to each step's loss, or ``None``."""
        return None

    def model_inputs(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """The batch's keys the model's forward takes (a method may consume some itself)."""
        return batch

    def context(self, batch: Mapping[str, Any]) -> Any:
        """A context manager around each forward and backward (TA-LoRA selects the batch's tasks in it)."""
        return nullcontext()

    def before_optimizer_step(self, step: int) -> None:
        """Called once per optimizer step, with its 1-based number, after the step's backward passes and before
        gradient clipping and ``optimizer.step()``: the place to drop (set to ``None``) gradients of parameters that
        must not move yet, which AdamW then skips entirely (no update, no weight decay, no state)."""


class Method:
    """One adapter method. Subclasses set the class attributes and implement what their method supports.

    - ``name``: the registry key, the ``lowrank_rs.method`` of its files and the CLI's ``--method`` value.
    - ``title``: how tables and plots spell it.
    - ``config_type``: its config class (a :class:`~lowrank_rs.config.JsonConfig`); ``accepts``: other objects
      ``lr.attach`` takes for it (TLoRA's calibration plan).
    - ``multitask``: whether its examples carry a task (``task`` or ``task_ids``).
    - ``description``: one line for ``--help``.
    - ``calibrates``: whether it has a calibration step whose plan ``attach`` takes (:meth:`calibrate`).
    - ``default_job_order``: the method's place in the fine-tuning job's default comparison, or ``None``.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    config_type: ClassVar[Type[Any]]
    accepts: ClassVar[Tuple[Type[Any], ...]] = ()
    multitask: ClassVar[bool] = False
    description: ClassVar[str] = ""
    default_job_order: ClassVar[Optional[int]] = None
    calibrates: ClassVar[bool] = False

    # -- the model ------------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module, config: Any, **options: Any) -> nn.Module:
        """Adapt ``model`` in place (record the attachment) and leave only the adapter trainable; returns it."""
        raise NotImplementedError

    def adapter_modules(self, model: nn.Module) -> Dict[str, nn.Module]:
        """This method's modules in ``model``, by name (empty for a model it has not adapted)."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        raise AdapterStateError(f"{self.title} adapters cannot be merged into the base weights")

    def unmerge(self, model: nn.Module) -> nn.Module:
        raise AdapterStateError(f"{self.title} adapters cannot be merged into the base weights, so never unmerged")

    def adapter_state(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The tensors an adapter file of this model holds, under the file's names."""
        raise NotImplementedError

    # -- files ----------------------------------------------------------------------------------------------------

    def save_adapter(self, model: nn.Module, path: PathLike, **options: Any) -> None:
        raise NotImplementedError

    def reads_file(self, peft_config: Mapping[str, Any]) -> bool:
        """Whether this method reads an adapter file that does not name its method (a file PEFT wrote)."""
        return False

    def load_adapter(
        self, model: nn.Module, tensors: Mapping[str, torch.Tensor], peft_config: Mapping[str, Any], path: PathLike
    ) -> nn.Module:
        raise NotImplementedError

    def config_from_dict(self, data: Mapping[str, Any]) -> Any:
        """The config a file records (its ``to_dict`` form)."""
        return self.config_type.from_dict(data)

    # -- training, export, the job -----------------------------------------------------------------------------------

    def training_hooks(self, model: nn.Module) -> TrainingHooks:
        return TrainingHooks()

    def export_hooks(self) -> Sequence[Any]:
        """The :class:`lowrank_rs.export.MethodExport` objects that export this method's modules."""
        return ()

    def prepare(self, model: nn.Module, examples: Sequence[Dict[str, Any]], settings: Settings, pad: int) -> Prepared:
        """The fine-tuning job's recipe: attach (calibrating first where the method needs data) with ``settings``."""
        raise InvalidArgumentError(f"{self.title} has no recipe for the fine-tuning job")

    def calibrate(
        self, model: nn.Module, examples: Sequence[Dict[str, Any]], settings: Settings, pad: int, **limits: Any
    ) -> Plan:
        """The job's calibration step alone (``lowrank-rs calibrate``): a plan to save, print, plot and attach.
        ``limits`` are method-specific bounds (TLoRA: ``budget``, ``min_rank``, ``max_rank``)."""
        raise InvalidArgumentError(f"{self.title} has no calibration step")

    def is_plan(self, config: Mapping[str, Any]) -> bool:
        """Whether a directory whose config is ``config`` holds this method's calibration plan."""
        return False

    def load_plan(self, path: PathLike) -> Plan:
        raise InvalidArgumentError(f"{self.title} has no calibration plans")

    def rank_budget(self, model: nn.Module, prepared: Prepared) -> Optional[int]:
        """The rank budget a results table shows for this adapted model, or ``None``."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
