"""Export hooks of LoRATRF (docs/methods.md): LoRA layers plus task-aware filters ``h ← h + s(h) · (h C) D`` with
``s(h) = clamp(cos(h, t), 0, 1)``.

The LoRA part exports as LoRA does (:mod:`.lora`). A filter cannot fold into a weight (its gate depends on ``h``),
so it stays as graph ops in both shapes:

- **merged**: the LoRA part folded into ``W0``; each filter computes with its trained ``t``, ``C``, ``D`` as
  constants. A layer-output filter runs from its hook on the layer as in torch; a linear-input filter runs in front of
  the merged linear layer that replaces its ``LoraLinear`` (the hook lived on the ``LoraLinear``).
- **adapters**: per filter three graph inputs, named like the filter's parameters (``<host>.trf_filter.task_vector``
  ``[d]``, ``<host>.trf_filter.C`` ``[d, rank_<host>_trf_filter]``, ``<host>.trf_filter.D``
  ``[rank_<host>_trf_filter, d]``, where ``<host>`` is the filtered layer or linear). ``C`` and ``D`` default to
  empty (rank 0), so ``(h C) D`` is an exact zero and the filter is the identity; ``t`` defaults to ones, not zeros,
  so no default can make a norm zero (the gate guards against ``0/0`` anyway, and with rank 0 it multiplies an empty
  tensor). An adapter that supplies only the LoRA part leaves the filters at their defaults.

Filter slots are built from an attached LoRATRF model (the filters' sites and widths come from it). A bare
``nn.Linear`` named by ``targets`` with ``method="loratrf"`` gets a plain LoRA slot.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ...adapters.peft_format import PEFT_PREFIX
from ...export.methods import EMPTY, EXAMPLE_RANK, GraphInput, GraphInputModule, MethodExport
from ..lora.export import LoraExport, rank_symbol
from ..lora.layer import LoraLinear
from .filters import FILTER_ATTR, FILTER_TENSORS, split_tensors
from .layer import TaskFilter

__all__ = ["TrfExport", "filter_input_names"]

_LORA = LoraExport()


def filter_input_names(filter_name: str) -> Tuple[str, str, str]:
    """The graph-input names of the filter module ``filter_name`` (``<host>.trf_filter``): its parameters' names."""
    return tuple(f"{filter_name}.{t}" for t in FILTER_TENSORS)  # type: ignore[return-value]


class _Filter:
    """``TaskFilter``'s own ``gate`` and ``forward`` run on given tensors instead of its parameters (they read
    ``task_vector``, ``C`` and ``D`` only), so the graph computes exactly the torch filter's equations."""

    gate: Any = TaskFilter.gate  # Any: typed for TaskFilter's self, run on this duck-typed one
    forward: Any = TaskFilter.forward

    def __init__(self, t: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> None:
        self.task_vector, self.C, self.D = t, c, d


def _input_filter(module: nn.Module) -> Optional[TaskFilter]:
    """The filter on ``module``'s input when ``module`` is a LoRA layer with one (``filter_site="linear_input"``)."""
    child = module._modules.get(FILTER_ATTR) if isinstance(module, LoraLinear) else None
    return child if isinstance(child, TaskFilter) else None


class FilteredLinear(nn.Module):
    """Merged graph, linear-input site: the filter (trained tensors as constants), then the merged linear layer."""

    def __init__(self, trf_filter: TaskFilter, linear: nn.Module) -> None:
        super().__init__()
        self.trf_filter = trf_filter
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.trf_filter(x))


class FilterSlot(GraphInputModule):
    """A filter whose ``t``, ``C``, ``D`` are graph inputs (see the module docstring); ``forward(h)`` filters ``h``
    ``[..., dim]``."""

    def __init__(self, filter_name: str, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.t_name, self.c_name, self.d_name = filter_input_names(filter_name)
        self.symbol = rank_symbol(filter_name)
        self.dim, self.dtype, self.device = dim, dtype, device

    def graph_inputs(self, model_inputs: Mapping[str, torch.Tensor]) -> List[GraphInput]:
        dtype, device = self.dtype, self.device
        return [
            GraphInput(
                self.t_name, torch.ones(self.dim, dtype=dtype, device=device), {}, torch.ones(self.dim, dtype=dtype)
            ),
            GraphInput(
                self.c_name, torch.zeros(self.dim, EXAMPLE_RANK, dtype=dtype, device=device), {1: self.symbol}, EMPTY
            ),
            GraphInput(
                self.d_name, torch.zeros(EXAMPLE_RANK, self.dim, dtype=dtype, device=device), {0: self.symbol}, EMPTY
            ),
        ]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _Filter(self.feed(self.t_name), self.feed(self.c_name), self.feed(self.d_name)).forward(h)


class LayerFilterSlot(FilterSlot):
    """Adapters graph, layer-output site: stands in for the filter module ``<layer>.trf_filter``.

    The filter runs from a forward hook on its layer, a bound method of the original filter, so swapping the child
    alone would change nothing: while bound, the original filter's ``forward`` is this slot's.
    """

    def __init__(self, filter_name: str, trf_filter: TaskFilter) -> None:
        p = trf_filter.C
        super().__init__(filter_name, trf_filter.dim, p.dtype, p.device)
        self._original = (trf_filter,)  # a tuple, not a submodule: the graph reads inputs, not its parameters

    def bind(self, feeds: Optional[Mapping[str, torch.Tensor]]) -> None:
        super().bind(feeds)
        original = self._original[0]
        if feeds is None:
            original.__dict__.pop("forward", None)
        else:
            original.forward = self.forward  # type: ignore[method-assign]  # an instance attribute, found first


class FilteredLinearSlot(GraphInputModule):
    """Adapters graph, linear-input site: a filter slot, then the LoRA slot of the linear layer."""

    def __init__(self, trf_filter: GraphInputModule, lora: GraphInputModule) -> None:
        super().__init__()
        self.trf_filter = trf_filter
        self.lora = lora

    def graph_inputs(self, model_inputs: Mapping[str, torch.Tensor]) -> List[GraphInput]:
        return self.lora.graph_inputs(model_inputs) + self.trf_filter.graph_inputs(model_inputs)

    def bind(self, feeds: Optional[Mapping[str, torch.Tensor]]) -> None:
        super().bind(feeds)
        self.trf_filter.bind(feeds)
        self.lora.bind(feeds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(self.trf_filter(x))


def _filter_tensors(filter_name: str, f: TaskFilter) -> Dict[str, torch.Tensor]:
    return {n: getattr(f, t).detach().float() for n, t in zip(filter_input_names(filter_name), FILTER_TENSORS)}


class TrfExport(MethodExport):
    """LoRATRF: layer-output filters (``TaskFilter`` modules) and LoRA layers with an input filter; LoRA layers
    without one are LoRA's (this method registers after LoRA, so it is asked first)."""

    name = "loratrf"
    module_type = TaskFilter
    slots_from_model = True

    def claims(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, TaskFilter) or _input_filter(module) is not None

    def merged(self, name: str, module: nn.Module) -> nn.Module:
        f = _input_filter(module)
        if f is None:
            return module  # a layer-output filter: its hook on the layer runs it, constants and all
        return FilteredLinear(f, _LORA.merged(name, module))

    def slot(self, name: str, module: nn.Module) -> GraphInputModule:
        if isinstance(module, TaskFilter):
            return LayerFilterSlot(name, module)
        f = _input_filter(module)
        if f is None:  # a bare nn.Linear target
            return _LORA.slot(name, module)
        p = f.C
        return FilteredLinearSlot(
            FilterSlot(f"{name}.{FILTER_ATTR}", f.dim, p.dtype, p.device), _LORA.slot(name, module)
        )

    def slot_target(self, name: str, module: nn.Module) -> Optional[str]:
        if isinstance(module, nn.Linear):
            return _LORA.slot_target(name, module)
        return (
            f"{name!r} is a {type(module).__name__}: LoRATRF filter slots come from an attached LoRATRF model (attach "
            "a TrfConfig or load_adapter the adapter first, then export that model); targets get LoRA slots on "
            "nn.Linear layers only"
        )

    def model_tensors(self, name: str, module: nn.Module) -> Dict[str, torch.Tensor]:
        if isinstance(module, TaskFilter):
            return _filter_tensors(name, module)
        f = _input_filter(module)
        assert f is not None
        return {**_LORA.model_tensors(name, module), **_filter_tensors(f"{name}.{FILTER_ATTR}", f)}

    def file_tensors(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str
    ) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        extras = config.get("lowrank_rs") if isinstance(config.get("lowrank_rs"), dict) else None
        filters, rest = split_tensors(tensors, extras, PEFT_PREFIX, where)
        modules, saved = _LORA.file_tensors(rest, config, where)
        site = ((extras or {}).get("config") or {}).get("filter_site")
        for host, parts in filters.items():
            filter_name = f"{host}.{FILTER_ATTR}"
            values = {n: parts[t] for n, t in zip(filter_input_names(filter_name), FILTER_TENSORS)}
            if site == "linear_input" or (site is None and host in modules):
                # Keyed by the LoRA layer, as adapter_modules names it in an attached model.
                modules.setdefault(host, {}).update(values)
            else:
                modules[filter_name] = values
        return modules, saved


TRF_EXPORTS = (TrfExport(),)
