"""Export hooks of LoRA and TLoRA (one module type, :class:`~lowrank_rs.LoraLinear`; TLoRA only differs in
per-module ranks and scales and a frozen ``A``, none of which changes the graph).

Merged graph: each adapted linear layer becomes a linear layer with ``W = W0 + γ B A`` (float32 math, rounded once
to the weight's dtype), so the graph is the base model's graph with other weights.

Adapter-attached graph: each adapted (or targeted) linear layer computes ``x W0ᵀ + b + (x A') B'`` with two graph
inputs per module, named ``<module>.lora_A`` (``A' = Aᵀ``, ``[d_in, r]``) and ``<module>.lora_B``
(``B' = γ Bᵀ``, ``[r, d_out]``): the scale is folded into ``B'`` and the factors are stored in the orientation
the graph multiplies in, so the graph does no transposes at run time. Each module has its own rank symbol
(``rank_<module>``); the defaults are empty (``[d_in, 0]`` and ``[0, d_out]``), for which the update is exactly zero.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...export.methods import EMPTY, EXAMPLE_RANK, GraphInput, GraphInputModule, MethodExport
from .codec import UNSUPPORTED_PEFT_FIELDS, check_lora_file, ranks_and_scales, split_factors
from .layer import LoraLinear

__all__ = ["LORA_EXPORT", "LoraExport", "lora_input_names", "rank_symbol"]


def lora_input_names(module: str) -> Tuple[str, str]:
    """The graph-input names of ``module``'s factors in an adapter-attached graph."""
    return f"{module}.lora_A", f"{module}.lora_B"


def rank_symbol(module: str) -> str:
    # torch.export names dimensions by Python identifiers.
    return "rank_" + re.sub(r"\W", "_", module)


class MergedLinear(nn.Module):
    """``F.linear`` with a merged weight and the base layer's own bias: the base graph's ops, other weights."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class LoraSlot(GraphInputModule):
    """``base(x) + (x A') B'`` with ``A'`` and ``B'`` read from graph inputs (see the module docstring)."""

    def __init__(self, name: str, base: nn.Linear, symbol: str) -> None:
        super().__init__()
        self.base_layer = base
        self.a_name, self.b_name = lora_input_names(name)
        self.symbol = symbol

    def graph_inputs(self, model_inputs: Mapping[str, torch.Tensor]) -> List[GraphInput]:
        w = self.base_layer.weight
        a = torch.zeros(w.shape[1], EXAMPLE_RANK, dtype=w.dtype, device=w.device)
        b = torch.zeros(EXAMPLE_RANK, w.shape[0], dtype=w.dtype, device=w.device)
        return [
            GraphInput(self.a_name, a, {1: self.symbol}, EMPTY),
            GraphInput(self.b_name, b, {0: self.symbol}, EMPTY),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (x @ self.feed(self.a_name)) @ self.feed(self.b_name)


def graph_factors(a: torch.Tensor, b: torch.Tensor, gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(Aᵀ, γ Bᵀ)`` in float32 from ``A: [r, d_in]``, ``B: [d_out, r]``: what an adapter-attached graph reads."""
    return a.detach().float().t().contiguous(), (b.detach().float() * gamma).t().contiguous()


class LoraExport(MethodExport):
    name = "lora"
    module_type = LoraLinear

    def merged(self, name: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, LoraLinear)
        base = module.base_layer
        if module.merged:  # the update is in the base weight already
            return base
        weight = (base.weight.detach().float() + module.delta_weight()).to(base.weight.dtype)
        return MergedLinear(weight, base.bias)

    def slot(self, name: str, module: nn.Module) -> GraphInputModule:
        base = module.base_layer if isinstance(module, LoraLinear) else module
        assert isinstance(base, nn.Linear)
        return LoraSlot(name, base, rank_symbol(name))

    def slot_target(self, name: str, module: nn.Module) -> Optional[str]:
        if not isinstance(module, nn.Linear):
            return f"{name!r} is a {type(module).__name__}; LoRA slots go on nn.Linear layers"
        if not module.weight.is_floating_point():
            return f"{name!r} has a {module.weight.dtype} weight; LoRA slots need a floating-point weight"
        return None

    def model_tensors(self, name: str, module: nn.Module) -> Dict[str, torch.Tensor]:
        assert isinstance(module, LoraLinear)
        if module.merged:
            # The graph's base weights are the merged ones already; feeding the factors again would double the update.
            return {}
        a, b = graph_factors(module.lora_A.weight, module.lora_B.weight, module.scaling)
        a_name, b_name = lora_input_names(name)
        return {a_name: a, b_name: b}

    def file_tensors(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str
    ) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        check_lora_file(config, where, UNSUPPORTED_PEFT_FIELDS, "LoRA")
        extras = config.get("lowrank_rs") if isinstance(config.get("lowrank_rs"), dict) else None
        factors, _, rest = split_factors(tensors)
        vllm = bool(extras and extras.get("vllm"))
        ranks, gammas = ranks_and_scales(factors, config, extras if vllm else None)
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for name, (a, b) in factors.items():
            r = ranks[name]
            a_name, b_name = lora_input_names(name)
            a_t, b_t = graph_factors(a[:r], b[:, :r], gammas[name])
            out[name] = {a_name: a_t, b_name: b_t}
        return out, rest


LORA_EXPORT = LoraExport()
