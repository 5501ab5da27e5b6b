"""Run a plain ASGI app on hypercorn's trio worker inside the caller's nursery."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.trio import tcp_server as _tcp_server


def _release_closed_connections_promptly() -> None:
    """hypercorn 0.18 (trio): when a client closes an idle keep-alive connection, the connection's
    task group still waits for the keep-alive idle timer (keep_alive_timeout) before it closes the
    socket, so every such connection sits in CLOSE-WAIT holding an fd for that long; clients that
    open and close connections quickly pile up thousands. Once the read loop has seen the peer go,
    stop that timer. (tests/test_faults.py::test_client_closed_connections_are_released_promptly)"""
    server = _tcp_server.TCPServer
    original = getattr(server, "_read_data", None)
    if original is None or getattr(original, "_miles_patched", False):
        return

    async def _read_data(self) -> None:
        await original(self)
        idle = getattr(self, "idle_task", None)
        if idle is not None:
            await idle.stop()

    _read_data._miles_patched = True
    server._read_data = _read_data


_release_closed_connections_promptly()


def hypercorn_config(host: str, port: int, *, graceful_timeout_s: float = 3.0) -> HypercornConfig:
    cfg = HypercornConfig()
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.accesslog = None
    cfg.errorlog = None
    cfg.graceful_timeout = graceful_timeout_s
    cfg.backlog = 2048
    # Clients (trainers) hold keep-alive connections for a whole rollout.
    cfg.keep_alive_max_requests = 1 << 30
    cfg.keep_alive_timeout = 75.0
    # Bodies are bounded by the app itself (413 with a JSON error), not by h11's default.
    cfg.h11_max_incomplete_size = 64 * 1024
    cfg.max_app_queue_size = 64
    return cfg


async def serve_asgi(
    app: Callable[..., Awaitable[None]],
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    graceful_timeout_s: float = 3.0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until `shutdown_trigger` returns; `task_status.started(url)` once bound.

    After the trigger fires hypercorn stops accepting and waits up to `graceful_timeout_s`
    for in-flight requests before returning.
    """
    cfg = hypercorn_config(host, port, graceful_timeout_s=graceful_timeout_s)
    if shutdown_trigger is None:
        shutdown_trigger = trio.sleep_forever

    async def _serve(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, cfg, shutdown_trigger=shutdown_trigger, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(_serve)
        # binds look like ["http://127.0.0.1:PORT"]
        task_status.started(binds[0])


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


INF = math.inf
