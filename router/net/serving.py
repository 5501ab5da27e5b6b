"""Run a plain ASGI app on hypercorn's trio worker inside the caller's nursery."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from router.net import _hypercorn_fixes, _trio_accept

_hypercorn_fixes.apply()
# A burst of new connections is accepted in one scheduler round, not one per round
# (router/net/_trio_accept.py).
_trio_accept.apply()


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


async def serve_asgi(
    app: Callable[..., Awaitable[None]],
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    graceful_timeout_s: float = 3.0,
    keep_alive_timeout_s: float = 75.0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until `shutdown_trigger` returns; `task_status.started(url)` once bound.

    After the trigger fires hypercorn stops accepting and waits up to `graceful_timeout_s`
    for in-flight requests before returning.
    """
    cfg = hypercorn_config(host, port, graceful_timeout_s=graceful_timeout_s, keep_alive_timeout_s=keep_alive_timeout_s)
    if shutdown_trigger is None:
        shutdown_trigger = trio.sleep_forever

    async def _serve(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, cfg, shutdown_trigger=shutdown_trigger, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(_serve)
        # binds look like ["http://127.0.0.1:PORT"]
        task_status.started(binds[0])
