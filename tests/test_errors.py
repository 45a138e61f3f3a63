"""Every exception class lives in lowrank_rs.errors, is exported, is a LowRankError and the built-in a user reaches
for; every class raised anywhere in the package is one of them; the README lists them all."""

import ast
import pathlib
import re

import lowrank_rs as lr
from lowrank_rs import errors

PACKAGE = pathlib.Path(lr.__file__).parent
# The repository's README, beside tests/ (the package itself may be installed elsewhere, e.g. site-packages).
README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BUILTINS = (ValueError, TypeError, OSError, MemoryError, RuntimeError, ImportError)


def _sources():
    return {p: ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def test_every_class_is_exported_and_derives_from_a_builtin():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, lr.LowRankError), name
        assert getattr(lr, name) is cls, f"{name} is not in the lowrank_rs facade"
        if cls is not lr.LowRankError:
            assert issubclass(cls, BUILTINS), f"{name} derives from no built-in exception"
    defined = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert defined == set(errors.__all__)


def test_no_exception_class_is_defined_outside_errors_py():
    for path, tree in _sources().items():
        if path.name == "errors.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                assert not any(b.endswith("Error") or b == "Exception" for b in bases), f"{path}: class {node.name}"


def test_every_raised_class_is_one_of_ours_and_none_is_the_bare_root():
    raised = set()
    for path, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                name = getattr(func, "id", getattr(func, "attr", None))
                if name and name.endswith("Error"):
                    raised.add(name)
                    assert name != "LowRankError", f"{path}:{node.lineno} raises the bare root; raise a subclass"
    ours = set(errors.__all__)
    # Built-ins re-raised with their own message are allowed only where Python's protocols demand them.
    foreign = raised - ours
    assert foreign <= {"AttributeError", "NotImplementedError"}, foreign
    assert raised & ours, "the scan found none of our classes, so it scanned nothing"


def test_readme_lists_every_class():
    text = README.read_text()
    section = text[text.index("Every error raised on bad input") :]
    section = section[: section.index("\n\n")]
    builtin = {cls.__name__ for cls in BUILTINS}
    listed = set(re.findall(r"`(\w+Error)`", section)) - builtin
    assert listed == set(errors.__all__)
