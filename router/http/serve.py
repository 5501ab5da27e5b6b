"""Serve a plain ASGI app on hypercorn's trio worker, with the router's connection classes, inside
the caller's nursery.

hypercorn's own entry point (`hypercorn.trio.serve` -> `worker_serve`) builds its `TCPServer` for each
connection and listens with trio's `SocketListener`, with no way to pass others. `_serve` follows its
`worker_serve` (hypercorn 0.18, reviewed: router/http/reviewed.py) for what the router uses (plain
TCP; no TLS, QUIC, statsd or max_requests) and hands `trio.serve_listeners`:
- a `BatchAcceptListener` (router/http/trio_accept.py) around each listening socket,
- a handler that serves each connection with `RouterTCPServer` (router/http/hypercorn_fixes.py),
  reading it through a `ReusedBufferStream` (router/http/trio_recv.py).
So the fixes apply to this server's connections only; hypercorn and trio are not changed.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from router.http import reviewed
from router.http.hypercorn_fixes import RouterTCPServer
from router.http.trio_accept import BatchAcceptListener
from router.http.trio_recv import reused_buffer_stream


def hypercorn_config(host: str, port: int, *, graceful_timeout_s: float = 3.0,
                     keep_alive_timeout_s: float = 75.0) -> HypercornConfig:
    cfg = HypercornConfig()
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.accesslog = None
    cfg.errorlog = None
    cfg.graceful_timeout = graceful_timeout_s
    cfg.backlog = 2048
    # Clients (trainers) hold keep-alive connections for a whole rollout.
    cfg.keep_alive_max_requests = 1 << 30
    cfg.keep_alive_timeout = keep_alive_timeout_s
    # Bodies are bounded by the app itself (413 with a JSON error), not by h11's default.
    cfg.h11_max_incomplete_size = 64 * 1024
    cfg.max_app_queue_size = 64
    return cfg


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not listening yet. Every process that binds
    the same address this way (same user) shares the port: Linux spreads new connections over the
    listening ones by a hash of their addresses, and one that is bound but never listens (the
    supervisor's, router/net/supervisor.py) only keeps the port reserved. Options as hypercorn sets them."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def serve_asgi(
    app: Callable[..., Awaitable[None]],
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    graceful_timeout_s: float = 3.0,
    keep_alive_timeout_s: float = 75.0,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until `shutdown_trigger` returns; `task_status.started(url)` once bound.

    After the trigger fires the server stops accepting and waits up to `graceful_timeout_s`
    for in-flight requests before returning. `reuse_port`: listen on a `reuse_port_socket`, so
    other processes can serve the same port. Refuses to start (reviewed.LibraryChanged, one line)
    when a library function a fix was reviewed against has changed.
    """
    reviewed.check()
    cfg = hypercorn_config(host, port, graceful_timeout_s=graceful_timeout_s, keep_alive_timeout_s=keep_alive_timeout_s)
    sockets = [reuse_port_socket(host, port)] if reuse_port else None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(_serve, app, cfg, shutdown_trigger or trio.sleep_forever, sockets))
        # binds look like ["http://127.0.0.1:PORT"]
        task_status.started(binds[0])


async def _serve(app, config: HypercornConfig, shutdown_trigger: Callable[[], Awaitable[None]],
                 sockets: list[socket.socket] | None = None,
                 task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    app = wrap_app(app, config.wsgi_max_body_size, "asgi")
    config.set_statsd_logger_class(StatsdLogger)
    lifespan_state: dict = {}
    lifespan = Lifespan(app, config, lifespan_state)
    context = WorkerContext(None)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        state = ConnectionState(lifespan_state.copy())  # what the app's startup left, shared as hypercorn does

        async def serve_connection(stream: trio.SocketStream) -> None:
            await RouterTCPServer(app, config, context, state, reused_buffer_stream(stream)).run()

        async with trio.open_nursery() as server_nursery:
            if sockets is None:
                sockets = config.create_sockets().insecure_sockets
            listeners, binds = [], []
            for sock in sockets:
                sock.listen(config.backlog)
                listeners.append(BatchAcceptListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock))))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            task_status.started(binds)
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(partial(trio.serve_listeners, serve_connection, listeners,
                                               handler_nursery=server_nursery))
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors
            finally:
                # stop accepting; in-flight requests get `graceful_timeout` to finish
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
