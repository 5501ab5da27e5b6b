"""Keep-alive HTTP/1.1 connection pool for the data path: raw non-blocking sockets under trio, parsed by h11.

Why not httpx: measured on this machine (BENCHMARKS.md §1), a trio+httpx proxy spends 1.6-2.4 ms CPU per request.
httpcore's pool walks every connection twice per request (O(pool)), `is_readable()` builds a new poll object on
every reuse, and the httpx layers (request building, cookies, auth/redirect wrappers) add ~30%. The router's whole
data path has a budget of <= 500 us CPU per request, hypercorn included, and <= 80 us per relayed SSE
chunk, so this module keeps only what the data path needs. Client CPU measured with bench/bench_upstream_client.py
(2-core VM, noisy): ~110 us/request at 64 concurrent requests (httpx: ~1.2-1.8 ms), ~200-250 us at concurrency 1
(httpx: ~0.7-0.8 ms), ~47 us per received SSE chunk (httpx: ~130 us).

* h11 (the parser httpcore itself uses) does all HTTP/1.1 framing: Content-Length, chunked, close-delimited,
  HEAD/204/304, 1xx skipping, keep-alive rules (`connection: close`, HTTP/1.0). Its validation and state machine
  are about half of the per-request cost above; everything else is kept close to the syscalls.
* Sockets are plain stdlib sockets in non-blocking mode; we wait with `trio.lowlevel.wait_readable/writable` only
  when a call would block. trio's SocketStream/trio.socket wrap every call in a checkpoint sandwich (~7 us each);
  we instead yield explicitly after `_YIELD_EVERY_BYTES` of back-to-back data so a fast large body can't starve
  other tasks. Receives go into one preallocated buffer per pool (`recv_into`) and straight into h11, which copies:
  `recv(n)` would malloc n bytes per call.
* One idle stack per origin (a deque: reuse from the right = LIFO, expire from the left = oldest), so a request is
  O(1): no scans over the pool. Connections idle for `keepalive_expiry_s` (below uvicorn's 5 s) are never reused;
  expired ones are dropped lazily (on checkout, on check-in, and in a sweep at most once per expiry period).
* A pooled socket that is readable while idle means the peer closed it (or sent something unsolicited): one
  poll(0) syscall on a reused poll object tells us, and we drop it.
* The keep-alive race (the worker closes an idle connection just as we reuse it, after the poll above) is
  retried once on a fresh connection, only when the connection was a reused one, not a single response byte
  arrived, and the worker cannot have run the request (RFC 9112 §9.3.1: a non-idempotent request is not retried
  automatically unless the client can tell the original was never applied). That is the case when
  - the method is safe (GET, HEAD, OPTIONS, TRACE): resending is harmless. PUT and DELETE are not included,
    because SGLang serves /generate on PUT too;
  - writing the request failed: part of it never left this host, so the worker never had all of it;
  - the worker closed in order (FIN, not a reset) and its TCP stack never acknowledged the whole request
    (TCP_INFO bytes_acked, Linux): it closed before the request arrived, which is the race itself. A worker that
    read the request acknowledged it, at the latest in its FIN.
  Everything else is not resent: a live worker that read a POST /generate and closed without replying may have
  run it, and resending would run the generation twice. A reset is not evidence either way (an abortive close
  after reading the request looks the same as one before it), so it is not resent. The caller gets
  UpstreamDisconnect, i.e. a 502.
* Cancellation/exception safety: a connection goes back to the pool only from one place, after h11 reports both
  sides DONE at the end of the response body. Every other exit (timeout, cancellation, error, body not read,
  failed write) closes the socket synchronously, so a half-used connection can never be reused.
* Timeouts use trio cancel scopes (~6 us each to create): one around send + response head, and one around the
  whole body (entered in `__aenter__`, left in `__aexit__`), armed at the first body wait that blocks and kept at
  least the body timeout ahead of the last body data handed out (`_StallDeadline`): a stall between chunks times out,
  and a relayed SSE chunk costs a clock read, not a scope or a deadline update.
* No unbounded buffering: the body is yielded chunk by chunk as it is received (<= `_RECEIVE_SIZE` per recv),
  `read(limit)` stops at the limit, and bodies over `_COALESCE_BODY_LIMIT` are written from the caller's buffer
  instead of being copied into the request head.
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from urllib.parse import urlsplit

import h11
import trio

from router.core.upstream_errors import (  # the exceptions this client raises (shared with stages)
    UpstreamConnectError,
    UpstreamDisconnect,
    UpstreamError,
    UpstreamLocalError,
    UpstreamTimeout,
)

__all__ = [
    "UpstreamConnectError",
    "UpstreamDisconnect",
    "UpstreamError",
    "UpstreamLocalError",
    "UpstreamPool",
    "UpstreamResponse",
    "UpstreamTimeout",
]

# Bytes per recv_into. The buffer is allocated once per pool (recv(n) would malloc n bytes per call, which is
# costly once n crosses glibc's mmap threshold), so it can be large: a 20 MB body takes ~80 receives.
_RECEIVE_SIZE = 256 * 1024
# h11's default (16 KiB) is too small for workers that return large headers; 256 KiB still caps a garbage stream.
_MAX_RESPONSE_HEAD_BYTES = 256 * 1024
# Bodies up to this size are concatenated with the request head into a single send (one syscall, one segment);
# larger ones are sent from the caller's buffer to avoid copying them.
_COALESCE_BODY_LIMIT = 64 * 1024
# Yield to the scheduler after this many bytes were received without blocking, for fairness.
_YIELD_EVERY_BYTES = 1024 * 1024
# A recv that returned less than this emptied the socket: the next receive waits before trying (see receive()).
_TRICKLE_BYTES = 4096
# Header names this module sets itself; a caller's copy would conflict with the real framing or origin.
# Connect failures that are about this process or host, not the worker.
_LOCAL_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL))
_POOL_OWNED_HEADERS = frozenset((b"host", b"content-length", b"transfer-encoding"))
# Methods whose request may be resent after the keep-alive race whatever happened to it (RFC 9110 §9.2.1).
_SAFE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))
# struct tcp_info (linux/tcp.h): tcpi_bytes_acked is a u64 at this offset (Linux >= 4.2; shorter replies: unknown).
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCPI_BYTES_ACKED_OFFSET = 120
_TCP_INFO_LEN = 192

_NEED_DATA = h11.NEED_DATA
_DONE = h11.DONE
_Data = h11.Data
_Response = h11.Response
_EndOfMessage = h11.EndOfMessage
_InformationalResponse = h11.InformationalResponse
_END_OF_MESSAGE = h11.EndOfMessage()
_POLLIN = select.POLLIN
_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable
_current_time = trio.current_time


class _ReusedConnectionDied(Exception):
    """Internal: a reused connection failed before any response byte arrived, and the worker cannot have run the
    request (the keep-alive race): resend it once on a fresh connection."""


def _tcp_bytes_acked(sock: socket.socket | None) -> int | None:
    """Bytes of ours the peer's TCP acknowledged (the SYN counts as one), or None where TCP_INFO can't tell."""
    if sock is None or _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < _TCPI_BYTES_ACKED_OFFSET + 8:
        return None
    return int.from_bytes(info[_TCPI_BYTES_ACKED_OFFSET:_TCPI_BYTES_ACKED_OFFSET + 8], sys.byteorder)


class _Origin:
    """Per-origin state: where to connect, what to put in `host`, and the idle connections (oldest left)."""

    __slots__ = ("url", "host", "port", "host_header", "idle")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise UpstreamConnectError(f"unsupported upstream origin {url!r}: only http:// is supported")
        if not parts.hostname:
            raise UpstreamConnectError(f"upstream origin {url!r} has no host")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
        self.host_header = parts.netloc.encode("ascii")
        self.idle: deque[_Connection] = deque()


class _Connection:
    __slots__ = ("sock", "fd", "h11", "origin", "receive_buffer", "idle_since", "reused", "broken",
                 "unyielded_bytes", "trickling", "sent", "acked_at_connect")

    def __init__(self, sock: socket.socket, origin: _Origin, receive_buffer: memoryview) -> None:
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE_HEAD_BYTES)
        self.origin = origin
        # Shared by every connection of the pool: safe because recv_into and h11's receive_data (which copies)
        # run back to back with no await in between.
        self.receive_buffer = receive_buffer
        self.idle_since = 0.0
        # True once the connection has completed an exchange and was taken from the idle stack again.
        self.reused = False
        # A write failed: whatever h11 thinks, the byte stream is unusable for another exchange.
        self.broken = False
        self.unyielded_bytes = 0
        self.trickling = False
        # Request bytes handed to the kernel over the connection's life, and TCP's acknowledged-bytes counter
        # right after connecting (the SYN): together they tell whether the worker's TCP stack received a request.
        self.sent = 0
        self.acked_at_connect = _tcp_bytes_acked(sock)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self.sock
        if sock is None:
            raise trio.ClosedResourceError("connection closed")
        while True:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                await _wait_writable(self.fd)
                continue
            if sent == len(data):
                return
            data = memoryview(data)[sent:]

    async def receive(self, stall: _StallDeadline | None, *, wait_first: bool = False) -> int:
        """Feed the next bytes from the socket to h11 (EOF included); returns how many (0 on EOF).

        A wait that blocks arms `stall` (the body's timeout); without one, the caller's cancel scope bounds it.
        The recv attempt is skipped when it would almost surely fail: with `wait_first` (right after sending a
        request), and after a small read (a trickle such as SSE events: the socket was empty then, and the next
        event is usually far away), which saves a failed syscall and its exception.
        """
        sock = self.sock
        if sock is None:
            raise trio.ClosedResourceError("connection closed")
        buffer = self.receive_buffer
        wait = wait_first or self.trickling
        while True:
            if wait:
                self.unyielded_bytes = 0
                if stall is None:
                    await _wait_readable(self.fd)
                else:
                    stall.before_wait()
                    stall.waiting = True
                    await _wait_readable(self.fd)
                    stall.waiting = False  # (left True by a timeout: it is the worker that stalled)
            try:
                received = sock.recv_into(buffer)
            except BlockingIOError:
                wait = True
                continue
            self.trickling = 0 < received < _TRICKLE_BYTES
            self.h11.receive_data(buffer[:received] if received else b"")
            self.unyielded_bytes += received
            if self.unyielded_bytes > _YIELD_EVERY_BYTES:
                self.unyielded_bytes = 0
                await trio.lowlevel.checkpoint()
            return received

    def close(self) -> bool:
        """Close the socket now (no await: safe in cancellation/except paths). True if it was open."""
        sock = self.sock
        if sock is None:
            return False
        self.sock = None
        trio.lowlevel.notify_closing(sock)
        sock.close()
        return True


async def _open_socket(host: str, port: int) -> socket.socket:
    """Connect a non-blocking TCP socket (TCP_NODELAY) to the first address of host:port that accepts."""
    addresses = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last_error: OSError | None = None
    for family, type_, proto, _, address in addresses:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock.connect(address)
            except BlockingIOError:
                await _wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err)) from None
            return sock
        except OSError as exc:
            last_error = exc
            trio.lowlevel.notify_closing(sock)
            sock.close()
        except BaseException:
            trio.lowlevel.notify_closing(sock)
            sock.close()
            raise
    raise last_error or OSError(errno.EADDRNOTAVAIL, f"no address for {host}:{port}")


class UpstreamResponse:
    """A response whose head has arrived; the body is read with `iter_chunks()` or `read()`.

    `headers` are as received (lower-cased names, hop-by-hop headers included).
    """

    __slots__ = ("status", "headers", "bytes_received", "_conn", "_pool", "_stall", "_finished")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        conn: _Connection,
        pool: UpstreamPool,
    ) -> None:
        self.status = status
        self.headers = headers
        self.bytes_received = 0
        self._conn: _Connection | None = conn
        self._pool = pool
        self._stall: _StallDeadline | None = None  # set by _RequestContext once the head has arrived
        self._finished = False

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body data as it arrives (one item per h11 Data event); never buffers the whole body."""
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        data = await self._next_data()
        if data is None:
            raise StopAsyncIteration
        return bytes(data)

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body. Raises ValueError("body over limit") (and closes the connection) past `limit` bytes."""
        parts: list[bytearray] = []
        total = 0
        while True:
            data = await self._next_data()
            if data is None:
                return b"".join(parts)
            total += len(data)
            if limit is not None and total > limit:
                await self.aclose()
                raise ValueError("body over limit")
            parts.append(data)

    async def aclose(self) -> None:
        """Close the connection unless the body was read to the end (then it is already back in the pool)."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._pool._discard(conn)

    async def _next_data(self) -> bytearray | None:
        conn = self._conn
        if conn is None:
            if self._finished:
                return None
            raise UpstreamDisconnect(
                "response was closed before its body was read to the end", bytes_received=self.bytes_received
            )
        h = conn.h11
        try:
            while True:
                event = h.next_event()
                if event is _NEED_DATA:
                    await conn.receive(self._stall)
                    continue
                event_type = type(event)
                if event_type is _Data:
                    self.bytes_received += len(event.data)  # type: ignore[union-attr]
                    if self._stall is not None:
                        self._stall.data_handed_out()
                    return event.data  # type: ignore[union-attr, return-value]
                if event_type is _EndOfMessage:
                    break
                raise h11.RemoteProtocolError(f"unexpected {event_type.__name__} in response body")
        except (h11.RemoteProtocolError, OSError) as exc:
            self._abandon(conn)
            raise UpstreamDisconnect(
                f"{conn.origin.url} broke the connection mid-body: {exc}", bytes_received=self.bytes_received
            ) from exc
        except BaseException:
            self._abandon(conn)
            raise
        self._conn = None
        self._finished = True
        self._pool._release(conn)
        return None

    def _abandon(self, conn: _Connection) -> None:
        self._conn = None
        self._pool._discard(conn)


_NOT_ARMED = -math.inf
_STALL_SLACK = 1.1


class _StallDeadline:
    """The body timeout of one response: a cancel scope around the whole body (`_RequestContext`).

    It is armed at the first body wait that blocks (a body that arrived with its head never touches it), and from
    then on kept at least `timeout_s` ahead of the last body data handed to the caller (`_next_data`). Moving a trio
    deadline costs a context manager and a re-registration, ~6% of a relayed SSE chunk when done around every
    wait, so it moves only when less than `timeout_s` is left, and then to `_STALL_SLACK` x `timeout_s` ahead:
    a busy body moves it about once per `timeout_s / 10`, and a stall times out after 1 to 1.1 x `timeout_s`.
    The clock also runs while the caller relays to its client, so a client that takes nothing for that long
    ends the exchange as well; `waiting` says which side it was.
    """

    __slots__ = ("scope", "timeout_s", "deadline", "waiting")

    def __init__(self, timeout_s: float) -> None:
        self.scope = trio.CancelScope()
        self.timeout_s = timeout_s
        self.deadline = _NOT_ARMED
        self.waiting = False

    def before_wait(self) -> None:
        """A body wait is about to block: the first one arms the deadline."""
        if self.deadline == _NOT_ARMED:
            self._move_ahead(_current_time())

    def data_handed_out(self) -> None:
        """Body data reached the caller: once armed, keep at least `timeout_s` ahead."""
        if self.deadline != _NOT_ARMED:
            now = _current_time()
            if self.deadline - now < self.timeout_s:
                self._move_ahead(now)

    def _move_ahead(self, now: float) -> None:
        self.deadline = now + self.timeout_s * _STALL_SLACK
        self.scope.deadline = self.deadline


class _RequestContext:
    """What `UpstreamPool.request()` returns: sends on enter, closes/releases the connection on exit."""

    __slots__ = ("_pool", "_origin", "_request", "_body", "_timeout_s", "_body_timeout_s", "_response", "_stall",
                 "_on_sent")

    def __init__(
        self,
        pool: UpstreamPool,
        origin: _Origin,
        request: h11.Request,
        body: bytes | bytearray | memoryview,
        timeout_s: float,
        body_timeout_s: float | None,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        self._on_sent = on_sent
        self._pool = pool
        self._origin = origin
        self._request = request
        self._body = body
        self._timeout_s = timeout_s
        self._body_timeout_s = body_timeout_s
        self._response: UpstreamResponse | None = None
        self._stall: _StallDeadline | None = None

    async def __aenter__(self) -> UpstreamResponse:
        pool = self._pool
        if pool._closed:
            raise RuntimeError("UpstreamPool is closed")
        origin = self._origin
        now = _current_time()
        deadline = now + self._timeout_s
        conn = pool._checkout(origin, now)
        if conn is None:
            conn = await pool._connect(origin, deadline)
        try:
            response = await self._exchange(conn, deadline)
        except _ReusedConnectionDied:
            pool.keepalive_retries += 1
            conn = await pool._connect(origin, deadline)
            response = await self._exchange(conn, deadline)
        self._response = response
        if self._body_timeout_s is not None:
            # Entered last and left first in __aexit__: the caller's own scopes nest inside it.
            stall = self._stall = response._stall = _StallDeadline(self._body_timeout_s)
            stall.scope.__enter__()
        return response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stall = self._stall
        timed_out = False
        if stall is not None:
            self._stall = None
            timed_out = stall.scope.__exit__(exc_type, exc, tb) and stall.scope.cancelled_caught
        response = self._response
        if response is not None:
            self._response = None
            await response.aclose()
        if timed_out:
            if stall.waiting:
                raise UpstreamTimeout(f"{self._origin.url} sent no body data for {self._body_timeout_s} s")
            raise UpstreamTimeout(f"the client accepted nothing of {self._origin.url}'s response for "
                                  f"{self._body_timeout_s} s")

    async def _exchange(self, conn: _Connection, deadline: float) -> UpstreamResponse:
        """Send the request on `conn` and read the response head; `conn` is closed on any failure."""
        pool = self._pool
        h = conn.h11
        head_bytes_received = 0
        send_failed = False
        try:
            with trio.CancelScope(deadline=deadline) as scope:
                body = self._body
                head = h.send(self._request)
                if body:
                    # Keeps h11's Content-Length accounting; we write `body` ourselves below (no copy).
                    h.send_with_data_passthrough(_Data(data=body))
                h.send(_END_OF_MESSAGE)
                try:
                    if len(body) <= _COALESCE_BODY_LIMIT:
                        await conn.send_all(head + body if body else head)
                    else:
                        await conn.send_all(head)
                        await conn.send_all(body)
                    conn.sent += len(head) + len(body)
                    if self._on_sent is not None:
                        self._on_sent()
                except OSError:
                    # The worker may have answered (e.g. 413) and closed; read whatever response it left.
                    conn.broken = send_failed = True
                # Nothing can be buffered yet (responses are only read here), so wait before parsing.
                head_bytes_received = await conn.receive(None, wait_first=True)
                while True:
                    event = h.next_event()
                    if event is _NEED_DATA:
                        head_bytes_received += await conn.receive(None)
                        continue
                    event_type = type(event)
                    if event_type is _Response:
                        break
                    if event_type is not _InformationalResponse:
                        raise h11.RemoteProtocolError(f"unexpected {event_type.__name__} before the response")
            if scope.cancelled_caught:
                # The scope swallowed the Cancelled; raising here (inside the try) still closes conn below.
                raise UpstreamTimeout(f"{conn.origin.url} did not answer within {self._timeout_s} s")
        except (h11.RemoteProtocolError, OSError) as exc:
            if head_bytes_received:
                pool._discard(conn)
                raise UpstreamDisconnect(
                    f"{conn.origin.url} closed the connection without a complete response: {exc}"
                ) from exc
            # EOF before any response byte shows up as h11's error; a reset as the OSError from recv.
            resend = conn.reused and self._never_applied(conn, send_failed,
                                                         orderly_close=not isinstance(exc, OSError))
            pool._discard(conn)
            if resend:
                raise _ReusedConnectionDied from exc
            if conn.reused:
                pool.not_resent += 1
            raise UpstreamDisconnect(
                f"{conn.origin.url} closed the connection without responding ({exc}); the request was not resent, "
                f"since the worker may have received and run it"
            ) from exc
        except BaseException:
            pool._discard(conn)
            raise
        return UpstreamResponse(
            event.status_code,  # type: ignore[union-attr]
            list(event.headers),  # type: ignore[union-attr]
            conn,
            pool,
        )

    def _never_applied(self, conn: _Connection, send_failed: bool, *, orderly_close: bool) -> bool:
        """After a reused connection died before any response byte: may the request be resent? (See the module
        docstring: safe method, failed write, or an orderly close before the worker's TCP had all of it.)"""
        if self._request.method in _SAFE_METHODS or send_failed:
            return True
        if not orderly_close:
            return False
        acked, base = _tcp_bytes_acked(conn.sock), conn.acked_at_connect
        return acked is not None and base is not None and acked - base < conn.sent


class UpstreamPool:
    """Per-origin keep-alive HTTP/1.1 connection pool (http:// only).

    Create and use it inside one trio run (its sockets are registered with that run's I/O manager) and `aclose()` it
    (or `async with` it) before the run ends. No limit on concurrent connections: a request that finds no idle
    connection opens one, so the caller's own concurrency limit is the connection limit.
    """

    def __init__(
        self,
        *,
        keepalive_expiry_s: float = 4.0,
        connect_timeout_s: float = 3.0,
        max_idle_per_origin: int = 512,
    ) -> None:
        self._keepalive_expiry_s = keepalive_expiry_s
        self._connect_timeout_s = connect_timeout_s
        self._max_idle_per_origin = max_idle_per_origin
        self._origins: dict[str, _Origin] = {}
        self._receive_buffer = memoryview(bytearray(_RECEIVE_SIZE))
        # Registering/unregistering an fd on a poll object is bookkeeping only; poll(0) is the one syscall.
        self._poller = select.poll()
        self._next_sweep = 0.0
        self._closed = False
        self.opened = 0
        self.reused = 0
        self.closed = 0
        self.keepalive_retries = 0
        # reused connections that died before any response byte, with the request not resent (it may have run)
        self.not_resent = 0
        self.stale_discarded = 0
        self.expired = 0

    def request(
        self,
        origin: str,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        timeout_s: float,
        body_timeout_s: float | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> _RequestContext:
        """`async with pool.request(...) as resp:` one exchange with `origin` ("http://host:port").

        `target` (path + "?" + query) is sent verbatim. `host` and `content-length` are set here; `headers` are the
        end-to-end headers with lower-case names (any host/content-length/transfer-encoding in them is dropped).
        `timeout_s` bounds connect + send + response head; `body_timeout_s` (default timeout_s) bounds the time
        between body chunks, within 10% (see `_StallDeadline`): a stall cancels the `async with` body and raises
        UpstreamTimeout as it exits (like `trio.fail_after`). `on_sent` is called once the whole request is written to
        the socket (again if a dead kept-alive connection makes it resend). Invalid method/target/headers raise
        ValueError before anything is sent.
        """
        origin_state = self._origins.get(origin)
        if origin_state is None:
            origin_state = self._add_origin(origin)
        request_headers = [(b"host", origin_state.host_header), (b"content-length", b"%d" % len(body))]
        for header in headers:
            if header[0] not in _POOL_OWNED_HEADERS:
                request_headers.append(header)
        try:
            request = h11.Request(
                method=method.encode("ascii"),
                target=target.encode("latin-1") if isinstance(target, str) else target,
                headers=request_headers,
            )
        except (h11.LocalProtocolError, UnicodeEncodeError) as exc:
            raise ValueError(f"invalid upstream request: {exc}") from exc
        if body_timeout_s is None:
            body_timeout_s = timeout_s
        return _RequestContext(
            self, origin_state, request, body, timeout_s, None if body_timeout_s == math.inf else body_timeout_s,
            on_sent,
        )

    async def __aenter__(self) -> UpstreamPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every idle connection. In-flight exchanges finish, but their connections are not pooled."""
        self._closed = True
        for origin in self._origins.values():
            idle = origin.idle
            while idle:
                self._discard(idle.pop())

    def stats(self) -> dict:
        """Idle connections per origin (and in total), connections in use, and lifetime counters."""
        idle = {url: len(origin.idle) for url, origin in self._origins.items() if origin.idle}
        total_idle = sum(idle.values())
        return {
            "idle": idle,
            "idle_total": total_idle,
            "in_use": self.opened - self.closed - total_idle,
            "opened": self.opened,
            "reused": self.reused,
            "closed": self.closed,
            "keepalive_retries": self.keepalive_retries,
            "not_resent": self.not_resent,
            "stale_discarded": self.stale_discarded,
            "expired": self.expired,
        }

    def _add_origin(self, url: str) -> _Origin:
        origin = self._origins.get(url)
        if origin is None:
            origin = self._origins[url] = _Origin(url)
        return origin

    def _checkout(self, origin: _Origin, now: float) -> _Connection | None:
        idle = origin.idle
        poller = self._poller
        while idle:
            conn = idle.pop()
            if now - conn.idle_since >= self._keepalive_expiry_s:
                # The stack is ordered by check-in time, so everything below is older still.
                self.expired += 1 + len(idle)
                self._discard(conn)
                while idle:
                    self._discard(idle.pop())
                return None
            poller.register(conn.fd, _POLLIN)
            readable = poller.poll(0)
            poller.unregister(conn.fd)
            if readable:
                # EOF (peer closed) or unsolicited bytes: either way the next response would not be ours.
                self.stale_discarded += 1
                self._discard(conn)
                continue
            conn.reused = True
            self.reused += 1
            return conn
        return None

    async def _connect(self, origin: _Origin, deadline: float) -> _Connection:
        connect_deadline = min(deadline, _current_time() + self._connect_timeout_s)
        with trio.CancelScope(deadline=connect_deadline) as scope:
            try:
                sock = await _open_socket(origin.host, origin.port)
            except OSError as exc:
                if exc.errno in _LOCAL_ERRNOS:
                    raise UpstreamLocalError(f"router out of resources connecting to {origin.url}: {exc}") from exc
                raise UpstreamConnectError(f"cannot connect to {origin.url}: {exc}") from exc
        if scope.cancelled_caught:
            raise UpstreamConnectError(f"connecting to {origin.url} timed out")
        self.opened += 1
        return _Connection(sock, origin, self._receive_buffer)

    def _release(self, conn: _Connection) -> None:
        """End of a response body: pool the connection if the exchange completed cleanly, else close it."""
        h = conn.h11
        if (
            self._closed
            or conn.broken
            or h.our_state is not _DONE
            or h.their_state is not _DONE
            or h.trailing_data[0]
        ):
            self._discard(conn)
            return
        h.start_next_cycle()
        now = _current_time()
        conn.idle_since = now
        conn.unyielded_bytes = 0
        idle = conn.origin.idle
        idle.append(conn)
        if len(idle) > self._max_idle_per_origin:
            self._discard(idle.popleft())
        oldest_allowed = now - self._keepalive_expiry_s
        while idle and idle[0].idle_since <= oldest_allowed:
            self.expired += 1
            self._discard(idle.popleft())
        if now >= self._next_sweep:
            self._sweep(now)

    def sweep_idle(self) -> None:
        """Drop expired idle connections now (called periodically, so a burst's sockets don't linger)."""
        self._sweep(_current_time())

    def drop_origin(self, url: str) -> None:
        """Close every idle connection to `url` (a removed worker); in-use ones close when done."""
        for key, origin in list(self._origins.items()):
            if origin.url == url:
                while origin.idle:
                    self._discard(origin.idle.pop())

    def _sweep(self, now: float) -> None:
        """Drop expired idle connections of every origin (bounded: at most once per expiry period)."""
        self._next_sweep = now + self._keepalive_expiry_s
        oldest_allowed = now - self._keepalive_expiry_s
        for origin in self._origins.values():
            idle = origin.idle
            while idle and idle[0].idle_since <= oldest_allowed:
                self.expired += 1
                self._discard(idle.popleft())

    def _discard(self, conn: _Connection) -> None:
        if conn.close():
            self.closed += 1
