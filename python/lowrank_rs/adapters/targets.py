"""Which modules an adapter config selects, with Hugging Face PEFT's rules, so a config means the same in both.

A list target ``t`` matches module ``m`` when ``m == t`` or ``m`` ends with ``"." + t``; a string target is a regex
that must ``re.fullmatch`` the full module name; targets inside a ``modules_to_save`` module are left alone. Names
that match nothing are errors that list the nearest names.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, List, Mapping, Sequence, Union

from torch import nn

from ..errors import TargetError

__all__ = ["matches", "nearest", "resolve_modules_to_save", "resolve_targets"]


def matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def resolve_modules_to_save(modules: Mapping[str, nn.Module], names: Sequence[str]) -> List[str]:
    found: List[str] = []
    for entry in names:
        hits = [name for name in modules if name and matches(name, entry)]
        if not hits:
            raise TargetError(
                f"modules_to_save entry {entry!r} matches no module; nearest names: {nearest(entry, modules)}"
            )
        found.extend(hits)
    # A module inside another saved module is saved with it already.
    return [n for n in dict.fromkeys(found) if not any(n.startswith(o + ".") for o in found if o != n)]


def resolve_targets(
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
                f"nearest names: {nearest(spec, modules)}"
            )
    else:
        hits = []
        for entry in spec:
            found = [n for n in modules if n and matches(n, entry) and not inside_kept(n)]
            if not found:
                raise TargetError(
                    f"target module {entry!r} matches no module{where}; nearest names: {nearest(entry, modules)}"
                )
            hits.extend(found)
        hits = [n for n in modules if n in set(hits)]  # model order, once each
    wrong = [(n, type(modules[n]).__name__) for n in hits if not isinstance(modules[n], nn.Linear)]
    if wrong:
        shown = ", ".join(f"{n!r} ({t})" for n, t in wrong[:5])
        raise TargetError(f"targets must be nn.Linear layers, but the target spec {spec!r} also matches {shown}")
    return hits


def nearest(query: str, names: Iterable[str], n: int = 6) -> List[str]:
    names = [x for x in names if x]
    leaves = sorted({x.rsplit(".", 1)[-1] for x in names})
    found = difflib.get_close_matches(query, leaves, n=n, cutoff=0.5)
    found += difflib.get_close_matches(query, names, n=n, cutoff=0.5)
    found = list(dict.fromkeys(found))[:n]
    return found or leaves[:n]
