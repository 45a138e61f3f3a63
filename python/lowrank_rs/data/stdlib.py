"""The built-in demo task: which standard-library package a docstring of Python's own standard library comes from.

Real English technical text that every Python installation carries, so the demo needs no download. Texts are the
docstrings (``inspect.getdoc``) of the public classes, functions and methods defined in eight large standard-library
packages and their submodules; an example's label is its package. The split is a hash of the text, so it is the same
on every run and on every machine with the same Python version (docstrings change a little between versions; the
task's :attr:`Task.fingerprint` says which texts a result was measured on).

The multi-task variant labels the same texts three more ways — the coarse domain of the package, the kind of object
documented, and whether the docstring is a one-liner — for multi-task training and few-shot transfer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import pkgutil
import warnings
from typing import Dict, List, Sequence, Tuple

# Chosen for size (each gives 80–210 docstrings) and for being pure-Python packages present in every CPython build.
PACKAGES: Tuple[str, ...] = ("asyncio", "email", "logging", "xml", "importlib", "http", "multiprocessing", "inspect")

# A coarsening of PACKAGES for the multi-task variant: related to the package task but not the same decision.
DOMAINS: Dict[str, str] = {
    "asyncio": "concurrency",
    "multiprocessing": "concurrency",
    "email": "formats",
    "xml": "formats",
    "http": "network",
    "logging": "runtime",
    "importlib": "runtime",
    "inspect": "runtime",
}
KINDS: Tuple[str, ...] = ("class", "function", "method")

# Submodules that are test suites, platform-specific or import-time noisy are not walked.
_SKIP_PARTS = ("test", "tests", "__main__", "windows", "_win", "idle")
_MIN_CHARS = 40


@dataclasses.dataclass(frozen=True)
class Docstring:
    text: str
    package: str
    kind: str  # one of KINDS
    qualname: str  # e.g. "asyncio.locks.Lock.acquire"


@dataclasses.dataclass(frozen=True)
class Task:
    """A classification task: texts, integer labels and the label names, split into train and test."""

    name: str
    labels: Tuple[str, ...]
    train: Tuple[Tuple[str, int], ...]
    test: Tuple[Tuple[str, int], ...]
    fingerprint: str

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train)} train / {len(self.test)} test examples, {self.num_labels} labels "
            f"({', '.join(self.labels)}), texts {self.fingerprint}"
        )


def docstrings(packages: Sequence[str] = PACKAGES) -> List[Docstring]:
    """Every distinct docstring of at least 40 characters of the public API of ``packages``, in a fixed order."""
    found: Dict[str, Docstring] = {}
    for package in packages:
        for module_name in _walk(package):
            module = _import(module_name)
            if module is None:
                continue
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                    continue
                if inspect.isclass(obj):
                    _add(found, obj, package, "class", f"{module_name}.{name}")
                    for member_name, member in sorted(vars(obj).items()):
                        # Other libraries patch methods onto stdlib classes (transformers adds
                        # logging.Logger.warning_advice); only the package's own code counts, so the task does not
                        # depend on what else the process imported.
                        if (
                            not member_name.startswith("_")
                            and inspect.isfunction(member)
                            and member.__module__ == module_name
                        ):
                            _add(found, member, package, "method", f"{module_name}.{name}.{member_name}")
                elif inspect.isfunction(obj):
                    _add(found, obj, package, "function", f"{module_name}.{name}")
    return list(found.values())


def package_task(test_fraction: float = 0.2) -> Task:
    """The demo task: the package a docstring comes from (8 labels)."""
    docs = docstrings()
    return _task("stdlib-package", docs, list(PACKAGES), [d.package for d in docs], test_fraction)


def multitask(test_fraction: float = 0.2) -> Dict[str, Task]:
    """The multi-task variant over the same texts: ``package`` (8 labels), ``domain`` (4), ``kind`` (3) and
    ``one_line`` (2, whether the docstring is a single line) — the last meant as the held-out task for few-shot
    transfer."""
    docs = docstrings()
    domains = sorted(set(DOMAINS.values()))
    return {
        "package": _task("package", docs, list(PACKAGES), [d.package for d in docs], test_fraction),
        "domain": _task("domain", docs, domains, [DOMAINS[d.package] for d in docs], test_fraction),
        "kind": _task("kind", docs, list(KINDS), [d.kind for d in docs], test_fraction),
        "one_line": _task(
            "one_line",
            docs,
            ["multi-line", "one-line"],
            ["one-line" if "\n" not in d.text else "multi-line" for d in docs],
            test_fraction,
        ),
    }


def _task(name: str, docs: Sequence[Docstring], labels: List[str], values: Sequence[str], test_fraction: float) -> Task:
    index = {label: i for i, label in enumerate(labels)}
    train: List[Tuple[str, int]] = []
    test: List[Tuple[str, int]] = []
    for doc, value in zip(docs, values):
        (test if _bucket(doc.text) < test_fraction else train).append((doc.text, index[value]))
    return Task(name, tuple(labels), tuple(train), tuple(test), _fingerprint(docs))


def _bucket(text: str) -> float:
    # A hash of the text, not of its position, so adding or losing a docstring elsewhere moves nothing.
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") / 2.0**64


def _fingerprint(docs: Sequence[Docstring]) -> str:
    digest = hashlib.sha256("\0".join(d.text for d in docs).encode()).hexdigest()[:12]
    return f"sha256:{digest} ({len(docs)} docstrings)"


def _walk(package: str) -> List[str]:
    module = _import(package)
    if module is None:
        return []
    names = [package]
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), package + "."):
        parts = info.name.split(".")
        if not any(part.startswith(_SKIP_PARTS) for part in parts[1:]):
            names.append(info.name)
    return sorted(names)


def _import(name: str):  # type: ignore[no-untyped-def]
    # Some submodules need optional C extensions or a platform; they are skipped, not fatal.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:
            return None


def _add(found: Dict[str, Docstring], obj: object, package: str, kind: str, qualname: str) -> None:
    text = inspect.getdoc(obj)
    if text and len(text) >= _MIN_CHARS and text not in found:
        found[text] = Docstring(text.strip(), package, kind, qualname)
