"""Config loading: defaults, the example file, and one-line errors naming file, key and reason."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from router.config import ConfigError, load_config
from router.core.urls import WorkerUrlError, host_allowed, normalize_worker_url

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_loads():
    cfg = load_config(ROOT / "router.toml.example")
    assert cfg.server.port == 30000 and cfg.simulate.workers == 2
    assert cfg.routes[0].path == "/generate"


@pytest.mark.parametrize(
    "body, expected",
    [
        ('[server]\nport = "x"', "server.port: expected an integer, got a string"),
        ("[server]\nprt = 1", "server.prt: unknown key"),
        ("[bogus]\na = 1", "bogus: unknown key"),
        ('[workers]\nurls = ["ftp://h:1"]', "workers.urls[0]: worker url must be http://host:port"),
        ("[workers]\nhealth_interval_s = 0", "workers.health_interval_s: must be > 0"),
        ('[[routes]]\npath = "/g"\npolicy = "fastest"', "routes[0].policy: invalid value 'fastest'"),
        ('[[routes]]\npath = "g"', "routes[0].path: must start with '/'"),
        ("[cache]\nbudget_bytes = 10\nhard_budget_bytes = 5", "cache.hard_budget_bytes: must be >="),
        ("[server\n", "(syntax): invalid TOML"),
        # constraints declared on the Structs (msgspec Meta), said in the router's words
        ("[workers]\nfailure_threshold = 0", "workers.failure_threshold: must be >= 1"),
        ("[breaker]\nfailure_rate = 1.5", "breaker.failure_rate: must be in (0, 1]"),
        ("[retry]\nstatuses = [500, 200]", "retry.statuses[1]: must be in 400..599 (an HTTP error status)"),
        ("[workers]\nmax_inflight_per_worker = 0", "workers.max_inflight_per_worker: must be >= 1 (leave it out for no cap)"),
        ('[store]\npath = "  "', "store.path: must not be empty"),
        ("[simulate]\nworkers = 65", "simulate.workers: must be in 0..64"),
        ('[routing]\nfanout_paths = ["/x"]', "routing.fanout_paths[0]: invalid value '/x': must be one of /abort_request"),
    ],
)
def test_bad_config_one_line(tmp_path, body, expected):
    p = tmp_path / "bad.toml"
    p.write_text(body)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}: ")
    assert expected in msg


def _bounded_fields(info, key=""):
    """(key path, inspect type) of every int/float field of the config with a declared bound."""
    import msgspec.inspect as mi

    for f in info.fields:
        t = f.type
        while isinstance(t, (mi.Metadata, mi.UnionType)):
            t = t.type if isinstance(t, mi.Metadata) else next(u for u in t.types if not isinstance(u, mi.NoneType))
        path = f"{key}.{f.encode_name}" if key else f.encode_name
        if isinstance(t, mi.StructType):
            yield from _bounded_fields(t, path)
        elif isinstance(t, (mi.IntType, mi.FloatType)) and (t.ge, t.gt, t.le, t.lt) != (None,) * 4:
            yield path, t


def test_every_declared_bound_fails_with_one_line_in_the_routers_words(tmp_path):
    import msgspec.inspect as mi

    from router.config import Config

    fields = list(_bounded_fields(mi.type_info(Config)))
    assert len(fields) >= 40  # the tables' numeric keys, breaker and simulate included
    for key, t in fields:
        low = t.gt if t.gt is not None else t.ge
        bad = low - 1 if low is not None else (t.le if t.le is not None else t.lt) + 1
        table, name = key.rsplit(".", 1)
        p = tmp_path / "bad.toml"
        p.write_text(f"[{table}]\n{name} = {bad if isinstance(t, mi.IntType) else float(bad)!r}\n")
        with pytest.raises(ConfigError) as ei:
            load_config(p)
        assert re.fullmatch(rf"{re.escape(str(p))}: {re.escape(key)}: must be [^\n]+", str(ei.value)), str(ei.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[workers]\nfailure_threshold = 'three'\n")
    r = subprocess.run([sys.executable, "-m", "router", "--config", str(p)], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert str(p) in lines[0] and "workers.failure_threshold" in lines[0] and "expected an integer" in lines[0]


def test_cli_bad_pipeline_exits_2(tmp_path):
    (tmp_path / "p.toml").write_text('stages = ["capture", "forward"]\n')
    cfg = tmp_path / "r.toml"
    cfg.write_text('[[routes]]\npath = "/generate"\npipeline = "p.toml"\n')
    r = subprocess.run([sys.executable, "-m", "router", "check", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2
    assert "p.toml: stages[0] (capture)" in r.stderr


def test_cli_check_prints_routes():
    r = subprocess.run([sys.executable, "-m", "router", "check", "--config", "router.toml.example"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert '"radix_lookup"' in r.stdout and '"insert"' in r.stdout and "passthrough" in r.stdout


@pytest.mark.parametrize(
    "url, norm",
    [("http://Host:80", "http://host:80"), ("http://h", "http://h:80"), ("http://h/", "http://h:80"),
     ("http://[::1]:5", "http://[::1]:5")],
)
def test_normalize_worker_url(url, norm):
    assert normalize_worker_url(url) == norm


@pytest.mark.parametrize(
    "url",
    ["ftp://h:1", "https://h:443", "http://user:pw@h:1", "http://h:1/path", "http://h:1?x=1", "http://", "javascript:alert(1)",
     "http://h:99999", "http://h:1\r\nX-Evil: 1", "file:///etc/passwd", ""],
)
def test_bad_worker_urls(url):
    with pytest.raises(WorkerUrlError):
        normalize_worker_url(url)


def test_host_allowlist():
    assert host_allowed("http://10.1.2.3:80", ["10.0.0.0/8"])
    assert not host_allowed("http://192.168.1.1:80", ["10.0.0.0/8"])
    assert host_allowed("http://gpu-1:80", ["gpu-1"])
    assert not host_allowed("http://gpu-2:80", ["gpu-1", "10.0.0.0/8"])
    assert host_allowed("http://anything:80", [])
