"""The layout that the architecture promises: the engine names no method."""

from __future__ import annotations

import ast
from pathlib import Path

import sam4med

PACKAGE = Path(sam4med.__file__).parent
METHODS = ("sam4med.evaluation", "sam4med.samaug", "sam4med.samunet", "sam4med.clicks", "sam4med.annotate", "sam4med.cli")


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names in a file, at any depth (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_engine_module_imports_a_method_package():
    engine_files = sorted((PACKAGE / "engine").glob("*.py"))
    assert len(engine_files) > 10
    offending = {f.name: sorted(m for m in imported_modules(f) if m.startswith(METHODS)) for f in engine_files}
    assert {name: mods for name, mods in offending.items() if mods} == {}


def test_the_walk_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from sam4med.samunet.loading import load_trained\n")
    assert "sam4med.samunet.loading" in imported_modules(probe)
