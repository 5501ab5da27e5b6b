"""The router's ASGI app: its own endpoints, and every other path run through a pipeline.

Plain ASGI (no framework): one dict lookup decides between a router endpoint and the proxy.
Request bodies are read once, bounded by `server.max_body_bytes` (413 before reading when the
Content-Length already says too much), and forwarded as the same bytes unless a stage rewrote them.
A watcher task turns a client disconnect into cancellation of the upstream call, which closes
that upstream connection and frees the worker slot.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

import trio

from router.wire import DECODE_ERRORS, decode_error_text
from router.core.errors import RouterError
from router.net.replies import (ClientStream, error_reply, error_reply_for, json_reply, send_reply,
                                send_reply_before_body)
from router.net.routes import Route, build_routes
from router.core.headers import header_value
from router.core.labels import check_labels, parse_label_list
from router.core.pipeline import CommitError, Exchange, Reply, StageError
from router.core.urls import TargetError, WorkerUrlError, host_allowed, normalize_worker_url, origin_form
from router.net.admission import QueueFull, QueueTimeout
from router.net.runtime import RoutePipeline, Runtime
from router.wire.api import worker_url_decoder

log = logging.getLogger("miles_router")

_JSON = [(b"content-type", b"application/json")]
_PROXY_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


class BodyTooLarge(Exception):
    def __init__(self, body_complete: bool) -> None:
        super().__init__()
        self.body_complete = body_complete  # the request's last body message has been received


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def _ascii(s: str) -> bytes:
    return s.encode("ascii", "backslashreplace")[:1024]


Handler = Callable[[dict, bytes], Awaitable[Reply]]


class RouterApp:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        cfg = runtime.config
        self.max_body = cfg.server.max_body_bytes
        self.admin_key = os.environ.get("MILES_ROUTER_ADMIN_KEY") or cfg.server.admin_api_key
        self.routes = build_routes(self, runtime)  # every route the router answers itself (router/net/routes.py)

    def own_routes(self) -> list[Route]:
        return [Route(("POST",), "/add_worker", self.add_worker, "register a worker (?url= or JSON; miles' way)",
                      admin=True),
                Route(("POST",), "/remove_worker", self.remove_worker, "remove a worker (in-flight requests finish)",
                      admin=True),
                Route(("GET",), "/list_workers", self.list_workers, "the registered worker URLs"),
                Route(("GET",), "/workers", self.workers, "every worker's state (the gateway's listing)"),
                Route(("GET",), "/health", self.health, "the router's liveness (+ miles' session_server_instance_id)"),
                Route(("GET",), "/metrics", self.metrics, "Prometheus text")]

    # ---- ASGI -------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope, receive, send) -> None:
        t0 = time.perf_counter()
        method = scope["method"]
        try:
            raw_path, path = origin_form(method, scope.get("raw_path") or scope["path"].encode("latin-1"))
        except TargetError as e:
            await send_reply_before_body(send, receive, error_reply(400, str(e)))
            self.rt.metrics.observe_request("(proxy)", 400, time.perf_counter() - t0)
            return
        if path != scope["path"]:  # absolute-form target: from here on only its path counts
            scope = {**scope, "path": path, "raw_path": raw_path}
        if self.admin_key:
            # The router's admin credential is the router's: never forwarded to a worker, whether
            # the request is a fan-out or proxied (tests/test_admin_security.py).
            scope = {**scope, "headers": self._without_admin_credentials(scope["headers"]),
                     "admin_headers": scope["headers"]}
        route = self.routes.match(method, path)
        route_label = route.label if route is not None else "(proxy)"
        try:
            body = await self._read_body(scope, receive)
        except ClientGone:
            return
        except BodyTooLarge as e:
            reply = error_reply(413, f"request body exceeds server.max_body_bytes ({self.max_body})",
                                limit=self.max_body)
            if e.body_complete:  # the connection is clean and stays open
                await send_reply(send, reply)
            else:
                await send_reply_before_body(send, receive, reply)
            self.rt.metrics.observe_request(route_label, 413, time.perf_counter() - t0)
            return
        if route is not None and route.streaming:
            status = await route.handler(scope, receive, send, body)
            self.rt.metrics.observe_request(route_label, status, time.perf_counter() - t0)
            return
        if route is not None:
            if route.admin and not self._admin_ok(scope):
                reply = error_reply(401, "admin endpoint: missing or wrong admin API key "
                                         "(send 'Authorization: Bearer <key>')")
                reply.headers.append((b"www-authenticate", b'Bearer realm="miles-router admin"'))
            else:
                try:
                    reply = await route.handler(scope, body)
                except RouterError as e:
                    reply = error_reply_for(e)
            await send_reply(send, reply)
            self.rt.metrics.observe_request(route_label, reply.status, time.perf_counter() - t0)
            return
        if method not in _PROXY_METHODS:
            await send_reply(send, error_reply(405, f"method {method} is not proxied"))
            return
        pipe = self.rt.pipeline_for(method, path)
        status = await self.proxy(scope, receive, send, body, pipe)
        self.rt.metrics.observe_request(pipe.route.path if pipe.route is not None else "(proxy)", status,
                                        time.perf_counter() - t0)

    async def _read_body(self, scope, receive) -> bytes:
        declared = header_value(scope["headers"], b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body:
                    raise BodyTooLarge(body_complete=False)
            except ValueError:
                pass
        chunks = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone
            chunk = msg.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body:
                    raise BodyTooLarge(body_complete=not msg.get("more_body", False))
                chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _admin_ok(self, scope) -> bool:
        if not self.admin_key:
            return True
        # Checked on the original headers (`_http` strips the credential before handlers run).
        headers = scope.get("admin_headers", scope["headers"])
        got = header_value(headers, b"authorization") or b""
        if got.lower().startswith(b"bearer "):
            got = got[7:].strip()
        else:
            got = header_value(headers, b"x-admin-key") or b""
        return hmac.compare_digest(got, self.admin_key.encode())

    def _without_admin_credentials(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """`headers` minus X-Admin-Key and an `Authorization: Bearer <admin key>` (other auth passes)."""
        key = self.admin_key.encode()
        out = []
        for k, v in headers:
            if k == b"x-admin-key":
                continue
            if k == b"authorization" and v.lower().startswith(b"bearer ") and hmac.compare_digest(v[7:].strip(), key):
                continue
            out.append((k, v))
        return out

    # ---- proxy ------------------------------------------------------------------------------
    async def proxy(self, scope, receive, send, body: bytes, pipe: RoutePipeline, *,
                    session=None, routing_key: str | None = None, upstream_path: str | None = None) -> int:
        """Run `pipe` for this request and relay the worker's reply (admission, disconnect watch, stages): the
        one entry for a proxied request, also the session routes' (`session`, `routing_key`: set on the
        Exchange; `upstream_path`: the path the worker gets). Returns the status the client got."""
        ex = Exchange(scope["method"], scope["path"], scope["query_string"], scope["headers"], body, route=pipe.route)
        if upstream_path is not None:
            ex.path = upstream_path
        elif scope.get("raw_path"):
            # Forward the path as the client spelled it (percent-encoding included), never re-quoted.
            ex.path = scope["raw_path"].decode("latin-1").split("?", 1)[0]
        ex.session, ex.routing_key = session, routing_key
        client = ClientStream(send, pipe.needs_response)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope, client)
            try:
                admitted = await self._admit(client)
                if admitted is not None:
                    try:
                        await self._run(pipe, ex, client)
                    finally:
                        if admitted:
                            self.rt.admission.release()
            finally:
                nursery.cancel_scope.cancel()
        # 499 (nginx's "client closed request"): the client left before any reply started.
        return client.status or 499

    async def _admit(self, client: ClientStream) -> bool | None:
        """Wait for an admission slot (server.max_concurrent_requests). True: held, release it;
        False: no limit; None: refused (429 queue full, 408 waited too long), reply sent."""
        adm = self.rt.admission
        try:
            return await adm.acquire()
        except QueueFull:
            self.rt.metrics.queue_rejected("admission", "full")
            await client.reply(error_reply(
                429, f"too many requests: {adm.limit} in progress and {adm.queue_size} waiting "
                     f"(server.max_concurrent_requests, server.queue_size)"))
        except QueueTimeout as e:
            self.rt.metrics.queue_rejected("admission", "timeout")
            await client.reply(error_reply(
                408, f"waited {e.waited_s:.3g}s for an admission slot (server.queue_timeout_s = "
                     f"{adm.timeout_s:g}s)"))
        return None

    @staticmethod
    async def _watch_disconnect(receive, scope: trio.CancelScope, client: ClientStream) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                # After the last body message it is hypercorn closing the stream (and, for
                # `Connection: close`, the socket) from inside that send: cancelling then broke
                # the close and the client waited forever (tests/test_bad_input.py::
                # test_connection_close_is_honoured_on_proxied_paths). Before it, the client left:
                # cancel the upstream call.
                if not client.finished:
                    scope.cancel()
                return

    async def _run(self, pipe: RoutePipeline, ex: Exchange, client: ClientStream) -> None:
        stage = None
        try:
            for stage in pipe.request_stages:
                reply = await stage.on_request(ex)
                if reply is not None:
                    await client.reply(reply)
                    return
            stage = pipe.forward_stage
            await stage.forward(ex, client)
        except RouterError as e:
            self.rt.metrics.stage_errors.labels(stage.name).inc()
            if client.started:
                raise
            await client.reply(error_reply_for(e, stage=stage.name))
            return
        except Exception as e:
            self.rt.metrics.stage_errors.labels(getattr(stage, "name", "?")).inc()
            if client.started:
                log.warning("%s %s: reply broken off after it started: %s: %s", ex.method, ex.path,
                            type(e).__name__, e)
                raise
            log.exception("stage %s failed", getattr(stage, "name", "?"))
            name = getattr(stage, "name", "?")
            await client.reply(error_reply(500, f"stage {name} failed: {type(e).__name__}: {e}", stage=name))
            return
        # The worker answered. Response stages never cost the client its reply: a failure is
        # logged, counted and reported in a header, and the worker's bytes go out unchanged.
        for stage in pipe.response_stages:
            try:
                await stage.on_response(ex)
            except CommitError as e:
                # What the reply promises could not be made true (e.g. the store could not write): the
                # client must not receive it as a success. A started stream is broken off, never completed.
                self.rt.metrics.stage_errors.labels(stage.name).inc()
                log.warning("response stage %s failed for %s %s: %s", stage.name, ex.method, ex.path, e.message)
                if client.started:
                    raise
                await client.reply(error_reply_for(e, stage=stage.name))
                return
            except Exception as e:
                self.rt.metrics.stage_errors.labels(stage.name).inc()
                log.warning("response stage %s failed for %s %s: %s: %s", stage.name, ex.method, ex.path,
                            type(e).__name__, e)
                ex.stage_errors.append(f"{stage.name}: {type(e).__name__}: {e}")
        if not client.started:
            headers = list(ex.client_headers or ())
            if ex.stage_errors:
                headers.append((b"x-miles-router-stage-error", _ascii("; ".join(ex.stage_errors))))
            await client.start(ex.status or 502, headers)
            client.defer(ex.response_body or b"")
        await client.finish()

    # ---- worker endpoints -------------------------------------------------------------------
    def _worker_url_from(self, scope, body: bytes) -> str:
        return self._worker_spec_from(scope, body)[0]

    def _worker_spec_from(self, scope, body: bytes) -> tuple[str, dict | None]:
        """(the worker URL, its labels or None) from `?url=&labels=k=v,...` or a JSON body `{"url", "labels"}`."""
        qs = parse_qs(scope["query_string"].decode("latin-1"))
        url = (qs.get("url") or qs.get("worker_url") or [None])[0]
        labels = None
        try:
            if "labels" in qs:
                labels = parse_label_list(qs["labels"][0])
            if body.strip():
                try:
                    b = worker_url_decoder.decode(body)
                except DECODE_ERRORS as e:
                    if url is None:
                        raise StageError(400, f"invalid JSON body: {decode_error_text(e, body)}") from None
                else:
                    url = url or b.url or b.worker_url
                    if b.labels is not None:
                        labels = {**(labels or {}), **check_labels(b.labels)}
        except ValueError as e:
            raise StageError(400, str(e)) from None
        if not url:
            raise StageError(400, "worker_url is required (use query ?url=... or JSON body {\"url\": ...})")
        try:
            return normalize_worker_url(url), labels
        except WorkerUrlError as e:
            raise StageError(400, str(e)) from None

    async def add_worker(self, scope, body: bytes) -> Reply:
        url, labels = self._worker_spec_from(scope, body)
        if not host_allowed(url, self.rt.config.workers.allowed_hosts):
            return error_reply(403, f"worker host not in workers.allowed_hosts: {url}")
        worker, _ = self.rt.workers.add(url, labels)
        self.rt.admin_changed(worker)
        return json_reply(200, {"status": "success", "worker_urls": self.rt.pool.inflight_by_url()})

    async def remove_worker(self, scope, body: bytes) -> Reply:
        url = self._worker_url_from(scope, body)
        w = self.rt.workers.remove(url)
        if w is None:
            return error_reply(404, f"unknown worker: {url}")
        self.rt.admin_removed(w.url)
        return json_reply(200, {"status": "success", "removed": url, "inflight": w.inflight,
                                "worker_urls": self.rt.pool.inflight_by_url()})

    async def list_workers(self, scope, body: bytes) -> Reply:
        return json_reply(200, {"urls": [w.url for w in self.rt.pool.active]})

    async def workers(self, scope, body: bytes) -> Reply:
        from router.net.gateway import workers_listing

        return json_reply(200, workers_listing(self.rt))

    async def health(self, scope, body: bytes) -> Reply:
        healthy = len(self.rt.pool.healthy())
        # pid: which process answered (`--processes N` serves one port from N processes)
        body = {"status": "ok", "healthy_workers": healthy, "total_workers": len(self.rt.pool), "pid": os.getpid()}
        if self.rt.sessions is not None:  # miles' session server answers with its instance id
            body["session_server_instance_id"] = self.rt.sessions.instance_id
        return json_reply(200, body)

    async def metrics(self, scope, body: bytes) -> Reply:
        text = self.rt.metrics.render()
        if self.rt.siblings is not None:  # one of several processes on the port: it answers for all
            text = await self.rt.siblings.all_metrics(text)
        return Reply(200, text, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")])
