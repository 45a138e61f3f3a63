"""The LoRA layer (docs/methods.md): a frozen ``nn.Linear`` plus a scaled low-rank update.

Parameter names match Hugging Face PEFT's LoRA layer (``base_layer.weight``, ``lora_A.weight``, ``lora_B.weight``),
so state dicts translate to PEFT's adapter files by adding a prefix and nothing else.

The forward pass runs as one autograd node (:class:`_LoraFunction`) whenever the layer is a plain adapter on a frozen
``nn.Linear``: the update is accumulated into the base output by the GEMM that computes it, with the scale as that
GEMM's ``alpha``, and the input gradients of both branches are summed the same way. That removes every elementwise
pass over a ``[tokens, d_out]`` or ``[tokens, d_in]`` tensor the module-by-module graph makes (PEFT's makes four per
step), and with ``A`` frozen (TLoRA) only ``A x`` is kept for backward, never ``x``. Anything the fused node does
not cover (active dropout, a trainable base layer, hooks on the inner modules, a subclassed base layer, float64 under
autocast) takes the module-by-module path, which is PEFT's.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ...errors import AdapterStateError, InvalidArgumentError, NonFiniteError, ShapeError

__all__ = ["AdapterStateError", "LoraLinear"]


class LoraLinear(nn.Module):
    """``y = base(x) + scaling · B(A(dropout(x)))`` with ``A: [r, d_in]``, ``B: [d_out, r]``.

    ``A`` starts Kaiming-uniform (a = √5, as PEFT and ``nn.Linear``) unless ``init_a`` gives it, ``B`` starts at zero,
    so the layer starts equal to ``base``. ``scaling`` is a plain float per module, which is what lets TLoRA give each
    module its own γ. The adapter takes the base weight's dtype and device; inputs may have any leading dimensions.

    ``merge()`` folds ``scaling · B A`` into the base weight (computed in float32, rounded once to the weight's dtype)
    and ``unmerge()`` takes it out again; while merged the forward pass is the base layer alone. Merging a merged
    layer, or unmerging an unmerged one, raises :class:`AdapterStateError`: doing it silently would either double
    the update or hide a bookkeeping bug in the caller. In 16-bit weights ``unmerge`` restores the base weight up to
    one rounding of the merged weight.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        scaling: float,
        *,
        dropout: float = 0.0,
        freeze_a: bool = False,
        init_a: Optional[Any] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise InvalidArgumentError(f"LoraLinear wraps an nn.Linear, not {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise InvalidArgumentError(f"rank r must be a positive integer, got {r!r}")
        weight = base_layer.weight
        if not weight.is_floating_point():
            raise InvalidArgumentError(
                f"the base layer's weight has dtype {weight.dtype}; LoRA needs a floating-point weight"
            )
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.scaling = float(scaling)
        self.merged = False
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_adapter(init_a=init_a, generator=generator)
        self.lora_A.weight.requires_grad_(not freeze_a)

    @torch.no_grad()
    def reset_adapter(self, init_a: Optional[Any] = None, generator: Optional[torch.Generator] = None) -> None:
        """``A`` from ``init_a`` (``[r, d_in]``) or Kaiming-uniform, ``B = 0``: the layer equals its base again."""
        if self.merged:
            raise AdapterStateError("reset_adapter on a merged layer would leave the old update in the base weight")
        if init_a is None:
            # Drawn on the CPU in float32 so a seed gives the same A on every device and in every dtype.
            a = torch.empty(self.r, self.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        else:
            a = torch.as_tensor(init_a)
            if tuple(a.shape) != (self.r, self.in_features):
                raise ShapeError(
                    f"init_a has shape {tuple(a.shape)}; expected [r, d_in] = [{self.r}, {self.in_features}]"
                )
            if not a.is_floating_point() or not torch.isfinite(a).all():
                raise InvalidArgumentError("init_a must be a finite floating-point array")
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.zero_()

    # Model code sometimes reads `proj.weight` (its dtype, its device); answer as the wrapped layer would, like PEFT.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        dtype = self._fused_dtype(x)
        if dtype is None:
            return self._forward_modules(x)
        base = self.base_layer
        return _LoraFunction.apply(
            x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight, self.scaling, dtype
        )

    def _forward_modules(self, x: torch.Tensor) -> torch.Tensor:
        """The module-by-module graph, in PEFT's operation order (so the two agree to rounding)."""
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def _fused_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype :class:`_LoraFunction` computes in for ``x``, or ``None`` where it would not match the modules.

        Under autocast that is the autocast dtype, which ``F.linear`` casts every non-float64 float input to; else
        every tensor must already share ``x``'s dtype (mixing them is an error the module path reports as usual).
        Runs on every forward, so it is written for speed: plain attribute tests, no generators.
        """
        base = self.base_layer
        lora_a, lora_b = self.lora_A, self.lora_B
        if type(base).forward is not nn.Linear.forward or (self.training and not _is_identity(self.lora_dropout)):
            return None
        # Hooks on the inner modules (tracing, quantisation stubs, user code) expect to see them run.
        if (
            base._forward_hooks
            or base._forward_pre_hooks
            or lora_a._forward_hooks
            or lora_a._forward_pre_hooks
            or lora_b._forward_hooks
            or lora_b._forward_pre_hooks
        ):
            return None
        weight, bias, a, b = base.weight, base.bias, lora_a.weight, lora_b.weight
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return None  # the fused node computes no gradient for the base layer
        if torch.is_autocast_enabled(x.device.type):
            f64 = torch.float64
            if x.dtype == f64 or weight.dtype == f64 or a.dtype == f64 or b.dtype == f64 or not x.is_floating_point():
                return None
            if bias is not None and bias.dtype == f64:
                return None
            return torch.get_autocast_dtype(x.device.type)
        dtype = x.dtype
        if weight.dtype != dtype or a.dtype != dtype or b.dtype != dtype or (bias is not None and bias.dtype != dtype):
            return None
        return dtype if x.is_floating_point() else None

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` in float32, ``[d_out, d_in]``."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merged_base(self) -> torch.Tensor:
        """The base weight ``merge`` would write, in its dtype; NaN or infinity in it raises :class:`NonFiniteError`.

        A non-finite merged weight cannot be unmerged (``inf - inf`` is NaN) and may leave the logits finite, so it
        would poison the model silently and for good.
        """
        if self.merged:
            raise AdapterStateError("this LoRA layer is already merged; unmerge() it first")
        weight = self.base_layer.weight
        merged = (weight.float() + self.delta_weight()).to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise NonFiniteError(
                "merging this LoRA layer would write NaN or infinity into the base weight (non-finite adapter "
                f"weights, or scaling {self.scaling:g} overflowing {weight.dtype})"
            )
        return merged

    def check_merge(self) -> None:
        """Raise what :meth:`merge` would raise, changing nothing."""
        self.merged_base()

    @torch.no_grad()
    def merge(self) -> None:
        self.base_layer.weight.copy_(self.merged_base())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise AdapterStateError("this LoRA layer is not merged; there is nothing to unmerge")
        self._add_to_base(-self.delta_weight())
        self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        weight.copy_((weight.float() + delta).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def _is_identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0)


class _LoraFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + s · h Bᵀ`` with ``h = x Aᵀ``, as one autograd node.

    ``x``: ``[..., d_in]``; ``W``: ``[d_out, d_in]`` and ``b``: ``[d_out]`` or ``None``, both frozen;
    ``A``: ``[r, d_in]``; ``B``: ``[d_out, r]``; ``s``: a float. Everything is computed in ``dtype`` (the autocast
    dtype, or the one all inputs share); gradients are returned in each input's own dtype.

    Backward, with ``G`` the output gradient ``[tokens, d_out]`` and ``D = G B`` (``[tokens, r]``):
    ``∂B = s Gᵀ h``, ``∂A = s Dᵀ x``, ``∂x = G W + s D A`` (one GEMM accumulating into the other). Saved for it:
    ``h`` when ``B`` trains, ``x`` only when ``A`` trains — with ``A`` frozen the layer keeps ``r`` numbers per token
    where the module graph (and PEFT) keep ``d_in``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        x2, w, a, b = (_cast(t, dtype) for t in (x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b))
        h = torch.mm(x2, a.t())
        out = torch.mm(x2, w.t()) if bias is None else torch.addmm(_cast(bias, dtype), x2, w.t())
        # The scale rides on the GEMM (alpha): no pass over a [tokens, d_out] tensor, and three kernels in all.
        out.addmm_(h, b.t(), alpha=scaling)
        # Grad mode is off in here; with it off outside too there is no graph, and ctx goes with its saved tensors.
        wants_x = x.requires_grad
        ctx.save_for_backward(
            x2 if lora_a.requires_grad else None,
            h if lora_b.requires_grad else None,
            w if wants_x else None,
            a if wants_x else None,
            b if wants_x or lora_a.requires_grad else None,
        )
        ctx.scaling = scaling
        ctx.dtypes = (dtype, x.dtype, lora_a.dtype, lora_b.dtype)
        return out.view(*lead, w.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x2, h, w, a, b = ctx.saved_tensors
        dtype, x_dtype, a_dtype, b_dtype = ctx.dtypes
        scaling = ctx.scaling
        lead = grad.shape[:-1]
        g = _cast(grad.reshape(-1, grad.shape[-1]), dtype)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[4]:
            grad_b = _cast(_scaled(torch.mm(g.t(), h), scaling), b_dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            d = torch.mm(g, b)  # [tokens, r]; the scale is applied on the r-wide side of each use
            if ctx.needs_input_grad[3]:
                grad_a = _cast(_scaled(torch.mm(d.t(), x2), scaling), a_dtype)
            if ctx.needs_input_grad[0]:
                grad_x = _cast(torch.mm(g, w).addmm_(d, a, alpha=scaling).view(*lead, w.shape[1]), x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _scaled(t: torch.Tensor, scaling: float) -> torch.Tensor:
    return t if scaling == 1.0 else t.mul_(scaling)
