"""Hugging Face PEFT's adapter-directory conventions, as PEFT 0.21 reads and writes them.

Tensors are named ``base_model.model.<module>.<key>``; per-module ranks and scales go to ``rank_pattern`` /
``alpha_pattern`` keyed by module paths that PEFT's ``(.*\\.)?(key)$`` rule applies to exactly one module each, with
``alpha_i`` chosen so that PEFT's ``alpha_i / r_i`` (or ``alpha_i / sqrt(r_i)``) is bit-for-bit the module's γ;
``task_type`` and ``modules_to_save`` are written only where ``PeftModelFor<Task>`` would rebuild the same model.
Every method with a PEFT-shaped file (LoRA, TLoRA, LoRATRF, DoRA) writes through these.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Union

import torch
from torch import nn

from ..errors import AdapterFormatError, InvalidArgumentError, ShapeError, TargetError

__all__ = [
    "PEFT_PREFIX",
    "alpha_reproducing",
    "json_number",
    "pattern_keys",
    "peft_modules_to_save",
    "peft_pattern_key",
    "peft_saved_modules",
    "peft_scale",
    "peft_selects_targets",
    "peft_target_modules",
    "saved_module_names",
    "saved_module_states",
    "TASK_EXTRA_MODULES",
    "task_type",
]


PEFT_PREFIX = "base_model.model."


# PeftModelFor<Task> adds these to modules_to_save on load (peft/peft_model.py), which also removes them from LoRA.
TASK_EXTRA_MODULES = {
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


def peft_pattern_key(keys: Iterable[str], name: str) -> Optional[str]:
    """The key PEFT 0.21 picks for ``name`` (``peft.utils.other.get_pattern_key``), or None for the default."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def pattern_keys(entries: Set[str], adapted: Set[str]) -> Dict[str, str]:
    """``rank_pattern`` / ``alpha_pattern`` keys that PEFT applies to exactly one module each.

    PEFT treats the keys as regexes that may match any dotted suffix, first match wins. A plain module path is
    unambiguous unless it is also a suffix of another adapted module (``proj`` and ``inner.proj``); then every key
    is anchored and escaped (``^inner\\.proj``), which PEFT's ``(.*\\.)?(key)$`` can only match at the start.
    """
    for make in (lambda n: n, lambda n: "^" + re.escape(n)):
        keys = {name: make(name) for name in entries}
        # Each module must be matched by its own key or by none, whatever order the keys end up in the JSON.
        if all(
            [k for k in keys.values() if peft_pattern_key([k], m) is not None] == ([keys[m]] if m in keys else [])
            for m in adapted
        ):
            return keys
    raise InvalidArgumentError(
        "cannot write rank_pattern keys that PEFT would apply to one module each"
    )  # pragma: no cover


def alpha_reproducing(gamma: float, r: int, base_alpha: float, rslora: bool) -> float:
    """The ``alpha`` whose PEFT scaling ``alpha / r`` (``alpha / sqrt(r)``) comes closest to ``gamma`` in float64.

    It is ``gamma`` exactly for every γ that :func:`peft_scale` produced, which is every γ ``attach`` stores.
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


def peft_scale(gamma: float, r: int, base_alpha: float, rslora: bool) -> float:
    """``gamma`` moved by at most an ulp or two onto a value PEFT can compute as ``alpha_i / r_i``.

    Division by a rank that is not a power of two skips some float64 values (``alpha / 3`` steps by more than one
    ulp of the quotient), so without this a saved adapter could come back from PEFT a rounding step off.
    """
    alpha = alpha_reproducing(gamma, r, base_alpha, rslora)
    return alpha / (math.sqrt(r) if rslora else r)


def json_number(x: float) -> Union[int, float]:
    # PEFT and vLLM type lora_alpha as int; an integral alpha is written as one.
    return int(x) if float(x).is_integer() else float(x)


def peft_selects_targets(spec: Union[str, Sequence[str]], name: str, excluded_by: Sequence[str]) -> bool:
    # peft.tuners.tuners_utils.check_target_module_exists, PEFT 0.21, for the fields this package writes.
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in excluded_by):
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + t) for t in spec)


def peft_target_modules(
    spec: Union[str, Sequence[str]], adapted: Set[str], base_names: Sequence[str], excluded_by: Sequence[str]
) -> Union[str, List[str]]:
    exact_list = sorted(adapted)
    exact_regex = "(?:" + "|".join(re.escape(n) for n in exact_list) + ")"
    for candidate in (spec if isinstance(spec, str) else list(spec), exact_list, exact_regex):
        if {n for n in base_names if peft_selects_targets(candidate, n, excluded_by)} == adapted:
            return candidate
    raise InvalidArgumentError(  # pragma: no cover - the escaped alternation of full names selects exactly those names
        "cannot express the adapted modules as PEFT target_modules"
    )


def peft_saved_modules(entries: Sequence[str], base_names: Sequence[str]) -> Set[str]:
    # peft.utils.other._set_trainable: plain `endswith`, outermost module wins (inner ones are inside its copy).
    hits = [n for n in base_names if n and any(n.endswith(e) for e in entries)]
    return {n for n in hits if not any(n.startswith(o + ".") for o in hits if o != n)}


def peft_modules_to_save(
    requested: Sequence[str], saved: Sequence[str], base_names: Sequence[str]
) -> Optional[List[str]]:
    """The ``modules_to_save`` entries to write: the config's own (``requested``) when PEFT's suffix rule selects
    exactly ``saved`` with them, else the full names."""
    if not saved:
        return None
    for candidate in (list(requested), sorted(saved)):
        if peft_saved_modules(candidate, base_names) == set(saved):
            return candidate
    raise InvalidArgumentError(
        f"PEFT's modules_to_save rule (plain suffix match) would save more modules than {list(saved)}; "
        "rename the modules or list fewer"
    )


def task_type(model: nn.Module, adapted: Set[str], saved: Sequence[str], base_names: Sequence[str]) -> Optional[str]:
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
    extra = TASK_EXTRA_MODULES.get(task or "", ())
    if extra and any(not peft_selects_targets(list(adapted), n, extra) for n in adapted):
        return None
    if extra and not peft_saved_modules(extra, base_names) <= set(saved):
        return None
    return task


def saved_module_names(rest: Mapping[str, Any], entries: Sequence[str], modules: Mapping[str, nn.Module]) -> Set[str]:
    """The modules the non-LoRA tensors belong to, found among those PEFT's ``modules_to_save`` entries select."""
    candidates = peft_saved_modules(entries, list(modules))
    owners: Set[str] = set()
    for key in rest:
        owner = max((c for c in candidates if key.startswith(c + ".")), key=len, default=None)
        if owner is None:
            raise AdapterFormatError(
                f"adapter tensor {key!r} is neither a LoRA factor nor part of a modules_to_save module of the model"
            )
        owners.add(owner)
    return owners


def saved_module_states(
    rest: Mapping[str, torch.Tensor], peft_config: Mapping[str, Any], kept: Sequence[str], modules: Any
) -> Dict[str, Dict[str, torch.Tensor]]:
    """The file's whole-module states by module, each checked to fit its module exactly."""
    entries = list(peft_config.get("modules_to_save") or []) + list(kept)
    owners = saved_module_names(rest, entries, modules)
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
