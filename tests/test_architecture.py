"""The shape docs/architecture.md promises: one registry that knows every method folder, generic code that names no
method, and no private name imported across modules. (The layer contract itself runs as `lint-imports` in CI.)"""

import ast
import pathlib

import lowrank_rs as lr
from lowrank_rs.adapters import Method, method_for, method_named, methods

PACKAGE = pathlib.Path(lr.__file__).parent
GENERIC = [
    "adapters",
    "training",
    "export",
    "workflows",
    "cli.py",
    "config.py",
    "linalg.py",
    "package.py",
    "statistics.py",
]


def _python_files(*parts):
    for part in parts:
        path = PACKAGE / part
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def test_every_method_folder_registers_one_method():
    folders = sorted(p.name for p in (PACKAGE / "methods").iterdir() if (p / "__init__.py").is_file())
    registered = sorted(m.name for m in methods())
    assert registered == folders
    for method in methods():
        assert isinstance(method, Method) and method_named(method.name) is method
        assert method.title and method.description
        assert method.config_type.__module__.startswith(f"lowrank_rs.methods.{method.name}.")


def test_configs_find_their_methods_through_the_registry():
    assert method_for(lr.LoraConfig(["q"])).name == "lora"
    assert method_for(lr.TLoraConfig(["q"])).name == "tlora"
    assert method_for(lr.TrfConfig()).name == "loratrf"
    assert method_for(lr.TaLoraConfig(tasks=["a"])).name == "talora"
    assert method_for(lr.DoraConfig(["q"])).name == "dora"


def _absolute(path, node):
    """The absolute module an ``ImportFrom`` in ``path`` names."""
    parts = ["lowrank_rs", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    if node.level == 0:
        return node.module or ""
    package = parts[: len(parts) - node.level + (1 if path.name == "__init__.py" else 0)]
    return ".".join(package + ([node.module] if node.module else []))


def test_generic_code_names_no_method_module():
    for path in _python_files(*GENERIC):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = _absolute(path, node)
                assert not target.startswith("lowrank_rs.methods"), f"{path}:{node.lineno} imports {target}"
            # The core demo writes a TLoRA-shaped file on purpose: it shows TLoRA's math with the core alone.
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and path.name != "demo.py":
                # A method's name in generic code is a special case where the registry should answer.
                assert node.value not in {m.name for m in methods()}, f"{path}:{node.lineno} names {node.value!r}"


def test_no_private_name_is_imported_across_modules():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    # `_core` is the compiled extension module itself, imported by name.
                    assert not private or alias.name == "_core", f"{path}:{node.lineno} imports {alias.name}"
