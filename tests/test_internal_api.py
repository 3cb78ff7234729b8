"""tune_integration uses the engine only through what modelbatch declares for it."""

from __future__ import annotations

import ast
from pathlib import Path

import modelbatch._internal


def allowed(module: str) -> bool:
    """A public module of modelbatch (no part of its name private), or the internal API."""
    return module == "modelbatch._internal" or not any(part.startswith("_") for part in module.split("."))


SOURCES = sorted((Path(__file__).parent.parent / "tune_integration").glob("*.py"))


def _engine_imports(path: Path) -> list[str]:
    """``module[.name]`` of each import of modelbatch in one file (``mb._x`` attribute reads too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [node.module] if (node.module or "").startswith("modelbatch") else []
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("modelbatch")]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "mb":
            found += [f"modelbatch.{node.attr}"] if node.attr.startswith("_") else []
    return found


def test_tune_integration_imports_no_private_modelbatch_module_but_the_internal_api():
    assert SOURCES
    imports = {f"{path.name}: {m}" for path in SOURCES for m in _engine_imports(path) if not allowed(m)}
    assert imports == set(), "import these from modelbatch._internal (add them there if missing)"
    assert any("modelbatch._internal" in _engine_imports(path) for path in SOURCES)


def test_the_internal_api_exports_what_it_lists():
    assert all(hasattr(modelbatch._internal, name) for name in modelbatch._internal.__all__)
