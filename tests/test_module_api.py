"""Every module says what it offers (DESIGN.md: ``__all__`` explicit): a name one snncompile module imports from
another is in the other's ``__all__``, and every name an ``__all__`` lists exists."""

import ast
import importlib
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parents[1] / "snncompile"


def _modules() -> list[Path]:
    """The package's modules, but ``__main__.py``, which runs the command line when imported."""
    return [path for path in sorted(PACKAGE.rglob("*.py")) if path.name != "__main__.py"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_between_modules():
    """(importing file, imported module, name) for every ``from .x import name`` inside the package."""
    for path in _modules():
        package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
                for alias in node.names:
                    yield path.relative_to(PACKAGE.parent), module, alias.name


def test_names_imported_across_modules_are_in_their_modules_all():
    missing = []
    for path, module_name, name in _imports_between_modules():
        if name.startswith("_"):  # a private name shared on purpose says so by its underscore
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # an optional runtime's module (TensorRT, Triton) where it is not installed
            continue
        if isinstance(getattr(module, name, None), ModuleType):  # `from . import submodule`
            continue
        if name not in getattr(module, "__all__", ()):
            missing.append(f"{path}: {module_name}.{name}")
    assert not missing, "imported but not in __all__:\n" + "\n".join(missing)


def test_every_public_module_has_an_all():
    """Private modules (``kernels/_triton.py``: Triton's kernels, reached through ``kernels/lif.py``) excepted."""
    without = [str(path.relative_to(PACKAGE.parent)) for path in _modules()
               if not path.stem.startswith("_") or path.name == "__init__.py"
               if not any(isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "__all__"
                          for node in ast.parse(path.read_text()).body)]
    assert not without, without


def test_every_name_in_an_all_exists():
    absent = []
    for path in _modules():
        try:
            module = importlib.import_module(_module_name(path))
        except ImportError:
            continue
        absent += [f"{module.__name__}.{name}" for name in getattr(module, "__all__", ()) if not hasattr(module, name)]
    assert not absent, absent
