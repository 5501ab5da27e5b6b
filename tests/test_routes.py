"""One route table (router/net/routes.py): every route the router answers itself, where it is matched, and what
`miles-router check` prints of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from router.net.routes import Route, RouteTable

ROOT = Path(__file__).resolve().parent.parent


async def _h(scope, body):
    return None


def test_exact_paths_win_then_the_longest_prefix():
    table = RouteTable([Route(("GET",), "/workers/", _h, "one", prefix=True),
                        Route(("GET",), "/workers/special/", _h, "deeper", prefix=True),
                        Route(("GET",), "/workers", _h, "list")])
    assert table.match("GET", "/workers").doc == "list"
    assert table.match("GET", "/workers/abc").doc == "one"
    assert table.match("GET", "/workers/special/x").doc == "deeper"
    assert table.match("POST", "/workers") is None and table.match("GET", "/workersx") is None
    with pytest.raises(ValueError, match="route GET /workers is defined twice"):
        RouteTable([Route(("GET",), "/workers", _h, "a"), Route(("GET", "POST"), "/workers", _h, "b")])


def test_check_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "router", "check", "--config", str(ROOT / "router.toml.example")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["router_routes"]
    by_path = {(m, r["path"]): r for r in rows for m in r["methods"]}
    assert by_path[("POST", "/add_worker")]["admin"] and by_path[("POST", "/add_worker")]["owner"] == "router"
    assert by_path[("POST", "/sessions/*")]["owner"] == "sessions"
    assert by_path[("POST", "/retrieve_from_text")]["owner"] == "retrieval"
    assert by_path[("GET", "/v1/rl/workers")]["admin"] and by_path[("POST", "/pause_generation")]["admin"]
    assert len(by_path) == sum(len(r["methods"]) for r in rows)  # no (method, path) twice
