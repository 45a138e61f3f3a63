"""What each adapter method contributes to an ONNX export: the one place a method plugs into ``export_onnx``.

An export swaps modules of the torch model for export-time replacements, traces the model, and puts the original
modules back. A method says, through the :class:`MethodExport` objects its ``Method.export_hooks()`` returns:

- ``merged(name, module)``: the replacement in a merged graph (LoRA: a plain linear layer with ``W0 + γ B A``).
- ``slot(name, module)``: the replacement in an adapter-attached graph, a :class:`GraphInputModule` that reads its
  adapter tensors from graph inputs, so ONNX Runtime can feed them from an ``.onnx_adapter`` file per request.
- ``model_tensors`` / ``file_tensors``: the values of those graph inputs for an attached adapter, or for an adapter
  directory's tensors; these are what an ``.onnx_adapter`` file holds.

A replacement that reads graph inputs declares them as :class:`GraphInput` s: each has a name, an example value to
trace with, its dynamic axes (each with its own symbol) and a default. With ``default=EMPTY`` the exported graph
gets an initializer of size zero along the dynamic axes under the input's name, which makes the input optional:
ONNX Runtime runs the default when no adapter supplies a value. ``default=None`` makes the input required (a
``task_id``, say); a tensor default makes it an overridable initializer holding that tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch
from torch import nn

from ..adapters.registry import method_for_file as registry_method_for_file
from ..adapters.registry import method_named as registry_method_named
from ..adapters.registry import methods
from ..errors import ExportError, InvalidArgumentError

__all__ = [
    "EMPTY",
    "EXAMPLE_RANK",
    "TASK_INPUT",
    "GraphInput",
    "GraphInputModule",
    "MethodExport",
    "adapter_modules",
    "method_for_file",
    "method_named",
    "registered_methods",
]

EMPTY = "empty"

# The graph input multi-task graphs select a task with ([batch] task indices).
TASK_INPUT = "task_id"

# Dynamic axes are traced at this size: torch.export would specialise a size of 0 or 1 into a constant.
EXAMPLE_RANK = 2

Default = Union[None, str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class GraphInput:
    """One graph input a replacement module reads.

    - ``name``: the graph input's name (and the parameter name in ``.onnx_adapter`` files).
    - ``example``: a value to trace with, in the graph's dtype and on the model's device. Dynamic axes should not
      have size 0 or 1 here: torch.export specialises those sizes into constants.
    - ``dynamic``: axis → symbol. Give every independent size its own symbol; axes that must agree share one.
      ``"batch"`` and ``"sequence"`` are the model inputs' axes 0 and 1 (size the example from ``model_inputs``).
    - ``default``: :data:`EMPTY` (an initializer of size 0 along every dynamic axis), a tensor (an overridable
      initializer with that value), or ``None`` (a required input).
    """

    name: str
    example: torch.Tensor
    dynamic: Mapping[int, str] = dataclasses.field(default_factory=dict)
    default: Default = EMPTY

    def empty_default(self) -> torch.Tensor:
        shape = [0 if axis in self.dynamic else n for axis, n in enumerate(self.example.shape)]
        return torch.zeros(shape, dtype=self.example.dtype)


class GraphInputModule(nn.Module):
    """A replacement module that reads graph inputs: declare them in ``graph_inputs``, read them with ``feed``.

    The export wrapper binds the traced inputs before it runs the model and unbinds them afterwards, so a forward
    outside an export raises instead of silently running without the adapter.
    """

    def __init__(self) -> None:
        super().__init__()
        self._feeds: Optional[Mapping[str, torch.Tensor]] = None

    def graph_inputs(self, model_inputs: Mapping[str, torch.Tensor]) -> List[GraphInput]:
        """The graph inputs this module reads; ``model_inputs`` are the export's example model inputs."""
        raise NotImplementedError

    def bind(self, feeds: Optional[Mapping[str, torch.Tensor]]) -> None:
        self._feeds = feeds

    def feed(self, name: str) -> torch.Tensor:
        if self._feeds is None:
            raise InvalidArgumentError(
                f"{type(self).__name__} runs only inside export_onnx (its graph inputs are not bound)"
            )
        return self._feeds[name]


class MethodExport:
    """Base class of a method's export hooks; a method's ``export_hooks()`` returns its instances.

    - ``name``: the method name users pass to ``export_onnx(method=...)`` for a base model's adapter slots.
    - ``module_type``: the method's adapter module class, found in models by ``isinstance`` (see :meth:`claims`).
    - ``internal_children``: the adapter module's submodules are its own parts (base layer, factors), never
      targets of a slot themselves. Set it False for an adapter module that wraps a whole block whose inner
      layers may carry adapters of their own; those are then found and swapped too (innermost first).
    - ``slots_from_model``: the slots are shaped by an attached adapter (LoRATRF's filters, TA-LoRA's prompts), not
      by module names alone, so ``lowrank-rs export adapters --adapter DIR`` attaches the first adapter and exports
      that model (with the base model's values as the defaults of saved modules).
    """

    name: ClassVar[str] = ""
    module_type: ClassVar[Type[nn.Module]] = nn.Module
    internal_children: ClassVar[bool] = True
    slots_from_model: ClassVar[bool] = False

    def claims(self, name: str, module: nn.Module) -> bool:
        """Whether ``module`` is one of this method's adapter modules; by default, an instance of ``module_type``.

        Methods are asked latest-registered first, so a method that takes over some of another method's modules
        (LoRATRF: the LoRA layers whose input it filters) registers after it.
        """
        return isinstance(module, self.module_type)

    def metadata(self, mode: str, modules: Mapping[str, nn.Module]) -> Dict[str, Any]:
        """Entries for the graph's ``lowrank_rs`` metadata (TA-LoRA: the task names a ``task_id`` input indexes),
        given the export ``mode`` and this method's adapter modules by name."""
        return {}

    def merged(self, name: str, module: nn.Module) -> nn.Module:
        """The module that replaces ``module`` in a merged graph (a :class:`GraphInputModule` if it needs inputs)."""
        raise NotImplementedError

    def slot(self, name: str, module: nn.Module) -> GraphInputModule:
        """The module that replaces ``module`` in an adapter-attached graph.

        ``module`` is either one of this method's adapter modules or a bare base module named by ``targets`` when a
        base model is exported; the slot computes the base module's output when its inputs hold their defaults.
        """
        raise NotImplementedError

    def slot_target(self, name: str, module: nn.Module) -> Optional[str]:
        """Why a bare module named by ``targets`` cannot take a slot of this method, or ``None`` if it can."""
        return None

    def model_tensors(self, name: str, module: nn.Module) -> Dict[str, torch.Tensor]:
        """The slot's graph-input values for ``module``'s current adapter (one of this method's modules)."""
        raise NotImplementedError

    def file_tensors(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str
    ) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        """Split an adapter directory's tensors and config (as ``read_adapter`` returns them) into the slot
        graph-input values of each adapted module (module → input name → value) and the rest: ``modules_to_save``
        states keyed by parameter name without PEFT's prefix."""
        raise NotImplementedError


def registered_methods() -> List[MethodExport]:
    """Every registered method's export hooks, in registration order (each once)."""
    hooks: List[MethodExport] = []
    for method in methods():
        hooks.extend(h for h in method.export_hooks() if h not in hooks)
    return hooks


def method_named(name: str) -> MethodExport:
    """The export hooks of the method called ``name`` (``export_onnx(method=...)``)."""
    hooks = list(registry_method_named(name).export_hooks())
    if not hooks:
        raise ExportError(f"adapter method {name!r} has no ONNX export")
    return hooks[0]


def method_for_file(config: Mapping[str, Any], where: str) -> MethodExport:
    """The export hooks of the method that reads an adapter directory with this config."""
    method = registry_method_for_file(config, where)
    hooks = list(method.export_hooks())
    if not hooks:
        exportable = sorted(m.name for m in methods() if m.export_hooks())
        raise ExportError(
            f"{where!r} holds a {method.name!r} adapter, which has no ONNX export; exportable: {exportable}"
        )
    return hooks[0]


def adapter_modules(model: nn.Module) -> Dict[str, Tuple[MethodExport, nn.Module]]:
    """Every adapter module of a registered method in ``model`` with its method's hooks, by module name.

    Hooks are asked latest-registered first, so a method that takes over some of another method's modules (LoRATRF:
    the LoRA layers whose input it filters; DoRA: its LoRA-layer subclass) registers after it.
    """
    hooks = registered_methods()
    found: Dict[str, Tuple[MethodExport, nn.Module]] = {}
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") and hook.internal_children for outer, (hook, _) in found.items()):
            continue
        for hook in reversed(hooks):
            if hook.claims(name, module):
                found[name] = (hook, module)
                break
    return found
