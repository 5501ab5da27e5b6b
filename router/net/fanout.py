"""Admin fan-out: engine-wide calls (abort, pause/continue, weight version, cache flush) go to
every healthy worker at once, with a per-worker result map.

200 when every worker succeeded, 207 when some failed, 502 when all failed, 503 when there is
no healthy worker. A body that is not empty or a JSON object is refused with 400 before any
worker sees it, and when every worker rejects the call with the same 4xx, that 4xx is the answer
(the client's request is wrong, not the workers). A successful `/update_weight_version` also
updates the router's record of each worker's weights, which gates re-admission of quarantined
workers, and `/pause_generation` / `/continue_generation` mark the workers paused and running
(router/core/control.py; routing holds generation requests while every candidate is paused).
"""

from __future__ import annotations

import msgspec
import trio

from router.wire import DECODE_ERRORS, decode_error_text
from router.core.headers import request_headers_for_upstream
from router.core.pipeline import Reply
from router.net.routes import Route
from router.net.rl import engine_call
from router.wire.api import json_encoder

_METHODS = {"/flush_cache": ("GET", "POST")}


def routes(runtime) -> list[Route]:
    return [Route((method,), path, _handler(runtime, method, path), "to every healthy worker (routing.fanout_paths)",
                  admin=True)
            for path in runtime.config.routing.fanout_paths for method in _METHODS.get(path, ("POST",))]


def _check_body(path: str, body: bytes) -> Reply | None:
    """400 unless `body` is empty or a JSON object. Malformed bodies used to be fanned out and come
    back as 502 "all workers failed" (every worker said 400), and invalid UTF-8 or deep nesting
    crashed the handler (msgspec raises UnicodeDecodeError / RecursionError, not DecodeError)
    (tests/test_bad_input.py)."""
    if not body.strip():
        return None
    try:
        obj = msgspec.json.decode(body)
    except DECODE_ERRORS as e:
        problem = f"invalid JSON body for {path}: {decode_error_text(e, body)}"
    else:
        if isinstance(obj, dict):
            return None
        problem = f"{path} takes a JSON object, got {type(obj).__name__}"
    return Reply(400, json_encoder.encode({"error": problem}))


def _handler(runtime, method: str, path: str):
    async def handler(scope, body: bytes) -> Reply:
        bad = _check_body(path, body)
        if bad is not None:
            return bad
        workers = runtime.pool.healthy()
        if not workers:
            return Reply(503, json_encoder.encode({"error": "no healthy worker available", "results": {}}))
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in request_headers_for_upstream(scope["headers"])]
        query = scope["query_string"].decode("latin-1")
        results: dict[str, dict] = {}
        timeout = runtime.config.server.request_timeout_s

        async def call(worker) -> None:
            out = await engine_call(runtime, worker, method, path, query, headers, body, timeout)
            if out.status is None:
                results[worker.url] = {"ok": False, "status": None, "error": out.message}
            else:
                results[worker.url] = {"ok": out.ok, "status": out.status, "body": out.decoded()}
            runtime.metrics.fanout.labels(path, "ok" if out.ok else "error").inc()

        async with trio.open_nursery() as nursery:
            for w in workers:
                nursery.start_soon(call, w)
        ok = sum(1 for r in results.values() if r["ok"])
        status = 200 if ok == len(results) else (207 if ok else 502)
        rejected = {r["status"] for r in results.values()}
        if not ok and len(rejected) == 1 and 400 <= (next(iter(rejected)) or 0) < 500:
            status = rejected.pop()  # every worker refused the same request the same way: a client error
        ordered = {w.url: results[w.url] for w in workers}
        return Reply(status, json_encoder.encode({"succeeded": ok, "failed": len(results) - ok, "results": ordered}))

    return handler
