"""What every config of the package shares: the JSON round trip and the field validators.

Configs are frozen dataclasses: a config that exists is valid, and ``dataclasses.replace`` builds a changed copy that
is validated again. Sequences are stored as tuples so that a config can be hashed and compared; ``to_dict`` turns them
back into lists for JSON. Each method's config lives with its method (``lowrank_rs.methods.<name>.config``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union, cast

from .errors import ConfigError

__all__ = [
    "JsonConfig",
    "MAX_ALPHA",
    "alpha_field",
    "TargetSpec",
    "bool_field",
    "choice",
    "field_default",
    "float_field",
    "int_field",
    "name_list",
    "regex_problem",
    "positive_float",
    "target_spec",
]

C = TypeVar("C", bound="JsonConfig")

_UNSAFE_SYNTAX = re.compile(r"\\[1-9]|\(\?P=|\(\?<?[=!]|\(\?\(")


def regex_problem(key: str, max_quantifiers: int) -> Optional[str]:
    """Why ``key`` might backtrack catastrophically in Python's ``re``, or None.

    Refused: backreferences, lookarounds, conditionals, a repeated group (``(a|aa)*``, ``(.*)+``, ``(ab){2,}``; an
    optional ``(...)?`` is allowed), and more than ``max_quantifiers`` quantifiers (k of them cost O(n^k) on an
    n-character name).
    """
    if _UNSAFE_SYNTAX.search(key):
        return f"key {key!r} uses a backreference, lookaround or conditional"
    quantifiers = 0
    previous = ""  # what the last token was: "atom", "(", ")" or "quantifier"
    i = 0
    while i < len(key):
        ch = key[i]
        if ch == "\\":
            i, previous = i + 2, "atom"
            continue
        if ch == "[":
            start = i + 1 + key.startswith("^", i + 1)
            close = key.find("]", start + key.startswith("]", start))  # a leading "]" is a literal
            if close < 0:
                return f"key {key!r} has an unclosed ["
            i, previous = close + 1, "atom"
            continue
        if ch in "*+{" or (ch == "?" and previous not in ("(", "quantifier")):
            # An optional group is one choice, counted as a quantifier; a repeated one is the catastrophic shape.
            if previous == ")" and ch != "?":
                return f"key {key!r} repeats a group (nested repetition backtracks catastrophically)"
            quantifiers += 1
            if ch == "{":
                close = key.find("}", i)
                if close < 0:
                    return f"key {key!r} has an unclosed {{"
                i = close
            i, previous = i + 1, "quantifier"
            if i < len(key) and key[i] in "?+":  # a lazy or possessive suffix belongs to the quantifier before it
                i += 1
            continue
        previous = ch if ch in "()" else "atom"
        i += 1
    if quantifiers > max_quantifiers:
        return f"key {key!r} has {quantifiers} quantifiers; at most {max_quantifiers} are allowed"
    return None


# A target regex is matched against every module name of the model; users' own (``.*\.(q|v)_proj``,
# ``model\.layers\.\d+\..*``) stay well inside these bounds.
MAX_TARGET_REGEX_LENGTH = 1000
_TARGET_REGEX_QUANTIFIERS = 4

TargetSpec = Union[str, Sequence[str]]


class JsonConfig:
    """The JSON round trip every config of the package shares (adapter configs, :class:`TrainConfig`).

    Subclasses are frozen dataclasses; tuples serialise as lists, unknown keys are an error listing the valid ones.
    """

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(cast(Any, self)):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls: Type[C], data: Mapping[str, Any]) -> C:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict needs a mapping, not {type(data).__name__}")
        valid = [f.name for f in dataclasses.fields(cast(Any, cls))]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {valid}")
        required = [
            f.name
            for f in dataclasses.fields(cast(Any, cls))
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ConfigError(f"{cls.__name__} needs field(s) {missing}")
        return cls(**dict(data))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls: Type[C], text: str) -> C:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls.__name__}.from_json: not valid JSON: {e}") from None
        return cls.from_dict(data)

    def _set(self, name: str, value: Any) -> None:
        # Frozen dataclasses only allow normalisation in __post_init__ through object.__setattr__.
        object.__setattr__(self, name, value)


def field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def target_spec(value: Any) -> Union[str, Tuple[str, ...]]:
    if isinstance(value, str):
        if not value:
            raise ConfigError("target_modules must not be an empty regex")
        if len(value) > MAX_TARGET_REGEX_LENGTH:
            raise ConfigError(f"target_modules regex is {len(value)} characters; at most {MAX_TARGET_REGEX_LENGTH}")
        problem = regex_problem(value, _TARGET_REGEX_QUANTIFIERS)
        if problem is not None:
            raise ConfigError(f"target_modules regex refused: {problem}")
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(
                f"target_modules is a string, so it is a regex, and {value!r} does not compile: {e}"
            ) from None
        return value
    found = name_list(value, "target_modules")
    if not found:
        raise ConfigError("target_modules must name at least one module (a list of name suffixes or a regex string)")
    return found


def name_list(value: Any, name: str) -> Tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{name} must be a list of module names, not {type(value).__name__} {value!r}")
    out = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{name} must hold non-empty strings, got {item!r}")
        out.append(item)
    if len(set(out)) != len(out):
        raise ConfigError(f"{name} lists a name twice: {out}")
    return tuple(out)


def int_field(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, not {type(value).__name__} {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def float_field(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, not {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    return value


def positive_float(value: Any, name: str) -> float:
    value = float_field(value, name)
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


# γ = alpha / r scales every adapter output; beyond this an alpha is a typo or a corruption (PEFT configs in the wild
# stay below a few thousand), and 1e308 overflows the first forward pass and the exported file.
MAX_ALPHA = 1e6


def alpha_field(value: Any, name: str) -> float:
    value = positive_float(value, name)
    if value > MAX_ALPHA:
        raise ConfigError(f"{name} must be at most {MAX_ALPHA:g}, got {value:g}")
    return value


def bool_field(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, not {type(value).__name__} {value!r}")
    return value


def choice(value: Any, name: str, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
