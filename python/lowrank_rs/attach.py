"""Model surgery: find the target layers, wrap them in adapters, merge, and move adapters through PEFT's file format.

Matching follows Hugging Face PEFT so that a config means the same thing in both libraries: a list target ``t``
matches module ``m`` when ``m == t`` or ``m`` ends with ``"." + t``; a string target is a regex that must
``re.fullmatch`` the full module name; targets inside a ``modules_to_save`` module are left alone.

Adapter directories are PEFT LoRA directories. Tensors are named ``base_model.model.<module>.lora_A.weight`` /
``.lora_B.weight`` (``[r, d_in]`` / ``[d_out, r]``), and a ``modules_to_save`` module's state as
``base_model.model.<module>.<key>`` — what ``peft.utils.save_and_load.get_peft_model_state_dict`` writes in PEFT
0.21. Per-module ranks and scales go to ``rank_pattern`` / ``alpha_pattern`` keyed by full module paths (PEFT's own
EVA and conversion code write keys the same way), with ``alpha_i`` chosen so that PEFT's ``alpha_i / r_i`` (or
``alpha_i / sqrt(r_i)``) is bit-for-bit this module's γ.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import numbers
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from . import trf as _trf
from ._core import __version__
from .config import LoraConfig, TLoraConfig, TrfConfig, config_from_dict
from .errors import AdapterFormatError, LowRankError, ShapeError, TargetError
from .nn.lora import AdapterStateError, LoraLinear
from .package import read_adapter, write_adapter

__all__ = [
    "AdapterStateError",
    "TargetError",
    "adapter_config",
    "adapter_state",
    "attach",
    "load_adapter",
    "lora_layers",
    "merge",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
]

PathLike = Union[str, "os.PathLike[str]"]

PEFT_PREFIX = "base_model.model."
_STATE_ATTR = "_lowrank_rs_attachment"
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")

# PeftModelFor<Task> adds these to modules_to_save on load (peft/peft_model.py), which also removes them from LoRA.
_TASK_EXTRA_MODULES = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
_TASK_BY_CLASS_SUFFIX = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)
# A PEFT feature whose tensors or semantics this package does not reproduce; loading one must fail, not half-work.
_UNSUPPORTED_PEFT_FIELDS = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
)


@dataclasses.dataclass(frozen=True)
class _Attachment:
    config: LoraConfig
    modules_to_save: Tuple[str, ...]


def attach(
    model: nn.Module,
    config: Any,
    *,
    ranks: Optional[Mapping[str, int]] = None,
    scales: Optional[Mapping[str, float]] = None,
    init_a: Optional[Mapping[str, Any]] = None,
    plan: Any = None,
    batches: Optional[Iterable[Mapping[str, Any]]] = None,
) -> nn.Module:
    """Wrap every target ``nn.Linear`` of ``model`` in a :class:`~lowrank_rs.nn.LoraLinear`, in place.

    ``config``: a :class:`~lowrank_rs.config.LoraConfig` / :class:`~lowrank_rs.config.TLoraConfig`, or a
    :class:`~lowrank_rs.calibrate.CalibrationPlan`, which supplies the config, ``ranks``, ``scales`` and ``init_a``
    itself and must cover every target of its config. A :class:`~lowrank_rs.config.TaLoraConfig` adds TA-LoRA
    prompts instead (:mod:`lowrank_rs.talora`), and takes none of the per-module overrides.

    Afterwards only adapter parameters and ``modules_to_save`` require grad (``A`` stays frozen for a
    :class:`~lowrank_rs.config.TLoraConfig` with ``train_a=False``). Per-module overrides are keyed by full module
    name (``model.named_modules()``):

    - ``ranks``: rank per module; 0 leaves the module without adapter; others get ``config.r``.
    - ``scales``: γ per module, stored to within an ulp or two: on the nearest value PEFT computes exactly as
      ``alpha_i / r_i``, so a saved adapter reloads bit for bit. Others get PEFT's ``alpha / r_i``
      (``alpha / sqrt(r_i)`` with rsLoRA). Scales of rank-0 modules are allowed (plans carry one per module).
    - ``init_a``: initial ``A`` per module, ``[r_i, d_in]`` (TLoRA's task-aware basis); others are Kaiming-uniform.

    A :class:`~lowrank_rs.config.TrfConfig` adds LoRATRF's filters (METHODS.md §3, :mod:`lowrank_rs.trf`) to the
    LoRA part, trainable too. ``plan`` (a :class:`~lowrank_rs.calibrate.CalibrationPlan`) makes that LoRA part TLoRA,
    with the plan's ranks, scales and ``A``; ``batches`` feed ``task_vector_init="mean"``. Both are for a TrfConfig
    only.

    Returns ``model``. A target that matches nothing, or matches a layer that is not an ``nn.Linear``, raises
    :class:`TargetError` naming the nearest module names; a model attached before raises :class:`AdapterStateError`.
    """
    if not isinstance(model, nn.Module):
        raise LowRankError(f"attach needs a torch.nn.Module, not {type(model).__name__}")
    method = _method_for_config(config)
    if method is not None:
        if ranks is not None or scales is not None or init_a is not None:
            raise LowRankError(f"ranks, scales and init_a are LoRA options; a {type(config).__name__} takes none")
        return method.attach(model, config)
    # A plan is recognised by what it provides rather than by its class: calibrate depends on attach, not back.
    from_plan = not isinstance(config, LoraConfig) and callable(getattr(config, "attach_arguments", None))
    if from_plan:
        if ranks is not None or scales is not None or init_a is not None:
            raise LowRankError("attach(model, plan) takes ranks, scales and init_a from the plan; pass none of them")
        config, ranks, scales, init_a = config.attach_arguments()
    if isinstance(config, TrfConfig):
        config, ranks, scales, init_a = _trf.prepare(model, config, plan, ranks, scales, init_a)
        from_plan = from_plan or plan is not None
    elif plan is not None or batches is not None:
        raise LowRankError("attach's plan= and batches= are for a TrfConfig (LoRATRF); pass a plan as the config")
    if not isinstance(config, LoraConfig):
        raise LowRankError(f"attach needs a LoraConfig, TLoraConfig or CalibrationPlan, not {type(config).__name__}")
    if getattr(model, _STATE_ATTR, None) is not None or lora_layers(model) or _trf.trf_filters(model):
        raise AdapterStateError("this model already has LoRA adapters attached; attach to a fresh copy of the model")

    modules = dict(model.named_modules())
    keep = _resolve_modules_to_save(modules, config.modules_to_save)
    targets = _resolve_targets(modules, config.target_modules, keep, type(model).__name__)
    if from_plan:
        covered = ranks or {}
        uncovered = [name for name in targets if name not in covered]
        if uncovered:
            raise TargetError(
                f"the calibration plan has no entry for target {uncovered[0]!r} ({len(uncovered)} in all); "
                "was it calibrated on another model? Calibrate this one"
            )
    ranks = _per_module(ranks, "ranks", targets, _rank_value)
    scales = _per_module(scales, "scales", targets, _scale_value)
    init_a = _per_module(init_a, "init_a", targets, lambda v, _name: v)
    module_ranks = [(name, ranks.get(name, config.r)) for name in targets]
    if all(r == 0 for _, r in module_ranks):
        raise LowRankError("every target module has rank 0, so no adapter would be attached")
    for name, r in module_ranks:
        if r == 0 and name in init_a and torch.as_tensor(init_a[name]).numel() != 0:
            raise ShapeError(f"init_a[{name!r}] is not empty, but ranks[{name!r}] is 0 (no adapter on that module)")

    lora_part = config.tlora if isinstance(config, TrfConfig) else config
    freeze_a = isinstance(lora_part, TLoraConfig) and not lora_part.train_a
    wrapped: Dict[str, LoraLinear] = {}
    for name, r in module_ranks:
        if r == 0:
            continue
        if name in scales:
            gamma = _peft_scale(scales[name], r, config.alpha, config.use_rslora)
        else:
            gamma = config.scaling_for(r)
        # Built before anything is replaced, so a bad init_a leaves the model untouched.
        wrapped[name] = LoraLinear(
            modules[name],
            r,
            gamma,
            dropout=config.dropout,
            freeze_a=freeze_a,
            init_a=init_a.get(name),
            generator=_module_generator(config.init_seed, name),
        )
    filters = _trf.build_filters(model, config, list(wrapped), keep, batches) if isinstance(config, TrfConfig) else {}
    # The new adapters are not in the model yet, so this freezes the base (including each wrapped base_layer) only.
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in wrapped.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer)
    _trf.install(model, filters)
    for name in keep:
        modules[name].requires_grad_(True)
    setattr(model, _STATE_ATTR, _Attachment(config, tuple(keep)))
    return model


def _module_generator(seed: Optional[int], name: str) -> Optional[torch.Generator]:
    # One stream per module, so a module's initial A depends on the seed and its name only, not on which other
    # modules were adapted, given an init_a, or had their rank changed.
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def lora_layers(model: nn.Module) -> Dict[str, LoraLinear]:
    """Every :class:`~lowrank_rs.nn.LoraLinear` in ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W = W0 + γ B A``, float32 math, the weight's dtype kept).

    TA-LoRA does not merge: it raises :class:`AdapterStateError` saying so.
    """
    method = _method_of(model)
    if method is not None:
        return method.merge(model)
    layers = _require_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise AdapterStateError(f"{len(merged)} adapter(s) are already merged, e.g. {merged[0]!r}; unmerge first")
    for layer in layers.values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of its base weight again."""
    method = _method_of(model)
    if method is not None:
        return method.unmerge(model)
    layers = _require_layers(model)
    unmerged = [name for name, layer in layers.items() if not layer.merged]
    if unmerged:
        raise AdapterStateError(f"{len(unmerged)} adapter(s) are not merged, e.g. {unmerged[0]!r}; merge first")
    for layer in layers.values():
        layer.unmerge()
    return model


def adapter_config(model: nn.Module) -> LoraConfig:
    """The config the model's adapter was attached (or loaded) with."""
    return _require_attachment(model).config


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements that require grad (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names: LoRA factors and every ``modules_to_save`` module's state (for
    TA-LoRA, the tensors its adapter file holds)."""
    method = _method_of(model)
    if method is not None:
        return method.adapter_state(model)
    layers = _require_layers(model)
    out: Dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    attachment = getattr(model, _STATE_ATTR, None)
    for name in attachment.modules_to_save if attachment is not None else ():
        for key, value in model.get_submodule(name).state_dict().items():
            out[f"{PEFT_PREFIX}{name}.{key}"] = value.detach()
    out.update(_trf.filter_state(model, PEFT_PREFIX))
    return out


def save_adapter(
    model: nn.Module, path: PathLike, *, vllm: bool = False, tasks: Optional[Sequence[str]] = None
) -> None:
    """Write the attached adapter as a PEFT LoRA directory (atomically, through the Rust core).

    ``peft.PeftModel.from_pretrained(base, path)`` rebuilds the same model. Per-module ranks and scales become
    ``rank_pattern`` / ``alpha_pattern``; ``target_modules`` is the config's own spec when PEFT would select exactly
    the adapted modules with it, otherwise the explicit list of adapted modules (rank-0 modules must not be adapted).

    ``vllm=True`` writes what vLLM can serve: vLLM reads one ``r`` and one ``lora_alpha`` for the whole adapter and
    ignores ``rank_pattern`` and ``alpha_pattern``. So each module's γ is folded into ``B`` and every module is
    zero-padded to the largest rank ``R`` (zero rows of ``A`` times zero columns of ``B`` add exactly nothing), with
    ``r = lora_alpha = R`` and no rsLoRA: scaling 1 everywhere, in vLLM and in PEFT alike. vLLM refuses
    ``modules_to_save``, so a model with any raises instead of writing a file vLLM cannot load.

    A TA-LoRA model is written in its own format (``lowrank_rs.talora``); ``tasks`` then picks the tasks to save
    (all by default), which is how one task is exported on its own.
    """
    attachment = _require_attachment(model)
    method = _method_for_config(attachment.config)
    if method is not None:
        return method.save_adapter(model, path, vllm=vllm, tasks=tasks)
    if tasks is not None:
        raise LowRankError("tasks= chooses the TA-LoRA tasks to save; this model's adapter has no tasks")
    layers = _require_layers(model)
    config = attachment.config
    base_names = _base_module_names(model, layers)
    ranks = {name: layer.r for name, layer in layers.items()}
    gammas = {name: layer.scaling for name, layer in layers.items()}
    task_type = _task_type(model, set(layers), attachment.modules_to_save, base_names)
    modules_to_save = _peft_modules_to_save(config, attachment.modules_to_save, base_names)
    excluded_by = list(modules_to_save or ()) + list(_TASK_EXTRA_MODULES.get(task_type or "", ()))
    target_modules = _peft_target_modules(config.target_modules, set(layers), base_names, excluded_by)

    if vllm:
        if _trf.trf_filters(model):
            raise LowRankError("vLLM serves LoRA only and cannot run LoRATRF's filters; save without vllm=True")
        if attachment.modules_to_save:
            raise LowRankError(
                f"vLLM cannot load adapters with modules_to_save ({list(attachment.modules_to_save)}); "
                "save without vllm=True, or attach without modules_to_save"
            )
        top = max(ranks.values())
        tensors: Dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            a = torch.zeros(top, layer.in_features, dtype=layer.lora_A.weight.dtype)
            b = torch.zeros(layer.out_features, top, dtype=layer.lora_B.weight.dtype)
            a[: layer.r] = layer.lora_A.weight.detach().cpu()
            b[:, : layer.r] = (layer.lora_B.weight.detach().float() * layer.scaling).to(b.dtype).cpu()
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        r, use_rslora = top, False
        alpha: Union[int, float] = top
        rank_pattern: Dict[str, int] = {}
        alpha_pattern: Dict[str, Any] = {}
    else:
        tensors = adapter_state(model)
        r, alpha, use_rslora = config.r, _json_number(config.alpha), config.use_rslora
        alphas = {name: _alpha_reproducing(gammas[name], ranks[name], config.alpha, use_rslora) for name in layers}
        rank_pattern = {name: ranks[name] for name in layers if ranks[name] != config.r}
        alpha_pattern = {name: _json_number(alphas[name]) for name in layers if alphas[name] != config.alpha}
        keys = _pattern_keys(set(rank_pattern) | set(alpha_pattern), set(layers))
        rank_pattern = {keys[name]: value for name, value in rank_pattern.items()}
        alpha_pattern = {keys[name]: value for name, value in alpha_pattern.items()}

    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": name_or_path,
        "inference_mode": True,
        "target_modules": target_modules,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": use_rslora,
        "lora_dropout": config.dropout,
        "modules_to_save": modules_to_save,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "lowrank_rs": {
            "version": __version__,
            "method": config.method,
            "config": config.to_dict(),
            "ranks": ranks,
            "scaling": gammas,
            "vllm": vllm,
            **_trf.describe(model),
        },
    }
    write_adapter(path, tensors, peft_config)


def load_adapter(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a LoRA adapter directory — ours or one written by PEFT's ``save_pretrained`` — into ``model``.

    An unattached model is attached first (with the adapter's config, and with exactly the modules the file has
    weights for); an attached one must have the same adapted modules and ranks. Scales follow PEFT's rule for the
    file's ``lora_alpha``, ``alpha_pattern`` and ``rank_pattern``, so the result equals ``PeftModel.from_pretrained``.
    A module the model lacks, a shape that does not fit, or a PEFT feature this package does not implement raises.
    """
    tensors, peft_config = read_adapter(path, framework="torch")
    method = next((m for m in _METHODS if m.peft_type == peft_config.get("peft_type")), None) or _method_of(model)
    if method is not None:
        return method.load_adapter(model, tensors, peft_config, path)
    _check_peft_config(peft_config, path)
    extras = peft_config.get("lowrank_rs") if isinstance(peft_config.get("lowrank_rs"), dict) else None
    filter_weights, tensors = _trf.split_tensors(tensors, extras, PEFT_PREFIX, path)
    factors, rest = _split_tensors(tensors)
    if not factors:
        raise AdapterFormatError(f"{os.fspath(path)!r} holds no LoRA weights (no '*.lora_A.weight' tensors)")
    vllm = bool(extras and extras.get("vllm"))
    ranks, gammas = _ranks_and_scales(factors, peft_config, extras if vllm else None)

    modules = dict(model.named_modules())
    missing = sorted(name for name in factors if name not in modules)
    if missing:
        raise TargetError(
            f"the adapter has weights for {len(missing)} module(s) the model does not have, e.g. {missing[0]!r}; "
            f"nearest names in the model: {_nearest(missing[0], modules)}"
        )
    for name, (a, b) in factors.items():
        module = modules[name]
        base = module.base_layer if isinstance(module, LoraLinear) else module
        if not isinstance(base, nn.Linear):
            raise TargetError(f"the adapter targets {name!r}, which is a {type(base).__name__}, not an nn.Linear")
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise ShapeError(
                f"adapter weights for {name!r} have lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the model's "
                f"layer is {base.out_features}×{base.in_features}, so expected [r, {base.in_features}] and "
                f"[{base.out_features}, r]"
            )

    # Everything is checked before the model changes, so a file that does not fit leaves the model as it was.
    attachment = getattr(model, _STATE_ATTR, None)
    if attachment is None:
        config = _config_for_load(peft_config, extras, factors, rest, modules)
        kept = _resolve_modules_to_save(modules, config.modules_to_save)
        targets = _resolve_targets(modules, config.target_modules, kept, "")
        outside = sorted(set(factors) - set(targets))
        if outside:
            raise TargetError(f"the adapter's config does not target {outside[0]!r}, yet the file has weights for it")
        filters = _trf.expected_filters(model, config, [t for t in targets if t in factors], kept)
    else:
        kept = list(attachment.modules_to_save)
        layers = lora_layers(model)
        if set(layers) != set(factors):
            raise TargetError(
                "the model's adapted modules differ from the adapter file's: adapted but not in the file "
                f"{sorted(set(layers) - set(factors))[:5]}, in the file but not adapted "
                f"{sorted(set(factors) - set(layers))[:5]}"
            )
        for name, layer in layers.items():
            if layer.merged:
                raise AdapterStateError(f"{name!r} is merged; unmerge the model before loading new adapter weights")
            if layer.r != ranks[name]:
                raise ShapeError(f"{name!r} has an adapter of rank {layer.r}; the file's is rank {ranks[name]}")
        filters = _trf.present_filters(model)
    _trf.check_weights(filters, filter_weights, path)
    saved = _saved_module_states(rest, peft_config, kept, modules)

    if attachment is None:
        attach(model, _trf.for_loading(config), ranks={t: ranks.get(t, 0) for t in targets}, scales=gammas)
        setattr(model, _STATE_ATTR, _Attachment(config, tuple(kept)))
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            a, b = factors[name]
            layer.lora_A.weight.copy_(a[: ranks[name]])
            layer.lora_B.weight.copy_(b[:, : ranks[name]])
            layer.scaling = gammas[name]
    for name, state in saved.items():
        modules[name].load_state_dict(state, strict=True)
    _trf.load_weights(model, filter_weights)
    return model


# --- matching -------------------------------------------------------------------------------------------------------


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _resolve_modules_to_save(modules: Mapping[str, nn.Module], names: Sequence[str]) -> List[str]:
    found: List[str] = []
    for entry in names:
        hits = [name for name in modules if name and _matches(name, entry)]
        if not hits:
            raise TargetError(
                f"modules_to_save entry {entry!r} matches no module; nearest names: {_nearest(entry, modules)}"
            )
        found.extend(hits)
    # A module inside another saved module is saved with it already.
    return [n for n in dict.fromkeys(found) if not any(n.startswith(o + ".") for o in found if o != n)]


def _resolve_targets(
    modules: Mapping[str, nn.Module], spec: Union[str, Sequence[str]], keep: Sequence[str], model_name: str
) -> List[str]:
    def inside_kept(name: str) -> bool:
        return any(name == k or name.startswith(k + ".") for k in keep)

    where = f" of {model_name}" if model_name else ""
    if isinstance(spec, str):
        # The root module ("") can never be replaced in its own parent.
        hits = [n for n in modules if n and re.fullmatch(spec, n) and not inside_kept(n)]
        if not hits:
            raise TargetError(
                f"target regex {spec!r} matches no module name{where} (it must match the whole name); "
                f"nearest names: {_nearest(spec, modules)}"
            )
    else:
        hits = []
        for entry in spec:
            found = [n for n in modules if n and _matches(n, entry) and not inside_kept(n)]
            if not found:
                raise TargetError(
                    f"target module {entry!r} matches no module{where}; nearest names: {_nearest(entry, modules)}"
                )
            hits.extend(found)
        hits = [n for n in modules if n in set(hits)]  # model order, once each
    wrong = [(n, type(modules[n]).__name__) for n in hits if not isinstance(modules[n], nn.Linear)]
    if wrong:
        shown = ", ".join(f"{n!r} ({t})" for n, t in wrong[:5])
        raise TargetError(f"targets must be nn.Linear layers, but the target spec {spec!r} also matches {shown}")
    return hits


def _nearest(query: str, names: Iterable[str], n: int = 6) -> List[str]:
    names = [x for x in names if x]
    leaves = sorted({x.rsplit(".", 1)[-1] for x in names})
    found = difflib.get_close_matches(query, leaves, n=n, cutoff=0.5)
    found += difflib.get_close_matches(query, names, n=n, cutoff=0.5)
    found = list(dict.fromkeys(found))[:n]
    return found or leaves[:n]


def _per_module(values: Optional[Mapping[str, Any]], what: str, targets: Sequence[str], check: Any) -> Dict[str, Any]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise LowRankError(f"{what} must be a mapping of module name to value, not {type(values).__name__}")
    unknown = [k for k in values if k not in targets]
    if unknown:
        raise TargetError(
            f"{what} names {unknown[0]!r}, which is not one of the config's target modules; "
            f"nearest targets: {_nearest(str(unknown[0]), targets)}"
        )
    return {k: check(v, f"{what}[{k!r}]") for k, v in values.items()}


def _rank_value(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise LowRankError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def _scale_value(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise LowRankError(f"{what} must be a finite number, got {value!r}")
    return float(value)


# --- PEFT format ----------------------------------------------------------------------------------------------------


def _peft_pattern_key(keys: Iterable[str], name: str) -> Optional[str]:
    """The key PEFT 0.21 picks for ``name`` (``peft.utils.other.get_pattern_key``), or None for the default."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _pattern_keys(entries: Set[str], adapted: Set[str]) -> Dict[str, str]:
    """``rank_pattern`` / ``alpha_pattern`` keys that PEFT applies to exactly one module each.

    PEFT treats the keys as regexes that may match any dotted suffix, first match wins. A plain module path is
    unambiguous unless it is also a suffix of another adapted module (``proj`` and ``inner.proj``); then every key
    is anchored and escaped (``^inner\\.proj``), which PEFT's ``(.*\\.)?(key)$`` can only match at the start.
    """
    for make in (lambda n: n, lambda n: "^" + re.escape(n)):
        keys = {name: make(name) for name in entries}
        # Each module must be matched by its own key or by none, whatever order the keys end up in the JSON.
        if all(
            [k for k in keys.values() if _peft_pattern_key([k], m) is not None] == ([keys[m]] if m in keys else [])
            for m in adapted
        ):
            return keys
    raise LowRankError("cannot write rank_pattern keys that PEFT would apply to one module each")  # pragma: no cover


def _alpha_reproducing(gamma: float, r: int, base_alpha: float, rslora: bool) -> float:
    """The ``alpha`` whose PEFT scaling ``alpha / r`` (``alpha / sqrt(r)``) comes closest to ``gamma`` in float64.

    It is ``gamma`` exactly for every γ that :func:`_peft_scale` produced, which is every γ ``attach`` stores.
    """
    denominator = math.sqrt(r) if rslora else r
    if base_alpha / denominator == gamma:
        return base_alpha
    centre = up = down = gamma * denominator
    candidates = [centre]  # ordered by distance from the centre
    for _ in range(16):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    exact = [alpha for alpha in candidates if alpha / denominator == gamma]
    return exact[0] if exact else min(candidates, key=lambda alpha: abs(alpha / denominator - gamma))


def _peft_scale(gamma: float, r: int, base_alpha: float, rslora: bool) -> float:
    """``gamma`` moved by at most an ulp or two onto a value PEFT can compute as ``alpha_i / r_i``.

    Division by a rank that is not a power of two skips some float64 values (``alpha / 3`` steps by more than one
    ulp of the quotient), so without this a saved adapter could come back from PEFT a rounding step off.
    """
    alpha = _alpha_reproducing(gamma, r, base_alpha, rslora)
    return alpha / (math.sqrt(r) if rslora else r)


def _json_number(x: float) -> Union[int, float]:
    # PEFT and vLLM type lora_alpha as int; an integral alpha is written as one.
    return int(x) if float(x).is_integer() else float(x)


def _base_module_names(model: nn.Module, layers: Mapping[str, LoraLinear]) -> List[str]:
    """Module names as they were before ``attach``: what PEFT will see on a fresh copy of the base model."""
    filters = {f"{name}.{_trf.FILTER_ATTR}" for name in _trf.trf_filters(model)}
    return [
        name
        for name, _ in model.named_modules()
        if not any(name.startswith(w + ".") for w in layers) and name not in filters
    ]


def _peft_selects_targets(spec: Union[str, Sequence[str]], name: str, excluded_by: Sequence[str]) -> bool:
    # peft.tuners.tuners_utils.check_target_module_exists, PEFT 0.21, for the fields this package writes.
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in excluded_by):
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + t) for t in spec)


def _peft_target_modules(
    spec: Union[str, Sequence[str]], adapted: Set[str], base_names: Sequence[str], excluded_by: Sequence[str]
) -> Union[str, List[str]]:
    exact_list = sorted(adapted)
    exact_regex = "(?:" + "|".join(re.escape(n) for n in exact_list) + ")"
    for candidate in (spec if isinstance(spec, str) else list(spec), exact_list, exact_regex):
        if {n for n in base_names if _peft_selects_targets(candidate, n, excluded_by)} == adapted:
            return candidate
    raise LowRankError(  # pragma: no cover - the escaped alternation of full names selects exactly those names
        "cannot express the adapted modules as PEFT target_modules"
    )


def _peft_saved_modules(entries: Sequence[str], base_names: Sequence[str]) -> Set[str]:
    # peft.utils.other._set_trainable: plain `endswith`, outermost module wins (inner ones are inside its copy).
    hits = [n for n in base_names if n and any(n.endswith(e) for e in entries)]
    return {n for n in hits if not any(n.startswith(o + ".") for o in hits if o != n)}


def _peft_modules_to_save(config: LoraConfig, saved: Sequence[str], base_names: Sequence[str]) -> Optional[List[str]]:
    if not saved:
        return None
    for candidate in (list(config.modules_to_save), sorted(saved)):
        if _peft_saved_modules(candidate, base_names) == set(saved):
            return candidate
    raise LowRankError(
        f"PEFT's modules_to_save rule (plain suffix match) would save more modules than {list(saved)}; "
        "rename the modules or list fewer"
    )


def _task_type(model: nn.Module, adapted: Set[str], saved: Sequence[str], base_names: Sequence[str]) -> Optional[str]:
    cls = type(model).__name__
    task = next((t for suffix, t in _TASK_BY_CLASS_SUFFIX if cls.endswith(suffix)), None)
    if task is None:
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover - transformers is a dependency
            return None
        task = "FEATURE_EXTRACTION" if isinstance(model, PreTrainedModel) and cls.endswith("Model") else None
    # PeftModelFor<Task> keeps LoRA off its head and insists on finding the head's tensors in the file, so the task
    # is only written when the head is saved whole and carries no adapter.
    extra = _TASK_EXTRA_MODULES.get(task or "", ())
    if extra and any(not _peft_selects_targets(list(adapted), n, extra) for n in adapted):
        return None
    if extra and not _peft_saved_modules(extra, base_names) <= set(saved):
        return None
    return task


def _check_peft_config(config: Mapping[str, Any], path: PathLike) -> None:
    where = os.fspath(path)
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{where!r} is a {config.get('peft_type')!r} adapter; only LORA adapters load")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{where!r} trains biases (bias={config['bias']!r}); only bias='none' is supported")
    used = [k for k in _UNSUPPORTED_PEFT_FIELDS if config.get(k)]
    if used:
        raise AdapterFormatError(f"{where!r} uses PEFT LoRA feature(s) {used}, which lowrank-rs does not implement")


def _split_tensors(
    tensors: Mapping[str, torch.Tensor],
) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor]], Dict[str, torch.Tensor]]:
    a: Dict[str, torch.Tensor] = {}
    b: Dict[str, torch.Tensor] = {}
    rest: Dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if name.endswith(".lora_A.weight"):
            a[name[: -len(".lora_A.weight")]] = value
        elif name.endswith(".lora_B.weight"):
            b[name[: -len(".lora_B.weight")]] = value
        elif ".lora_" in name:
            raise AdapterFormatError(f"adapter tensor {key!r} belongs to a LoRA variant lowrank-rs does not implement")
        else:
            rest[name] = value
    unpaired = sorted(set(a) ^ set(b))
    if unpaired:
        raise AdapterFormatError(f"module {unpaired[0]!r} has only one of lora_A.weight / lora_B.weight")
    for name in a:
        if a[name].ndim != 2 or b[name].ndim != 2 or a[name].shape[0] != b[name].shape[1]:
            raise ShapeError(
                f"{name!r}: lora_A {tuple(a[name].shape)} and lora_B {tuple(b[name].shape)} are not [r, d_in] and "
                "[d_out, r] with one r"
            )
    return {name: (a[name], b[name]) for name in a}, rest


def _ranks_and_scales(
    factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
    config: Mapping[str, Any],
    vllm_extras: Optional[Mapping[str, Any]],
) -> Tuple[Dict[str, int], Dict[str, float]]:
    """Rank and γ of each module by PEFT's rule (``peft.tuners.lora.model._create_and_replace``).

    A vLLM variant of ours is padded to one rank; its true ranks come from our extras and the padding is checked to
    be zero before it is dropped.
    """
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    ranks: Dict[str, int] = {}
    gammas: Dict[str, float] = {}
    for name, (a, b) in factors.items():
        r_key, alpha_key = _peft_pattern_key(rank_pattern, name), _peft_pattern_key(alpha_pattern, name)
        r_i = rank_pattern[r_key] if r_key is not None else r
        alpha_i = alpha_pattern[alpha_key] if alpha_key is not None else alpha
        gammas[name] = alpha_i / math.sqrt(r_i) if rslora else alpha_i / r_i
        if a.shape[0] != r_i:
            raise ShapeError(f"{name!r}: the file's config gives rank {r_i}, its lora_A has {a.shape[0]} rows")
        ranks[name] = r_i
        if vllm_extras is not None:
            true_rank = int((vllm_extras.get("ranks") or {}).get(name, r_i))
            if a[true_rank:].any() or b[:, true_rank:].any():
                raise AdapterFormatError(f"{name!r}: the vLLM padding beyond rank {true_rank} is not zero")
            ranks[name] = true_rank
    return ranks, gammas


def _config_for_load(
    peft_config: Mapping[str, Any],
    extras: Optional[Mapping[str, Any]],
    factors: Mapping[str, Any],
    rest: Mapping[str, Any],
    modules: Mapping[str, nn.Module],
) -> LoraConfig:
    if extras is not None and "config" in extras:
        return config_from_dict(extras.get("method", "lora"), extras["config"])
    saved = _saved_module_names(rest, peft_config.get("modules_to_save") or [], modules)
    return LoraConfig(
        target_modules=sorted(factors),
        r=int(peft_config.get("r", 8)),
        alpha=float(peft_config.get("lora_alpha", 8)),
        use_rslora=bool(peft_config.get("use_rslora", False)),
        dropout=float(peft_config.get("lora_dropout", 0.0)),
        modules_to_save=sorted(saved),
    )


def _saved_module_names(rest: Mapping[str, Any], entries: Sequence[str], modules: Mapping[str, nn.Module]) -> Set[str]:
    """The modules the non-LoRA tensors belong to, found among those PEFT's ``modules_to_save`` entries select."""
    candidates = _peft_saved_modules(entries, list(modules))
    owners: Set[str] = set()
    for key in rest:
        owner = max((c for c in candidates if key.startswith(c + ".")), key=len, default=None)
        if owner is None:
            raise AdapterFormatError(
                f"adapter tensor {key!r} is neither a LoRA factor nor part of a modules_to_save module of the model"
            )
        owners.add(owner)
    return owners


def _saved_module_states(
    rest: Mapping[str, torch.Tensor], peft_config: Mapping[str, Any], kept: Sequence[str], modules: Any
) -> Dict[str, Dict[str, torch.Tensor]]:
    """The file's whole-module states by module, each checked to fit its module exactly."""
    entries = list(peft_config.get("modules_to_save") or []) + list(kept)
    owners = _saved_module_names(rest, entries, modules)
    not_kept = sorted(owners - set(kept))
    if not_kept:
        raise TargetError(
            f"the adapter saves module {not_kept[0]!r} whole, but the model was attached without it in modules_to_save"
        )
    out: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in owners}
    for key, value in rest.items():
        owner = max((o for o in owners if key.startswith(o + ".")), key=len)
        out[owner][key[len(owner) + 1 :]] = value
    for name, state in out.items():
        expected = modules[name].state_dict()
        if set(state) != set(expected):
            raise AdapterFormatError(
                f"the adapter's saved module {name!r} has tensors {sorted(state)}; the model's has {sorted(expected)}"
            )
        wrong = [k for k in state if tuple(state[k].shape) != tuple(expected[k].shape)]
        if wrong:
            raise ShapeError(
                f"the adapter's saved {name}.{wrong[0]} has shape {tuple(state[wrong[0]].shape)}; "
                f"the model's is {tuple(expected[wrong[0]].shape)}"
            )
    return out


def _require_attachment(model: nn.Module) -> _Attachment:
    attachment = getattr(model, _STATE_ATTR, None)
    if attachment is None:
        raise AdapterStateError("the model has no adapter attached by lowrank_rs.attach (or load_adapter)")
    return attachment


def _require_layers(model: nn.Module) -> Dict[str, LoraLinear]:
    layers = lora_layers(model)
    if not layers:
        raise AdapterStateError("the model has no LoRA layers; call lowrank_rs.attach first")
    return layers


# --- methods in modules of their own --------------------------------------------------------------------------------

# TA-LoRA (lowrank_rs.talora) builds on this module, so this module cannot import it without a cycle. It registers a
# handler instead, and attach, save_adapter, load_adapter, adapter_state, merge and unmerge hand it the configs,
# models and files that are its own. A handler has `config_type` and `peft_type`, and the functions
# `attach(model, config)`, `save_adapter(model, path, **options)`, `load_adapter(model, tensors, peft_config, path)`,
# `adapter_state(model)`, `merge(model)` and `unmerge(model)`.
_METHODS: List[Any] = []


def register_method(handler: Any) -> None:
    """Hand the configs of ``handler.config_type`` and files of ``handler.peft_type`` over to ``handler``."""
    if handler not in _METHODS:
        _METHODS.append(handler)


def _method_for_config(config: Any) -> Optional[Any]:
    return next((m for m in _METHODS if isinstance(config, m.config_type)), None)


def _method_of(model: nn.Module) -> Optional[Any]:
    return _method_for_config(getattr(getattr(model, _STATE_ATTR, None), "config", None))
