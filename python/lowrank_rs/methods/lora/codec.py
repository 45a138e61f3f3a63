"""LoRA's side of PEFT's file format: which files are LoRA files, the factors in them, and each module's rank and
scale by PEFT's rule. The method (loading into a model) and the export hooks (``.onnx_adapter`` files) both read
files through these."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from ...adapters.peft_format import PEFT_PREFIX, check_lora_fields, peft_pattern_key
from ...errors import AdapterFormatError, ShapeError

__all__ = ["UNSUPPORTED_PEFT_FIELDS", "Factors", "check_lora_file", "ranks_and_scales", "split_factors"]

PathLike = Union[str, "os.PathLike[str]"]
Factors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]

# A PEFT feature whose tensors or semantics this package does not reproduce; loading one must fail, not half-work.
# (A variant that implements one, as DoRA does use_dora, takes it off its own list.)
UNSUPPORTED_PEFT_FIELDS = (
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


def check_lora_file(peft_config: Mapping[str, Any], path: PathLike, unsupported: Sequence[str], title: str) -> None:
    """That a file is a PEFT LoRA adapter using no feature outside ``unsupported``'s complement."""
    where = os.fspath(path)
    if peft_config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{where!r} is a {peft_config.get('peft_type')!r} adapter; only LORA adapters load")
    if peft_config.get("bias", "none") != "none":
        raise AdapterFormatError(
            f"{where!r} trains biases (bias={peft_config['bias']!r}); only bias='none' is supported"
        )
    used = [k for k in unsupported if peft_config.get(k)]
    if used:
        raise AdapterFormatError(
            f"{where!r} uses PEFT LoRA feature(s) {used}, which lowrank-rs's {title} does not implement"
        )
    check_lora_fields(peft_config, where)


def split_factors(
    tensors: Mapping[str, torch.Tensor], layer_keys: Sequence[str] = (), title: str = "LoRA"
) -> Tuple[Factors, Dict[str, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
    """The file's LoRA factors by module, each module's other per-layer tensors (``layer_keys``), and
    the rest (``modules_to_save`` states), keyed without PEFT's prefix."""
    a: Dict[str, torch.Tensor] = {}
    b: Dict[str, torch.Tensor] = {}
    per_layer: Dict[str, Dict[str, torch.Tensor]] = {}
    rest: Dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        suffix = next((k for k in layer_keys if name.endswith("." + k)), None)
        if name.endswith(".lora_A.weight"):
            a[name[: -len(".lora_A.weight")]] = value
        elif name.endswith(".lora_B.weight"):
            b[name[: -len(".lora_B.weight")]] = value
        elif suffix is not None:
            per_layer.setdefault(name[: -len(suffix) - 1], {})[suffix] = value
        elif ".lora_" in name:
            raise AdapterFormatError(
                f"adapter tensor {key!r} belongs to a LoRA variant that {title} does not implement"
            )
        else:
            rest[name] = value
    unpaired = sorted(set(a) ^ set(b))
    if unpaired:
        raise AdapterFormatError(f"module {unpaired[0]!r} has only one of lora_A.weight / lora_B.weight")
    stray = sorted(set(per_layer) - set(a))
    if stray:
        raise AdapterFormatError(f"module {stray[0]!r} has {sorted(per_layer[stray[0]])} but no LoRA factors")
    for name in a:
        if a[name].ndim != 2 or b[name].ndim != 2 or a[name].shape[0] != b[name].shape[1]:
            raise ShapeError(
                f"{name!r}: lora_A {tuple(a[name].shape)} and lora_B {tuple(b[name].shape)} are not [r, d_in] "
                "and [d_out, r] with one r"
            )
    return {name: (a[name], b[name]) for name in a}, per_layer, rest


def ranks_and_scales(
    factors: Factors, config: Mapping[str, Any], vllm_extras: Optional[Mapping[str, Any]]
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
        r_key, alpha_key = peft_pattern_key(rank_pattern, name), peft_pattern_key(alpha_pattern, name)
        r_i = rank_pattern[r_key] if r_key is not None else r
        alpha_i = alpha_pattern[alpha_key] if alpha_key is not None else alpha
        gammas[name] = alpha_i / math.sqrt(r_i) if rslora else alpha_i / r_i
        if a.shape[0] != r_i:
            raise ShapeError(f"{name!r}: the file's config gives rank {r_i}, its lora_A has {a.shape[0]} rows")
        ranks[name] = r_i
        if vllm_extras is not None:
            true_rank = (vllm_extras.get("ranks") or {}).get(name, r_i)
            # The true rank sizes the layer attach builds, so it must come from the tensors, not the config alone.
            if isinstance(true_rank, bool) or not isinstance(true_rank, int) or not 1 <= true_rank <= a.shape[0]:
                raise AdapterFormatError(
                    f"{name!r}: lowrank_rs.ranks gives rank {true_rank!r}; the file's lora_A has {a.shape[0]} rows"
                )
            if a[true_rank:].any() or b[:, true_rank:].any():
                raise AdapterFormatError(f"{name!r}: the vLLM padding beyond rank {true_rank} is not zero")
            ranks[name] = true_rank
    return ranks, gammas
