"""LoRA as a method (docs/methods.md): attach, merge, PEFT LoRA files, and the seams its variants override.

Adapter directories are PEFT LoRA directories. Tensors are named ``base_model.model.<module>.lora_A.weight`` /
``.lora_B.weight`` (``[r, d_in]`` / ``[d_out, r]``), and a ``modules_to_save`` module's state as
``base_model.model.<module>.<key>`` — what ``peft.utils.save_and_load.get_peft_model_state_dict`` writes in PEFT
0.21. Per-module ranks and scales go to ``rank_pattern`` / ``alpha_pattern`` (:mod:`lowrank_rs.adapters.peft_format`).

TLoRA, LoRATRF and DoRA are LoRA with something more, so their methods subclass :class:`LoraMethod` and override
its hooks (like PEFT's ``LoraVariant``): how ``attach``'s arguments resolve, which layer wraps a target, extra
modules beside the layers (LoRATRF's filters), extra tensors and config fields in the file. This module names none
of them.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from ..._core import __version__
from ...adapters.method import Method
from ...adapters.peft_format import (
    PEFT_PREFIX,
    TASK_EXTRA_MODULES,
    alpha_reproducing,
    json_number,
    pattern_keys,
    peft_modules_to_save,
    peft_scale,
    peft_target_modules,
    saved_module_names,
    saved_module_states,
    task_type,
)
from ...adapters.recipe import Prepared, Settings, settings_targets
from ...adapters.record import Attachment, attachment_of, record_attachment, require_attachment
from ...adapters.registry import method_named
from ...adapters.seeding import generator_for
from ...adapters.targets import nearest, resolve_modules_to_save, resolve_targets
from ...errors import (
    AdapterFormatError,
    AdapterStateError,
    ConfigError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeError,
    TargetError,
)
from ...package import write_adapter
from .codec import UNSUPPORTED_PEFT_FIELDS, Factors, check_lora_file, ranks_and_scales, split_factors
from .config import LoraConfig
from .export import LORA_EXPORT
from .layer import LoraLinear

__all__ = ["UNSUPPORTED_PEFT_FIELDS", "LoraMethod", "lora_layers"]

PathLike = Union[str, "os.PathLike[str]"]


Overrides = Tuple[Any, Optional[Mapping[str, int]], Optional[Mapping[str, float]], Optional[Mapping[str, Any]], bool]


def lora_layers(model: nn.Module) -> Dict[str, LoraLinear]:
    """Every :class:`LoraLinear` (and subclass: DoRA's) in ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


class LoraMethod(Method):
    name = "lora"
    title = "LoRA"
    config_type = LoraConfig
    default_job_order: ClassVar[Optional[int]] = 1
    description = "plain LoRA, y = W0 x + γ B A x (A Kaiming-uniform, B = 0)"
    unsupported_peft_fields: Tuple[str, ...] = UNSUPPORTED_PEFT_FIELDS
    layer_type: ClassVar[Type[LoraLinear]] = LoraLinear

    # -- attach ---------------------------------------------------------------------------------------------------

    def attach(
        self,
        model: nn.Module,
        config: Any,
        *,
        ranks: Optional[Mapping[str, int]] = None,
        scales: Optional[Mapping[str, float]] = None,
        init_a: Optional[Mapping[str, Any]] = None,
        **options: Any,
    ) -> nn.Module:
        """Wrap every target ``nn.Linear`` of ``model`` in a :class:`LoraLinear`, in place.

        Per-module overrides are keyed by full module name (``model.named_modules()``):

        - ``ranks``: rank per module; 0 leaves the module without adapter; others get ``config.r``.
        - ``scales``: γ per module, stored to within an ulp or two: on the nearest value PEFT computes exactly as
          ``alpha_i / r_i``, so a saved adapter reloads bit for bit. Others get PEFT's ``alpha / r_i``
          (``alpha / sqrt(r_i)`` with rsLoRA). Scales of rank-0 modules are allowed (plans carry one per module).
        - ``init_a``: initial ``A`` per module, ``[r_i, d_in]`` (TLoRA's task-aware basis); others Kaiming-uniform.
        """
        config, ranks, scales, init_a, from_plan = self.resolve(model, config, ranks, scales, init_a, options)
        modules = dict(model.named_modules())
        keep = resolve_modules_to_save(modules, config.modules_to_save)
        targets = resolve_targets(modules, config.target_modules, keep, type(model).__name__)
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
            raise InvalidArgumentError("every target module has rank 0, so no adapter would be attached")
        for name, r in module_ranks:
            if r == 0 and name in init_a and torch.as_tensor(init_a[name]).numel() != 0:
                raise ShapeError(f"init_a[{name!r}] is not empty, but ranks[{name!r}] is 0 (no adapter on that module)")

        freeze_a = self.freezes_a(config)
        wrapped: Dict[str, LoraLinear] = {}
        for name, r in module_ranks:
            if r == 0:
                continue
            if name in scales:
                gamma = peft_scale(scales[name], r, config.alpha, config.use_rslora)
            else:
                gamma = config.scaling_for(r)
            # Built before anything is replaced, so a bad init_a leaves the model untouched.
            wrapped[name] = self.make_layer(
                modules[name],
                r,
                gamma,
                config,
                freeze_a=freeze_a,
                init_a=init_a.get(name),
                generator=generator_for(config.init_seed, name),
            )
        extras = self.build_extras(model, config, list(wrapped), keep, options)
        # The new adapters are not in the model yet, so this freezes the base (including each wrapped base_layer) only.
        for p in model.parameters():
            p.requires_grad_(False)
        for name, layer in wrapped.items():
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer)
        self.install_extras(model, extras)
        for name in keep:
            modules[name].requires_grad_(True)
        record_attachment(model, Attachment(self.name, config, tuple(keep)))
        return model

    def resolve(
        self,
        model: nn.Module,
        config: Any,
        ranks: Optional[Mapping[str, int]],
        scales: Optional[Mapping[str, float]],
        init_a: Optional[Mapping[str, Any]],
        options: Mapping[str, Any],
    ) -> Overrides:
        """``attach``'s config and per-module overrides, and whether they came from a calibration plan."""
        if options:
            raise InvalidArgumentError(
                f"attach got option(s) {sorted(options)} that {type(config).__name__} does not take; "
                f"{self.title}'s are ranks, scales and init_a"
            )
        return config, ranks, scales, init_a, False

    def freezes_a(self, config: Any) -> bool:
        return False

    def make_layer(
        self,
        base: nn.Linear,
        r: int,
        scaling: float,
        config: Any,
        *,
        freeze_a: bool,
        init_a: Any,
        generator: Optional[torch.Generator],
    ) -> LoraLinear:
        return self.layer_type(
            base, r, scaling, dropout=config.dropout, freeze_a=freeze_a, init_a=init_a, generator=generator
        )

    def build_extras(
        self, model: nn.Module, config: Any, adapted: Sequence[str], kept: Sequence[str], options: Mapping[str, Any]
    ) -> Any:
        """Modules beside the LoRA layers, built before the model changes (LoRATRF's filters)."""
        return None

    def install_extras(self, model: nn.Module, extras: Any) -> None:
        """Put what :meth:`build_extras` built into the model, after the LoRA layers are in place."""

    def layers(self, model: nn.Module) -> Dict[str, LoraLinear]:
        """This method's layers in ``model``: every ``layer_type`` (a variant with a layer of its own narrows it)."""
        return {name: m for name, m in model.named_modules() if isinstance(m, self.layer_type)}

    def adapter_modules(self, model: nn.Module) -> Dict[str, nn.Module]:
        return dict(self.layers(model))

    # -- merge ----------------------------------------------------------------------------------------------------

    def merge(self, model: nn.Module) -> nn.Module:
        layers = _require_layers(model)
        merged = [name for name, layer in layers.items() if layer.merged]
        if merged:
            raise AdapterStateError(f"{len(merged)} adapter(s) are already merged, e.g. {merged[0]!r}; unmerge first")
        # Every layer is checked before any is merged, so a refusal leaves the whole model as it was.
        for name, layer in layers.items():
            try:
                layer.check_merge()
            except NonFiniteError as e:
                raise NonFiniteError(f"{name!r}: {e}") from None
        for layer in layers.values():
            layer.merge()
        return model

    def unmerge(self, model: nn.Module) -> nn.Module:
        layers = _require_layers(model)
        unmerged = [name for name, layer in layers.items() if not layer.merged]
        if unmerged:
            raise AdapterStateError(f"{len(unmerged)} adapter(s) are not merged, e.g. {unmerged[0]!r}; merge first")
        for layer in layers.values():
            layer.unmerge()
        return model

    # -- files ----------------------------------------------------------------------------------------------------

    def adapter_state(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        layers = _require_layers(model)
        out: Dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach()
            out.update({f"{PEFT_PREFIX}{name}.{k}": v for k, v in self.layer_tensors(layer).items()})
        attachment = attachment_of(model)
        for name in attachment.modules_to_save if attachment is not None else ():
            for key, value in model.get_submodule(name).state_dict().items():
                out[f"{PEFT_PREFIX}{name}.{key}"] = value.detach()
        out.update(self.extra_state(model))
        return out

    def layer_tensors(self, layer: LoraLinear) -> Dict[str, torch.Tensor]:
        """A layer's file tensors beyond ``lora_A`` / ``lora_B``, by key below the module (DoRA's magnitude)."""
        return {}

    def extra_state(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """File tensors of the extra modules, under their file names."""
        return {}

    def describe(self, model: nn.Module) -> Dict[str, Any]:
        """Entries for the file's ``lowrank_rs`` key beyond the ones every LoRA file has."""
        return {}

    def peft_fields(self) -> Dict[str, Any]:
        """PEFT config fields that differ by variant."""
        return {"use_dora": False}

    def vllm_refusal(self, model: nn.Module) -> Optional[str]:
        """Why vLLM cannot serve this model's adapter, or ``None``."""
        return None

    def hidden_modules(self, model: nn.Module) -> List[str]:
        """Names of modules this method added beside its layers (absent from a fresh base model)."""
        return []

    def save_adapter(self, model: nn.Module, path: PathLike, *, vllm: bool = False, **options: Any) -> None:
        """Write the attached adapter as a PEFT LoRA directory (atomically, through the Rust core).

        ``peft.PeftModel.from_pretrained(base, path)`` rebuilds the same model. Per-module ranks and scales become
        ``rank_pattern`` / ``alpha_pattern``; ``target_modules`` is the config's own spec when PEFT would select
        exactly the adapted modules with it, otherwise the explicit list of adapted modules.

        ``vllm=True`` writes what vLLM can serve: vLLM reads one ``r`` and one ``lora_alpha`` for the whole adapter
        and ignores ``rank_pattern`` and ``alpha_pattern``. So each module's γ is folded into ``B`` and every module
        is zero-padded to the largest rank ``R`` (zero rows of ``A`` times zero columns of ``B`` add exactly
        nothing), with ``r = lora_alpha = R`` and no rsLoRA: scaling 1 everywhere, in vLLM and in PEFT alike. vLLM
        refuses ``modules_to_save``, so a model with any raises instead of writing a file vLLM cannot load.
        """
        if options:
            raise InvalidArgumentError(
                f"save_adapter got option(s) {sorted(options)}, which a {self.title} adapter does not take: it takes "
                "vllm= only (tasks= chooses the tasks of a multi-task adapter; this one has no tasks)"
            )
        attachment = require_attachment(model)
        layers = _require_layers(model)
        config = attachment.config
        hidden = set(self.hidden_modules(model))
        base_names = [
            name
            for name, _ in model.named_modules()
            if not any(name.startswith(w + ".") for w in layers) and name not in hidden
        ]
        ranks = {name: layer.r for name, layer in layers.items()}
        gammas = {name: layer.scaling for name, layer in layers.items()}
        task = task_type(model, set(layers), attachment.modules_to_save, base_names)
        modules_to_save = peft_modules_to_save(config.modules_to_save, attachment.modules_to_save, base_names)
        excluded_by = list(modules_to_save or ()) + list(TASK_EXTRA_MODULES.get(task or "", ()))
        target_modules = peft_target_modules(config.target_modules, set(layers), base_names, excluded_by)

        if vllm:
            refusal = self.vllm_refusal(model)
            if refusal is not None:
                raise InvalidArgumentError(refusal)
            if attachment.modules_to_save:
                raise InvalidArgumentError(
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
            tensors = self.adapter_state(model)
            r, alpha, use_rslora = config.r, json_number(config.alpha), config.use_rslora
            alphas = {name: alpha_reproducing(gammas[name], ranks[name], config.alpha, use_rslora) for name in layers}
            rank_pattern = {name: ranks[name] for name in layers if ranks[name] != config.r}
            alpha_pattern = {name: json_number(alphas[name]) for name in layers if alphas[name] != config.alpha}
            keys = pattern_keys(set(rank_pattern) | set(alpha_pattern), set(layers))
            rank_pattern = {keys[name]: value for name, value in rank_pattern.items()}
            alpha_pattern = {keys[name]: value for name, value in alpha_pattern.items()}

        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        peft_config = {
            "peft_type": "LORA",
            "task_type": task,
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
            **self.peft_fields(),
            "lora_bias": False,
            "lowrank_rs": {
                "version": __version__,
                "method": self.name,
                "config": config.to_dict(),
                "ranks": ranks,
                "scaling": gammas,
                "vllm": vllm,
                **self.describe(model),
            },
        }
        write_adapter(path, tensors, peft_config)

    def reads_file(self, peft_config: Mapping[str, Any]) -> bool:
        return peft_config.get("peft_type") == "LORA" and not peft_config.get("use_dora")

    def check_file(self, peft_config: Mapping[str, Any], path: PathLike) -> None:
        check_lora_file(peft_config, path, self.unsupported_peft_fields, self.title)

    # Hooks of the file's extra tensors: split them off, say what the model expects, check, load.

    def split_extras(
        self, tensors: Mapping[str, torch.Tensor], extras: Optional[Mapping[str, Any]], path: PathLike
    ) -> Tuple[Any, Mapping[str, torch.Tensor]]:
        return None, tensors

    def expected_extras(self, model: nn.Module, config: Any, adapted: Sequence[str], kept: Sequence[str]) -> Any:
        return None

    def present_extras(self, model: nn.Module) -> Any:
        return None

    def check_extras(self, expected: Any, weights: Any, path: PathLike) -> None:
        """That the file's extra tensors are exactly the ones the model has or will have."""

    def load_extras(self, model: nn.Module, weights: Any) -> None:
        """Copy the file's extra tensors into the model."""

    def config_for_loading(self, config: Any) -> Any:
        """The config ``attach`` rebuilds the model with while loading (before the file's weights go in)."""
        return config

    def config_from_peft(self, peft_config: Mapping[str, Any], adapted: Sequence[str], saved: Sequence[str]) -> Any:
        """The config of a file PEFT wrote (no ``lowrank_rs`` key)."""
        return self.config_type(
            target_modules=sorted(adapted),
            r=int(peft_config.get("r", 8)),
            alpha=float(peft_config.get("lora_alpha", 8)),
            use_rslora=bool(peft_config.get("use_rslora", False)),
            dropout=float(peft_config.get("lora_dropout", 0.0)),
            modules_to_save=sorted(saved),
        )

    def layer_state_keys(self) -> Tuple[str, ...]:
        """Keys below a module that :meth:`layer_tensors` writes (the file's tensors beside the factors)."""
        return ()

    def load_layer_tensors(self, layer: LoraLinear, tensors: Mapping[str, torch.Tensor], name: str) -> None:
        """Copy a layer's file tensors beyond the factors into it (checked by :meth:`split_factors`)."""

    def load_adapter(
        self, model: nn.Module, tensors: Mapping[str, torch.Tensor], peft_config: Mapping[str, Any], path: PathLike
    ) -> nn.Module:
        """Load a LoRA adapter directory — ours or one written by PEFT's ``save_pretrained`` — into ``model``.

        An unattached model is attached first (with the adapter's config, and with exactly the modules the file has
        weights for); an attached one must have the same adapted modules and ranks. Scales follow PEFT's rule for
        the file's ``lora_alpha``, ``alpha_pattern`` and ``rank_pattern``, so the result equals
        ``PeftModel.from_pretrained``. A module the model lacks, a shape that does not fit, or a PEFT feature this
        package does not implement raises, and leaves the model as it was.
        """
        self.check_file(peft_config, path)
        raw_extras = peft_config.get("lowrank_rs")
        extras = raw_extras if isinstance(raw_extras, dict) else None
        extra_weights, tensors = self.split_extras(tensors, extras, path)
        factors, layer_extra, rest = self.split_factors(tensors)
        if not factors:
            raise AdapterFormatError(f"{os.fspath(path)!r} holds no LoRA weights (no '*.lora_A.weight' tensors)")
        vllm = bool(extras and extras.get("vllm"))
        ranks, gammas = ranks_and_scales(factors, peft_config, extras if vllm else None)

        modules = dict(model.named_modules())
        missing = sorted(name for name in factors if name not in modules)
        if missing:
            raise TargetError(
                f"the adapter has weights for {len(missing)} module(s) the model does not have, e.g. {missing[0]!r}; "
                f"nearest names in the model: {nearest(missing[0], modules)}"
            )
        for name, (a, b) in factors.items():
            module = modules[name]
            base = module.base_layer if isinstance(module, LoraLinear) else module
            if not isinstance(base, nn.Linear):
                raise TargetError(f"the adapter targets {name!r}, which is a {type(base).__name__}, not an nn.Linear")
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise ShapeError(
                    f"adapter weights for {name!r} have lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the "
                    f"model's layer is {base.out_features}×{base.in_features}, so expected [r, {base.in_features}] "
                    f"and [{base.out_features}, r]"
                )
            self.check_layer_tensors(name, base, layer_extra.get(name, {}), path)

        # Everything is checked before the model changes, so a file that does not fit leaves the model as it was.
        attachment = attachment_of(model)
        if attachment is None:
            if extras is not None and "config" in extras:
                named = extras.get("method", self.name)
                try:
                    config = method_named(named).config_from_dict(extras["config"])
                except ConfigError as e:
                    raise AdapterFormatError(
                        f"{os.fspath(path)!r}: the config under lowrank_rs does not fit its method (method is "
                        f"{named!r}): {e}"
                    ) from None
            else:
                saved = saved_module_names(rest, peft_config.get("modules_to_save") or [], modules)
                config = self.config_from_peft(peft_config, list(factors), sorted(saved))
            kept = resolve_modules_to_save(modules, config.modules_to_save)
            targets = resolve_targets(modules, config.target_modules, kept, "")
            outside = sorted(set(factors) - set(targets))
            if outside:
                raise TargetError(
                    f"the adapter's config does not target {outside[0]!r}, yet the file has weights for it"
                )
            expected = self.expected_extras(model, config, [t for t in targets if t in factors], kept)
        else:
            kept = list(attachment.modules_to_save)
            layers = self.layers(model)
            if not layers:
                raise AdapterStateError(
                    f"the model has a {attachment.method} adapter attached, and {os.fspath(path)!r} is a {self.title} "
                    "adapter; load it into a fresh copy of the model"
                )
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
            expected = self.present_extras(model)
        self.check_extras(expected, extra_weights, path)
        saved_states = saved_module_states(rest, peft_config, kept, modules)

        if attachment is None:
            self.attach(
                model, self.config_for_loading(config), ranks={t: ranks.get(t, 0) for t in targets}, scales=gammas
            )
            record_attachment(model, Attachment(self.name, config, tuple(kept)))
        with torch.no_grad():
            for name, layer in self.layers(model).items():
                a, b = factors[name]
                layer.lora_A.weight.copy_(a[: ranks[name]])
                layer.lora_B.weight.copy_(b[:, : ranks[name]])
                layer.scaling = gammas[name]
                self.load_layer_tensors(layer, layer_extra.get(name, {}), name)
        for name, state in saved_states.items():
            modules[name].load_state_dict(state, strict=True)
        self.load_extras(model, extra_weights)
        return model

    def check_layer_tensors(
        self, name: str, base: nn.Linear, tensors: Mapping[str, torch.Tensor], path: PathLike
    ) -> None:
        """That a module's file tensors beyond the factors fit its base layer."""

    def split_factors(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> Tuple[Factors, Dict[str, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        """The file's LoRA factors by module, each module's other per-layer tensors (:meth:`layer_state_keys`), and
        the rest (``modules_to_save`` states), keyed without PEFT's prefix."""
        return split_factors(tensors, self.layer_state_keys(), self.title)

    # -- training, export, the job -------------------------------------------------------------------------------

    def export_hooks(self) -> Sequence[Any]:
        return (LORA_EXPORT,)

    def config_for_job(self, model: nn.Module, settings: Settings) -> Any:
        """The config the fine-tuning job attaches with, from its shared settings."""
        targets, heads = settings_targets(model, settings)
        return self.config_type(
            target_modules=targets,
            r=settings.rank,
            alpha=settings.lora_alpha,
            modules_to_save=heads,
            init_seed=settings.seed,
        )

    def prepare(self, model: nn.Module, examples: Sequence[Dict[str, Any]], settings: Settings, pad: int) -> Prepared:
        return Prepared(self.attach(model, self.config_for_job(model, settings)))

    def rank_budget(self, model: nn.Module, prepared: Prepared) -> Optional[int]:
        ranks = [layer.r for layer in lora_layers(model).values()]
        return sum(ranks) if ranks else None


def _require_layers(model: nn.Module) -> Dict[str, LoraLinear]:
    layers = lora_layers(model)
    if not layers:
        raise AdapterStateError("the model has no LoRA layers; call lowrank_rs.attach first")
    return layers


def _per_module(values: Optional[Mapping[str, Any]], what: str, targets: Sequence[str], check: Any) -> Dict[str, Any]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise InvalidArgumentError(f"{what} must be a mapping of module name to value, not {type(values).__name__}")
    unknown = [k for k in values if k not in targets]
    if unknown:
        raise TargetError(
            f"{what} names {unknown[0]!r}, which is not one of the config's target modules; "
            f"nearest targets: {nearest(str(unknown[0]), targets)}"
        )
    return {k: check(v, f"{what}[{k!r}]") for k, v in values.items()}


def _rank_value(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InvalidArgumentError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def _scale_value(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidArgumentError(f"{what} must be a finite number, got {value!r}")
    return float(value)
