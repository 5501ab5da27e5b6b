"""One router process of `--processes N`: its line to the supervisor (router/net/supervisor.py), and through it
to the other processes on the same port.

Requests reach whichever process the kernel hands their connection, so an admin call changes one process.
What it changed is sent on, so every process routes over the same workers with the same view of them:
- `/add_worker`, `/remove_worker`, `POST /workers`, `DELETE /workers/{id}`: the worker set and its labels
  (worker ids are the same in every process: a hash of the URL, router/core/workers.py);
- control calls through the fan-out paths or the RL plane (pause, continue, sleep, wake, weight updates):
  the router's view of each engine (router/core/control.py), which routing reads. The engine is called
  once, by the process the call reached; the others take its outcome.
It arrives within milliseconds (one hop through the supervisor): a request that reaches another process in
that window sees the state before the call, as it would had it come a moment earlier. A process that starts
(or restarts) gets the current state before it listens. What stays per process: health probing (each
process probes every worker), in-flight counts and the admission limits, the memory cache. `/metrics` on any
process answers for all, each process's series under a `process` label (router/net/metrics.py
`merge_expositions`).

Wire: router/wire/procs.py, one JSON object per line over the socketpair the supervisor passed down (its fd
in $MILES_ROUTER_PROCESS). The supervisor's `Drain` is the same as a signal's drain, `Stop` cancels at once,
and the line closing (the supervisor died) drains: no router process outlives its supervisor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import AsyncIterator

import trio

from router.core.control import ControlState
from router.net.metrics import merge_expositions
from router.wire import procs
from router.wire.procs import Drain, MetricsAll, MetricsAsk, MetricsText, Stop, Synced, WorkerGone, WorkerView

log = logging.getLogger("miles_router")

ENV = "MILES_ROUTER_PROCESS"  # {"fd", "index", "processes", "workers"}: set by the supervisor for its processes
METRICS_WAIT_S = 3.0  # the longest /metrics waits for the other processes' (the supervisor waits 2 s for them)


async def read_messages(stream: trio.abc.ReceiveStream) -> AsyncIterator[procs.Message]:
    """The messages on `stream`, one per line, until it closes."""
    buf = b""
    while True:
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if not data:
            return
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield procs.decoder.decode(line)


async def write_messages(stream: trio.abc.SendStream, outbox: trio.MemoryReceiveChannel) -> None:
    """Send what arrives in `outbox` until the other side is gone."""
    async for msg in outbox:
        try:
            await stream.send_all(procs.encode_line(msg))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def view_of(worker) -> WorkerView:
    c = worker.control
    return WorkerView(url=worker.url, labels=dict(worker.labels), bootstrap_port=worker.bootstrap_port,
                      paused=c.paused, released=sorted(c.released), weight_version=worker.weight_version)


def apply(runtime, msg) -> None:
    """Take another process's admin change (without sending it on again)."""
    if isinstance(msg, WorkerView):
        workers = runtime.workers
        worker, _ = workers.add(msg.url, msg.labels)
        worker.bootstrap_port = msg.bootstrap_port
        state = ControlState(msg.paused, frozenset(msg.released))
        if (worker.control.paused, worker.control.released) != (state.paused, state.released):
            worker.control = state
            workers.control_changed(worker)
        workers.observe_version(worker, msg.weight_version)
    elif isinstance(msg, WorkerGone):
        runtime.workers.remove(msg.url)


class SiblingLink:
    """This process's end of the line to the supervisor (`from_env`); `runtime.siblings` while it serves."""

    def __init__(self, fd: int, index: int, processes: int, workers: list[str]) -> None:
        self.fd, self.index, self.processes, self.workers = fd, index, processes, workers
        self._stream: trio.SocketStream | None = None
        self._outbox, self._outbox_out = trio.open_memory_channel(math.inf)
        self._asked = 0
        self._metrics_asks: dict[int, tuple[trio.Event, list]] = {}  # ask -> (answered, [MetricsAll])

    @classmethod
    def from_env(cls) -> SiblingLink | None:
        raw = os.environ.pop(ENV, None)
        if raw is None:
            return None
        d = json.loads(raw)
        return cls(int(d["fd"]), int(d["index"]), int(d["processes"]), list(d.get("workers", [])))

    @property
    def name(self) -> str:
        return f"process {self.index + 1}/{self.processes}"

    async def sync(self, runtime) -> None:
        """Apply the state the supervisor holds (everything up to `Synced`) before this process serves."""
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=self.fd)))
        self._messages = read_messages(self._stream)
        async for msg in self._messages:
            if isinstance(msg, Synced):
                return
            apply(runtime, msg)
        raise RuntimeError("the supervisor closed the line before sending the state")

    async def run(self, runtime, shutdown: trio.Event, root: trio.CancelScope) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(write_messages, self._stream, self._outbox_out)
            async for msg in self._messages:
                if isinstance(msg, Drain):
                    log.info("%s: the supervisor drains: draining (up to the drain timeout), then stopping", self.name)
                    shutdown.set()
                elif isinstance(msg, Stop):
                    log.warning("%s: the supervisor stops: stopping now", self.name)
                    root.cancel()
                elif isinstance(msg, MetricsAsk):
                    self._send(MetricsText(msg.ask, self.index + 1, runtime.metrics.render().decode()))
                elif isinstance(msg, MetricsAll):
                    waiting = self._metrics_asks.get(msg.ask)
                    if waiting is not None:
                        waiting[1].append(msg)
                        waiting[0].set()
                else:
                    apply(runtime, msg)
            log.error("%s: the supervisor is gone: draining, then stopping", self.name)
            shutdown.set()
            n.cancel_scope.cancel()

    def _send(self, msg) -> None:
        self._outbox.send_nowait(msg)

    def worker_changed(self, worker) -> None:
        """An admin call registered `worker` or changed its control state here."""
        self._send(view_of(worker))

    def worker_removed(self, url: str) -> None:
        self._send(WorkerGone(url))

    def ready(self) -> None:
        self._send(procs.Ready(os.getpid()))

    async def all_metrics(self, own: bytes) -> bytes:
        """Every process's metrics (this one's is `own`), each under its `process` label. A process that does not
        answer within the wait (busy, or restarting) is left out of this scrape."""
        self._asked += 1
        ask, answered = self._asked, trio.Event()
        self._metrics_asks[ask] = (answered, [])
        try:
            self._send(MetricsAsk(ask))
            with trio.move_on_after(METRICS_WAIT_S):
                await answered.wait()
            texts = {t.process: t.text.encode() for m in self._metrics_asks[ask][1] for t in m.texts}
        finally:
            del self._metrics_asks[ask]
        return merge_expositions({**texts, self.index + 1: own})
