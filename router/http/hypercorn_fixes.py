"""The router's connection classes for hypercorn 0.18's trio worker: `RouterTCPServer` (a
`TCPServer`) and `RouterH11Protocol` (an `H11Protocol`). router/http/serve.py serves the router's
connections with them; hypercorn itself is not changed, so other servers in the process (and
importing the simulator) see hypercorn as shipped.

Each override keeps hypercorn's behaviour and protocol code, has a test (tests/test_serving.py), and
names the hypercorn source it was reviewed against (router/http/reviewed.py refuses to serve if
that source changed). docs/upstream-fixes.md has the write-up of each, for hypercorn.

1. Closed connections are released at once (the idle timer used to hold them in CLOSE-WAIT).
2. The keep-alive idle timer is one deadline per connection, moved as requests start and finish,
   instead of a task started and awaited (`nursery.start`) and another cancelled per request.
3. Response writes go to the socket at once when the kernel takes them (trio's `send_all` adds a
   scheduler round trip after every write), take the connection's send lock without a round trip
   when it is free, and skip h11's empty end-of-body write of Content-Length responses.
4. hypercorn's own error replies (malformed request line or headers, which never reach the app)
   carry a JSON body naming the problem, like every other error the router gives.
5. A response head with a Content-Length is written together with the body that follows it.
6. A streamed (chunked) body's chunks are framed directly, as h11's ChunkedWriter would.

2, 3 and 5 save a task spawn, two socket writes and several scheduler round trips per small
reply; 3 and 6 most of hypercorn's cost per relayed SSE event (BENCHMARKS.md §1 has the A/B).
"""

from __future__ import annotations

import math
import os

import h11
import msgspec
import trio
from h11._writers import ChunkedWriter as _ChunkedWriter  # h11 is pinned below 0.17 with hypercorn
from hypercorn.events import Closed, RawData
from hypercorn.protocol.events import Body
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer

_POSIX = os.name == "posix"  # a socket is a file descriptor os.write() can take
_ERROR_TEXT = {
    400: "malformed HTTP request (request line, headers or framing)",
    413: "request head too large",
    431: "request header fields too large",
}


class KeepAliveDeadline:
    """Stands in for hypercorn's TrioSingleTask as `TCPServer.idle_task`.

    While the connection is idle (between requests) a deadline `keep_alive_timeout` ahead is
    armed; while a request is in flight it is infinite. One watcher task per connection waits for
    that deadline or for server shutdown, then closes the connection (at shutdown only once it is
    idle, as before). `restart` and `stop` are hypercorn's names for "now idle" and "now busy".
    """

    def __init__(self, server: TCPServer) -> None:
        self._server = server
        self._scope = trio.CancelScope()
        self._idle = True
        self._became_idle = trio.Event()
        self._started = False
        self._closed = False

    async def restart(self, task_group, action) -> None:  # noqa: ARG002 -- the action is built in
        self._idle = True
        self._became_idle.set()
        self._scope.deadline = trio.current_time() + self._server.config.keep_alive_timeout
        if not self._started:
            self._started = True
            task_group._nursery.start_soon(self._watch)

    async def stop(self) -> None:
        self._idle = False
        self._scope.deadline = math.inf

    def close(self) -> None:
        """The connection is gone: end the watcher now (its task group waits for it)."""
        self._closed = True
        self._scope.cancel()

    async def _watch(self) -> None:
        server = self._server
        with self._scope:
            await server.context.terminated.wait()
            while not self._idle:  # shutdown: let the in-flight request finish first
                self._became_idle = trio.Event()
                await self._became_idle.wait()
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            await server._initiate_server_close()


class RouterH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol with fixes 4-6."""

    _held_head = b""  # a Content-Length response's head, until its body is written with it (5)

    async def stream_send(self, event) -> None:
        # (6) A streamed body's chunk: h11 does nothing for it but frame it (its state machine stays in
        # SEND_BODY), yet building and checking the event costs as much as the write itself. Frame it
        # here exactly as h11's ChunkedWriter does; every other event goes through h11.
        if type(event) is Body and type(getattr(self.connection, "_writer", None)) is _ChunkedWriter:
            data = event.data
            if data:
                await self.send(RawData(data=b"%x\r\n%b\r\n" % (len(data), data)))
            return
        await super().stream_send(event)

    async def _send_h11_event(self, event) -> None:
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        held = self._held_head
        if held:
            self._held_head = b""
            data = held + data
        elif type(event) is h11.Response and any(name == b"content-length" for name, _ in event.headers):
            # (5) A head with a Content-Length is useless to the client without its body, which the
            # app is about to send: write both at once (one syscall and one scheduler round trip
            # fewer per reply). Streams (chunked) still get their head at once.
            self._held_head = data
            return
        await self.send(RawData(data=data))

    async def _send_error_response(self, status_code: int) -> None:
        # (4) hypercorn's own error replies: a JSON body naming the problem.
        body = msgspec.json.encode({"error": f"{status_code}: {_ERROR_TEXT.get(status_code, 'bad request')}"})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *self.config.response_headers("h11")]
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


class RouterTCPServer(TCPServer):
    """hypercorn's trio connection with fixes 1-3, speaking HTTP/1.1 through `RouterH11Protocol`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.idle_task = KeepAliveDeadline(self)  # (2)

    @property
    def protocol(self) -> ProtocolWrapper:
        return self._protocol

    @protocol.setter
    def protocol(self, wrapper: ProtocolWrapper) -> None:
        # hypercorn's `run` builds the ProtocolWrapper, which builds an H11Protocol with no hook to
        # choose the class; the connection's protocol becomes ours before it handles anything (a
        # subclass with no state of its own, so the object stays valid). h2 stays hypercorn's.
        if type(wrapper.protocol) is H11Protocol:
            wrapper.protocol.__class__ = RouterH11Protocol
        self._protocol = wrapper

    async def _read_data(self) -> None:
        # (1) hypercorn returns here once the peer has gone, but the connection's task group then
        # waited for the idle timer; a client that closed a keep-alive socket left it in
        # CLOSE-WAIT for keep_alive_timeout (tests/test_faults.py).
        await super()._read_data()
        self.idle_task.close()

    async def protocol_send(self, event) -> None:
        # (3)
        sock = getattr(self.stream, "socket", None)  # None for TLS, which the router does not serve
        if type(event) is not RawData or sock is None or not _POSIX:
            return await super().protocol_send(event)
        if not event.data:
            return  # h11's end of a Content-Length body: nothing to write
        data = event.data
        lock = self.send_lock
        await trio.lowlevel.checkpoint_if_cancelled()  # as Lock.acquire does: a cancelled task writes nothing
        try:
            lock.acquire_nowait()  # free in the common case: no scheduler round trip
        except trio.WouldBlock:
            await lock.acquire()
        try:
            # Most writes fit in the socket buffer: write them now, and wait (through trio) only
            # for what the kernel did not take.
            try:
                sent = os.write(sock.fileno(), data)
            except BlockingIOError:
                sent = 0
            except OSError:  # reset by the peer, or the socket is already closed (fd -1)
                raise trio.BrokenResourceError from None
            if sent < len(data):
                with trio.CancelScope(shield=True):  # a half-written response would corrupt the stream
                    await self.stream.send_all(memoryview(data)[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.protocol.handle(Closed())
        finally:
            lock.release()
