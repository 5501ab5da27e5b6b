"""Admin fan-out: engine-wide calls (abort, pause/continue, weight version, cache flush) go to
every healthy worker at once, with a per-worker result map.

200 when every worker succeeded, 207 when some failed, 502 when all failed, 503 when there is
no healthy worker. A successful `/update_weight_version` also updates the router's record of
each worker's weights, which gates re-admission of quarantined workers.
"""

from __future__ import annotations

import httpx
import msgspec
import trio

from router.core.headers import request_headers_for_upstream
from router.core.pipeline import Reply
from router.wire.api import json_encoder

_METHODS = {"/flush_cache": ("GET", "POST")}


def install(app, runtime) -> None:
    for path in runtime.config.routing.fanout_paths:
        for method in _METHODS.get(path, ("POST",)):
            app.register(method, path, _handler(runtime, method, path), admin=True)


def _decode(r: httpx.Response):
    if not r.content:
        return None
    try:
        return msgspec.json.decode(r.content)
    except msgspec.DecodeError:
        return r.text


def _handler(runtime, method: str, path: str):
    async def handler(scope, body: bytes) -> Reply:
        workers = runtime.pool.healthy()
        if not workers:
            return Reply(503, json_encoder.encode({"error": "no healthy worker available", "results": {}}))
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in request_headers_for_upstream(scope["headers"])]
        query = scope["query_string"].decode("latin-1")
        results: dict[str, dict] = {}
        timeout = runtime.config.server.request_timeout_s

        async def call(worker) -> None:
            url = worker.url + path + (f"?{query}" if query else "")
            try:
                r = await runtime.control.request(method, url, content=body, headers=headers, timeout=timeout)
            except httpx.HTTPError as e:
                results[worker.url] = {"ok": False, "status": None, "error": f"{type(e).__name__}: {e}"}
                runtime.metrics.fanout.labels(path, "error").inc()
                return
            ok = 200 <= r.status_code < 300
            results[worker.url] = {"ok": ok, "status": r.status_code, "body": _decode(r)}
            runtime.metrics.fanout.labels(path, "ok" if ok else "error").inc()
            if ok and path == "/update_weight_version":
                try:
                    version = msgspec.json.decode(body).get("new_version")
                except (msgspec.DecodeError, AttributeError):
                    version = None
                runtime.observe_weight_version(worker, None if version is None else str(version))

        async with trio.open_nursery() as nursery:
            for w in workers:
                nursery.start_soon(call, w)
        ok = sum(1 for r in results.values() if r["ok"])
        status = 200 if ok == len(results) else (207 if ok else 502)
        ordered = {w.url: results[w.url] for w in workers}
        return Reply(status, json_encoder.encode({"succeeded": ok, "failed": len(results) - ok, "results": ordered}))

    return handler
