"""The harness's tasks: offline, deterministic text classification built from installed material.

Every split is a hash of the text (never of its position), so it is the same on every machine with the same
installed versions; each task reports a fingerprint of its texts so a result says what it was measured on.

- ``package``: the package's own demo task (:func:`lowrank_rs.data.stdlib.package_task`): which of 8 standard-library
  packages a docstring comes from.
- ``sympy``: which of 8 SymPy subpackages a docstring comes from. SymPy is installed with PyTorch (a dependency of
  this package), so the texts are always present; they change only when SymPy's docstrings do (SymPy ≥ 1.13 is what
  PyTorch requires; the fingerprint pins the exact texts). Capped at 150 docstrings per subpackage (the first by
  text hash), so the task is balanced and as large as ``package``.
- the multi-task set: ``package``, ``domain`` (4 labels) and ``kind`` (class / function / method) over the stdlib
  docstrings, and the held-out transfer task ``returns``: whether the first 200 characters of the docstring mention
  a return value (the word "return…"). The label is a property of the text the model sees at 64 tokens, so it is
  learnable by construction (the harness checks it: a fresh LoRA on the full training set must clear the majority
  class); the old transfer task ("one-line vs multi-line") depended on newlines the tokenizer drops.

Validation is carved from the training split by a second hash (15%), so the test split is never used for choices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import re
from typing import Dict, List, Sequence, Tuple

from lowrank_rs.data import stdlib

Pairs = Tuple[Tuple[str, int], ...]

SYMPY_PARTS: Tuple[str, ...] = (
    "sympy.core",
    "sympy.polys",
    "sympy.matrices",
    "sympy.physics",
    "sympy.combinatorics",
    "sympy.functions",
    "sympy.solvers",
    "sympy.printing",
)
SYMPY_CAP = 150
VAL_FRACTION = 0.15
TEST_FRACTION = 0.2
SOURCE_TASKS: Tuple[str, ...] = ("package", "domain", "kind")
TRANSFER_TASK = "returns"
_RETURN = re.compile(r"\breturn", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    labels: Tuple[str, ...]
    train: Pairs
    val: Pairs
    test: Pairs
    fingerprint: str

    def majority(self, split: str = "test") -> float:
        rows = getattr(self, split)
        counts: Dict[int, int] = {}
        for _, y in rows:
            counts[y] = counts.get(y, 0) + 1
        return max(counts.values()) / len(rows)

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.labels)} labels, {len(self.train)} train / {len(self.val)} validation / "
            f"{len(self.test)} test, texts {self.fingerprint}"
        )


def _hash(text: str, salt: str) -> float:
    digest = hashlib.sha256((salt + text).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def _fingerprint(texts: Sequence[str]) -> str:
    return "sha256:" + hashlib.sha256("\0".join(texts).encode()).hexdigest()[:12] + f" ({len(texts)} texts)"


def _split(name: str, texts: Sequence[str], values: Sequence[str], labels: Sequence[str]) -> Task:
    index = {label: i for i, label in enumerate(labels)}
    train: List[Tuple[str, int]] = []
    val: List[Tuple[str, int]] = []
    test: List[Tuple[str, int]] = []
    for text, value in zip(texts, values):
        row = (text, index[value])
        # The test split is the package's own (same hash as lowrank_rs.data.stdlib); validation is a second hash of
        # what remains, so the package task's test set is exactly the demo's.
        if _hash(text, "") < TEST_FRACTION:
            test.append(row)
        elif _hash(text, "validation:") < VAL_FRACTION:
            val.append(row)
        else:
            train.append(row)
    return Task(name, tuple(labels), tuple(train), tuple(val), tuple(test), _fingerprint(texts))


def _stdlib_docs() -> List[stdlib.Docstring]:
    return stdlib.docstrings()


def package() -> Task:
    docs = _stdlib_docs()
    return _split("package", [d.text for d in docs], [d.package for d in docs], stdlib.PACKAGES)


def sympy() -> Task:
    # Importing SymPy's subpackages prints banners (e.g. "The Zen of SymPy"); the task's texts must not depend on
    # stdout, and the harness's progress lines should not drown in them.
    with contextlib.redirect_stdout(io.StringIO()):
        docs = stdlib.docstrings(SYMPY_PARTS)
    by_part: Dict[str, List[str]] = {}
    for doc in docs:
        by_part.setdefault(doc.package, []).append(doc.text)
    texts, values = [], []
    for part in SYMPY_PARTS:
        chosen = sorted(by_part.get(part, []), key=lambda t: _hash(t, "sympy-cap:"))[:SYMPY_CAP]
        texts += chosen
        values += [part.split(".", 1)[1]] * len(chosen)
    return _split("sympy", texts, values, [p.split(".", 1)[1] for p in SYMPY_PARTS])


def multitask() -> Dict[str, Task]:
    docs = _stdlib_docs()
    texts = [d.text for d in docs]
    domains = sorted(set(stdlib.DOMAINS.values()))
    return {
        "package": _split("package", texts, [d.package for d in docs], stdlib.PACKAGES),
        "domain": _split("domain", texts, [stdlib.DOMAINS[d.package] for d in docs], domains),
        "kind": _split("kind", texts, [d.kind for d in docs], stdlib.KINDS),
        TRANSFER_TASK: _split(
            TRANSFER_TASK,
            texts,
            ["mentions" if _RETURN.search(t[:200]) else "silent" for t in texts],
            ["silent", "mentions"],
        ),
    }


SINGLE = {"package": package, "sympy": sympy}
