"""The SGLang Model Gateway's worker API, so an engine registers here whichever way it is told to.

miles registers an engine with `POST /workers {"url", "worker_type", "bootstrap_port"?}` when it
talks to a gateway, and removes it with `GET /workers` + `DELETE /workers/{id}` (or, for older
gateways, `DELETE /workers/{url-encoded url}`); with the miles router it uses `/add_worker` and
`/remove_worker`. Both paths act on the same pool (router/core/workers.py).

Differences from the gateway, on purpose: registration is immediate (the 202 still says
"accepted"); registering a URL that is already registered answers 202 with its existing id
(idempotent, like /add_worker); a worker's id is a hash of its URL (UUID5), not a random UUID per
registration, so every router process (and every router of a fleet) gives a worker the same id; only
`worker_type: "regular"` is served (no prefill/decode disaggregation). Admin endpoints need the admin
key and `workers.allowed_hosts` applies, as for /add_worker.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import unquote

import msgspec

from router.core.labels import check_labels
from router.core.pipeline import Reply
from router.net.routes import Route
from router.core.urls import WorkerUrlError, host_allowed, normalize_worker_url
from router.core.workers import Worker
from router.wire import DECODE_ERRORS, decode_error_text
from router.wire.api import json_encoder

WORKERS_PREFIX = "/workers/"
WORKER_TYPES = ("regular", "prefill", "decode")


class WorkerSpec(msgspec.Struct):
    """The fields of the gateway's WorkerConfigRequest this router uses (the rest is ignored)."""

    url: str
    worker_type: str = "regular"
    bootstrap_port: int | None = None
    labels: Any = None  # smg's worker labels (selectors of the RL plane, router/net/rl.py)


_spec_decoder = msgspec.json.Decoder(WorkerSpec)


def _json(status: int, obj, *headers: tuple[bytes, bytes]) -> Reply:
    return Reply(status, json_encoder.encode(obj), [(b"content-type", b"application/json"), *headers])


def _error(status: int, message: str, code: str) -> Reply:
    """The gateway's error shape: {"error": ..., "code": ...}."""
    return _json(status, {"error": message, "code": code})


def worker_info(w: Worker) -> dict:
    """One worker as GET /workers and GET /workers/{id} show it: the router's fields plus the
    gateway's WorkerInfo fields (`id`, `is_healthy`, `load`, `worker_type`, ...)."""
    info = w.describe()
    info.update(id=w.id, is_healthy=w.selectable, load=w.inflight, worker_type=w.worker_type,
                connection_mode="http", model_id=None, priority=50, cost=1.0)
    if w.bootstrap_port is not None:
        info["bootstrap_port"] = w.bootstrap_port
    return info


def workers_listing(runtime) -> dict:
    """GET /workers: the gateway's {"workers", "total", "stats"} plus the router's "healthy"."""
    workers = runtime.pool.all
    stats = {f"{t}_count": sum(1 for w in workers if w.worker_type == t) for t in WORKER_TYPES}
    return {"workers": [worker_info(w) for w in workers], "total": len(workers),
            "healthy": sum(1 for w in workers if w.selectable), "stats": stats}


def _find(runtime, key: str) -> Worker | Reply:
    """The worker a /workers/{key} path names: a UUID (the gateway), or a URL-encoded worker URL
    (older gateway releases, which miles still uses for sglang_router < 0.3)."""
    key = unquote(key)
    if "://" in key:
        try:
            url = normalize_worker_url(key)
        except WorkerUrlError as e:
            return _error(400, str(e), "BAD_REQUEST")
        w = runtime.pool.get(url)
        return w if w is not None else _error(404, f"Worker {url} not found", "WORKER_NOT_FOUND")
    try:
        wanted = str(uuid.UUID(key))
    except ValueError:
        return _error(400, f"Invalid worker_id {key!r}: expected a UUID", "BAD_REQUEST")
    for w in runtime.pool.all:
        if w.id == wanted:
            return w
    return _error(404, f"Worker {wanted} not found", "WORKER_NOT_FOUND")


def routes(runtime) -> list[Route]:
    allowed = runtime.config.workers.allowed_hosts

    async def create(scope, body: bytes) -> Reply:
        try:
            spec = _spec_decoder.decode(body)
        except DECODE_ERRORS as e:
            return _error(400, f"invalid JSON body: {decode_error_text(e, body)}", "BAD_REQUEST")
        if spec.worker_type not in WORKER_TYPES:
            return _error(400, f"worker_type must be one of {', '.join(WORKER_TYPES)}, got {spec.worker_type!r}",
                          "BAD_REQUEST")
        if spec.worker_type != "regular":
            return _error(400, f"worker_type {spec.worker_type!r} is not served: this router has no "
                               "prefill/decode disaggregation", "BAD_REQUEST")
        try:
            url = normalize_worker_url(spec.url)
        except WorkerUrlError as e:
            return _error(400, str(e), "BAD_REQUEST")
        if not host_allowed(url, allowed):
            return _error(403, f"worker host not in workers.allowed_hosts: {url}", "FORBIDDEN")
        try:
            labels = None if spec.labels is None else check_labels(spec.labels)
        except ValueError as e:
            return _error(400, str(e), "BAD_REQUEST")
        worker, created = runtime.workers.add(url, labels)
        worker.worker_type = spec.worker_type
        worker.bootstrap_port = spec.bootstrap_port
        runtime.admin_changed(worker)
        location = f"/workers/{worker.id}"
        return _json(202, {"status": "accepted", "worker_id": worker.id, "url": url, "location": location,
                           "message": "Worker added" if created else "Worker already registered"},
                     (b"location", location.encode()))

    async def get_one(scope, body: bytes) -> Reply:
        found = _find(runtime, scope["path"][len(WORKERS_PREFIX):])
        return found if isinstance(found, Reply) else _json(200, worker_info(found))

    async def delete_one(scope, body: bytes) -> Reply:
        found = _find(runtime, scope["path"][len(WORKERS_PREFIX):])
        if isinstance(found, Reply):
            return found
        runtime.workers.remove(found.url)
        runtime.admin_removed(found.url)
        return _json(202, {"status": "accepted", "worker_id": found.id, "url": found.url,
                           "message": f"Worker removed ({found.inflight} requests in flight finish first)"})

    async def other_method(scope, body: bytes) -> Reply:
        return _error(405, f"{scope['method']} {WORKERS_PREFIX}{{id}} is not supported (GET or DELETE)",
                      "METHOD_NOT_ALLOWED")

    async def other_method_on_list(scope, body: bytes) -> Reply:
        # /workers is the router's own: another method there is refused, never proxied to a worker
        return _error(405, f"{scope['method']} /workers is not supported (GET or POST)", "METHOD_NOT_ALLOWED")

    async def readiness(scope, body: bytes) -> Reply:
        healthy, total = len(runtime.pool.healthy()), len(runtime.pool)
        if healthy:
            return _json(200, {"status": "ready", "healthy_workers": healthy, "total_workers": total})
        return _json(503, {"status": "not_ready", "healthy_workers": 0, "total_workers": total,
                           "reason": "No healthy workers available"})

    async def liveness(scope, body: bytes) -> Reply:
        return Reply(200, b"OK", [(b"content-type", b"text/plain; charset=utf-8")])

    async def loads(scope, body: bytes) -> Reply:
        # load = requests this router has in flight on the worker; -1 for one out of rotation
        # (the gateway's "could not get a load" value)
        entries = [{"worker": w.url, "worker_type": None if w.worker_type == "regular" else w.worker_type,
                    "load": w.inflight if w.selectable else -1} for w in runtime.pool.active]
        ok = sum(1 for e in entries if e["load"] >= 0)
        return _json(200, {"loads": entries, "total_workers": len(entries), "successful": ok,
                           "failed": len(entries) - ok})

    return [
        Route(("POST",), "/workers", create, "register a worker (the gateway's API: 202 and its id)", admin=True),
        Route(("GET",), WORKERS_PREFIX, get_one, "one worker, by id or URL-encoded URL", prefix=True),
        Route(("DELETE",), WORKERS_PREFIX, delete_one, "remove a worker (in-flight requests finish)", admin=True,
              prefix=True),
        Route(("POST", "PUT", "PATCH", "HEAD", "OPTIONS"), WORKERS_PREFIX, other_method, "405", prefix=True),
        Route(("PUT", "PATCH", "DELETE"), "/workers", other_method_on_list, "405 (never proxied)"),
        Route(("GET",), "/readiness", readiness, "200 ready / 503 without a healthy worker"),
        Route(("GET",), "/liveness", liveness, "200 OK"),
        Route(("GET",), "/v1/loads", loads, "in-flight requests per worker"),
        Route(("GET",), "/get_loads", loads, "alias of /v1/loads"),
    ]
