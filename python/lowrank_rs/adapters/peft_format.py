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

from ..config import MAX_ALPHA, regex_problem
from ..errors import AdapterFormatError, InvalidArgumentError, NonFiniteError, ShapeError, TargetError

__all__ = [
    "MAX_LORA_ALPHA",
    "MAX_LORA_RANK",
    "MAX_PATTERN_KEY_LENGTH",
    "MAX_REGEX_PATTERN_KEYS",
    "PEFT_PREFIX",
    "check_finite_tensors",
    "check_lora_fields",
    "pattern_key_problem",
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


# PEFT applies the keys as regexes, so a crafted key like ``(.*.*)*z`` backtracks for hours. Keys as this package
# writes them (plain dotted paths, or ``^`` + an escaped path) are matched without a regex; any other key must be
# short, have at most two quantifiers, none on a group, and no backreference or lookaround. The worst such key costs
# O(n^3) steps on an n-character module name (PEFT's own ``.*`` prefix plus two): about 3 ms for n = 200 — see
# tests/test_hardening.py::test_pattern_key_worst_case_is_bounded, which measures it.
MAX_PATTERN_KEY_LENGTH = 256
MAX_REGEX_PATTERN_KEYS = 16
_MAX_QUANTIFIERS = 2
_QUANTIFIER_CHARS = re.compile(r"[*+?{]")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-.]+")
_ANCHORED_KEY = re.compile(r"\^(?:[A-Za-z0-9_]|\\[.\-]|-)+")


def pattern_key_problem(key: Any) -> Optional[str]:
    """Why PEFT's ``(.*\\.)?(key)$`` cannot be matched safely for ``key``, or None if it can."""
    if not isinstance(key, str) or not key:
        return f"a key must be a non-empty string, not {key!r}"
    if len(key) > MAX_PATTERN_KEY_LENGTH:
        return f"a key of {len(key)} characters is longer than {MAX_PATTERN_KEY_LENGTH}"
    if _PLAIN_KEY.fullmatch(key) or _ANCHORED_KEY.fullmatch(key):
        return None
    problem = regex_problem(key, _MAX_QUANTIFIERS)
    if problem is not None:
        return problem
    try:
        re.compile(rf"(.*\.)?({key})$")
    except re.error as e:
        return f"key {key!r} is not a valid regex: {e}"
    return None


def _key_matches(key: str, name: str) -> bool:
    if _ANCHORED_KEY.fullmatch(key):
        return name == re.sub(r"\\(.)", r"\1", key[1:])
    if _PLAIN_KEY.fullmatch(key):
        # PEFT's regex reads each "." of a plain key as any character; the key's length fixes where it must start.
        start = len(name) - len(key)
        if start < 0 or (start > 0 and name[start - 1] != "."):
            return False
        return all(k == "." or k == c for k, c in zip(key, name[start:]))
    return re.match(rf"(.*\.)?({key})$", name) is not None


def peft_pattern_key(keys: Iterable[str], name: str) -> Optional[str]:
    """The key PEFT 0.21 picks for ``name`` (``peft.utils.other.get_pattern_key``), or None for the default.

    Keys must have passed :func:`pattern_key_problem` (a file's keys are checked by :func:`check_lora_fields`).
    """
    for key in keys:
        if _key_matches(key, name):
            return key
    return None


MAX_LORA_ALPHA = MAX_ALPHA
# A rank beyond the tensor sizes any model has; the file's tensors bound it further (``ranks_and_scales``).
MAX_LORA_RANK = 1 << 20


def _field_int(value: Any, name: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterFormatError(f"{where!r}: {name} must be an integer, not {type(value).__name__} {value!r}")
    if not minimum <= value <= MAX_LORA_RANK:
        raise AdapterFormatError(f"{where!r}: {name} must lie in [{minimum}, {MAX_LORA_RANK}], got {value}")
    return value


def _field_alpha(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterFormatError(f"{where!r}: {name} must be a number, not {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and 0 < value <= MAX_LORA_ALPHA):
        raise AdapterFormatError(f"{where!r}: {name} must be a positive number up to {MAX_LORA_ALPHA:g}, got {value!r}")
    return float(value)


def _field_pattern(value: Any, name: str, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterFormatError(
            f"{where!r}: {name} must be a mapping of module-name pattern to value, not {type(value).__name__} {value!r}"
        )
    slow = 0
    for key in value:
        problem = pattern_key_problem(key)
        if problem is not None:
            raise AdapterFormatError(f"{where!r}: {name}: {problem}")
        # Only a quantifier makes a key cost more than a plain comparison; PEFT users' ``^model.layers.0.q_proj``
        # keys (unescaped dots) have none, so any number of them is fine.
        slow += bool(_QUANTIFIER_CHARS.search(key))
    if slow > MAX_REGEX_PATTERN_KEYS:
        raise AdapterFormatError(
            f"{where!r}: {name} has {slow} keys with quantifiers; at most {MAX_REGEX_PATTERN_KEYS} (keys without "
            "quantifiers are not limited)"
        )
    return value


def check_finite_tensors(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse a file tensor holding NaN or infinity, naming it.

    Loaded, it would reach the base weight on merge (where unmerge cannot take it out again) or the ONNX Runtime
    adapter file, often with finite logits, so nothing downstream would tell the user.
    """
    for key, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"{where!r}: adapter tensor {key!r} holds NaN or infinity")


def check_lora_fields(peft_config: Mapping[str, Any], where: str) -> None:
    """Every field of a PEFT LoRA config this package reads, checked by type and range before anything is built.

    JSON has no integer/boolean discipline of its own, so ``"use_rslora": "false"`` or ``"r": "8"`` would otherwise
    be read by Python's truthiness and arithmetic rules instead of refused.
    """
    _field_int(peft_config.get("r", 8), "r", where, 1)
    _field_alpha(peft_config.get("lora_alpha", 8), "lora_alpha", where)
    rslora = peft_config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterFormatError(f"{where!r}: use_rslora must be true or false, not {type(rslora).__name__} {rslora!r}")
    dropout = peft_config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise AdapterFormatError(f"{where!r}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    for key, value in _field_pattern(peft_config.get("rank_pattern"), "rank_pattern", where).items():
        _field_int(value, f"rank_pattern[{key!r}]", where, 1)
    for key, value in _field_pattern(peft_config.get("alpha_pattern"), "alpha_pattern", where).items():
        _field_alpha(value, f"alpha_pattern[{key!r}]", where)
    saved = peft_config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
        raise AdapterFormatError(f"{where!r}: modules_to_save must be a list of module names or null, got {saved!r}")
    extras = peft_config.get("lowrank_rs")
    if extras is None:
        return
    if not isinstance(extras, dict):
        raise AdapterFormatError(f"{where!r}: lowrank_rs must be a mapping, not {type(extras).__name__}")
    if not isinstance(extras.get("vllm", False), bool):
        raise AdapterFormatError(f"{where!r}: lowrank_rs.vllm must be true or false, got {extras['vllm']!r}")
    if not isinstance(extras.get("method", ""), str):
        raise AdapterFormatError(f"{where!r}: lowrank_rs.method must be a string, got {extras['method']!r}")
    if "config" in extras and not isinstance(extras["config"], dict):
        raise AdapterFormatError(f"{where!r}: lowrank_rs.config must be a mapping, got {extras['config']!r}")
    ranks = extras.get("ranks")
    if ranks is not None:
        if not isinstance(ranks, dict):
            raise AdapterFormatError(f"{where!r}: lowrank_rs.ranks must be a mapping of module to rank, got {ranks!r}")
        for key, value in ranks.items():
            _field_int(value, f"lowrank_rs.ranks[{key!r}]", where, 0)


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
