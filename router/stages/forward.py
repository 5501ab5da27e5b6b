"""forward: pick a worker, send it the request, relay its reply to the client.

Reads `ex.body_for_upstream` (the client's bytes unless an earlier stage rewrote them), the
method, path, query and end-to-end headers. Writes `ex.worker`, `ex.route_reason`, `ex.status`,
`ex.response_headers` and, when a later stage needs it, `ex.response_body` (non-stream) or
`ex.final_event` (the last SSE event). Bytes are relayed unchanged as they arrive; when response
stages follow, the end of the reply (the whole body for JSON, `data: [DONE]` for SSE) is held
back until they ran, so a trajectory is stored before the client can ask for it.
"""

from __future__ import annotations

import msgspec

from router.core.headers import header_value, request_headers_for_upstream, response_headers_for_client
from router.core.pipeline import Exchange, Stage, StageError
from router.core.upstream_errors import UpstreamConnectError, UpstreamDisconnect, UpstreamLocalError, UpstreamTimeout
from router.wire.sglang import reply_summaries

_DONE = b"data: [DONE]"
# A reply this small with a Content-Length is read whole and sent in one message (one write
# through the server instead of three); larger ones stream.
_ONE_SHOT_BYTES = 1 << 20


class Options(msgspec.Struct, forbid_unknown_fields=True):
    # Resend a reply whose finish_reason is "abort" to another healthy worker, at once (never after
    # a blind sleep), at most this many times. Off by default: aborts are usually deliberate
    # (abort_all at the end of a rollout) and are recorded as what they are. Applies to replies
    # the router reads whole (non-stream); a stream already relayed can't be taken back.
    abort_retries: int = 0


class Forward(Stage):
    name = "forward"
    phase = "forward"
    provides = frozenset({"response"})
    Options = Options

    async def forward(self, ex: Exchange, client) -> None:
        svc = self.services
        cfg = svc.config.server
        target = ex.path + ("?" + ex.query.decode("latin-1") if ex.query else "")
        headers = request_headers_for_upstream(ex.headers)
        body = ex.body_for_upstream
        capture = client.pipeline_needs_response
        is_generate = ex.path == "/generate"
        tried = []
        reasons = []  # one route reason per attempt, all shown in x-miles-router-route-reason
        failed_attempts = []  # "url status" of error replies that were retried
        last_error = ""
        connect_retries = 1  # only for a connect failure: nothing reached the worker, so resending is safe
        abort_retries = self.options.abort_retries
        # An error reply (retry.statuses) means the worker did not do the work: unlike a delivered
        # request on a dropped connection, it is safe to send it to another worker, at once.
        status_retries = svc.config.retry.max_attempts - 1
        workers = svc.workers
        retry_statuses = workers.retry_statuses
        while True:
            worker, reason, trial = await workers.take(ex, exclude=tried)
            if worker is None:
                break
            reasons.append(reason)
            ex.worker, ex.route_reason = worker, ", ".join(reasons)
            outcome = None  # (failed, reason) once known; the breaker hears every outcome once
            sent = workers.sending(worker)  # a pause of this worker waits until the request is written
            try:
                async with svc.upstream.request(worker.url, ex.method, target, headers, body,
                                                timeout_s=cfg.request_timeout_s, on_sent=sent) as resp:
                    ex.status = resp.status
                    ex.response_headers = resp.headers
                    # 5xx is a failure; 4xx (incl. 429) means the worker is alive and answering.
                    outcome = (resp.status >= 500, f"HTTP {resp.status}")
                    if (resp.status in retry_statuses and status_retries > 0
                            and workers.routable(ex, exclude=[*tried, worker])):
                        status_retries -= 1
                        tried.append(worker)
                        failed_attempts.append(f"{worker.url} {resp.status}")
                        svc.metrics.status_retries.labels(str(resp.status)).inc()
                        continue  # the reply is dropped with its connection; nothing reached the client
                    if resp.status in retry_statuses and len(reasons) > 1:
                        svc.metrics.retries_exhausted.inc()
                    if failed_attempts:
                        ex.extra_headers.append((b"x-miles-router-retried", ", ".join(failed_attempts).encode()))
                    out_headers = response_headers_for_client(resp.headers) + client.route_headers(ex)
                    sse = (header_value(resp.headers, b"content-type") or b"").startswith(b"text/event-stream")
                    length = header_value(resp.headers, b"content-length")
                    whole = capture or (length is not None and length.isdigit() and int(length) <= _ONE_SHOT_BYTES)
                    if sse or not whole:
                        await client.start(resp.status, out_headers)
                        if capture:
                            await self._relay_sse(ex, resp, client)
                        else:
                            async for chunk in resp.iter_chunks():
                                await client.send(chunk)
                    else:
                        reply = await resp.read()
                        outputs = reply_summaries(reply) if resp.status == 200 and (is_generate or abort_retries) else None
                        if (abort_retries and outputs and any(o.aborted for o in outputs)
                                and workers.pickable(ex, exclude=[*tried, worker])):
                            abort_retries -= 1
                            tried.append(worker)
                            svc.metrics.abort_retries.inc()
                            continue  # an abort is deliberate, not a failure
                        if capture:
                            ex.response_body = reply
                            ex.client_headers = out_headers
                        else:
                            await client.start(resp.status, out_headers)
                            client.defer(reply)
                            if is_generate and outputs:
                                workers.note_reply(ex, outputs)
                return
            except UpstreamLocalError as e:
                # The router is out of sockets or memory: not the worker's fault, and no retry helps.
                raise StageError(503, f"router overloaded: {e}", worker=worker.url) from None
            except UpstreamConnectError as e:
                outcome = (True, f"connect failed: {e}")
                last_error = f"{worker.url}: {e}"
                workers.on_worker_error(worker, f"connect failed: {e}")
                tried.append(worker)
                if not connect_retries:
                    break
                connect_retries -= 1
            except UpstreamTimeout as e:
                outcome = (True, f"timed out: {e}")
                if client.started:
                    raise
                raise StageError(504, f"worker {worker.url} did not answer within the timeout: {e}",
                                 worker=worker.url) from None
            except UpstreamDisconnect as e:
                outcome = (True, f"disconnected: {e}")
                if client.started:
                    raise
                workers.on_worker_error(worker, f"disconnected: {e}")
                raise StageError(502, f"worker {worker.url} closed the connection: {e}", worker=worker.url) from None
            finally:
                sent()
                if outcome is not None:  # None: cancelled (the client left), which says nothing of the worker
                    workers.on_outcome(worker, outcome[0], outcome[1], trial)
                workers.give_back(worker, trial, ex)
        if tried:
            raise StageError(502, f"could not connect to a worker ({last_error})")
        raise StageError(503, "no healthy worker available", workers=len(svc.workers.pool))

    @staticmethod
    async def _relay_sse(ex: Exchange, resp, client) -> None:
        """Relay whole SSE events; remember the last data event; hold back [DONE] and after."""
        pending = b""
        held = b""
        async for chunk in resp.iter_chunks():
            if held:
                held += chunk
                continue
            pending += chunk
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            events, pending = pending[: cut + 2], pending[cut + 2 :]
            done_at = events.find(_DONE)
            if done_at >= 0:
                events, held = events[:done_at], events[done_at:] + pending
                pending = b""
            if events:
                # The last event starts after the previous blank line (a JSON string may contain "data: ").
                prev = events.rfind(b"\n\n", 0, len(events) - 2)
                start = prev + 2 if prev >= 0 else 0
                if events.startswith(b"data: ", start):
                    ex.final_event = events[start + 6 : -2]
                await client.send(events)
        client.defer(held + pending)
