"""The public adapter calls — ``attach``, ``merge``, ``unmerge``, ``save_adapter``, ``load_adapter``,
``adapter_state``, ``adapter_config`` — each a dispatch through the method registry."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Union, cast

import torch
from torch import nn

from ..errors import AdapterFormatError, AdapterStateError, InvalidArgumentError
from ..package import read_adapter
from .peft_format import check_finite_tensors
from .record import require_attachment
from .registry import has_adapter, method_for, method_for_file, method_of, method_or_none

__all__ = [
    "adapter_config",
    "adapter_state",
    "attach",
    "load_adapter",
    "merge",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
]

PathLike = Union[str, "os.PathLike[str]"]


def attach(model: nn.Module, config: Any, **options: Any) -> nn.Module:
    """Adapt ``model`` in place with the method of ``config`` and return it; only the adapter stays trainable.

    ``config`` is any registered method's config — :class:`~lowrank_rs.LoraConfig`, :class:`~lowrank_rs.TLoraConfig`,
    :class:`~lowrank_rs.DoraConfig`, :class:`~lowrank_rs.TrfConfig`, :class:`~lowrank_rs.TaLoraConfig` — or a
    :class:`~lowrank_rs.CalibrationPlan`. ``options`` are the method's own (LoRA's ``ranks``, ``scales`` and ``init_a``
    per module; LoRATRF's ``plan`` and ``batches``); each method documents them on its ``attach``.

    A model that already carries an adapter raises :class:`~lowrank_rs.AdapterStateError`; a target that matches
    nothing raises :class:`~lowrank_rs.TargetError` naming the nearest module names.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"attach needs a torch.nn.Module, not {type(model).__name__}")
    method = method_for(config)
    present = method_or_none(model)
    if has_adapter(model):
        what = f"{present.title} adapters" if present is not None else "adapter modules"
        raise AdapterStateError(f"this model already has an adapter: {what} (attach to a fresh copy of the model)")
    return method.attach(model, config, **options)


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights (``W = W0 + γ B A`` for LoRA, float32 math, the weight's dtype kept).

    Methods that cannot merge (TA-LoRA) raise :class:`~lowrank_rs.AdapterStateError` saying why.
    """
    return method_of(model).merge(model)


def unmerge(model: nn.Module) -> nn.Module:
    """Take a merged adapter out of the base weights again."""
    return method_of(model).unmerge(model)


def adapter_config(model: nn.Module) -> Any:
    """The config the model's adapter was attached (or loaded) with, resolved for the model."""
    return require_attachment(model).config


def adapter_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter's tensors under its file's names (PEFT's for LoRA-shaped methods), ``modules_to_save`` included."""
    return method_of(model).adapter_state(model)


def save_adapter(model: nn.Module, path: PathLike, **options: Any) -> None:
    """Write the attached adapter as a directory, atomically (PEFT's layout where the method has one).

    ``options`` are the method's: ``vllm=True`` for LoRA-shaped methods writes what vLLM can serve; ``tasks=`` for
    TA-LoRA picks the tasks to save.

    Under several processes (``torchrun``) every rank calls it: an FSDP2-sharded model is gathered whole on every
    rank for the duration of the call, rank 0 alone writes, and every rank returns once the directory is there.
    """
    method = method_of(model)
    with _gathered(model) as rank:
        if rank == 0:
            method.save_adapter(model, path, **options)


@contextmanager
def _gathered(model: nn.Module) -> Iterator[int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield 0
        return
    # FSDP2 units hold a shard of each parameter between forwards; unshard() puts the whole tensors back on the
    # module (a collective, so every rank runs it, in module order) and reshard() frees them again.
    units = [
        m for m in model.modules() if callable(getattr(m, "unshard", None)) and callable(getattr(m, "reshard", None))
    ]
    if not units:
        try:
            yield dist.get_rank()
        finally:
            dist.barrier()
        return
    # The writer sees copies: FSDP2 frees the gathered storage on reshard(), which fails once a writer has shared it
    # (numpy views). FSDP2 also hooks state_dict() to hand out shards even while unsharded, and the methods read
    # modules_to_save through state_dict(): those hooks are set aside for the call.
    for unit in units:
        cast(Any, unit).unshard()
    params = {m: dict(m._parameters) for m in model.modules() if m._parameters}
    hooks = {m: m._state_dict_pre_hooks for m in model.modules() if m._state_dict_pre_hooks}
    try:
        for module, own in params.items():
            for key, p in own.items():
                if p is not None:
                    module._parameters[key] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for module in hooks:
            module._state_dict_pre_hooks = type(hooks[module])()
        yield dist.get_rank()
    finally:
        for module, own in params.items():
            module._parameters.update(own)
        for module, saved in hooks.items():
            module._state_dict_pre_hooks = saved
        for unit in units:
            cast(Any, unit).reshard()
        dist.barrier()


def load_adapter(model: nn.Module, path: PathLike) -> nn.Module:
    """Load an adapter directory — ours, or one PEFT's ``save_pretrained`` wrote — into ``model``.

    An unattached model is attached first by the method the file names (or, for PEFT's files, the one that reads
    them); an attached one must have the same adapted modules and ranks, and an adapter of the same method (or of a
    variant of it). Nothing changes in the model when the file does not fit.
    """
    tensors, peft_config = read_adapter(path, framework="torch")
    check_finite_tensors(tensors, os.fspath(path))
    if not isinstance(peft_config, dict):
        raise AdapterFormatError(f"{os.fspath(path)!r}: the adapter config is a JSON {type(peft_config).__name__}")
    in_file = method_for_file(peft_config, path)
    attached = method_or_none(model)
    # Between a method and a variant of it (LoRA and TLoRA, LoRATRF or DoRA) the more specific one reads the file, so
    # that both sides' extra parts (filters, magnitudes) are compared; unrelated methods never share a model.
    if attached is None or isinstance(in_file, type(attached)):
        method = in_file
    elif isinstance(attached, type(in_file)):
        method = attached
    else:
        raise AdapterStateError(
            f"the model has a {attached.title} adapter attached, and {os.fspath(path)!r} is a "
            f"{peft_config.get('peft_type')!r} adapter ({in_file.title}); load it into a fresh copy of the model"
        )
    return method.load_adapter(model, tensors, peft_config, path)


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements that require grad (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
