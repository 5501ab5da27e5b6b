"""The SGLang Model Gateway's RL control plane (smg 1.13 `--enable-rl`, its client `smg.rl.RL`), wire-compatible:

    GET  /v1/rl/workers                          {"protocol_version": 1, "workers": [...], "total"}
    GET  /v1/rl/workers/{id}                     one worker: id, url, engine, weight_version, labels, health, ...
    ANY  /v1/rl/workers/{id}/engine/{path}       one engine route on that worker, body and query verbatim:
                                                 {"worker_id", "url", "status", "latency_ms", "body"}, the
                                                 engine's status as the reply's
    ANY  /v1/rl/engine/{path}?selector=k=v,...   the same call on every worker the selector matches, at most
                                                 `rl.fanout_concurrency` at once: {"results": {id: call},
                                                 "failed": [...], "total", "succeeded"}, 200 or 207

Errors are smg's shape, `{"error": "<code>", "message": ...}`: 400 selector_required / invalid_selector /
no_workers_match, 404 worker_not_found, 502 upstream_unreachable, 504 upstream_timeout. A fan-out target that
fails is in `failed[]` with `error` upstream_error (its HTTP status), upstream_unreachable or upstream_timeout.
Admin endpoints (the admin key, like the fan-out paths). Control calls use the control client: they never count
as a worker's load or touch its breaker. Pause/continue, sleep/wake and weight updates that pass through here
update the router's view of each engine (router/core/control.py), which routing reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import unquote_plus

import httpx
import msgspec
import trio

from router.core import control
from router.core.headers import request_headers_for_upstream
from router.core.labels import SelectorError, matches, parse_selector
from router.core.pipeline import Reply
from router.core.workers import Worker, WorkerState
from router.wire import DECODE_ERRORS
from router.wire.api import json_encoder
from router.net.routes import Route

PREFIX = "/v1/rl/"
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
# What SGLang's HTTP server offers the RL plane (smg reports the same static row for an SGLang worker).
SGLANG_CAPABILITIES = {"source": "static", "pause_modes": ["abort", "retract", "in_place"],
                       "update_from": ["disk", "tensor", "distributed"], "abort": True, "flush_cache": True,
                       "sleep_wake": True, "reports_weight_version": True}
_ENGINE_INFO_RETRY_S = 10.0
# How long a pause (or sleep) waits for the requests routed to the engine before it to be written. Writing one
# takes microseconds unless its connection is still opening; past this the pause is sent anyway (such a request
# then waits inside SGLang until `continue`: it is not aborted).
_PAUSE_WAITS_FOR_SENDS_S = 5.0


@dataclass(slots=True)
class CallOutcome:
    """One engine call: the worker's status and body, or why there is none (`error` = smg's code)."""

    status: int | None
    body: bytes
    latency_ms: int
    error: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def decoded(self):
        if not self.body:
            return None
        try:
            return msgspec.json.decode(self.body)
        except DECODE_ERRORS:  # plain text (flush_cache) or an odd reply: its text
            return self.body.decode("utf-8", "replace")


async def engine_call(runtime, worker: Worker, method: str, path: str, query: str, headers, body: bytes,
                      timeout_s: float) -> CallOutcome:
    """Send one control call to `worker` with the control client, keeping the router's view of the engine
    (paused, asleep, weight version) in step with it."""
    p = control.plan(path, body)
    undo = control.before(worker.control, p)
    if p.pause or p.release:
        runtime.workers.control_changed(worker)
        runtime.admin_changed(worker)
        if worker.unsent:  # requests routed here before the pause: they reach the engine first
            await runtime.workers.wait_sent(worker, min(timeout_s, _PAUSE_WAITS_FOR_SENDS_S))
    url = worker.url + path + (f"?{query}" if query else "")
    t0 = time.perf_counter()
    out = None
    try:
        r = await runtime.workers.control_client(worker).request(method, url, content=body, headers=headers, timeout=timeout_s)
        out = CallOutcome(r.status_code, r.content, _ms(t0))
    except httpx.TimeoutException as e:
        out = CallOutcome(None, b"", _ms(t0), "upstream_timeout",
                          f"upstream `{worker.url}` did not answer within {timeout_s:g}s: {type(e).__name__}")
    except httpx.HTTPError as e:
        out = CallOutcome(None, b"", _ms(t0), "upstream_unreachable",
                          f"upstream `{worker.url}` unreachable: {type(e).__name__}: {e}")
    finally:
        # (cancelled: no outcome; the pause may or may not have reached the engine, so it stands)
        if out is not None:
            version = control.after(worker.control, p, out.status, out.body, undo)
            if version is not None:
                runtime.workers.observe_version(worker, version)
            if p.changes_anything:
                runtime.workers.control_changed(worker)
                runtime.admin_changed(worker)
    return out


def _ms(t0: float) -> int:
    return int((time.perf_counter() - t0) * 1000)


def _json(status: int, obj) -> Reply:
    return Reply(status, json_encoder.encode(obj), [(b"content-type", b"application/json")])


def _error(status: int, code: str, message: str, **extra) -> Reply:
    return _json(status, {"error": code, "message": message, **extra})


def _health(w: Worker) -> str:
    if w.state is WorkerState.DRAINING:
        return "draining"
    return "ready" if w.state is WorkerState.HEALTHY else "unhealthy"


def rl_worker(w: Worker) -> dict:
    """A worker as smg's discovery row (`smg.rl.Worker`), plus the router's `control_state` and `inflight`."""
    info = w.engine_info or {}
    labels = dict(w.labels)
    if w.weight_version is not None:
        labels["weight_version"] = w.weight_version
    dp = info.get("dp_size")
    return {"id": w.id, "url": w.url, "base_url": w.url, "engine": "sglang",
            "engine_version": info.get("version"), "model_id": info.get("model_id"),
            "worker_type": w.worker_type, "connection_mode": "http", "control_url": w.url,
            "tp_size": info.get("tp_size"), "dp_size": dp, "pp_size": info.get("pp_size"),
            "dp_ranks": dp if isinstance(dp, int) else 1, "role": None, "health": _health(w),
            "weight_version": w.weight_version, "labels": labels, "capabilities": dict(SGLANG_CAPABILITIES),
            "control_state": w.control.name, "inflight": w.inflight}


def selector_value(w: Worker, key: str) -> str | None:
    """What a selector key reads on `w`: its labels first, then the discovery row's fields."""
    value = w.labels.get(key)
    if value is not None:
        return value
    if key == "weight_version":
        return w.weight_version
    row = rl_worker(w)
    v = row.get(key)
    return v if isinstance(v, str) else None if v is None or isinstance(v, (dict, list)) else str(v)


async def _engine_info(runtime, workers: list[Worker]) -> None:
    """Fill in engine facts (version, model, parallelism) from SGLang's /server_info, once per worker."""
    now = time.monotonic()
    todo = [w for w in workers if w.engine_info is None and now - w.engine_info_tried >= _ENGINE_INFO_RETRY_S]

    async def fetch(w: Worker) -> None:
        w.engine_info_tried = now
        try:
            r = await runtime.workers.control_client(w).get(w.url + "/server_info", timeout=runtime.config.workers.health_timeout_s)
            d = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return
        if isinstance(d, dict):
            w.engine_info = {"version": d.get("version"), "model_id": d.get("served_model_name") or d.get("model_path"),
                             **{k: d.get(k) for k in ("tp_size", "dp_size", "pp_size")}}

    async with trio.open_nursery() as n:
        for w in todo:
            n.start_soon(fetch, w)


def _strip_selector(query: str) -> str:
    """The query string without its `selector` parameter (the rest goes to the engine as spelled)."""
    return "&".join(p for p in query.split("&") if p and unquote_plus(p.split("=", 1)[0]) != "selector")


def _selector_of(query: str) -> str | None:
    for p in query.split("&"):
        k, _, v = p.partition("=")
        if unquote_plus(k) == "selector":
            return unquote_plus(v)
    return None


def routes(runtime) -> list[Route]:
    if not runtime.config.rl.enabled:
        return []
    cfg = runtime.config.rl

    def headers_of(scope) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request_headers_for_upstream(scope["headers"])]

    async def list_workers(scope, body: bytes) -> Reply:
        workers = runtime.pool.all
        await _engine_info(runtime, workers)
        return _json(200, {"protocol_version": 1, "workers": [rl_worker(w) for w in workers], "total": len(workers)})

    async def one_worker(scope, wid: str, rest: str, body: bytes) -> Reply:
        w = runtime.pool.by_id(wid)
        if w is None:
            return _error(404, "worker_not_found", f"worker `{wid}` not found", id=wid)
        if not rest:
            if scope["method"] != "GET":
                return _error(405, "method_not_allowed", f"{scope['method']} /v1/rl/workers/{{id}}: use GET")
            await _engine_info(runtime, [w])
            return _json(200, rl_worker(w))
        if not rest.startswith("engine/") or rest == "engine/":
            return _error(404, "not_found", f"no route /v1/rl/workers/{{id}}/{rest} (engine calls: "
                                            f"/v1/rl/workers/{{id}}/engine/{{path}})")
        out = await engine_call(runtime, w, scope["method"], "/" + rest[len("engine/"):],
                                scope["query_string"].decode("latin-1"), headers_of(scope), body,
                                cfg.control_timeout_s)
        runtime.metrics.fanout.labels("/" + rest[len("engine/"):], "ok" if out.ok else "error").inc()
        if out.status is None:
            return _error(504 if out.error == "upstream_timeout" else 502, out.error, out.message,
                          worker_id=w.id, url=w.url)
        return _json(out.status, {"worker_id": w.id, "url": w.url, "status": out.status,
                                  "latency_ms": out.latency_ms, "body": out.decoded()})

    async def fanout(scope, path: str, body: bytes) -> Reply:
        query = scope["query_string"].decode("latin-1")
        selector = _selector_of(query)
        if not selector or not selector.strip():
            return _error(400, "selector_required", "a non-empty `selector` query parameter is required")
        try:
            terms = parse_selector(selector)
        except SelectorError as e:
            return _error(400, "invalid_selector", str(e), offset=e.offset)
        targets = [w for w in runtime.pool.active if matches(terms, lambda k, w=w: selector_value(w, k))]
        if not targets:
            return _error(400, "no_workers_match", f"no workers match selector `{selector}`", selector=selector)
        forwarded_query, headers = _strip_selector(query), headers_of(scope)
        limiter = trio.CapacityLimiter(cfg.fanout_concurrency)
        outcomes: dict[str, CallOutcome] = {}

        async def call(w: Worker) -> None:
            async with limiter:
                outcomes[w.id] = await engine_call(runtime, w, scope["method"], path, forwarded_query, headers,
                                                   body, cfg.control_timeout_s)
            runtime.metrics.fanout.labels(path, "ok" if outcomes[w.id].ok else "error").inc()

        async with trio.open_nursery() as n:
            for w in targets:
                n.start_soon(call, w)
        results, failed = {}, []
        for w in targets:
            out = outcomes[w.id]
            if out.status is not None:
                results[w.id] = {"worker_id": w.id, "url": w.url, "status": out.status,
                                 "latency_ms": out.latency_ms, "body": out.decoded()}
            if out.status is None:
                failed.append({"worker_id": w.id, "url": w.url, "error": out.error, "message": out.message})
            elif not out.ok:
                failed.append({"worker_id": w.id, "url": w.url, "error": "upstream_error",
                               "message": f"HTTP {out.status}", "status": out.status})
        return _json(207 if failed else 200, {"results": results, "failed": failed, "total": len(targets),
                                              "succeeded": len(targets) - len(failed)})

    async def dispatch(scope, body: bytes) -> Reply:
        rest = scope["path"][len(PREFIX):]
        if rest.startswith("workers/"):
            wid, _, tail = rest[len("workers/"):].partition("/")
            return await one_worker(scope, wid, tail, body)
        if rest.startswith("engine/") and rest != "engine/":
            return await fanout(scope, rest[len("engine"):], body)
        return _error(404, "not_found", f"no route {scope['path']} (the RL plane: /v1/rl/workers, "
                                        f"/v1/rl/workers/{{id}}[/engine/{{path}}], /v1/rl/engine/{{path}}?selector=)")

    return [Route(("GET",), "/v1/rl/workers", list_workers, "smg's RL plane: the workers with labels and versions",
                  admin=True),
            Route(METHODS, PREFIX, dispatch, "smg's RL plane: /workers/{id}[/engine/{path}], /engine/{path}?selector=",
                  admin=True, prefix=True)]
