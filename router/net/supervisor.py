"""`miles-router --processes N` (`server.processes`): N router processes serve one port under one supervisor.

One router process tops out at one core (~2,400 `/generate` req/s through the passthrough pipeline,
BENCHMARKS.md §1). N processes use N cores. This process runs no router itself; it
- reserves the port: it binds a socket with SO_REUSEPORT and never listens on it, so the port stays this
  router's across every restart of every process, and `port = 0` becomes one concrete port for all;
- starts the N processes (`python -m router run ...`, the same config), each of which binds its own listening
  socket to that port with SO_REUSEPORT (router/http/serve.py `reuse_port_socket`);
- runs the embedded simulated workers (`[simulate] workers`) once, here, and hands their URLs to every
  process as configured workers; they outlive any one process and stay up until all have drained;
- restarts a process that dies (0.5 s, doubling to 30 s while they keep dying within 30 s of starting; logged);
- keeps the admin state (workers registered or removed through the API, the control state of each engine)
  and passes each change to the other processes and to every new one before it serves (router/net/siblings.py);
- on SIGTERM/SIGINT tells every process to drain (each stops accepting and finishes its requests for up to
  `server.drain_timeout_s`, as one router does) and exits when all have: 0 if each exited 0. A second signal
  tells them to stop at once. A process still alive 10 s past the drain timeout gets SIGKILL.

Why each process listens on its own SO_REUSEPORT socket rather than on one socket the supervisor passes down:
with one shared accept queue every idle process wakes for each new connection (no EPOLLEXCLUSIVE in trio) and
the batch accept (router/http/trio_accept.py) lets whichever wins take up to 128 at once, so a burst lands on
one process; with SO_REUSEPORT the kernel spreads connections evenly (a hash of their addresses), each process
has its own queue, and nothing is contended. The cost: connections waiting in the queue of a process that
dies are reset (Linux >= 5.14 hands them to another process with `sysctl net.ipv4.tcp_migrate_req=1`), a loss
the requests in flight on that process share anyway. Keep-alive connections stay with the process that
accepted them, as they do with any load balancer.

Processes start with the same process group as the supervisor, and the supervisor tells them to drain over
their line rather than by a signal: a service manager that signals the whole group (systemd's default
KillMode, Ctrl-C in a terminal) gives each process its own signal plus the supervisor's message, which counts
as one request to drain, not two. A process whose supervisor dies (kill -9) drains and exits.

N > 1 needs state every process shares (`processes_problem`): each process has its own memory cache, sessions
and prefix-key filter, so with the SQLite store, or no store, a trajectory or session one process recorded
would be missing or stale in the next request's process. With `[store] url` (PostgreSQL, shared: not
`store.shared = false`) every process reads what the others stored.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

import trio

from router.config import Config
from router.http.serve import reuse_port_socket
from router.net.siblings import ENV, read_messages, write_messages
from router.wire.procs import Drain, MetricsAll, MetricsAsk, MetricsText, Ready, Stop, Synced, WorkerGone, WorkerView

log = logging.getLogger("miles_router")

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 30.0  # a process that lived this long resets the restart delay
KILL_GRACE_S = 10.0  # past the drain timeout, a process still alive is killed
METRICS_WAIT_S = 2.0  # the longest a /metrics question waits for the other processes


def _stateful(spec) -> tuple[bool, bool]:
    """(keeps trajectories, persists them) for a pipeline spec."""
    classes = [s.cls for s in spec.stages]
    keeps = any(getattr(c, "uses_tree", False) or getattr(c, "uses_store", False) for c in classes)
    return keeps, any(getattr(c, "uses_store", False) for c in classes)


def processes_problem(cfg: Config, pipelines: dict) -> str | None:
    """Why this config cannot run `server.processes` > 1 (one line, to follow the key and its value), or None.

    `pipelines`: (method, path) -> PipelineSpec of every route, the session chat route included (cli._load)."""
    if cfg.server.processes <= 1:
        return None
    shared = cfg.store.enabled and cfg.store.url is not None
    keeping = []  # routes that keep per-request state (trajectories, sessions)
    unpersisted = []
    for (_method, path), spec in pipelines.items():
        keeps, persists = _stateful(spec)
        is_session = path.startswith("/sessions")
        if keeps or is_session:
            keeping.append("/sessions" if is_session else path)
            if not persists:
                unpersisted.append("/sessions" if is_session else path)
    if not keeping:
        return None
    routes = ", ".join(sorted(set(keeping)))
    fix = "set [store] url (PostgreSQL), or server.processes = 1"
    if not cfg.store.enabled:
        return (f"{routes}: trajectories and sessions would live in each process's memory only (no durable "
                f"store), so another process would not find them; {fix}")
    if not shared:
        return (f"{routes}: the SQLite store (store.path) cannot be shared: each process would keep its own "
                f"memory cache, prefix-key filter and sessions over the one file, so a trajectory or session "
                f"that one process stored would be missing or stale in another; {fix}")
    if cfg.store.shared is False:
        return (f"{routes}: store.shared = false makes the database one process's own (asked only about keys "
                f"stored before it started, sessions never re-read), so a trajectory or session that one process "
                f"stored would be missing or stale in another; drop store.shared = false, or server.processes = 1")
    if unpersisted:
        return (f"{', '.join(sorted(set(unpersisted)))}: the pipeline keeps trajectories in each process's memory "
                f"only (no persist stage), so another process would not find them; add persist, or "
                f"server.processes = 1")
    return None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass(eq=False)
class Slot:
    """One of the N router processes (and its successors)."""

    index: int
    proc: trio.Process | None = None
    outbox: trio.MemorySendChannel | None = None
    serving: bool = False
    exit_codes: list = field(default_factory=list)


class Supervisor:
    def __init__(self, config: Config, child_command: list[str]) -> None:
        """`child_command`: how to start one router process (`python -m router run --config ...`), without --port."""
        self.config = config
        self.n = config.server.processes
        self.child_command = child_command
        self.slots = [Slot(i) for i in range(self.n)]
        self.views: dict[str, WorkerView] = {}  # url -> the latest admin view of that worker
        self.sim_urls: list[str] = []
        self.stopping = trio.Event()
        self.failed: str | None = None  # why startup failed
        self.all_serving = trio.Event()
        self.port = 0
        self._nursery: trio.Nursery | None = None
        self._asked = 0
        self._metrics_asks: dict[int, tuple[list, int, trio.Event]] = {}  # ask -> (answers, expected, all in)

    # ---- the port ---------------------------------------------------------------------------
    def reserve_port(self) -> socket.socket:
        """Bind (not listen) the configured address with SO_REUSEPORT; raises OSError when it is taken.

        SO_REUSEPORT alone would let this router join any other program of the same user that listens on the
        port the same way (another `--processes` router started by mistake): both would get half the
        connections. So the port is first bound without it, which fails while anything listens there."""
        sv = self.config.server
        with socket.socket(socket.AF_INET6 if ":" in sv.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((sv.host.strip("[]"), sv.port))
            port = probe.getsockname()[1]
        sock = reuse_port_socket(sv.host, port)
        self.port = port
        return sock

    @property
    def url(self) -> str:
        host = self.config.server.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    # ---- running ------------------------------------------------------------------------------
    async def run(self) -> int:
        """Supervise until every process has exited after a drain (or startup failed); the exit code."""
        from router.net.server import start_sim_workers

        reserved = self.reserve_port()
        try:
            async with trio.open_nursery() as root:
                sims = await start_sim_workers(self.config, root)
                self.sim_urls = [url for url, _ in sims]
                self._nursery = root
                root.start_soon(self._signals, root)
                root.start_soon(self._announce_when_serving)
                async with trio.open_nursery() as slots:
                    for slot in self.slots:
                        slots.start_soon(self._keep_running, slot)
                root.cancel_scope.cancel()  # the simulated workers, the signal watcher
        finally:
            reserved.close()
        if self.failed:
            print(f"miles-router: {self.failed}", file=sys.stderr)
            return 1
        bad = [(s.index, c) for s in self.slots for c in s.exit_codes[-1:] if c != 0]
        for index, code in bad:
            log.error("process %d/%d %s while draining", index + 1, self.n, _describe_exit(code))
        log.info("all %d processes stopped", self.n)
        return 1 if bad else 0

    async def _announce_when_serving(self) -> None:
        await self.all_serving.wait()
        pids = ", ".join(str(s.proc.pid) for s in self.slots if s.proc is not None)
        log.info("miles-router listening on %s with %d processes (pids %s; supervisor %d)", self.url, self.n,
                 pids, os.getpid())

    async def _signals(self, root: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.stopping.is_set():
                    log.info("%s: draining all %d processes (up to the drain timeout), then stopping", name, self.n)
                    self._stop(Drain(), root, self.config.server.drain_timeout_s + KILL_GRACE_S)
                else:
                    log.warning("second %s: stopping all processes now", name)
                    self._stop(Stop(), root, KILL_GRACE_S)

    def _stop(self, msg, root: trio.Nursery, kill_after_s: float) -> None:
        self.stopping.set()
        for slot in self.slots:
            if slot.outbox is not None:
                slot.outbox.send_nowait(msg)
        root.start_soon(self._kill_after, kill_after_s)

    async def _kill_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                log.error("process %d/%d (pid %d) still running %.0f s after the stop: killing it", slot.index + 1,
                          self.n, slot.proc.pid, seconds)
                slot.proc.kill()

    async def _keep_running(self, slot: Slot) -> None:
        delay = RESTART_MIN_S
        while not self.stopping.is_set():
            t0 = trio.current_time()
            code = await self._run_once(slot)
            slot.exit_codes.append(code)
            if self.stopping.is_set():
                return
            lived = trio.current_time() - t0
            if not self.all_serving.is_set():  # a process that cannot start: the config or the machine is wrong
                self.failed = (f"router process {slot.index + 1}/{self.n} {_describe_exit(code)} before it "
                               f"served (its log is above); stopping")
                for other in self.slots:
                    if other.outbox is not None:
                        other.outbox.send_nowait(Stop())
                self.stopping.set()
                return
            if lived >= STABLE_S:
                delay = RESTART_MIN_S
            log.warning("process %d/%d %s after %.1f s; starting another in %.1f s", slot.index + 1, self.n,
                        _describe_exit(code), lived, delay)
            with trio.move_on_after(delay):
                await self.stopping.wait()
            delay = min(delay * 2, RESTART_MAX_S)

    def _child_env(self, fd: int, slot: Slot) -> dict:
        link = {"fd": fd, "index": slot.index, "processes": self.n, "workers": self.sim_urls}
        return {**os.environ, ENV: json.dumps(link)}

    async def _run_once(self, slot: Slot) -> int:
        ours, theirs = socket.socketpair()
        try:
            cmd = [*self.child_command, "--port", str(self.port)]
            proc = await trio.lowlevel.open_process(cmd, pass_fds=(theirs.fileno(),),
                                                    env=self._child_env(theirs.fileno(), slot))
        finally:
            theirs.close()
        slot.proc = proc
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        outbox, outbox_out = trio.open_memory_channel(math.inf)
        # The state so far, then every later change, in order: no await until the slot takes broadcasts.
        for view in self.views.values():
            outbox.send_nowait(view)
        outbox.send_nowait(Synced())
        if self.stopping.is_set():
            outbox.send_nowait(Drain())
        slot.outbox = outbox
        log.info("process %d/%d started (pid %d)", slot.index + 1, self.n, proc.pid)
        read_all = trio.Event()
        try:
            async with trio.open_nursery() as n:
                n.start_soon(write_messages, stream, outbox_out)
                n.start_soon(self._read, slot, stream, read_all)
                code = await proc.wait()
                with trio.move_on_after(1.0):  # what it sent before it died
                    await read_all.wait()
                n.cancel_scope.cancel()
        finally:
            slot.outbox, slot.serving = None, False
            with trio.CancelScope(shield=True):
                await stream.aclose()
        return code

    async def _gather_metrics(self, slot: Slot, ask: int) -> None:
        """Ask every other serving process for its metrics; hand what came within METRICS_WAIT_S to `slot`."""
        others = [s for s in self.slots if s is not slot and s.serving and s.outbox is not None]
        self._asked += 1
        ours, answers, all_in = self._asked, [], trio.Event()
        self._metrics_asks[ours] = (answers, len(others), all_in)
        try:
            for other in others:
                other.outbox.send_nowait(MetricsAsk(ours))
            if others:
                with trio.move_on_after(METRICS_WAIT_S):
                    await all_in.wait()
        finally:
            del self._metrics_asks[ours]
        if slot.outbox is not None:
            slot.outbox.send_nowait(MetricsAll(ask, list(answers)))

    async def _read(self, slot: Slot, stream: trio.SocketStream, done: trio.Event) -> None:
        async for msg in read_messages(stream):
            if isinstance(msg, Ready):
                slot.serving = True
                log.info("process %d/%d (pid %d) serving", slot.index + 1, self.n, msg.pid)
                if all(s.serving for s in self.slots):
                    self.all_serving.set()
            elif isinstance(msg, MetricsAsk):
                self._nursery.start_soon(self._gather_metrics, slot, msg.ask)
            elif isinstance(msg, MetricsText):
                waiting = self._metrics_asks.get(msg.ask)
                if waiting is not None:
                    waiting[0].append(msg)
                    if len(waiting[0]) == waiting[1]:
                        waiting[2].set()
            elif isinstance(msg, (WorkerView, WorkerGone)):
                if isinstance(msg, WorkerView):
                    self.views[msg.url] = msg
                else:
                    self.views.pop(msg.url, None)
                for other in self.slots:
                    if other is not slot and other.outbox is not None:
                        other.outbox.send_nowait(msg)
        done.set()
