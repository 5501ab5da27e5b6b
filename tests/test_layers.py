"""The layers point one way: router/wire <- router/core <- router/stages and router/net.

wire (formats) imports neither core, stages nor net; core (pure logic) imports neither stages nor
net; stages import no net. Checked on every import statement, function-level ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROUTER = Path(__file__).resolve().parent.parent / "router"
FORBIDDEN = {
    "wire": ("router.core", "router.stages", "router.net"),
    "core": ("router.stages", "router.net"),
    "stages": ("router.net",),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text("utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "router":  # `from router import net`
                found += [(node.lineno, f"router.{a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return sorted(found)


def violations(layer: str) -> list[str]:
    bad = []
    for path in sorted((ROUTER / layer).rglob("*.py")):
        for line, module in imported_modules(path):
            if module.startswith("."):
                bad.append(f"{path.relative_to(ROUTER.parent)}:{line}: relative import {module} (use router.*)")
            elif any(module == f or module.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(ROUTER.parent)}:{line}: imports {module}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer):
    assert violations(layer) == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The checker itself finds an upward import, also one inside a function."""
    fake = tmp_path / "router"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("def f():\n    from router.net.upstream import UpstreamPool\n"
                                          "from router import stages\n")
    monkeypatch.setattr(__import__(__name__), "ROUTER", fake)
    assert violations("core") == ["router/core/bad.py:2: imports router.net.upstream",
                                  "router/core/bad.py:3: imports router.stages"]
