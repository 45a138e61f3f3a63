"""The TA-LoRA prompt branch of one attention layer (docs/methods.md; the choices are in docs/methods.md, "TA-LoRA").

Per adapted layer: a shared prompt ``θ0: [L_p, d]`` and a shared ``B: [L_p, r]`` (slow weights), per task ``i`` a
rank-1 ``A_i = u_i v_iᵀ`` with ``u_i: [r]`` and ``v_i: [d]`` (fast weights), and a gate ``g: [H]`` at zero. Task
``i``'s prompt is ``P_i = θ0 + B A_i`` and the layer's attention output becomes

    O = softmax(Q Kᵀ/√d_h + M) V + tanh(g) · softmax(Q K_iᵀ/√d_h) V_i,    K_i = k_proj(P_i), V_i = v_proj(P_i)

The first term is the model's own attention, computed by the model's own code (eager, SDPA or any other
implementation); :class:`TaLoraLayer` adds the second through hooks, so no attention code is copied per
``transformers`` version: a forward hook on the query projection keeps ``Q``, a pre-hook on the attention module
keeps the rotary ``(cos, sin)`` it is called with (decoders), and a pre-hook on the output projection adds the branch
to that projection's input, which is the per-head attention output ``[batch, seq, H · d_h]``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ...errors import InvalidArgumentError, ShapeError, TaskError

__all__ = ["TaLoraLayer", "TaskError"]

Rotary = Callable[..., Tuple[torch.Tensor, torch.Tensor]]


class TaLoraLayer(nn.Module):
    """TA-LoRA parameters of one attention layer, and the hooks that add its gated prompt branch.

    Parameters (in the base weight's dtype and on its device):

    - ``theta0``: ``[L_p, d]`` shared prompt, ``N(0, prompt_init_std²)``; ``B``: ``[L_p, r]``, ``N(0, 1)`` (slow).
    - ``u[i]``: ``[r]``, ``N(0, 1/r)``; ``v[i]``: ``[d]``, zero (fast), for task id ``i`` (``task_names[i]``;
      :meth:`task_parameters` finds them by name). ``v = 0`` makes ``A_i = 0``.
    - ``gate``: ``[H]``, zero (slow), so the layer starts as the base layer exactly.

    ``task_ids`` (set by :func:`lowrank_rs.use_tasks`) is a LongTensor ``[batch]`` (or 0-d, for every example) of
    task indices into ``task_names``; a forward without it raises :class:`TaskError`.

    Built by :func:`lowrank_rs.attach` with a :class:`~lowrank_rs.TaLoraConfig`, which then adds the tasks. The
    attention module and its query, key, value and output projections are referenced, not owned: their weights stay
    where the model has them. ``generator`` seeds ``θ0`` and ``B``.
    """

    def __init__(
        self,
        *,
        prompt_length: int,
        r: int,
        attention: nn.Module,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        o_proj: nn.Module,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scaling: float,
        rotary: Optional[Rotary],
        prompt_init_std: float = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        weight: torch.Tensor = k_proj.weight  # type: ignore[assignment]  # an nn.Linear's
        if not weight.is_floating_point():
            raise InvalidArgumentError(
                f"the key projection's weight has dtype {weight.dtype}; TA-LoRA needs floating point"
            )
        if num_heads % num_kv_heads != 0:
            raise ShapeError(f"{num_heads} query heads cannot share {num_kv_heads} key/value heads evenly")
        self.hidden_size = int(weight.shape[1])
        self.prompt_length = prompt_length
        self.r = r
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = float(scaling)
        self.prompt_init_std = float(prompt_init_std)
        factory: Dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
        # Drawn on the CPU in float32, as LoRA's A, so a seed gives the same prompt on every device and in every dtype.
        theta0 = torch.randn(prompt_length, self.hidden_size, generator=generator) * self.prompt_init_std
        self.theta0 = nn.Parameter(theta0.to(**factory))
        self.B = nn.Parameter(torch.randn(prompt_length, r, generator=generator).to(**factory))
        self.gate = nn.Parameter(torch.zeros(num_heads, **factory))
        # Tasks come one by one through add_task, each with its own random stream (see lowrank_rs.methods.talora).
        # Lists by task id rather than dicts by name: a ParameterDict key may not be an attribute name ("train").
        self.u = nn.ParameterList()
        self.v = nn.ParameterList()
        self._task_names: List[str] = []
        # Not submodules: the model owns them, and registering them here would duplicate their weights in state dicts.
        self._site: Tuple[nn.Module, ...] = (attention, q_proj, k_proj, v_proj, o_proj)
        self._rotary = rotary
        self.task_ids: Optional[torch.Tensor] = None
        self._query: Optional[torch.Tensor] = None
        self._rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        # Bound methods, so that copy.deepcopy of the model rebinds them to the copy's layer.
        q_proj.register_forward_hook(self._keep_query)
        if rotary is not None:
            attention.register_forward_pre_hook(self._keep_rotary, with_kwargs=True)
        o_proj.register_forward_pre_hook(self._add_branch)

    # -- tasks ---------------------------------------------------------------------------------------------------------

    @property
    def task_names(self) -> Tuple[str, ...]:
        return tuple(self._task_names)

    def task_parameters(self, name: str) -> Tuple[nn.Parameter, nn.Parameter]:
        """Task ``name``'s ``(u, v)``: ``[r]`` and ``[d]``."""
        if name not in self._task_names:
            raise TaskError(f"task {name!r} is not one of this layer's tasks {self._task_names}")
        index = self._task_names.index(name)
        return self.u[index], self.v[index]

    def fresh_task(self, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """A new task's ``(u, v)``: ``u ~ N(0, 1/r)``, ``v = 0`` (float32, CPU)."""
        return torch.randn(self.r, generator=generator) / math.sqrt(self.r), torch.zeros(self.hidden_size)

    def add_task(self, name: str, u: torch.Tensor, v: torch.Tensor) -> None:
        """Register task ``name`` with fast weights ``u: [r]``, ``v: [d]`` (copied into new parameters)."""
        if name in self._task_names:
            raise TaskError(f"task {name!r} exists already")
        if tuple(u.shape) != (self.r,) or tuple(v.shape) != (self.hidden_size,):
            raise ShapeError(
                f"task {name!r}: u {tuple(u.shape)} and v {tuple(v.shape)} must be [r] = [{self.r}] and "
                f"[d] = [{self.hidden_size}]"
            )
        factory: Dict[str, Any] = {"device": self.theta0.device, "dtype": self.theta0.dtype}
        self.u.append(nn.Parameter(u.detach().to(**factory).clone()))
        self.v.append(nn.Parameter(v.detach().to(**factory).clone()))
        self._task_names.append(name)

    # -- the equations -------------------------------------------------------------------------------------------------

    def fast_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``U: [T, r]`` and ``V: [T, d]``, the tasks' ``u_i`` and ``v_i`` stacked in task order."""
        return torch.stack(list(self.u)), torch.stack(list(self.v))

    def prompts(self) -> torch.Tensor:
        """``P_i = θ0 + B u_i v_iᵀ`` for every task: ``[T, L_p, d]``."""
        u, v = self.fast_weights()
        weights = u @ self.B.transpose(0, 1)  # [T, L_p]: B u_i, the weight of v_i in each prompt row
        return self.theta0.unsqueeze(0) + weights.unsqueeze(-1) * v.unsqueeze(1)

    def prompt_keys_values(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every task's prompt keys and values through the layer's own (frozen) projections, without rotary
        embedding: two ``[T, H_kv, L_p, d_h]`` tensors.

        This is the only part of the branch that depends on the adapter weights alone, so a deployment can compute
        it once per task and select rows by task id.
        """
        _, _, k_proj, v_proj, _ = self._site
        prompts = self.prompts()
        shape = (prompts.shape[0], self.prompt_length, self.num_kv_heads, self.head_dim)
        keys = k_proj(prompts).view(shape).transpose(1, 2)
        values = v_proj(prompts).view(shape).transpose(1, 2)
        return keys, values

    def branch(self, query: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """``tanh(g) · softmax(Q K_iᵀ · scaling) V_i`` for queries ``[batch, H, seq, d_h]`` (rotary applied where the
        model applies it) and task ids ``[batch]``: ``[batch, seq, H · d_h]``, in the query's dtype.

        No mask: every query sees all ``L_p`` prompt tokens, as a prefix the causal mask never hides. The softmax is
        taken in float32, as transformers' eager attention does.
        """
        keys, values = self.prompt_keys_values()
        keys = keys.index_select(0, task_ids)
        values = values.index_select(0, task_ids)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            # Query head h reads key/value head h // groups (transformers' repeat_kv).
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, keys.transpose(-1, -2).to(query.dtype)) * self.scaling
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        out = torch.matmul(probs, values.to(query.dtype))
        out = out * torch.tanh(self.gate).to(query.dtype).view(1, -1, 1, 1)
        return out.transpose(1, 2).reshape(query.shape[0], query.shape[2], self.num_heads * self.head_dim)

    def orthogonality(self) -> torch.Tensor:
        """``Σ_{i≠j} ‖A_iᵀ A_j‖²_F`` over this layer's tasks, in float32: for rank-1 ``A_i = u_i v_iᵀ`` it is
        ``Σ_{i≠j} (u_i·u_j)² ‖v_i‖² ‖v_j‖²`` (zero for a single task)."""
        u, v = self.fast_weights()
        u, v = u.float(), v.float()
        gram = u @ u.transpose(0, 1)
        norms = (v * v).sum(dim=1)
        pairs = gram.square() * (norms.unsqueeze(0) * norms.unsqueeze(1))
        return pairs.sum() - pairs.diagonal().sum()

    # -- hooks ---------------------------------------------------------------------------------------------------------

    def _keep_query(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._query = output

    def _keep_rotary(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        rope = kwargs.get("position_embeddings")
        if rope is None and len(args) > 1:
            rope = args[1]
        if rope is None:
            raise InvalidArgumentError(
                f"{type(module).__name__} was called without position_embeddings; TA-LoRA needs the rotary (cos, sin) "
                "the model applies to its queries"
            )
        self._rope = rope

    def _add_branch(self, module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        query, self._query = self._query, None
        rope, self._rope = self._rope, None
        if self.task_ids is None:
            raise TaskError(
                f"this model has TA-LoRA prompts for tasks {list(self.task_names)}, and every forward needs each "
                "example's task: run it inside `with lowrank_rs.use_tasks(model, task_ids):` (lowrank_rs.train "
                "takes them from each batch's task_ids)"
            )
        if query is None:
            raise InvalidArgumentError(
                "TA-LoRA: the output projection ran without its query projection in the same forward"
            )
        attn_output = args[0]
        batch, seq = attn_output.shape[0], attn_output.shape[1]
        query = query.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        if self._rotary is not None:
            assert rope is not None
            cos, sin = rope
            query = self._rotary(query, query, cos, sin)[0]
        task_ids = self.task_ids.to(attn_output.device)
        if task_ids.dim() == 0:
            task_ids = task_ids.expand(batch)
        elif task_ids.shape[0] != batch:
            raise TaskError(f"task ids are given for {task_ids.shape[0]} examples, but the batch has {batch}")
        out = self.branch(query, task_ids)
        return (attn_output + out.to(attn_output.dtype), *args[1:])

    def extra_repr(self) -> str:
        return (
            f"tasks={list(self.task_names)}, prompt_length={self.prompt_length}, r={self.r}, d={self.hidden_size}, "
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}"
        )
