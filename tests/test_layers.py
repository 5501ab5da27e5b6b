"""The layers point one way: router/wire <- router/core <- router/stages and router/net; the simulator,
the tokenizer and the HTTP server stand beside them.

- wire (formats) imports nothing else of the router; core (pure logic) imports only wire;
- stages import no net (the I/O edge), and net imports no stage: stages reach it only through the
  pipeline, which loads them by name (router/core/pipeline.py);
- the simulator (router/sim) imports neither the I/O edge nor the stages: it serves through
  router/http like the router does;
- the tokenizer does not depend on the trajectory cache (router/core/radix) nor on the I/O edge;
- the HTTP server (router/http) imports nothing else of the router.

Checked on every import statement, function-level ones included, and on `importlib.import_module(...)`
and `__import__(...)` calls with a literal module name, so no import hides from the check."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROUTER = Path(__file__).resolve().parent.parent / "router"
EDGE_AND_TOOLS = ("router.stages", "router.net", "router.sim", "router.http", "router.tokenizer", "router.config",
                  "router.cli", "router.demo")
FORBIDDEN = {
    "wire": ("router.core", *EDGE_AND_TOOLS),
    "core": EDGE_AND_TOOLS,
    "stages": ("router.net", "router.sim", "router.http", "router.cli", "router.demo"),
    "net": ("router.stages", "router.cli", "router.demo"),
    "sim": ("router.net", "router.stages", "router.core.radix", "router.cli", "router.demo"),
    "tokenizer": ("router.core.radix", "router.net", "router.stages", "router.sim", "router.http", "router.config",
                  "router.cli", "router.demo"),
    "http": ("router",),  # anything of the router but itself
}
ALLOWED = {"http": ("router.http",)}
DYNAMIC_IMPORTS = {"import_module", "__import__"}


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
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            if name in DYNAMIC_IMPORTS:
                found.append((node.lineno, node.args[0].value))
    return sorted(found)


def _matches(module: str, prefixes) -> bool:
    return any(module == f or module.startswith(f + ".") for f in prefixes)


def violations(layer: str) -> list[str]:
    bad = []
    for path in sorted((ROUTER / layer).rglob("*.py")):
        for line, module in imported_modules(path):
            where = f"{path.relative_to(ROUTER.parent)}:{line}"
            if module.startswith("."):
                bad.append(f"{where}: relative import {module} (use router.*)")
            elif _matches(module, FORBIDDEN[layer]) and not _matches(module, ALLOWED.get(layer, ())):
                bad.append(f"{where}: imports {module}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer):
    assert (ROUTER / layer).is_dir()
    assert violations(layer) == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The checker itself finds an upward import, also one inside a function, and a dynamic one."""
    fake = tmp_path / "router"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("def f():\n    from router.net.upstream import UpstreamPool\n"
                                          "from router import stages\n"
                                          "def g():\n    return importlib.import_module('router.net.app')\n")
    (fake / "http").mkdir()
    (fake / "http" / "bad.py").write_text("from router.http.serve import serve_asgi\nimport router.wire\n")
    monkeypatch.setattr(__import__(__name__), "ROUTER", fake)
    assert violations("core") == ["router/core/bad.py:2: imports router.net.upstream",
                                  "router/core/bad.py:3: imports router.stages",
                                  "router/core/bad.py:5: imports router.net.app"]
    assert violations("http") == ["router/http/bad.py:2: imports router.wire"]


@pytest.mark.parametrize("package, must_not_load", [
    ("router.sim", ("router.net", "router.stages")),
    ("router.tokenizer", ("router.core.radix", "router.net", "router.stages")),
    ("router.http.serve", ("router.net", "router.core", "router.wire", "router.sim", "router.tokenizer")),
])
def test_importing_loads_no_forbidden_module(package, must_not_load):
    """What an import really pulls in, in a fresh interpreter (the static check above reads source)."""
    import subprocess
    import sys

    code = (f"import sys, {package}\n"
            f"print('\\n'.join(m for m in sys.modules if m.startswith({must_not_load!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROUTER.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == []
