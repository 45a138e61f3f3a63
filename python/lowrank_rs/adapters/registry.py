"""The one registry of adapter methods.

Each method package registers its :class:`~lowrank_rs.adapters.method.Method` once, when it is imported
(``lowrank_rs.methods`` imports them all: adding a method is one line there). Lookups go by name, by the type of a
config (or another object ``attach`` takes, such as a calibration plan), by a model's attachment record, or by an
adapter file's config — never by ``isinstance`` chains in generic code.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Type

from torch import nn

from ..errors import AdapterFormatError, ConfigError, InvalidArgumentError
from .method import Method
from .record import attachment_of, require_attachment

__all__ = [
    "baseline",
    "method_for",
    "method_for_file",
    "method_named",
    "method_of",
    "method_or_none",
    "methods",
    "register",
    "has_adapter",
]

_BY_NAME: Dict[str, Method] = {}
_BY_TYPE: Dict[Type[Any], Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under its name and config types; returns it. A second method of the same name is an error."""
    if not isinstance(method, Method):
        raise InvalidArgumentError(f"register takes a Method instance, not {type(method).__name__}")
    known = _BY_NAME.get(method.name)
    if known is not None and type(known) is not type(method):
        raise InvalidArgumentError(f"a method named {method.name!r} is registered already ({known!r})")
    _BY_NAME[method.name] = method
    for kind in (method.config_type, *method.accepts):
        _BY_TYPE[kind] = method
    return method


def baseline() -> Method:
    """The first registered method: the plain baseline every variant is compared with and the default of
    ``export_onnx``'s slots (``lowrank_rs.methods`` registers LoRA first)."""
    if not _BY_NAME:
        raise InvalidArgumentError("no adapter method is registered; import lowrank_rs (which registers them all)")
    return next(iter(_BY_NAME.values()))


def methods() -> List[Method]:
    """Every registered method, in registration order."""
    return list(_BY_NAME.values())


def method_named(name: str) -> Method:
    method = _BY_NAME.get(name) if isinstance(name, str) else None
    if method is None:
        raise ConfigError(f"unknown adapter method {name!r}; known: {sorted(_BY_NAME)}")
    return method


def method_for(obj: Any) -> Method:
    """The method whose config (or other accepted object) ``obj`` is; the most derived registered type wins."""
    for kind in type(obj).__mro__:
        if kind in _BY_TYPE:
            return _BY_TYPE[kind]
    accepted = sorted({k.__name__ for k in _BY_TYPE})
    raise ConfigError(
        f"attach needs an adapter config or a calibration plan ({', '.join(accepted)}), not {type(obj).__name__}"
    )


def method_of(model: nn.Module) -> Method:
    """The method that adapted ``model`` (``AdapterStateError`` for a model without adapter)."""
    return method_named(require_attachment(model).method)


def method_or_none(model: nn.Module) -> Optional[Method]:
    """The method that adapted ``model``, or ``None`` for a model without adapter."""
    record = attachment_of(model)
    return None if record is None else method_named(record.method)


def method_for_file(peft_config: Mapping[str, Any], path: Any) -> Method:
    """The method that reads an adapter file: the one the file names, else the one that claims its PEFT config."""
    extras = peft_config.get("lowrank_rs")
    if isinstance(extras, Mapping) and "method" in extras:
        name = extras["method"]
        # Any JSON value can stand here; a list or a mapping is no method's name (and cannot be looked up).
        if not isinstance(name, str) or name not in _BY_NAME:
            raise AdapterFormatError(
                f"{os.fspath(path)!r} was written by lowrank-rs method {name!r}, which this version does not have; "
                f"known: {sorted(_BY_NAME)}"
            )
        return _BY_NAME[name]
    for method in _BY_NAME.values():
        if method.reads_file(peft_config):
            return method
    raise AdapterFormatError(
        f"{os.fspath(path)!r} is a {peft_config.get('peft_type')!r} adapter that no method here reads "
        f"(peft_type LORA, with or without use_dora, and lowrank-rs's own files load)"
    )


def has_adapter(model: nn.Module) -> bool:
    """Whether ``model`` carries an attachment record or any registered method's modules."""
    return attachment_of(model) is not None or any(m.adapter_modules(model) for m in _BY_NAME.values())


def config_from_dict(method: str, data: Mapping[str, Any]) -> Any:
    """The config of ``method`` (``"lora"``, ``"tlora"``, ...) from its ``to_dict`` form, as adapter files store it."""
    return method_named(method).config_from_dict(data)


def unregister(name: str) -> None:
    """Remove the method called ``name`` (a plug-in's tests, or replacing a method); unknown names are an error."""
    method = method_named(name)
    del _BY_NAME[name]
    for kind in [k for k, m in _BY_TYPE.items() if m is method]:
        del _BY_TYPE[kind]
