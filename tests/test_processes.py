"""`--processes N` over real processes (router/net/supervisor.py): one supervisor, N router processes on one port.

- both processes serve the port (fresh connections reach each: /health says which pid answered), /metrics on
  either answers for both (a `process` label), and an admin call that reaches one process (register a worker,
  pause the engines, remove a worker) holds in every process;
- a process killed with SIGKILL: the port keeps serving (every request after the kill succeeds), a new process
  takes its place and has the admin state from before it started; the supervisor killed with SIGKILL: its
  processes drain and exit;
- SIGTERM to the supervisor: requests in flight in every process finish, and it exits 0;
- N > 1 without a store every process shares is refused with one line naming the key.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from harness import free_port, gone, parent_of, start_sim
from router.config import load_config
from router.core.pipeline import load_pipeline
from router.net.supervisor import processes_problem

ROOT = Path(__file__).resolve().parent.parent


class Supervised:
    """`python -m router --config router.toml [args]` with `[server] processes` > 1, its log in the test's folder."""

    def __init__(self, folder: Path, config: str, *args: str) -> None:
        self.port = free_port()
        self.folder = folder
        cfg = folder / "router.toml"
        cfg.write_text(f"[server]\nport = {self.port}\n{config}")
        self.log_path = folder / "router.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "router", "--config", str(cfg), *args], cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    async def pids(self, n: int, timeout: float = 30.0) -> set[int]:
        """The pids of the processes serving the port, once `n` different ones answered /health."""
        seen: set[int] = set()
        with trio.fail_after(timeout):
            while len(seen) < n:
                if self.proc.poll() is not None:
                    raise AssertionError(f"supervisor exited {self.proc.returncode}: {self.log[-3000:]}")
                try:
                    async with fresh(self.url) as c:
                        r = await c.get("/health")
                        if r.json()["healthy_workers"] >= 1:
                            seen.add(r.json()["pid"])
                except httpx.HTTPError:
                    await trio.sleep(0.05)
        return seen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def fresh(url: str) -> httpx.AsyncClient:
    """A client on one new connection: the kernel hands it to any of the processes."""
    return httpx.AsyncClient(base_url=url, trust_env=False, timeout=10.0, limits=httpx.Limits(max_connections=1))


async def each_process(url: str, n: int, path: str, timeout: float = 10.0) -> dict[int, dict]:
    """GET `path` from every one of the `n` processes (pid -> JSON), over fresh connections."""
    answers: dict[int, dict] = {}
    with trio.fail_after(timeout):
        while len(answers) < n:
            async with fresh(url) as c:  # /health and `path` on the same connection: the same process
                pid = (await c.get("/health")).json()["pid"]
                answers[pid] = (await c.get(path)).json()
    return answers


async def eventually_each(url: str, n: int, path: str, check, timeout: float = 5.0) -> dict[int, dict]:
    """Until `check(answer)` holds in every process; the last answers."""
    with trio.fail_after(timeout):
        while True:
            answers = await each_process(url, n, path)
            if all(check(a) for a in answers.values()):
                return answers
            await trio.sleep(0.02)


SIM = """
[simulate]
workers = 1
tokenizer = "builtin:tiny"
token_latency_s = {latency}
[workers]
health_interval_s = 0.2
[tokenizer]
path = "builtin:tiny"
[sessions]
enabled = false
"""


def generate(c: httpx.AsyncClient, tokens: int = 4):
    return c.post("/generate", json={"text": "hello there", "sampling_params": {"max_new_tokens": tokens}})


REPLACED_BOUND_S = 10.0  # from a process's SIGKILL until its replacement answers with the admin state


@pytest.fixture
def supervised(tmp_path):
    started = []

    def start(config: str, *args: str) -> Supervised:
        s = Supervised(tmp_path, config, *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


async def test_processes_share_the_port_and_every_admin_call(supervised, nursery):
    s = supervised("processes = 2\n" + SIM.format(latency=0.0))
    pids = await s.pids(2)
    assert s.proc.pid not in pids and {parent_of(p) for p in pids} == {s.proc.pid}
    # the embedded simulated worker runs once, in the supervisor: both processes route to the same one
    (sim_url,) = {w["url"] for a in (await each_process(s.url, 2, "/workers")).values() for w in a["workers"]}
    for _ in range(6):
        async with fresh(s.url) as c:
            r = await generate(c)
            assert r.status_code == 200 and r.headers["x-miles-router-worker"] == sim_url
    # /metrics on either process answers for both, each process's series under its own label
    for _ in range(4):
        async with fresh(s.url) as c:
            families = {f.name: f for f in text_string_to_metric_families((await c.get("/metrics")).text)}
        served = {smp.labels["process"]: smp.value for smp in families["miles_router_requests"].samples
                  if smp.name == "miles_router_requests_total" and smp.labels["route"] == "(proxy)"}
        assert sum(served.values()) == 6 and set(served) <= {"1", "2"}
        probed = {smp.labels["process"] for smp in families["miles_router_worker_healthy"].samples}
        assert probed == {"1", "2"}

    # an admin call reaches one process; every process acts on it
    extra = await start_sim(nursery)
    async with fresh(s.url) as c:
        assert (await c.post("/add_worker", params={"url": extra.url})).status_code == 200
    both = await eventually_each(s.url, 2, "/workers", lambda a: a["total"] == 2)
    ids = {pid: sorted((w["url"], w["id"]) for w in a["workers"]) for pid, a in both.items()}
    assert len(set(map(tuple, ids.values()))) == 1  # the same workers under the same ids

    async with fresh(s.url) as c:
        r = await c.post("/pause_generation", json={})
        assert r.status_code == 200 and r.json()["succeeded"] == 2
    await eventually_each(s.url, 2, "/v1/rl/workers",
                          lambda a: {w["control_state"] for w in a["workers"]} == {"paused"})
    async with fresh(s.url) as c:
        assert (await c.post("/continue_generation", json={})).status_code == 200
    await eventually_each(s.url, 2, "/v1/rl/workers",
                          lambda a: {w["control_state"] for w in a["workers"]} == {"running"})

    extra_id = next(i for url, i in next(iter(ids.values())) if url == extra.url)
    async with fresh(s.url) as c:  # miles' deregistration: the id one process listed, deleted on any
        assert (await c.delete(f"/workers/{extra_id}")).status_code == 202
    await eventually_each(s.url, 2, "/workers", lambda a: [w["url"] for w in a["workers"]] == [sim_url])


async def test_a_killed_process_is_replaced_and_the_port_keeps_serving(supervised, nursery):
    s = supervised(SIM.format(latency=0.0), "--processes", "2")
    pids = await s.pids(2)
    extra = await start_sim(nursery)
    async with fresh(s.url) as c:
        assert (await c.post("/workers", json={"url": extra.url})).status_code == 202
    await eventually_each(s.url, 2, "/workers", lambda a: a["total"] == 2)

    outcomes: list[tuple[float, float, bool]] = []  # (sent, done, ok) of every request, new connection each
    stop = trio.Event()

    async def load() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                async with fresh(s.url) as c:
                    ok = (await generate(c)).status_code == 200
            except httpx.HTTPError:
                ok = False
            outcomes.append((t0, time.monotonic(), ok))

    async with trio.open_nursery() as n:
        for _ in range(2):
            n.start_soon(load)
        await trio.sleep(0.3)
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(5):
            while not gone(victim):
                await trio.sleep(0.005)
        killed_at = time.monotonic()
        # a new process takes the slot, with the worker registered before it started
        answers = await eventually_each(s.url, 2, "/workers", lambda a: a["total"] == 2, timeout=20)
        replaced_s = time.monotonic() - killed_at
        new = set(answers) - pids
        assert len(new) == 1 and victim not in answers, answers.keys()
        # the supervisor's first restart delay (0.5 s) plus a process start-up; generous for a loaded machine
        assert replaced_s < REPLACED_BOUND_S, replaced_s
        await trio.sleep(0.3)
        stop.set()
    after = [ok for sent, _, ok in outcomes if sent > killed_at]
    assert len(after) >= 20 and all(after), f"{after.count(False)} of {len(after)} failed after the kill"
    # what failed was on the wire at the kill (at most one per client)
    assert sum(1 for *_, ok in outcomes if not ok) <= 2
    assert "was killed by SIGKILL" in s.log and "starting another" in s.log
    failed = [(sent, done) for sent, done, ok in outcomes if not ok]
    print(f"\none of 2 processes killed (SIGKILL) under 2 clients: {len(outcomes)} requests, {len(failed)} failed "
          f"(in flight at the kill: sent {', '.join(f'{killed_at - t:.3f}' for t, _ in failed) or '-'} s before it), "
          f"{len(after)} after it, all 200; the new process served {replaced_s:.2f} s after the kill "
          f"(bound {REPLACED_BOUND_S:g} s)")

    # the supervisor killed with SIGKILL: no router process outlives it
    serving = set(answers)
    s.proc.kill()
    s.proc.wait()
    with trio.fail_after(10):
        while not all(gone(p) for p in serving):
            await trio.sleep(0.05)


async def test_sigterm_drains_every_process_and_exits_0(supervised):
    s = supervised("processes = 2\ndrain_timeout_s = 10\n" + SIM.format(latency=0.05))
    pids = await s.pids(2)
    connections: dict[int, list[httpx.AsyncClient]] = {pid: [] for pid in pids}
    while any(len(cs) < 3 for cs in connections.values()):  # 3 open connections to each process
        c = fresh(s.url)
        pid = (await c.get("/health")).json()["pid"]
        if len(connections[pid]) < 3:
            connections[pid].append(c)
        else:
            await c.aclose()
    results: list = []

    async def one(pid: int, c: httpx.AsyncClient) -> None:
        try:
            r = await generate(c, tokens=20)  # ~1 s on the worker
            results.append((pid, r.status_code, len(r.json()["output_ids"])))
        finally:
            await c.aclose()

    async with trio.open_nursery() as n:
        for pid, cs in connections.items():
            for c in cs:
                n.start_soon(one, pid, c)
        await trio.sleep(0.4)
        s.proc.send_signal(signal.SIGTERM)
    assert sorted(results) == sorted((pid, 200, 20) for pid in pids for _ in range(3))
    assert await trio.to_thread.run_sync(s.proc.wait, 10) == 0
    assert s.log.count("the supervisor drains") == 2 and "all 2 processes stopped" in s.log
    with pytest.raises(httpx.ConnectError):
        async with fresh(s.url) as c:
            await c.get("/health")


def refusal(tmp_path, toml: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "router.toml"
    cfg.write_text(toml)
    return subprocess.run([sys.executable, "-m", "router", "--config", str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_the_sqlite_store_refuses_several_processes(tmp_path):
    r = refusal(tmp_path, f"""
[server]
processes = 2
[tokenizer]
path = "builtin:tiny"
[[routes]]
path = "/generate"
pipeline = "{ROOT / 'pipelines/radix-cache.toml'}"
""")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"miles-router: {tmp_path / 'router.toml'}: server.processes = 2: /generate, /sessions: "
                           "the SQLite store (store.path) cannot be shared")
    assert line.endswith("set [store] url (PostgreSQL), or server.processes = 1")
    assert not (tmp_path / "miles-router-store.db").exists()  # refused before anything was opened


def test_a_port_in_use_is_refused_even_with_so_reuseport(tmp_path):
    with socket.socket() as taken:  # another router of the same user listening with SO_REUSEPORT
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = refusal(tmp_path, f"[server]\nport = {taken.getsockname()[1]}\nprocesses = 2\n[sessions]\nenabled = false\n")
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("miles-router: cannot start: ") and "in use" in line


def problem(tmp_path, toml: str) -> str | None:
    (tmp_path / "no-persist.toml").write_text('stages = ["radix_lookup", "tokenize", "forward", "capture", "insert"]\n')
    cfg_file = tmp_path / "router.toml"
    cfg_file.write_text(toml)
    cfg = load_config(cfg_file)
    pipelines = {(r.method, r.path): load_pipeline(r.pipeline, cfg.base_dir) for r in cfg.routes}
    if cfg.sessions.enabled:
        pipelines[("POST", "/sessions/{id}/v1/chat/completions")] = load_pipeline(cfg.sessions.pipeline, cfg.base_dir)
    return processes_problem(cfg, pipelines)


RADIX = f"""
[[routes]]
path = "/generate"
pipeline = "{ROOT / 'pipelines/radix-cache.toml'}"
"""


@pytest.mark.parametrize("toml, expected", [
    # nothing per request to share: several processes are fine, whatever the store
    ("[server]\nprocesses = 4\n[sessions]\nenabled = false\n", None),
    # one process: nothing to refuse
    ("[sessions]\nenabled = true\n" + RADIX, None),
    # sessions or trajectories in memory only
    ("[server]\nprocesses = 2\n[store]\nenabled = false\n",
     "/sessions: trajectories and sessions would live in each process's memory only"),
    ("[server]\nprocesses = 2\n[store]\nenabled = false\n[sessions]\nenabled = false\n" + RADIX,
     "/generate: trajectories and sessions would live in each process's memory only"),
    # the SQLite store
    ("[server]\nprocesses = 2\n", "/sessions: the SQLite store (store.path) cannot be shared"),
    # PostgreSQL: every process reads what the others stored
    ("[server]\nprocesses = 2\n[store]\nurl = \"postgresql://router@db/t\"\n" + RADIX, None),
    # ... unless the database is declared one router's own
    ("[server]\nprocesses = 2\n[store]\nurl = \"postgresql://router@db/t\"\nshared = false\n" + RADIX,
     "/generate, /sessions: store.shared = false makes the database one process's own"),
    # ... or a route keeps trajectories without storing them
    ("[server]\nprocesses = 2\n[store]\nurl = \"postgresql://router@db/t\"\n[sessions]\nenabled = false\n"
     "[[routes]]\npath = \"/generate\"\npipeline = \"no-persist.toml\"\n",
     "/generate: the pipeline keeps trajectories in each process's memory only (no persist stage)"),
])
def test_which_configs_may_run_several_processes(tmp_path, toml, expected):
    got = problem(tmp_path, toml)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.startswith(expected), got
