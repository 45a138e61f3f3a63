"""LoRATRF's task-aware filter (docs/methods.md): ``h ← h + s(h) · (h C) D`` with ``s(h) = clamp(cos(h, t), 0, 1)``.

A :class:`TaskFilter` is an ``nn.Module`` that maps a hidden state to its filtered version. It does not replace the
layer it filters: :mod:`lowrank_rs.trf` makes it a child of that layer (so its parameters are the layer's, for
``.to()``, ``state_dict``, FSDP wrapping and optimizers) and calls it from a forward hook (layer output) or a forward
pre-hook (linear input). The hooked layer keeps its class, its name and its own parameter names, which is what keeps
the LoRA part's names PEFT's and lets Hugging Face code that inspects its layers run unchanged. The hooks are bound
methods of the filter, so ``copy.deepcopy`` of a model carries them over to the copy's own filters.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import nn

from ...errors import InvalidArgumentError, ShapeError

__all__ = ["TaskFilter"]

# Norms below this count as zero: cos is then 0 instead of 0/0. Real hidden states and task vectors are many orders
# of magnitude larger; the bound also keeps |cos| ≤ 1 for tiny non-zero vectors and every gradient finite.
NORM_EPS = 1e-6


class TaskFilter(nn.Module):
    """One task-aware filter on hidden states of width ``dim``.

    Parameters (in the dtype and on the device given, the site's):

    - ``task_vector``, ``t``: ``[dim]``, standard normal at init (or set by
      :func:`lowrank_rs.trf.init_task_vectors`).
    - ``C``: ``[dim, rank]``, drawn like LoRA's ``A`` (Kaiming-uniform with a = √5 over fan-in ``dim``, i.e.
      ``U(-1/√dim, 1/√dim)``): it is the down-projection of ``T = C D``, as ``A`` is LoRA's.
    - ``D``: ``[rank, dim]``, zero at init, so the filter starts as the identity — exactly, bit for bit.

    ``forward(h)``: ``h`` of shape ``[..., dim]`` (any leading dimensions, every token filtered on its own, so no
    token — padding included — can change another's output) in any float dtype; returns the same shape and dtype.

    - The gate ``s = clamp(cos(h, t), 0, 1)`` is computed in float32 (or wider) as ``(h · t̂) / ‖h‖`` with a unit
      ``t̂``: no intermediate exceeds ``‖h‖``, so fp16 cannot overflow where ``h`` itself does not (``‖h‖²`` would).
      A zero ``h`` or ``t`` gives ``s = 0`` and finite gradients.
    - ``(s h) C D`` is computed as ``((h C) · s) D``: equal up to rounding, and the scaling touches ``rank`` numbers
      per token instead of ``dim``.
    - The parameters are cast to ``h``'s dtype, so a float32 filter works on a bf16 residual stream, and autocast
      picks the matmul precision as usual.
    - No Python branch depends on tensor values, so ``torch.export`` / ``torch.onnx`` trace one graph for every
      input.
    """

    def __init__(
        self,
        dim: int,
        rank: int,
        *,
        site: str = "layer_output",
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        for value, what in ((dim, "dim"), (rank, "rank")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"TaskFilter {what} must be a positive integer, got {value!r}")
        dtype = dtype or torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise InvalidArgumentError(f"TaskFilter needs a floating-point dtype, not {dtype}")
        self.dim = dim
        self.rank = rank
        self.site = site
        self.task_vector = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))
        self.C = nn.Parameter(torch.empty(dim, rank, dtype=dtype, device=device))
        self.D = nn.Parameter(torch.empty(rank, dim, dtype=dtype, device=device))
        self.reset_filter(generator=generator)

    @torch.no_grad()
    def reset_filter(self, generator: Optional[torch.Generator] = None) -> None:
        """``t`` standard normal, ``C`` Kaiming-uniform, ``D = 0``: the filter is the identity again."""
        # Drawn on the CPU in float32 so a seed gives the same filter on every device and in every dtype.
        t = torch.randn(self.dim, generator=generator)
        c = torch.empty(self.rank, self.dim)
        nn.init.kaiming_uniform_(c, a=math.sqrt(5), generator=generator)
        self.task_vector.copy_(t)
        self.C.copy_(c.T)
        self.D.zero_()

    @torch.no_grad()
    def set_task_vector(self, t: Any) -> None:
        """Set ``t`` (``[dim]``, finite, not zero); its dtype and device follow the parameter's."""
        t = torch.as_tensor(t)
        if tuple(t.shape) != (self.dim,):
            raise ShapeError(f"task vector has shape {tuple(t.shape)}; the filter needs [{self.dim}]")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise InvalidArgumentError("a task vector must be a finite floating-point array")
        if float(torch.linalg.vector_norm(t.double())) <= NORM_EPS:
            raise InvalidArgumentError("a task vector must not be zero: cos(h, t) would be 0 for every token")
        self.task_vector.copy_(t)

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """``s = clamp(cos(h, t), 0, 1)``, shape ``h.shape[:-1]``, float32 (float64 for float64 ``h``)."""
        wide = torch.promote_types(h.dtype, torch.float32)
        t = self.task_vector.to(wide)
        t_unit = t / torch.linalg.vector_norm(t).clamp_min(NORM_EPS)
        dot = torch.matmul(h, t_unit.to(h.dtype)).to(wide)
        norm = torch.linalg.vector_norm(h, dim=-1, dtype=wide)
        return (dot / norm.clamp_min(NORM_EPS)).clamp(0.0, 1.0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        s = self.gate(h)
        u = torch.matmul(h, self.C.to(h.dtype))
        delta = torch.matmul(u * s.unsqueeze(-1).to(u.dtype), self.D.to(h.dtype))
        return h + delta.to(h.dtype)

    def delta_matrix(self) -> torch.Tensor:
        """``T = C D`` in float32, ``[dim, dim]``."""
        return self.C.float() @ self.D.float()

    # -- hooks (bound methods, so deepcopy re-binds them to the copied filter) -------------------------------------

    def filter_layer_output(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
        """Forward hook for a transformer layer: filters its output hidden state.

        A layer returns the hidden state itself or a tuple (or list) whose first element it is (Hugging Face layers
        do one or the other); the other elements pass through untouched.
        """
        if isinstance(output, torch.Tensor):
            return self(output)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            rest = list(output[1:])
            if type(output) in (tuple, list):
                return type(output)([self(output[0]), *rest])
        raise InvalidArgumentError(
            f"the filtered layer {type(module).__name__} returned a {type(output).__name__}; a layer-output filter "
            "needs the hidden state or a plain tuple starting with it (use filter_site='linear_input' otherwise)"
        )

    def filter_linear_input(self, module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        """Forward pre-hook for a linear layer: filters its input."""
        if not args or not isinstance(args[0], torch.Tensor):
            raise InvalidArgumentError(
                f"the filtered {type(module).__name__} was called without a positional input tensor; a linear-input "
                "filter needs module(x)"
            )
        return (self(args[0]), *args[1:])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, site={self.site}"
