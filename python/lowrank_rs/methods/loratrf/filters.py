"""LoRATRF's filters on a model (docs/methods.md): where filters go, how they are built, hooked, initialised, saved.

Users reach all of it through the one adapter code path — :func:`lowrank_rs.attach` with a
:class:`~lowrank_rs.TrfConfig`, then ``train``, ``save_adapter``, ``load_adapter``, ``merge`` — plus two
functions of their own here: :func:`trf_filters` (the filters of a model) and :func:`init_task_vectors` (``t`` from
the mean hidden state of calibration batches).

**Where a filter lives.** A :class:`~lowrank_rs.TaskFilter` becomes the child ``trf_filter`` of the module it
filters and runs from a hook on that module: a forward hook on a transformer layer (``filter_site="layer_output"``),
or a forward pre-hook on a LoRA-adapted linear, the :class:`~lowrank_rs.LoraLinear` (``"linear_input"``). Nothing
is wrapped or renamed, so the LoRA part keeps PEFT's names, and the filter's parameters are
``<module>.trf_filter.{task_vector,C,D}`` in ``named_parameters`` and in ``state_dict``. Merging the LoRA part leaves
the filter where it is: its gate depends on ``h``, so it cannot fold into a weight.

**Adapter files.** The filters' tensors go into the same ``adapter_model.safetensors`` as the LoRA factors, named
``base_model.model.<module>.trf_filter.<parameter>`` (the prefix PEFT gives every adapter tensor), and the config's
``lowrank_rs`` key describes them under ``"filters"``: ``{module: {"dim": d, "rank": r_f}}``. PEFT's loader ignores
tensors that match no module of its model, so PEFT and tools built on it load the LoRA part alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from collections.abc import Mapping as MappingABC
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ...adapters.seeding import generator_for
from ...errors import (
    AdapterFormatError,
    AdapterStateError,
    ConfigError,
    EmptyInputError,
    InvalidArgumentError,
    ShapeError,
    TargetError,
)
from ...training.collate import batch_iterator
from ..lora.layer import LoraLinear
from .config import TrfConfig
from .layer import NORM_EPS, TaskFilter

__all__ = [
    "FILTER_ATTR",
    "FILTER_TENSORS",
    "FilterSite",
    "build_filters",
    "check_weights",
    "describe",
    "expected_filters",
    "filter_state",
    "init_task_vectors",
    "install",
    "load_weights",
    "present_filters",
    "resolve",
    "split_tensors",
    "trf_filters",
]

PathLike = Union[str, "os.PathLike[str]"]

FILTER_ATTR = "trf_filter"
FILTER_TENSORS = ("task_vector", "C", "D")

# Architecture families with a default LoRA part (docs/methods.md). Encoders: the value projection's leaf name.
_ENCODER_VALUE = {
    "bert": "value",
    "roberta": "value",
    "xlm-roberta": "value",
    "electra": "value",
    "deberta-v2": "value_proj",
}
_DECODERS = ("llama", "mistral", "qwen2", "qwen3")
_DECODER_TARGETS = ("o_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class FilterSite:
    """Where one filter goes: ``module`` (a layer, or an adapted linear), its width ``dim`` and its layer index."""

    module: str
    dim: int
    layer: int


# --- config resolution ----------------------------------------------------------------------------------------------


def resolve(config: TrfConfig, model: nn.Module) -> TrfConfig:
    """``config`` with what it left to the model filled in: targets, ``r``, ``alpha`` (see :class:`TrfConfig`) and
    ``filter_layers`` (every layer). Raises :class:`~lowrank_rs.TargetError` for a model without default
    targets when ``target_modules`` is unset, or for a filter layer the model does not have."""
    if not isinstance(config, TrfConfig):
        raise ConfigError(f"resolve needs a TrfConfig, not {type(config).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    decoder = model_type in _DECODERS
    targets = config.target_modules
    if targets is None:
        if model_type in _ENCODER_VALUE:
            value = _ENCODER_VALUE[model_type]
            targets = rf"(?:.*\.)?layer\.\d+\.(?:attention\.self\.{value}|intermediate\.dense|output\.dense)"
        elif decoder:
            targets = _DECODER_TARGETS
        else:
            known = sorted(_ENCODER_VALUE) + list(_DECODERS)
            raise TargetError(
                f"TrfConfig has no default targets for model_type {model_type!r} (defaults exist for {known}); "
                "set target_modules"
            )
    r = config.r if config.r is not None else (32 if decoder else 8)
    alpha = config.alpha if config.alpha is not None else 2.0 * r
    _, layers = layer_stack(model, config.layers_module)
    filter_layers = config.filter_layers if config.filter_layers is not None else tuple(range(len(layers)))
    outside = [i for i in filter_layers if i >= len(layers)]
    if outside:
        raise TargetError(
            f"filter_layers names layer {outside[0]}, but the model has {len(layers)} layers (0 to {len(layers) - 1})"
        )
    return dataclasses.replace(config, target_modules=targets, r=r, alpha=alpha, filter_layers=filter_layers)


# --- layers and sites -----------------------------------------------------------------------------------------------


def layer_stack(model: nn.Module, layers_module: Optional[str] = None) -> Tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of transformer layers, and its name: ``layers_module`` (a name or name suffix) or the one
    list of identical modules with ``model.config.num_hidden_layers`` entries."""
    modules = dict(model.named_modules())
    if layers_module is not None:
        hits = [n for n in modules if n == layers_module or n.endswith("." + layers_module)]
        if len(hits) != 1 or not isinstance(modules[hits[0]], nn.ModuleList):
            found = f"matches {hits[:5]}" if hits else "matches no module"
            raise TargetError(
                f"layers_module {layers_module!r} {found}; it must name one nn.ModuleList, e.g. "
                f"{_module_lists(modules)[:5]}"
            )
        return hits[0], modules[hits[0]]
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        n
        for n in _module_lists(modules)
        if len({type(m) for m in modules[n]}) == 1 and (not isinstance(count, int) or len(modules[n]) == count)
    ]
    if len(candidates) != 1:
        what = "no nn.ModuleList" if not candidates else f"{len(candidates)} nn.ModuleLists ({candidates[:5]})"
        raise TargetError(
            f"found {what} of identical layers"
            + (f" with num_hidden_layers = {count} entries" if isinstance(count, int) else "")
            + "; set TrfConfig.layers_module to the list of transformer layers"
        )
    return candidates[0], modules[candidates[0]]


def _module_lists(modules: Mapping[str, nn.Module]) -> List[str]:
    return [n for n, m in modules.items() if n and isinstance(m, nn.ModuleList) and len(m) > 0]


def filter_sites(
    model: nn.Module, config: TrfConfig, adapted: Sequence[str], kept: Sequence[str] = ()
) -> List[FilterSite]:
    """The filters a resolved ``config`` puts on ``model``, whose LoRA-adapted linears are ``adapted``."""
    if not config.resolved:
        raise ConfigError("filter_sites needs a resolved TrfConfig (lowrank_rs.trf.resolve)")
    stack, layers = layer_stack(model, config.layers_module)
    modules = dict(model.named_modules())
    sites: List[FilterSite] = []
    for i in config.filter_layers or ():
        if i >= len(layers):
            raise TargetError(f"filter_layers names layer {i}, but the model has {len(layers)} layers")
        layer = f"{stack}.{i}"
        if config.filter_site == "layer_output":
            # The filter would be saved twice, once as part of the whole module.
            saved = [k for k in kept if layer == k or layer.startswith(k + ".")]
            if saved:
                raise TargetError(
                    f"layer {layer!r} would get a filter, but modules_to_save saves {saved[0]!r} whole; leave the "
                    "layer out of filter_layers or out of modules_to_save"
                )
            sites.append(FilterSite(layer, _hidden_size(model), i))
            continue
        linears = [n for n in adapted if n.startswith(layer + ".")]
        if not linears:
            raise TargetError(
                f"filter_site='linear_input' filters the inputs of LoRA-adapted linears, and layer {i} ({layer!r}) has "
                "none; leave it out of filter_layers"
            )
        for name in linears:
            module = modules[name]
            base = module.base_layer if isinstance(module, LoraLinear) else module
            sites.append(FilterSite(name, int(base.in_features), i))
    return sites


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, numbers.Integral) and not isinstance(size, bool) and int(size) > 0:
        return int(size)
    raise TargetError("filter_site='layer_output' needs model.config.hidden_size, the width of the layers' outputs")


# --- building and installing ----------------------------------------------------------------------------------------


def build_filters(
    model: nn.Module, config: TrfConfig, adapted: Sequence[str], kept: Sequence[str], batches: Any
) -> Dict[str, TaskFilter]:
    """The filters of a resolved ``config``, initialised, not yet in the model (which it does not change).

    ``task_vector_init="mean"`` runs the model on ``batches`` first: with ``D = 0`` and ``B = 0`` at init the hidden
    states at every site are the same with or without the adapters, so the means are taken on the bare model.
    """
    mean = config.task_vector_init == "mean"
    if mean and batches is None:
        raise ConfigError(
            "task_vector_init='mean' takes t from calibration hidden states: pass attach(model, config, batches=...) "
            "(an iterable of batch dicts as the model takes them)"
        )
    if not mean and batches is not None:
        raise InvalidArgumentError("batches are used by task_vector_init='mean' only; this config's init is 'normal'")
    modules = dict(model.named_modules())
    filters: Dict[str, TaskFilter] = {}
    for site in filter_sites(model, config, adapted, kept):
        host = modules[site.module]
        if hasattr(host, FILTER_ATTR):
            raise AdapterStateError(f"{site.module!r} already has an attribute {FILTER_ATTR!r}")
        reference = _reference_parameter(host)
        filters[site.module] = TaskFilter(
            site.dim,
            config.filter_rank,
            site=config.filter_site,
            dtype=reference.dtype if reference is not None else None,
            device=reference.device if reference is not None else None,
            # One stream per filter, from the seed and the filtered module's name (the LoRA factors use others).
            generator=generator_for(config.init_seed, f"{site.module}:{FILTER_ATTR}"),
        )
    if mean:
        kind = "output" if config.filter_site == "layer_output" else "input"
        means = _site_means(model, {name: (modules[name], kind) for name in filters}, batches)
        for name, f in filters.items():
            f.set_task_vector(_scaled_mean(means[name], name))
    return filters


def install(model: nn.Module, filters: Mapping[str, TaskFilter]) -> None:
    """Make each filter the child ``trf_filter`` of its module and hook it in (after the LoRA part is in place)."""
    for name, f in filters.items():
        host = model.get_submodule(name)
        host.add_module(FILTER_ATTR, f)
        if f.site == "layer_output":
            host.register_forward_hook(f.filter_layer_output)
        else:
            host.register_forward_pre_hook(f.filter_linear_input)


def trf_filters(model: nn.Module) -> Dict[str, TaskFilter]:
    """Every :class:`~lowrank_rs.TaskFilter` of ``model``, keyed by the name of the module it filters."""
    suffix = "." + FILTER_ATTR
    return {
        (n[: -len(suffix)] if n.endswith(suffix) else n): m
        for n, m in model.named_modules()
        if isinstance(m, TaskFilter)
    }


def _reference_parameter(module: nn.Module) -> Optional[torch.Tensor]:
    # The filter takes the dtype and device of the weights around it, as LoraLinear takes its base layer's.
    base = module.base_layer if isinstance(module, LoraLinear) else module
    return next((p for p in base.parameters() if p.is_floating_point()), None)


# --- task-vector init -----------------------------------------------------------------------------------------------


def init_task_vectors(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> nn.Module:
    """Set every filter's ``t`` to the mean of its input hidden states over ``batches``, rescaled to norm ``√d``.

    ``batches``: an iterable of dicts of tensors as the model takes them (moved to the model's device); tokens where
    ``attention_mask`` is 0 do not count. The model runs in eval mode without gradients and is left in its mode.
    This is what ``attach`` does for ``task_vector_init="mean"``; call it to re-initialise ``t`` (the filters should
    still be at init, ``D = 0``, for the means to be the adapter-free model's). Returns ``model``.
    """
    filters = trf_filters(model)
    if not filters:
        raise AdapterStateError("the model has no LoRATRF filters; attach a TrfConfig first")
    means = _site_means(model, {name: (f, "input") for name, f in filters.items()}, batches)
    for name, f in filters.items():
        f.set_task_vector(_scaled_mean(means[name], name))
    return model


def _scaled_mean(mean: torch.Tensor, name: str) -> torch.Tensor:
    norm = float(torch.linalg.vector_norm(mean))
    if not math.isfinite(norm):
        raise InvalidArgumentError(f"the mean hidden state at {name!r} is not finite; check the calibration batches")
    if norm <= NORM_EPS:
        raise InvalidArgumentError(
            f"the mean hidden state at {name!r} is zero, so it gives no direction; use 'normal' init"
        )
    return mean * (math.sqrt(mean.numel()) / norm)


def _site_means(
    model: nn.Module, sites: Mapping[str, Tuple[nn.Module, str]], batches: Iterable[Mapping[str, Any]]
) -> Dict[str, torch.Tensor]:
    """float64 mean over non-padding tokens of each site's tensor (``"input"``: first argument, ``"output"``: the
    output or its first element) while the model runs on ``batches``."""
    iterator = batch_iterator(batches)
    sums: Dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(sites, 0)
    state: Dict[str, Any] = {"mask": None, "index": 0}

    def take(name: str, x: Any) -> None:
        if isinstance(x, (tuple, list)) and x:
            x = x[0]
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(f"the hidden state at {name!r} is a {type(x).__name__}, not a tensor")
        x = x.detach()
        mask = state["mask"]
        if mask is None:
            rows = x.reshape(-1, x.shape[-1])
        elif tuple(x.shape[:-1]) == tuple(mask.shape):
            rows = x[mask]
        elif x.dim() == 2 and x.shape[0] == mask.numel():
            rows = x[mask.reshape(-1)]
        else:
            raise ShapeError(
                f"batch {state['index']}: the hidden state at {name!r} has shape {tuple(x.shape)}, which does not "
                f"line up with attention_mask {tuple(mask.shape)}"
            )
        total = rows.double().sum(dim=0)
        sums[name] = sums[name] + total if name in sums else total
        counts[name] += rows.shape[0]

    handles = []
    for name, (module, kind) in sites.items():
        if kind == "output":
            handles.append(module.register_forward_hook(lambda _m, _a, out, name=name: take(name, out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda _m, args, name=name: take(name, args)))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(iterator):
                if not isinstance(batch, MappingABC):
                    raise InvalidArgumentError(
                        f"batch {index} is a {type(batch).__name__}; each batch must be a dict of tensors as the "
                        "model takes them"
                    )
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                mask = inputs.get("attention_mask")
                if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
                    raise ShapeError(f"batch {index}: attention_mask must be a [batch, seq] tensor")
                state["mask"] = None if mask is None else mask != 0
                state["index"] = index
                model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise EmptyInputError(
            f"no non-padding token reached {empty[0]!r} (batches empty or fully masked); the mean init needs some"
        )
    return {name: sums[name] / counts[name] for name in sites}


# --- adapter files --------------------------------------------------------------------------------------------------


def filter_state(model: nn.Module, prefix: str) -> Dict[str, torch.Tensor]:
    """The filters' tensors under their adapter-file names ``<prefix><module>.trf_filter.<parameter>``."""
    out: Dict[str, torch.Tensor] = {}
    for name, f in trf_filters(model).items():
        for tensor in FILTER_TENSORS:
            out[f"{prefix}{name}.{FILTER_ATTR}.{tensor}"] = getattr(f, tensor).detach()
    return out


def describe(model: nn.Module) -> Dict[str, Any]:
    """What the config's ``lowrank_rs`` key says about the filters: ``{}`` without any."""
    filters = trf_filters(model)
    if not filters:
        return {}
    return {"filters": {name: {"dim": f.dim, "rank": f.rank} for name, f in filters.items()}}


def split_tensors(
    tensors: Mapping[str, torch.Tensor], extras: Optional[Mapping[str, Any]], prefix: str, path: PathLike
) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
    """The file's filter tensors by filtered module, and every other tensor; checked against the description."""
    where = os.fspath(path)
    marker = f".{FILTER_ATTR}."
    filters: Dict[str, Dict[str, torch.Tensor]] = {}
    rest: Dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if marker not in name:
            rest[key] = value
            continue
        module, _, tensor = name.rpartition(marker)
        if tensor not in FILTER_TENSORS or not module:
            raise AdapterFormatError(f"{where!r}: tensor {key!r} is not one of a filter's {list(FILTER_TENSORS)}")
        filters.setdefault(module, {})[tensor] = value
    described = (extras or {}).get("filters") or {}
    if not isinstance(described, dict):
        raise AdapterFormatError(
            f"{where!r}: lowrank_rs.filters must map each filtered module to its description, not {described!r}"
        )
    method = (extras or {}).get("method")
    if filters and method != TrfConfig.method:
        raise AdapterFormatError(
            f"{where!r} holds LoRATRF filter tensors, but its config's method is {method!r}, not 'loratrf'"
        )
    if set(filters) != set(described):
        raise AdapterFormatError(
            f"{where!r}: the filters described under lowrank_rs.filters ({sorted(described)[:3]}...) are not the "
            f"ones with tensors in the file ({sorted(filters)[:3]}...)"
        )
    for module, parts in filters.items():
        missing = [t for t in FILTER_TENSORS if t not in parts]
        if missing:
            raise AdapterFormatError(f"{where!r}: the filter on {module!r} lacks its {missing} tensor(s)")
    return filters, rest


def check_weights(
    expected: Mapping[str, Tuple[int, int]], weights: Mapping[str, Mapping[str, torch.Tensor]], path: PathLike
) -> None:
    """That the file's filters are exactly the model's (``expected``: module → (dim, rank)), with fitting shapes."""
    where = os.fspath(path)
    if set(expected) != set(weights):
        only_model = sorted(set(expected) - set(weights))
        only_file = sorted(set(weights) - set(expected))
        if not weights:
            detail = f"the model has filters ({only_model[:3]}), the file none: a plain LoRA adapter"
        elif not expected:
            detail = f"the file has filters ({only_file[:3]}), the model none: it was attached without a TrfConfig"
        else:
            detail = (
                f"filters only in the model: {only_model[:3]}; only in the file: {only_file[:3]} (another model, "
                f"filter_site or filter_layers; nearest model modules to the first: "
                f"{_nearest(only_file[0], expected) if only_file else []})"
            )
        raise TargetError(f"{where!r} does not fit the model's LoRATRF filters: {detail}")
    for module, (dim, rank) in expected.items():
        shapes = {"task_vector": (dim,), "C": (dim, rank), "D": (rank, dim)}
        for tensor, shape in shapes.items():
            got = tuple(weights[module][tensor].shape)
            if got != shape:
                raise ShapeError(
                    f"{where!r}: the filter on {module!r} has {tensor} of shape {got}; the model's filter needs "
                    f"{shape} (width {dim}, rank {rank})"
                )


def expected_filters(
    model: nn.Module, config: Any, adapted: Sequence[str], kept: Sequence[str]
) -> Dict[str, Tuple[int, int]]:
    """module → (dim, rank) of the filters ``config`` would put on ``model``; ``{}`` for a config without filters."""
    if not isinstance(config, TrfConfig):
        return {}
    config = resolve(config, model)  # a no-op for configs this package wrote, which are resolved
    return {s.module: (s.dim, config.filter_rank) for s in filter_sites(model, config, adapted, kept)}


def present_filters(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    return {name: (f.dim, f.rank) for name, f in trf_filters(model).items()}


@torch.no_grad()
def load_weights(model: nn.Module, weights: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    filters = trf_filters(model)
    for module, parts in weights.items():
        for tensor, value in parts.items():
            getattr(filters[module], tensor).copy_(value)


def _nearest(query: str, names: Iterable[str], n: int = 3) -> List[str]:
    return difflib.get_close_matches(query, list(names), n=n, cutoff=0.3)
