"""The simulated SGLang worker as a raw ASGI app, with its runtime state.

`SimWorker` answers SGLang v0.5.12's native endpoints (shared/sglang_api.md §1-4): `/generate`
(JSON, batch, `n`, SSE streaming), aborts, pause/continue, weight versions, flush_cache, health and
info routes. Generation itself is `router.sim.model`; time (the waiting queue, prefill and decode
latency, pauses, aborts) is `router.sim.scheduler`; this module adds the HTTP side (parsing,
replies, streaming, disconnects), fault injection and the `/_sim/*` test hooks:

- `GET|POST /_sim/faults`: read / partially update `Faults` (JSON object);
- `GET /_sim/stats`, `POST /_sim/stats/reset`: counters, peak in-flight, the last 64 request bodies;
- `* /_sim/echo`: `{"method","path","query","headers":[[name,value],...],"body_b64"}` of the request.

Every reply carries `x-sim-worker: <name>` and `x-sim-query: <raw query string>`.
"""

from __future__ import annotations

import base64
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from router.wire import DECODE_ERRORS
from router.http.serve import serve_asgi
from router.sim.model import (
    ABORTED,
    SGLANG_VERSION,
    AbortedRequest,
    Faults,
    GenerateItem,
    InternalError,
    PrefixCache,
    RequestError,
    SimModel,
    SimOptions,
    ValidationError,
    bad_request_abort,
    check_prompt,
    parse_generate,
    peek_stream_flag,
)
from router.sim.scheduler import Live, Scheduler
from router.tokenizer import Tokenizer, load_tokenizer

__all__ = ["SimStats", "SimWorker", "serve_sim_worker"]

_json_encode = msgspec.json.encode
_SSE_DONE = b"data: [DONE]\n\n"
_STREAM_BUFFER_CHUNKS = 64
_KEEP_LAST = 64
_JSON = b"application/json"
_SSE = b"text/event-stream; charset=utf-8"


class SimStats:
    """Counters and the last requests, for tests (`GET /_sim/stats` gives `to_json()` plus the
    scheduler's batch-model counters `busy_s`, `steps`, `late_s`, `late_max_s`)."""

    def __init__(self) -> None:
        self.requests = 0  # every HTTP request, /_sim/* included
        self.generate_requests = 0
        self.in_flight = 0  # /generate requests being answered
        self.peak_in_flight = 0
        self.aborted = 0  # items finished by an abort
        self.paths: dict[str, int] = {}
        self.last_bodies: deque[bytes] = deque(maxlen=_KEEP_LAST)  # raw /generate bodies
        self.last_input_ids: deque[list[int]] = deque(maxlen=_KEEP_LAST)  # prompt ids per generated item
        self.last_requests: deque[dict[str, Any]] = deque(maxlen=_KEEP_LAST)  # non-/_sim requests

    def to_json(self) -> dict[str, Any]:
        def decoded(body: bytes) -> Any:
            try:
                return msgspec.json.decode(body)
            except DECODE_ERRORS:
                return {"raw_b64": base64.b64encode(body).decode()}

        return {
            "requests": self.requests,
            "generate_requests": self.generate_requests,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "aborted": self.aborted,
            "paths": dict(self.paths),
            "last_bodies": [decoded(b) for b in self.last_bodies],
            "last_input_ids": list(self.last_input_ids),
            "last_requests": [
                {k: v for k, v in r.items() if k != "body"} | {"body": decoded(r["body"])} for r in self.last_requests
            ],
        }


class _Reply:
    """Sends one HTTP response; adds the x-sim-* headers."""

    def __init__(self, send: Callable[[dict], Awaitable[None]], extra_headers: list[tuple[bytes, bytes]]) -> None:
        self.send = send
        self.extra_headers = extra_headers

    async def start(self, status: int, content_type: bytes | None, content_length: int | None = None) -> None:
        headers = list(self.extra_headers)
        if content_type is not None:
            headers.append((b"content-type", content_type))
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, status: int, data: bytes, content_type: bytes | None) -> None:
        await self.start(status, content_type, len(data))
        await self.send({"type": "http.response.body", "body": data, "more_body": False})

    async def json(self, status: int, obj: Any) -> None:
        await self.body(status, _json_encode(obj), _JSON)

    async def empty(self, status: int = 200) -> None:
        await self.body(status, b"", None)


class SimWorker:
    """A simulated SGLang worker; an ASGI callable. See the module docstring for the routes."""

    def __init__(self, options: SimOptions | None = None, *, tokenizer: Tokenizer | None = None) -> None:
        self.options = options = options or SimOptions()
        self.tokenizer = tokenizer or load_tokenizer(options.tokenizer)
        self.model = SimModel(self.tokenizer, options)
        self.faults: Faults = msgspec.structs.replace(options.faults)
        self.stats = SimStats()
        self.weight_version = options.weight_version
        self.prefix_cache = PrefixCache(options.prefix_cache_tokens)
        self.scheduler = Scheduler(options, self.prefix_cache, lambda: self.faults)
        self._created = int(time.time())
        self._routes: dict[str, tuple[frozenset[str], Callable[..., Awaitable[None]]]] = {}
        for methods, paths, handler in (
            ("GET", ("/health", "/health_generate"), self._health),
            ("GET", ("/model_info", "/get_model_info"), self._model_info),
            ("GET", ("/server_info", "/get_server_info"), self._server_info),
            ("GET", ("/get_weight_version", "/weight_version"), self._weight_version_gone),
            ("GET", ("/v1/models",), self._models),
            ("GET", ("/get_load",), self._load),
            ("POST PUT", ("/generate",), self._generate),
            ("POST", ("/abort_request",), self._abort_request),
            ("POST", ("/pause_generation",), self._pause_generation),
            ("POST", ("/continue_generation",), self._continue_generation),
            ("POST", ("/update_weight_version",), self._update_weight_version),
            ("POST", ("/update_weights_from_disk",), self._update_weights),
            ("POST", ("/update_weights_from_tensor", "/update_weights_from_distributed"), self._update_weights),
            ("POST", ("/init_weights_update_group", "/destroy_weights_update_group"), self._weights_group),
            ("GET POST", ("/release_memory_occupation", "/resume_memory_occupation"), self._memory_occupation),
            ("GET POST", ("/flush_cache",), self._flush_cache),
            ("GET POST", ("/_sim/faults",), self._sim_faults),
            ("GET", ("/_sim/stats",), self._sim_stats),
            ("POST", ("/_sim/stats/reset",), self._sim_stats_reset),
            ("GET POST PUT PATCH DELETE HEAD OPTIONS", ("/_sim/echo",), self._sim_echo),
        ):
            for path in paths:
                self._routes[path] = (frozenset(methods.split()), handler)

    # ---- python-side controls (same effect as the HTTP endpoints)

    def set_faults(self, **changes: Any) -> Faults:
        self.faults = msgspec.convert(msgspec.structs.asdict(self.faults) | changes, Faults)
        self.scheduler.wake_all()
        return self.faults

    def abort(self, rid: str = "", abort_all: bool = False) -> int:
        """`/abort_request`: abort_all, or every live rid starting with `rid` if `rid` itself is live."""
        return self.scheduler.abort(rid, abort_all)

    def pause(self, mode: str = "abort") -> list[Live]:
        return self.scheduler.pause(mode)

    def resume(self) -> None:
        self.scheduler.resume()

    def reset_stats(self) -> None:
        self.stats = SimStats()
        self.scheduler.reset_counters()

    @property
    def paused(self) -> bool:
        return self.scheduler.paused

    @property
    def _live(self) -> dict[str, Live]:  # rid -> item, waiting or running (tests wait on it)
        return self.scheduler.live

    # ---- ASGI entry

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        path, method = scope["path"], scope["method"]
        query = scope.get("query_string", b"")
        stats = self.stats
        stats.requests += 1
        stats.paths[path] = stats.paths.get(path, 0) + 1
        if not path.startswith("/_sim/"):
            stats.last_requests.append(
                {"method": method, "path": path, "query": query.decode("latin-1"), "body": bytes(body)}
            )
        reply = _Reply(send, [(b"x-sim-worker", self.options.name.encode()), (b"x-sim-query", query)])
        route = self._routes.get(path)
        if route is None:
            await reply.json(404, {"detail": "Not Found"})
        elif method not in route[0]:
            await reply.json(405, {"detail": "Method Not Allowed"})
        else:
            await route[1](reply, bytes(body), scope=scope, receive=receive)

    # ---- small endpoints

    async def _health(self, reply: _Reply, body: bytes, **_: Any) -> None:
        await reply.empty(self.faults.health_status)

    async def _model_info(self, reply: _Reply, body: bytes, **_: Any) -> None:
        await reply.json(
            200,
            {
                "model_path": self.options.model_path,
                "tokenizer_path": str(self.tokenizer.folder or self.options.tokenizer),
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": self.weight_version,
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": "qwen3_moe",
                "architectures": ["Qwen3MoeForCausalLM"],
            },
        )

    async def _server_info(self, reply: _Reply, body: bytes, *, scope: dict, **_: Any) -> None:
        host, port = (scope.get("server") or ("127.0.0.1", 0))[:2]
        opts = self.options
        await reply.json(
            200,
            {
                "model_path": opts.model_path,
                "tokenizer_path": str(self.tokenizer.folder or opts.tokenizer),
                "served_model_name": opts.model_path,
                "host": host,
                "port": port,
                "tp_size": 1,
                "dp_size": 1,
                "pp_size": 1,
                "ep_size": 1,
                "context_length": opts.context_length,
                "random_seed": opts.seed,
                "weight_version": self.weight_version,
                "enable_return_routed_experts": opts.enable_routed_experts,
                "enable_memory_saver": False,
                "enable_metrics": False,
                "skip_tokenizer_init": False,
                "incremental_streaming_output": False,
                "stream_interval": 1,
                "page_size": 1,
                "status": "ready",
                "max_total_num_tokens": opts.prefix_cache_tokens,
                "max_req_input_len": opts.context_length - 1,
                "internal_states": [{"last_gen_throughput": 0.0, "num_running_reqs": self.scheduler.count(running=True)}],
                "version": SGLANG_VERSION,
            },
        )

    async def _weight_version_gone(self, reply: _Reply, body: bytes, **_: Any) -> None:
        message = "Endpoint '/get_weight_version' or '/weight_version' is deprecated. Please use '/model_info' instead."
        await reply.json(404, {"object": "error", "message": message, "type": "404", "param": None, "code": 404})

    async def _models(self, reply: _Reply, body: bytes, **_: Any) -> None:
        card = {
            "id": self.options.model_path,
            "object": "model",
            "created": self._created,
            "owned_by": "sglang",
            "root": self.options.model_path,
            "parent": None,
            "max_model_len": self.options.context_length,
        }
        await reply.json(200, {"object": "list", "data": [card]})

    async def _load(self, reply: _Reply, body: bytes, **_: Any) -> None:
        running = [live for live in self.scheduler.live.values() if live.running]
        await reply.json(
            200,
            [
                {
                    "dp_rank": 0,
                    "num_reqs": len(running),
                    "num_waiting_reqs": len(self.scheduler.live) - len(running),
                    "num_tokens": sum(live.prompt_tokens for live in running),
                    "num_pending_tokens": 0,
                    "ts_tic": time.time(),
                }
            ],
        )

    @staticmethod
    def _json_object(body: bytes) -> dict[str, Any]:
        if not body.strip():
            return {}
        try:
            obj = msgspec.json.decode(body)
        except DECODE_ERRORS as exc:
            raise ValidationError(f"JSON decode error: {exc}") from None
        if not isinstance(obj, dict):
            raise ValidationError("Input should be a valid dictionary")
        return obj

    async def _with_json(self, reply: _Reply, body: bytes) -> dict[str, Any] | None:
        try:
            return self._json_object(body)
        except ValidationError as exc:
            await reply.json(exc.status, exc.body())
            return None

    async def _abort_request(self, reply: _Reply, body: bytes, **_: Any) -> None:
        req = await self._with_json(reply, body)
        if req is not None:
            self.abort(str(req.get("rid") or ""), bool(req.get("abort_all")))
            await reply.empty(200)

    async def _pause_generation(self, reply: _Reply, body: bytes, **_: Any) -> None:
        req = await self._with_json(reply, body)
        if req is None:
            return
        mode = req.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            await reply.json(400, {"error": {"message": f"Invalid pause mode: {mode}"}})
            return
        for live in self.pause(mode):  # abort mode waits until the aborted requests are gone
            await live.done.wait()
        await reply.json(200, {"message": "Generation paused successfully.", "status": "ok"})

    async def _continue_generation(self, reply: _Reply, body: bytes, **_: Any) -> None:
        self.resume()
        await reply.json(200, {"message": "Generation continued successfully.", "status": "ok"})

    async def _update_weight_version(self, reply: _Reply, body: bytes, **_: Any) -> None:
        req = await self._with_json(reply, body)
        if req is None:
            return
        version = req.get("new_version")
        if not isinstance(version, str):
            await reply.json(400, ValidationError("new_version: Field required").body())
            return
        if req.get("abort_all_requests", True):
            self.abort(abort_all=True)
        self.weight_version = version
        await reply.json(
            200, {"success": True, "message": f"Weight version updated to {version}", "new_version": version}
        )

    async def _update_weights(self, reply: _Reply, body: bytes, *, scope: dict, **_: Any) -> None:
        req = await self._with_json(reply, body)
        if req is None:
            return
        if req.get("abort_all_requests"):
            self.abort(abort_all=True)
        if isinstance(req.get("weight_version"), str):
            self.weight_version = req["weight_version"]
        if req.get("flush_cache", True) and not self.scheduler.live:
            self.prefix_cache.clear()
        if scope["path"] == "/update_weights_from_disk":
            result = {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
        else:
            result = {"success": True, "message": "Succeeded to update parameter online."}
        await reply.json(200, result)

    async def _weights_group(self, reply: _Reply, body: bytes, *, scope: dict, **_: Any) -> None:
        if await self._with_json(reply, body) is not None:
            verb = "initialized" if scope["path"].startswith("/init") else "destroyed"
            await reply.json(200, {"success": True, "message": f"Weights update group {verb} (simulated)."})

    async def _memory_occupation(self, reply: _Reply, body: bytes, **_: Any) -> None:
        await reply.body(200, b"null", _JSON)

    async def _flush_cache(self, reply: _Reply, body: bytes, **_: Any) -> None:
        idle = not self.scheduler.live
        if idle:
            self.prefix_cache.clear()
        text = (
            "Cache flushed.\nPlease check backend logs for more details. "
            "(When there are running or waiting requests, the operation will not be performed.)\n"
        )
        await reply.body(200 if idle else 400, text.encode(), None)

    # ---- /_sim hooks

    async def _sim_faults(self, reply: _Reply, body: bytes, *, scope: dict, **_: Any) -> None:
        if scope["method"] == "POST":
            req = await self._with_json(reply, body)
            if req is None:
                return
            try:
                self.set_faults(**req)
            except msgspec.ValidationError as exc:
                await reply.json(400, {"error": {"message": str(exc)}})
                return
        await reply.json(200, msgspec.structs.asdict(self.faults))

    async def _sim_stats(self, reply: _Reply, body: bytes, **_: Any) -> None:
        await reply.json(200, self._stats_json())

    async def _sim_stats_reset(self, reply: _Reply, body: bytes, **_: Any) -> None:
        self.reset_stats()
        await reply.json(200, self._stats_json())

    def _stats_json(self) -> dict[str, Any]:
        sched = self.scheduler  # the batch model's counters (0 with the independent one)
        return self.stats.to_json() | {"busy_s": sched.busy_s, "steps": sched.steps, "late_s": sched.late_s,
                                       "late_max_s": sched.late_max_s}

    async def _sim_echo(self, reply: _Reply, body: bytes, *, scope: dict, **_: Any) -> None:
        await reply.json(
            200,
            {
                "method": scope["method"],
                "path": scope["path"],
                "query": scope.get("query_string", b"").decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
                "body_b64": base64.b64encode(body).decode(),
            },
        )

    # ---- /generate

    async def _generate(self, reply: _Reply, body: bytes, *, scope: dict, receive: Callable, **_: Any) -> None:
        stats = self.stats
        stats.generate_requests += 1
        stats.last_bodies.append(body)
        stats.in_flight += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
        try:
            await self._generate_guarded(reply, body, scope, receive)
        finally:
            stats.in_flight -= 1

    async def _generate_guarded(self, reply: _Reply, body: bytes, scope: dict, receive: Callable) -> None:
        faults = self.faults
        if faults.echo:
            content_type = dict(scope["headers"]).get(b"content-type", b"application/octet-stream")
            await self._send_limited(reply, 200, body, content_type)
            return
        if faults.generate_status is not None:
            await self._fault_error(reply, faults.generate_status)
            return
        received = trio.current_time()
        try:
            decoded = msgspec.json.decode(body)
        except DECODE_ERRORS as exc:
            err = ValidationError(f"JSON decode error: {exc}")
            await reply.json(err.status, err.body())
            return
        stream = peek_stream_flag(decoded)
        try:
            if not self.options.honour_routed_experts_start_len and isinstance(decoded, dict):
                decoded.pop("routed_experts_start_len", None)
            request = parse_generate(decoded, return_routed_experts_enabled=self.options.enable_routed_experts)
            prompts: list[list[int]] = []
            bad_request_aborts: dict[int, str] = {}
            for item in request.items:
                ids = item.prompt if isinstance(item.prompt, list) else await self.tokenizer.encode_async(item.prompt)
                try:
                    check_prompt(item, ids, self.options.context_length)
                except AbortedRequest as exc:
                    if not request.stream:
                        raise
                    bad_request_aborts[item.index] = exc.message
                prompts.append(ids)
            duplicates = [item.rid for item in request.items if item.rid in self.scheduler.live]
            if duplicates:
                raise RequestError(f"Duplicate request ID detected: {duplicates[0]}")
        except ValidationError as exc:
            await reply.json(exc.status, exc.body())
            return
        except InternalError:
            await reply.body(500, b"Internal Server Error", b"text/plain; charset=utf-8")
            return
        except RequestError as exc:
            if stream:  # raised inside SGLang's stream generator: an error frame, HTTP 200
                await reply.start(200, _SSE)
                frame = b"data: " + _json_encode(exc.body()) + b"\n\n" + _SSE_DONE
                await reply.send({"type": "http.response.body", "body": frame, "more_body": False})
            else:
                await reply.json(exc.status, exc.body())
            return

        for ids in prompts:
            self.stats.last_input_ids.append(ids)
        lives = [Live(item.rid, len(ids)) for item, ids in zip(request.items, prompts)]
        for live in lives:
            self.scheduler.add(live)
        try:
            if request.stream:
                await self._generate_stream(reply, request.items, prompts, lives, received, receive, bad_request_aborts)
            else:
                await self._generate_json(reply, request.is_single, request.items, prompts, lives, received, receive)
        finally:
            for live in lives:  # items cut short by a disconnect or a dropped connection
                self.scheduler.forget(live)

    async def _fault_error(self, reply: _Reply, status: int) -> None:
        message = f"Simulated fault: status {status}"
        if status == 400:
            await reply.json(400, {"error": {"message": message}})
        else:
            await reply.json(
                status, {"object": "error", "message": message, "type": str(status), "param": None, "code": status}
            )

    async def _generate_json(
        self,
        reply: _Reply,
        is_single: bool,
        items: list[GenerateItem],
        prompts: list[list[int]],
        lives: list[Live],
        received: float,
        receive: Callable,
    ) -> None:
        outputs: list[dict[str, Any] | None] = [None] * len(items)

        async def run_all() -> None:
            async def one(k: int) -> None:
                outputs[k] = await self._run_item(items[k], prompts[k], lives[k], received, None, None)

            async with trio.open_nursery() as nursery:
                for k in range(len(items)):
                    nursery.start_soon(one, k)

        if not await self._unless_disconnected(receive, run_all):
            return
        await self._send_limited(reply, 200, _json_encode(outputs[0] if is_single else outputs), _JSON)

    async def _generate_stream(
        self,
        reply: _Reply,
        items: list[GenerateItem],
        prompts: list[list[int]],
        lives: list[Live],
        received: float,
        receive: Callable,
        bad_request_aborts: dict[int, str],
    ) -> None:
        batch = len(items) > 1
        send_chunk, chunks = trio.open_memory_channel(_STREAM_BUFFER_CHUNKS)

        async def emit(chunk: dict[str, Any]) -> None:
            await send_chunk.send(b"data: " + _json_encode(chunk) + b"\n\n")

        async def produce() -> None:
            async with send_chunk, trio.open_nursery() as nursery:
                for k, item in enumerate(items):
                    nursery.start_soon(
                        self._run_item,
                        item,
                        prompts[k],
                        lives[k],
                        received,
                        emit,
                        k if batch else None,
                        bad_request_aborts.get(item.index),
                    )

        async def stream_out() -> None:
            limit = self.faults.drop_after_bytes
            sent = 0
            await reply.start(200, _SSE)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                async with chunks:
                    async for data in chunks:
                        if limit is not None and sent + len(data) >= limit:
                            data = data[: limit - sent]
                        sent += len(data)
                        if not await self._send_body(reply, data, more=True) or sent == limit:
                            # returning with the body unfinished makes hypercorn close the connection
                            nursery.cancel_scope.cancel()
                            return
            if limit is not None and sent + len(_SSE_DONE) >= limit:
                await self._send_body(reply, _SSE_DONE[: limit - sent], more=True)
            else:
                await self._send_body(reply, _SSE_DONE, more=False)

        await self._unless_disconnected(receive, stream_out)

    @staticmethod
    async def _send_body(reply: _Reply, data: bytes, *, more: bool) -> bool:
        """False once the client has gone (hypercorn refuses sends after a disconnect)."""
        try:
            await reply.send({"type": "http.response.body", "body": data, "more_body": more})
        except Exception:  # noqa: BLE001 - hypercorn raises its own error types once the client is gone
            return False
        return True

    async def _send_limited(self, reply: _Reply, status: int, data: bytes, content_type: bytes) -> None:
        """A complete response, or (fault drop_after_bytes) a Content-Length one cut short."""
        limit = self.faults.drop_after_bytes
        if limit is None or limit >= len(data):
            await reply.body(status, data, content_type)
            return
        await reply.start(status, content_type, len(data))
        await reply.send({"type": "http.response.body", "body": data[:limit], "more_body": True})
        # returning now makes hypercorn close the connection with the body incomplete

    @staticmethod
    async def _unless_disconnected(receive: Callable, fn: Callable[[], Awaitable[None]]) -> bool:
        """Run `fn`, cancelling it if the client disconnects; False if it did."""
        finished = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await fn()
            finished = True
            nursery.cancel_scope.cancel()
        return finished

    # ---- one item

    async def _run_item(
        self,
        item: GenerateItem,
        prompt_ids: list[int],
        live: Live,
        received: float,
        emit: Callable[[dict[str, Any]], Awaitable[None]] | None,
        index: int | None,
        bad_request: str | None = None,
    ) -> dict[str, Any]:
        """Generate one item; returns its final output (also emitted when streaming)."""
        try:
            return await self._generate_item(item, prompt_ids, live, received, emit, index, bad_request)
        finally:
            self.scheduler.forget(live)

    async def _generate_item(
        self,
        item: GenerateItem,
        prompt_ids: list[int],
        live: Live,
        received: float,
        emit: Callable[[dict[str, Any]], Awaitable[None]] | None,
        index: int | None,
        bad_request: str | None,
    ) -> dict[str, Any]:
        model = self.model

        async def waiting_abort() -> dict[str, Any]:
            self.stats.aborted += 1
            out = model.waiting_abort_output(
                item,
                weight_version=self.weight_version,
                e2e_latency=trio.current_time() - received,
                sent_ts=time.time(),
                index=index,
            )
            if emit is not None:
                await emit(out)
            return out

        if not await self.scheduler.admit(live):
            return await waiting_abort()

        completion = model.complete(prompt_ids, item.params, item.sample_index)
        total = len(completion)
        sent_ts: float | None = None

        def output(produced: int, finish: dict[str, Any] | None, text: str) -> dict[str, Any]:
            nonlocal sent_ts
            first = sent_ts is None
            if first:
                sent_ts = time.time()
            return model.output(
                item,
                prompt_ids,
                completion,
                produced,
                finish_reason=finish,
                text=text,
                weight_version=self.weight_version,
                cached_tokens=live.cached,
                num_retractions=live.num_retractions,
                e2e_latency=trio.current_time() - received,
                sent_ts=sent_ts if first else None,
                index=index,
            )

        if bad_request is not None:
            live.running = True
            live.cached = self.prefix_cache.match(prompt_ids)
            out = output(0, bad_request_abort(bad_request), "")
            if emit is not None:
                await emit(out)
            return out

        async def on_token(produced: int) -> None:
            text = completion.partial_text(produced)
            if text is not None:
                await emit(output(produced, None, text))

        produced = await self.scheduler.execute(live, prompt_ids, completion.output_ids,
                                                on_token if emit is not None else None)
        if not live.running:  # batch model: aborted before it joined the running batch
            return await waiting_abort()
        if produced == total:
            out = output(total, completion.finish_reason, completion.final_text())
        else:
            self.stats.aborted += 1
            out = output(produced, dict(ABORTED), completion.aborted_text(produced))
        if emit is not None:
            await emit(out)
        return out


async def serve_sim_worker(
    options: SimOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[tuple[str, SimWorker]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a `SimWorker` over HTTP; `task_status.started((url, worker))` once bound."""
    options = options or SimOptions()
    tokenizer = await trio.to_thread.run_sync(load_tokenizer, options.tokenizer)
    worker = SimWorker(options, tokenizer=tokenizer)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(_serve, worker, host, port, shutdown_trigger)
        task_status.started((url, worker))


async def _serve(
    worker: SimWorker,
    host: str,
    port: int,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_asgi(worker, host, port, shutdown_trigger=shutdown_trigger, task_status=task_status)
