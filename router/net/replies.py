"""How the router writes replies to a client: whole replies of its own (JSON, errors), a refusal sent before the
request's body was read, and `ClientStream`, the relay a pipeline's forward stage writes the worker's reply
to (it is the `ClientSink` of router/core/pipeline.py)."""

from __future__ import annotations

import trio

from router.core.errors import RouterError
from router.core.pipeline import Exchange, Reply
from router.wire.api import error_body, json_encoder


class ClientStream:
    """The reply to the client: started once, body relayed in pieces, ended exactly once."""

    __slots__ = ("_send", "started", "finished", "deferred", "pipeline_needs_response", "status")

    def __init__(self, send, pipeline_needs_response: bool) -> None:
        self._send = send
        self.started = False
        # Set before the last body message goes to hypercorn: it reports "http.disconnect" from
        # inside that send, which is then the normal end of the exchange, not a client leaving.
        self.finished = False
        self.deferred = b""
        self.pipeline_needs_response = pipeline_needs_response
        self.status = 0

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        self.status = status
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def send(self, chunk: bytes) -> None:
        if chunk:
            await self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    def defer(self, data: bytes) -> None:
        self.deferred += data

    async def finish(self) -> None:
        self.finished = True
        await self._send({"type": "http.response.body", "body": self.deferred, "more_body": False})

    async def reply(self, reply: Reply) -> None:
        """A whole reply of the router's own (an error, or a stage's short-circuit)."""
        self.status = reply.status
        self.finished = True
        await send_reply(self._send, reply)

    @staticmethod
    def route_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
        out = list(ex.extra_headers)
        if ex.worker is not None:
            out.append((b"x-miles-router-worker", ex.worker.url.encode()))
            out.append((b"x-miles-router-route-reason", ex.route_reason.encode()))
            version = ex.worker.weight_version  # the weights that served it, as the router knows them
            if version is not None and version.isprintable() and version.isascii():
                out.append((b"x-miles-router-weight-version", version.encode()))
        return out


async def send_reply(send, reply: Reply) -> None:
    headers = reply.headers + [(b"content-length", str(len(reply.body)).encode())]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


# Bounds on reading and dropping a refused request's body (see send_reply_before_body).
_LINGER_BYTES = 64 << 20
_LINGER_S = 5.0


async def send_reply_before_body(send, receive, reply: Reply) -> None:
    """Refuse a request whose body is still arriving (413, a bad target), then read and drop the rest.

    Closing a socket with unread bytes makes the kernel answer with a reset, which can reach the
    client before it has read the reply: it then sees "connection reset" or, having been told
    nothing, reuses the dead keep-alive connection. So the reply says `Connection: close` and goes
    out first; the rest of the body is then drained (bounded in bytes and time, as nginx's
    lingering close is) before hypercorn closes the connection.
    """
    headers = reply.headers + [(b"content-length", str(len(reply.body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body, "more_body": True})
    drained = 0
    with trio.move_on_after(_LINGER_S):
        while drained < _LINGER_BYTES:
            msg = await receive()
            if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
                break
            drained += len(msg.get("body", b""))
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def json_reply(status: int, obj) -> Reply:
    return Reply(status, json_encoder.encode(obj))


def error_reply(status: int, message: str, **extra) -> Reply:
    return Reply(status, error_body(message, **extra))


def error_reply_for(e: RouterError, **extra) -> Reply:
    """The one answer to any RouterError (router/core/errors.py): its status, `{"error", **extra}`."""
    return error_reply(e.status, e.message, **extra, **e.extra)
