"""Export hooks of TA-LoRA (docs/methods.md): per adapted attention layer, a gated prompt branch
``tanh(g) · softmax(Q K_iᵀ · scaling) V_i`` added to the output projection's input, ``K_i = k_proj(P_i)``,
``V_i = v_proj(P_i)``, ``P_i = θ0 + (B u_i) v_iᵀ``.

- **merged**: ``K_i`` and ``V_i`` depend on the weights only, so every task's are computed once at export and stored
  as constants ``[T, H_kv, L_p, d_h]``; a required graph input ``task_id`` (int64 ``[batch]``) selects each example's
  rows, so one request may mix tasks. The metadata lists the task names in id order (``OrtModel`` maps
  ``task_ids=`` names to ids with it and refuses ids outside ``[0, T)`` before ONNX Runtime sees them).
- **adapters**: one ``.onnx_adapter`` is one task. Per layer two graph inputs: ``<layer>.prompt`` (``P_i``,
  ``[prompt_<layer>, d]``) and ``<layer>.gate`` (``g``, ``[H]``); the graph computes ``K``, ``V`` through the
  layer's own (base) key and value projections per request, which costs two ``[L_p, d] × [d, d_kv]`` products per
  layer. The defaults are one zero prompt token and a zero gate: ``tanh(0) = 0`` multiplies a finite branch (a
  softmax over one token), so the branch is exactly zero and the graph is the base model. (Not an empty prompt: the
  exporter writes the grouped-query ``repeat_interleave`` as a ``Reshape`` whose 0 entries copy input sizes, so a
  prompt of length 0 fails in ONNX Runtime.) There is no ``task_id`` input: the active adapter is the task, so a
  request has one task; a new task (``lr.add_task``, saved alone with ``lr.save_adapter(model, path,
  tasks=[name])``) is a new adapter file for the same graph.

Both shapes are built from an attached TA-LoRA model (its layers, heads and prompt length); a base model's modules
cannot take TA-LoRA slots through ``targets``.

The branch hooks are bound methods of each :class:`~lowrank_rs.TaLoraLayer` (on the query projection, the
attention module and the output projection), so the replacement of the layer's ``talora`` child does not run by
itself: while bound, it gives the original layer its task ids and a ``branch`` that reads the constants or graph
inputs. The equations are ``TaLoraLayer.branch`` itself, run on those tensors.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ...adapters.peft_format import PEFT_PREFIX
from ...errors import AdapterFormatError, ConfigError, InvalidArgumentError, ShapeError, TaskError
from ...export.methods import EXAMPLE_RANK, TASK_INPUT, GraphInput, GraphInputModule, MethodExport
from .config import PEFT_TYPE, TaLoraConfig
from .layer import TaLoraLayer

__all__ = ["TASK_INPUT", "TaLoraExport", "prompt_input_names"]


def prompt_input_names(layer: str) -> Tuple[str, str]:
    """The graph-input names of a TA-LoRA layer's prompt and gate in an adapters-mode graph."""
    return f"{layer}.prompt", f"{layer}.gate"


def _symbol(layer: str) -> str:
    return "prompt_" + re.sub(r"\W", "_", layer)


class _Branch:
    """``TaLoraLayer.branch`` run on given prompt keys/values and gate instead of the layer's parameters."""

    branch: Any = TaLoraLayer.branch  # Any: typed for TaLoraLayer's self, run on this duck-typed one

    def __init__(self, layer: TaLoraLayer, keys: torch.Tensor, values: torch.Tensor, gate: torch.Tensor) -> None:
        self.num_heads, self.num_kv_heads = layer.num_heads, layer.num_kv_heads
        self.head_dim, self.scaling = layer.head_dim, layer.scaling
        self.gate = gate
        self._kv = (keys, values)

    def prompt_keys_values(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._kv


class _Standin(GraphInputModule):
    """Replaces a layer's ``talora`` child; while bound, the original layer's hooks run ``self.branch``."""

    def __init__(self, layer: TaLoraLayer) -> None:
        super().__init__()
        self._layer = (layer,)  # a tuple, not a submodule: the graph needs only what the stand-in registers
        self._previous: Optional[torch.Tensor] = None

    def task_ids(self, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def branch(self, query: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, feeds: Optional[Mapping[str, torch.Tensor]]) -> None:
        super().bind(feeds)
        layer = self._layer[0]
        if feeds is None:
            layer.__dict__.pop("branch", None)
            layer.task_ids, self._previous = self._previous, None
        else:
            self._previous = layer.task_ids
            layer.task_ids = self.task_ids(feeds)
            layer.branch = self.branch  # type: ignore[method-assign]  # an instance attribute, found first


class MergedPrompts(_Standin):
    """Merged graph: every task's prompt keys/values as constants, rows chosen by the ``task_id`` input."""

    def __init__(self, layer: TaLoraLayer) -> None:
        super().__init__(layer)
        with torch.no_grad():
            keys, values = layer.prompt_keys_values()
        self.register_buffer("keys", keys.detach().clone())
        self.register_buffer("values", values.detach().clone())
        self.gate = layer.gate
        self.num_tasks = len(layer.task_names)

    def graph_inputs(self, model_inputs: Mapping[str, torch.Tensor]) -> List[GraphInput]:
        batch = next(iter(model_inputs.values())).shape[0]
        example = torch.arange(batch, device=self.get_buffer("keys").device) % self.num_tasks
        return [GraphInput(TASK_INPUT, example, {0: "batch"}, None)]

    def task_ids(self, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return feeds[TASK_INPUT]

    def branch(self, query: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        keys, values = self.get_buffer("keys"), self.get_buffer("values")
        return _Branch(self._layer[0], keys, values, self.gate).branch(query, task_ids)


class PromptSlot(_Standin):
    """Adapters graph: one task's prompt and the gate as graph inputs; keys/values through the base projections."""

    def __init__(self, name: str, layer: TaLoraLayer) -> None:
        super().__init__(layer)
        self.prompt_name, self.gate_name = prompt_input_names(name)
        self.symbol = _symbol(name)

    def graph_inputs(self, model_inputs: Mapping[str, torch.Tensor]) -> List[GraphInput]:
        layer = self._layer[0]
        dtype, device = layer.theta0.dtype, layer.theta0.device
        prompt = torch.zeros(EXAMPLE_RANK, layer.hidden_size, dtype=dtype, device=device)
        gate = torch.zeros(layer.num_heads, dtype=dtype, device=device)
        return [
            GraphInput(self.prompt_name, prompt, {0: self.symbol}, torch.zeros(1, layer.hidden_size, dtype=dtype)),
            GraphInput(self.gate_name, gate, {}, torch.zeros(layer.num_heads, dtype=dtype)),
        ]

    def task_ids(self, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # The one task of the adapter, for every example (a 0-d id is expanded to the batch).
        return torch.zeros((), dtype=torch.long, device=self._layer[0].theta0.device)

    def branch(self, query: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        layer = self._layer[0]
        _, _, k_proj, v_proj, _ = layer._site
        prompt = self.feed(self.prompt_name)
        heads = (layer.num_kv_heads, layer.head_dim)
        # [L_p, d] → [1, H_kv, L_p, d_h], as TaLoraLayer.prompt_keys_values lays out one task.
        keys = k_proj(prompt).unflatten(-1, heads).transpose(0, 1).unsqueeze(0)
        values = v_proj(prompt).unflatten(-1, heads).transpose(0, 1).unsqueeze(0)
        return _Branch(layer, keys, values, self.feed(self.gate_name)).branch(query, task_ids)


def _one_task(tasks: Tuple[str, ...], where: str) -> str:
    if len(tasks) != 1:
        raise TaskError(
            f"{where} holds TA-LoRA tasks {list(tasks)}; an .onnx_adapter holds one task's prompts (an adapters-mode "
            "graph has no task_id input: the active adapter is the task). Save each task alone with "
            "lr.save_adapter(model, path, tasks=[name]) and write that directory, or export mode='merged', whose "
            "task_id input selects among all tasks"
        )
    return tasks[0]


def _prompt(theta0: torch.Tensor, b: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``P = θ0 + (B u) vᵀ``, ``[L_p, d]``, in TaLoraLayer.prompts' order of operations, in float32."""
    theta0, b, u, v = (x.detach().float() for x in (theta0, b, u, v))
    weights = u.unsqueeze(0) @ b.transpose(0, 1)
    return (theta0.unsqueeze(0) + weights.unsqueeze(-1) * v.unsqueeze(0).unsqueeze(1))[0]


class TaLoraExport(MethodExport):
    name = "talora"
    module_type = TaLoraLayer
    slots_from_model = True

    def metadata(self, mode: str, modules: Mapping[str, nn.Module]) -> Dict[str, Any]:
        names = {tuple(m.task_names) for m in modules.values() if isinstance(m, TaLoraLayer)}
        if len(names) > 1:
            raise InvalidArgumentError(f"the model's TA-LoRA layers have different tasks {sorted(names)}")
        return {"tasks": list(names.pop())} if names and mode == "merged" else {}

    def merged(self, name: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, TaLoraLayer)
        return MergedPrompts(module)

    def slot(self, name: str, module: nn.Module) -> GraphInputModule:
        assert isinstance(module, TaLoraLayer)
        return PromptSlot(name, module)

    def slot_target(self, name: str, module: nn.Module) -> Optional[str]:
        return (
            f"{name!r} cannot take a TA-LoRA slot by name: TA-LoRA slots come from an attached TA-LoRA model (attach a "
            "TaLoraConfig or load_adapter the adapter first, then export that model with mode='adapters')"
        )

    def model_tensors(self, name: str, module: nn.Module) -> Dict[str, torch.Tensor]:
        assert isinstance(module, TaLoraLayer)
        _one_task(module.task_names, "the model")
        prompt_name, gate_name = prompt_input_names(name)
        with torch.no_grad():
            prompt = module.prompts()[0]
        return {prompt_name: prompt.detach().float(), gate_name: module.gate.detach().float()}

    def file_tensors(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str
    ) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        extras = config.get("lowrank_rs")
        try:
            if config.get("peft_type") != PEFT_TYPE or not isinstance(extras, dict):
                raise AdapterFormatError(
                    f"{where!r}: peft_type {config.get('peft_type')!r} with its lowrank_rs key is not a TA-LoRA file"
                )
            file_config = TaLoraConfig.from_dict(extras["config"])
            layers = [str(m) for m in extras["modules"]]
        except (KeyError, TypeError, ConfigError) as e:
            raise AdapterFormatError(
                f"{where!r}: a malformed TA-LoRA adapter config: {type(e).__name__}: {e}"
            ) from None
        task = _one_task(tuple(file_config.tasks), repr(where))
        used = set()
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for layer in layers:
            keys = {k: f"{PEFT_PREFIX}{layer}.{k}" for k in ("theta0", "B", "gate")}
            keys.update(u=f"{PEFT_PREFIX}{layer}.u.{task}", v=f"{PEFT_PREFIX}{layer}.v.{task}")
            missing = [key for key in keys.values() if key not in tensors]
            if missing:
                raise AdapterFormatError(f"{where!r} lacks tensor {missing[0]!r}")
            t = {k: tensors[key] for k, key in keys.items()}
            length, d = t["theta0"].shape
            if t["B"].shape != (length, file_config.r) or t["u"].shape != (file_config.r,) or t["v"].shape != (d,):
                raise ShapeError(f"{where!r}: the TA-LoRA tensors of {layer!r} do not fit together")
            used |= set(keys.values())
            prompt_name, gate_name = prompt_input_names(layer)
            out[layer] = {prompt_name: _prompt(t["theta0"], t["B"], t["u"], t["v"]), gate_name: t["gate"]}
        rest = {
            (k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k): v for k, v in tensors.items() if k not in used
        }
        return out, rest


TALORA_EXPORTS = (TaLoraExport(),)
