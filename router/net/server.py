"""Start the router: one root nursery owns the server, the probers, the embedded simulated workers
and the cache maintenance task. SIGINT/SIGTERM stop accepting, let in-flight requests finish for
up to `server.drain_timeout_s`, then cancel everything; a second signal cancels at once.

One of the processes of `--processes N` (router/net/supervisor.py) runs the same way with a
`SiblingLink` (router/net/siblings.py): it listens with SO_REUSEPORT, takes the admin state the
supervisor holds before it serves, and drains or stops when the supervisor says so.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from functools import partial

import trio

from router.config import Config
from router.http.serve import serve_asgi
from router.net.app import RouterApp
from router.net.runtime import Runtime

log = logging.getLogger("miles_router")


@dataclass
class RouterHandle:
    url: str
    runtime: Runtime
    app: RouterApp
    shutdown: trio.Event
    sim_workers: list


async def _signal_watcher(shutdown: trio.Event, root: trio.CancelScope) -> None:
    # Counts the signals this process got, not whether something else (the supervisor) asked for the drain:
    # a service manager that signals every process of the group at once is one request, not two.
    signalled = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if signalled:
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                root.cancel()
                return
            log.info("%s: draining (up to the drain timeout), then stopping", signal.Signals(signum).name)
            signalled = True
            shutdown.set()


async def start_sim_workers(config: Config, nursery: trio.Nursery) -> list:
    if config.simulate.workers <= 0:
        return []
    from router.sim import serve_sim_worker

    s = config.simulate
    started = []
    for i in range(s.workers):
        opts = s.options_for(i)
        port = s.base_port + i if s.base_port else 0
        url, worker = await nursery.start(partial(serve_sim_worker, opts, s.host, port))
        started.append((url, worker))
        log.info("simulated SGLang worker %d listening on %s", i, url)
    return started


async def run_router(config: Config, *, install_signals: bool = True, shutdown: trio.Event | None = None,
                     siblings=None, task_status: trio.TaskStatus[RouterHandle] = trio.TASK_STATUS_IGNORED) -> None:
    shutdown = shutdown or trio.Event()
    async with trio.open_nursery() as root:
        runtime = Runtime(config, root)
        try:
            await runtime.start()
            app = RouterApp(runtime)
            sims = await start_sim_workers(config, root)
            for url, _ in sims:
                runtime.workers.add(url)
            for url in config.workers.urls:
                runtime.workers.add(url)
            if siblings is not None:  # what admin calls did before this process started, then what they do
                await siblings.sync(runtime)
                runtime.siblings = siblings
                root.start_soon(siblings.run, runtime, shutdown, root.cancel_scope)
            if install_signals:
                root.start_soon(_signal_watcher, shutdown, root.cancel_scope)
            async with trio.open_nursery() as server_nursery:
                bound = await server_nursery.start(partial(
                    serve_asgi, app, config.server.host, config.server.port,
                    shutdown_trigger=shutdown.wait, graceful_timeout_s=config.server.drain_timeout_s,
                    reuse_port=siblings is not None))
                log.info("miles-router listening on %s with %d worker(s)", bound, len(runtime.pool))
                if siblings is not None:
                    siblings.ready()
                task_status.started(RouterHandle(bound, runtime, app, shutdown, [w for _, w in sims]))
            log.info("stopped accepting; in-flight requests drained")
        finally:
            root.cancel_scope.cancel()
            await runtime.aclose()
