"""UpstreamPool against real loopback servers: scripted raw trio + h11 servers, plus hypercorn."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from functools import partial

import h11
import pytest
import trio

from router.http.serve import serve_asgi
from router.net.upstream import (
    UpstreamConnectError,
    UpstreamDisconnect,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
)

# ---------------------------------------------------------------- scripted loopback server


class Exchange:
    """One request as the test server saw it, plus ways to answer (or misbehave)."""

    def __init__(self, server: Server, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request,
                 body: bytes, index_on_connection: int) -> None:
        self.server = server
        self.stream = stream
        self.conn = conn
        self.request = request
        self.body = body
        self.index_on_connection = index_on_connection

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.request.headers)

    async def respond(self, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None,
                      body: bytes = b"") -> None:
        if headers is None:
            headers = [(b"content-length", b"%d" % len(body))]
        data = self.conn.send(h11.Response(status_code=status, headers=headers))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    def abort(self) -> None:
        """Close with RST instead of FIN."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.stream.socket.close()

    async def wait_client_close(self) -> None:
        """Block until the client closes the connection (EOF or reset) and record it."""
        try:
            while await self.stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.server.client_closes += 1


Handler = Callable[[Exchange], Awaitable[bool | None]]


class Server:
    """trio.serve_tcp + h11. `handler(exchange)` answers one request; returning False ends the connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.requests = 0
        self.client_closes = 0  # the client closed while the server was waiting for a request / in wait_client_close
        self.connections_done = 0
        self.url = ""

    async def start(self, nursery: trio.Nursery) -> Server:
        listeners = await nursery.start(partial(trio.serve_tcp, self._serve_connection, 0, host="127.0.0.1"))
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        return self

    async def _read_request(self, stream: trio.SocketStream, conn: h11.Connection):
        request, body = None, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                self.client_closes += 1
                return None, b""

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        index = 0
        try:
            while True:
                try:
                    request, body = await self._read_request(stream, conn)
                except h11.RemoteProtocolError:
                    self.client_closes += 1
                    return
                if request is None:
                    return
                self.requests += 1
                keep = await self.handler(Exchange(self, stream, conn, request, body, index))
                index += 1
                if keep is False or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.connections_done += 1
            if stream.socket.fileno() != -1:
                await stream.aclose()


async def ok_handler(ex: Exchange) -> None:
    await ex.respond(body=b"ok:" + ex.request.target)


@pytest.fixture
async def pool():
    pool = UpstreamPool()
    yield pool
    await pool.aclose()


@pytest.fixture
def start(nursery):
    async def start_server(handler: Handler = ok_handler) -> Server:
        return await Server(handler).start(nursery)

    return start_server


async def get(pool: UpstreamPool, url: str, target: str = "/", *, method: str = "GET", body: bytes = b"",
              headers: list[tuple[bytes, bytes]] | None = None, timeout_s: float = 5.0):
    async with pool.request(url, method, target, headers or [], body, timeout_s=timeout_s) as resp:
        return resp.status, resp.headers, await resp.read()


@contextlib.contextmanager
def listener_that_never_accepts() -> Iterator[int]:
    """A listener whose accept queue is full: the kernel drops further SYNs, so connect() hangs. Yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = [socket.socket() for _ in range(4)]
    try:
        for filler in fillers:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(listener.getsockname())
        yield listener.getsockname()[1]
    finally:
        for s in [*fillers, listener]:
            s.close()


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.005)


# ---------------------------------------------------------------- keep-alive, expiry, stale sockets, retries


async def test_keepalive_reuses_one_connection_and_sends_request_verbatim(start, pool):
    seen = []

    async def handler(ex: Exchange) -> None:
        seen.append((ex.request.method, ex.request.target, list(ex.request.headers), ex.body))
        await ex.respond(body=b"n=%d" % len(seen))

    server = await start(handler)
    for i in range(10):
        status, _, body = await get(pool, server.url, "/generate?x=1&y=%20z", method="POST", body=b'{"a":%d}' % i,
                                    headers=[(b"content-type", b"application/json"), (b"host", b"client.example"),
                                             (b"content-length", b"999")])
        assert (status, body) == (200, b"n=%d" % (i + 1))
    assert server.accepted == 1
    stats = pool.stats()
    assert (stats["opened"], stats["reused"], stats["closed"], stats["in_use"]) == (1, 9, 0, 0)
    assert stats["idle"] == {server.url: 1}
    method, target, headers, body = seen[3]
    assert (method, target, body) == (b"POST", b"/generate?x=1&y=%20z", b'{"a":3}')
    # host and content-length come from the pool; the caller's copies are dropped.
    assert headers == [(b"host", server.url.removeprefix("http://").encode()), (b"content-length", b"7"),
                       (b"content-type", b"application/json")]


async def test_response_headers_are_as_received(start, pool):
    async def handler(ex: Exchange) -> None:
        await ex.respond(headers=[(b"Content-Length", b"2"), (b"X-Worker", b"w1"), (b"Connection", b"keep-alive")],
                         body=b"hi")

    server = await start(handler)
    status, headers, body = await get(pool, server.url)
    assert (status, body) == (200, b"hi")
    assert headers == [(b"content-length", b"2"), (b"x-worker", b"w1"), (b"connection", b"keep-alive")]


async def test_idle_connection_expires(start):
    server = await start()
    async with UpstreamPool(keepalive_expiry_s=0.2) as pool:
        await get(pool, server.url)
        await trio.sleep(0.3)
        await get(pool, server.url)
        assert server.accepted == 2
        assert pool.stats()["expired"] == 1
        await eventually(lambda: server.client_closes == 1)  # the expired socket was really closed


async def test_expired_connections_are_swept_without_traffic_to_their_origin(start):
    a, b = await start(), await start()
    async with UpstreamPool(keepalive_expiry_s=0.2) as pool:
        await get(pool, a.url)
        await trio.sleep(0.3)
        await get(pool, b.url)  # check-in on another origin triggers the periodic sweep
        assert pool.stats()["idle"] == {b.url: 1}
        await eventually(lambda: a.client_closes == 1)


async def test_peer_closed_idle_socket_is_detected_and_skipped(start, pool):
    async def close_after_response(ex: Exchange) -> bool:
        await ex.respond(body=b"x")
        return False  # close without announcing `connection: close`

    server = await start(close_after_response)
    await get(pool, server.url)
    await trio.sleep(0.05)  # the FIN reaches the idle socket
    assert await get(pool, server.url) == (200, [(b"content-length", b"1")], b"x")
    stats = pool.stats()
    assert (stats["stale_discarded"], stats["keepalive_retries"], server.accepted, server.requests) == (1, 0, 2, 2)


def blind_idle_check(pool: UpstreamPool) -> None:
    """Make the pool's readability check before reuse see nothing: the worker's FIN now arrives "after the check",
    which is the keep-alive race the check cannot catch."""
    pool._poller = type("BlindPoll", (), {"register": lambda *a: None, "unregister": lambda *a: None,
                                          "poll": lambda *a: []})()


def drop_second_request(how: str):
    """A handler that answers "fine", except the second request on a connection: it closes (FIN) or resets."""
    async def handler(ex: Exchange) -> bool | None:
        if ex.index_on_connection == 1:
            if how == "rst":
                ex.abort()
            return False
        await ex.respond(body=b"fine")
        return None

    return handler


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_safe_request_is_resent_once_after_the_keepalive_race(start, pool, how):
    # The worker drops a kept-alive connection just as our next request arrives on it. A GET may be resent
    # whatever the worker did with it.
    server = await start(drop_second_request(how))
    assert (await get(pool, server.url))[2] == b"fine"
    assert (await get(pool, server.url, target="/get_model_info"))[2] == b"fine"
    stats = pool.stats()
    assert (stats["keepalive_retries"], stats["not_resent"], server.accepted, server.requests) == (1, 0, 2, 3)
    assert stats["in_use"] == 0


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_delivered_post_is_not_resent(start, pool, how):
    """A live worker reads a whole POST on a reused connection, then closes it without replying (FIN) or resets
    it: it may have run the request, so the pool must not resend it (RELIABILITY.md, keep-alive race)."""
    server = await start(drop_second_request(how))
    assert (await get(pool, server.url, "/generate", method="POST", body=b'{"text":"a"}'))[2] == b"fine"
    with pytest.raises(UpstreamDisconnect) as info:
        await get(pool, server.url, "/generate", method="POST", body=b'{"text":"b"}')
    assert "not resent" in str(info.value) and info.value.bytes_received == 0
    stats = pool.stats()
    assert (server.accepted, server.requests) == (1, 2)  # the second POST reached the worker exactly once
    assert (stats["keepalive_retries"], stats["not_resent"], stats["in_use"]) == (0, 1, 0)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_request_on_a_connection_the_worker_closed_before_it_arrived_is_resent(start, pool, method):
    """The race itself, for a non-idempotent request: the worker closed the idle connection (FIN) before our
    request reached it, and our idle check missed it. Its TCP never acknowledged the request: resend it."""
    async def close_after_response(ex: Exchange) -> bool:
        await ex.respond(body=b"n=%d" % server.requests)
        return False

    server = await start(close_after_response)
    blind_idle_check(pool)
    assert (await get(pool, server.url, "/generate", method=method, body=b"one"))[2] == b"n=1"
    await eventually(lambda: server.connections_done == 1)  # the worker has closed it; the pool still holds it
    assert pool.stats()["idle"] == {server.url: 1}
    assert (await get(pool, server.url, "/generate", method=method, body=b"two"))[2] == b"n=2"
    stats = pool.stats()
    assert (stats["keepalive_retries"], stats["not_resent"], stats["stale_discarded"]) == (1, 0, 0)
    assert (server.accepted, server.requests) == (2, 2)  # the first connection never saw the second request


async def test_post_whose_write_failed_is_resent(nursery, pool):
    """The worker resets a reused connection after reading only the head of a large POST: part of the body
    never left this host, so the worker cannot have the request and it is resent on a fresh connection."""
    body = os.urandom(32 << 20)
    complete: list[int] = []  # connection index of each request read in full

    async def serve(stream: trio.SocketStream) -> None:
        index = len(connections)
        connections.append(stream)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        number = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(1 << 16))
                continue
            if isinstance(event, h11.Request) and index == 0 and number == 1:
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                stream.socket.close()  # RST with most of the body unread
                return
            if isinstance(event, h11.EndOfMessage):
                complete.append(index)
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"2")]))
                                      + conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
                number += 1

    connections: list[trio.SocketStream] = []
    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    assert (await get(pool, url, "/generate", method="POST", body=b"small"))[2] == b"ok"
    assert (await get(pool, url, "/generate", method="POST", body=body, timeout_s=30))[2] == b"ok"
    assert complete == [0, 1]  # the big POST was read in full once, on the fresh connection
    assert (pool.stats()["keepalive_retries"], pool.stats()["not_resent"]) == (1, 0)


async def test_server_closing_right_after_response_never_fails_the_next_request(start, pool):
    async def handler(ex: Exchange) -> bool:
        await ex.respond(body=b"x")
        return False

    server = await start(handler)
    for _ in range(20):  # next request goes out immediately: either the idle check or the retry catches it
        assert (await get(pool, server.url))[2] == b"x"
    stats = pool.stats()
    assert server.accepted == 20
    assert stats["stale_discarded"] + stats["keepalive_retries"] == 19


async def test_fresh_connection_closed_without_response_is_not_retried(start, pool):
    async def drop(ex: Exchange) -> bool:
        return False

    server = await start(drop)
    with pytest.raises(UpstreamDisconnect) as info:
        await get(pool, server.url, method="POST", body=b"x")
    assert info.value.bytes_received == 0
    assert server.requests == 1


async def test_retry_happens_at_most_once(start, pool):
    async def handler(ex: Exchange) -> bool | None:
        if server.requests == 1:
            await ex.respond(body=b"first")
            return None
        return False  # every later request: closed without a response

    server = await start(handler)
    await get(pool, server.url)
    with pytest.raises(UpstreamDisconnect):
        await get(pool, server.url, method="HEAD")
    assert (server.requests, pool.stats()["keepalive_retries"]) == (3, 1)


async def test_no_retry_once_a_response_byte_arrived(start, pool):
    async def handler(ex: Exchange) -> bool | None:
        if ex.index_on_connection == 1:
            await ex.send_raw(b"HTTP/1.1 200 OK\r\ncontent-")
            return False
        await ex.respond(body=b"first")
        return None

    server = await start(handler)
    await get(pool, server.url)
    with pytest.raises(UpstreamDisconnect):
        await get(pool, server.url)
    assert (server.requests, pool.stats()["keepalive_retries"]) == (2, 0)


# ---------------------------------------------------------------- framing


async def test_chunked_response_is_decoded_and_connection_reused(start, pool):
    async def handler(ex: Exchange) -> None:
        await ex.send_raw(ex.conn.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")])))
        for part in (b"ab", b"", b"cde", b"f" * 70000):
            if part:
                await ex.send_raw(ex.conn.send(h11.Data(data=part)))
        await ex.send_raw(ex.conn.send(h11.EndOfMessage()))

    server = await start(handler)
    for _ in range(2):
        assert (await get(pool, server.url))[2] == b"abcde" + b"f" * 70000
    assert server.accepted == 1


async def test_close_delimited_response_is_read_to_eof_and_not_pooled(start, pool):
    async def handler(ex: Exchange) -> bool:
        await ex.send_raw(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart one,")
        await trio.sleep(0.01)
        await ex.send_raw(b" part two")
        return False

    server = await start(handler)
    assert (await get(pool, server.url))[2] == b"part one, part two"
    assert (await get(pool, server.url))[2] == b"part one, part two"
    assert server.accepted == 2
    assert pool.stats()["idle"] == {}


async def test_http10_response_is_not_pooled(start, pool):
    async def handler(ex: Exchange) -> bool:
        await ex.send_raw(b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nold")
        await ex.wait_client_close()
        return False

    server = await start(handler)
    assert await get(pool, server.url) == (200, [(b"content-length", b"3")], b"old")
    await eventually(lambda: server.client_closes == 1)
    assert pool.stats()["idle"] == {}


async def test_request_with_connection_close_is_not_pooled(start, pool):
    server = await start()
    await get(pool, server.url, headers=[(b"connection", b"close")])
    assert pool.stats()["idle"] == {}
    await get(pool, server.url)
    assert server.accepted == 2


@pytest.mark.parametrize("method,status", [("HEAD", 200), ("GET", 204), ("GET", 304)])
async def test_bodiless_responses(start, pool, method, status):
    async def handler(ex: Exchange) -> None:
        headers = [(b"content-length", b"12")] if status != 204 else []
        await ex.send_raw(ex.conn.send(h11.Response(status_code=status, headers=headers)))
        await ex.send_raw(ex.conn.send(h11.EndOfMessage()))

    server = await start(handler)
    for _ in range(3):
        got_status, _, body = await get(pool, server.url, method=method)
        assert (got_status, body) == (status, b"")
    assert server.accepted == 1


async def test_informational_responses_are_skipped(start, pool):
    async def handler(ex: Exchange) -> None:
        await ex.send_raw(ex.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        await ex.send_raw(ex.conn.send(h11.InformationalResponse(status_code=103, headers=[(b"link", b"</a>")])))
        await ex.respond(status=201, body=b"created")

    server = await start(handler)
    assert await get(pool, server.url) == (201, [(b"content-length", b"7")], b"created")
    assert (await get(pool, server.url))[0] == 201
    assert server.accepted == 1


async def test_large_response_head_is_accepted(start, pool):
    big = b"v" * 100_000  # h11's default limit is 16 KiB

    async def handler(ex: Exchange) -> None:
        await ex.respond(headers=[(b"content-length", b"2"), (b"x-big", big)], body=b"ok")

    server = await start(handler)
    status, headers, body = await get(pool, server.url)
    assert (status, body, dict(headers)[b"x-big"]) == (200, b"ok", big)


async def test_garbage_response_is_a_disconnect(start, pool):
    async def handler(ex: Exchange) -> bool:
        await ex.send_raw(b"SSH-2.0-OpenSSH\r\n\r\n")
        return False

    server = await start(handler)
    with pytest.raises(UpstreamDisconnect):
        await get(pool, server.url)
    assert pool.stats()["in_use"] == 0


# ---------------------------------------------------------------- streaming and big bodies


async def test_chunks_are_yielded_as_they_arrive(start, pool):
    first_chunk_seen = trio.Event()

    async def handler(ex: Exchange) -> None:
        await ex.send_raw(ex.conn.send(h11.Response(status_code=200, headers=[(b"content-type", b"text/event-stream"),
                                                                              (b"transfer-encoding", b"chunked")])))
        await ex.send_raw(ex.conn.send(h11.Data(data=b"data: 0\n\n")))
        await first_chunk_seen.wait()  # the rest is only sent once the client got the first event
        for i in range(1, 4):
            await ex.send_raw(ex.conn.send(h11.Data(data=b"data: %d\n\n" % i)))
        await ex.send_raw(ex.conn.send(h11.EndOfMessage()))

    server = await start(handler)
    chunks = []
    with trio.fail_after(5):
        async with pool.request(server.url, "POST", "/generate", [], b"{}", timeout_s=5) as resp:
            async for chunk in resp.iter_chunks():
                assert type(chunk) is bytes
                chunks.append(chunk)
                first_chunk_seen.set()
    assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\n"
    assert chunks[0] == b"data: 0\n\n"
    assert pool.stats()["idle"] == {server.url: 1}


@pytest.mark.parametrize("response_framing", ["content-length", "chunked"])
async def test_20mb_body_round_trip_is_byte_exact(start, pool, response_framing):
    payload = random.Random(7).randbytes(20 * 1024 * 1024)

    async def echo(ex: Exchange) -> None:
        if response_framing == "content-length":
            await ex.respond(body=ex.body)
            return
        await ex.send_raw(ex.conn.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")])))
        view = memoryview(ex.body)
        for start_at in range(0, len(view), 1 << 20):
            await ex.send_raw(ex.conn.send(h11.Data(data=bytes(view[start_at:start_at + (1 << 20)]))))
        await ex.send_raw(ex.conn.send(h11.EndOfMessage()))

    server = await start(echo)
    digest = hashlib.sha256()
    received = 0
    async with pool.request(server.url, "POST", "/echo", [], payload, timeout_s=30) as resp:
        async for chunk in resp.iter_chunks():
            assert len(chunk) <= 256 * 1024  # streamed, never buffered whole
            digest.update(chunk)
            received += len(chunk)
    assert (received, digest.digest()) == (len(payload), hashlib.sha256(payload).digest())
    # And once more through read(), on the same connection.
    assert (await get(pool, server.url, method="POST", body=payload, timeout_s=30))[2] == payload
    assert server.accepted == 1


async def test_read_limit(start, pool):
    async def handler(ex: Exchange) -> None:
        await ex.respond(body=b"x" * 1000)

    server = await start(handler)
    async with pool.request(server.url, "GET", "/", [], b"", timeout_s=5) as resp:
        assert await resp.read(limit=1000) == b"x" * 1000
    async with pool.request(server.url, "GET", "/", [], b"", timeout_s=5) as resp:
        with pytest.raises(ValueError, match="body over limit"):
            await resp.read(limit=999)
    stats = pool.stats()
    assert (stats["closed"], stats["in_use"], stats["idle"]) == (1, 0, {})


# ---------------------------------------------------------------- timeouts and failures


async def test_no_answer_is_a_timeout_and_closes_the_connection(start, pool):
    async def silent(ex: Exchange) -> bool:
        await ex.wait_client_close()
        return False

    server = await start(silent)
    started = trio.current_time()
    with pytest.raises(UpstreamTimeout):
        await get(pool, server.url, timeout_s=0.2)
    assert 0.2 <= trio.current_time() - started < 1.0
    await eventually(lambda: server.client_closes == 1)
    assert pool.stats()["in_use"] == 0


async def test_body_stall_is_a_timeout(start, pool):
    async def stall(ex: Exchange) -> bool:
        await ex.send_raw(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        await ex.wait_client_close()
        return False

    server = await start(stall)
    with trio.fail_after(5), pytest.raises(UpstreamTimeout, match="no body data for 0.2 s"):
        # Like trio.fail_after, the stall cancels the body and surfaces as UpstreamTimeout where it ends.
        async with pool.request(server.url, "GET", "/", [], b"", timeout_s=5, body_timeout_s=0.2) as resp:
            chunks = resp.iter_chunks()
            assert await chunks.__anext__() == b"0123456789"
            started = trio.current_time()
            await chunks.__anext__()
    assert 0.2 <= trio.current_time() - started < 1.0
    await eventually(lambda: server.client_closes == 1)
    assert pool.stats()["in_use"] == 0


async def _trickle(ex: Exchange) -> bool:
    await ex.send_raw(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    for i in range(6):
        await ex.send_raw(b"1\r\n%d\r\n" % i)
        await trio.sleep(0.02)
    await ex.send_raw(b"0\r\n\r\n")
    return True


async def test_slow_consumer_is_not_a_stall(start, pool):
    """The body timeout bounds the gap between chunks received, not the body's whole time: a caller that takes
    each chunk within it (e.g. writing to a slow client) may take far longer than the timeout in all."""
    server = await start(_trickle)
    got = b""
    started = trio.current_time()
    async with pool.request(server.url, "GET", "/", [], b"", timeout_s=5, body_timeout_s=0.2) as resp:
        async for chunk in resp.iter_chunks():
            got += chunk
            await trio.sleep(0.15)  # we are the slow one, but within the timeout each time
    assert got == b"012345"
    assert trio.current_time() - started > 0.6  # 3x the body timeout: the deadline moved with the bytes


async def test_consumer_that_takes_nothing_for_the_timeout_ends_the_exchange(start, pool):
    """The same clock runs while the caller is stuck relaying a chunk (a client that accepts nothing): the
    exchange ends, the connection is closed, and the error names the client, not the worker."""
    server = await start(_trickle)
    with trio.fail_after(5), pytest.raises(UpstreamTimeout, match="client accepted nothing"):
        async with pool.request(server.url, "GET", "/", [], b"", timeout_s=5, body_timeout_s=0.2) as resp:
            async for _ in resp.iter_chunks():
                await trio.sleep(0.5)
    stats = pool.stats()
    assert (stats["in_use"], stats["idle"]) == (0, {})  # closed, not pooled mid-body


async def test_dead_pooled_socket_then_refused_connect_is_a_connect_error(nursery, pool):
    async def serve_until_cancelled(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                listeners = await inner.start(partial(trio.serve_tcp, Server(ok_handler)._serve_connection, 0,
                                                      host="127.0.0.1"))
                task_status.started((scope, listeners[0].socket.getsockname()[1]))

    scope, port = await nursery.start(serve_until_cancelled)
    url = f"http://127.0.0.1:{port}"
    await get(pool, url)
    scope.cancel()  # the worker goes away: listener and kept-alive connection closed
    await trio.sleep(0.05)
    with pytest.raises(UpstreamConnectError):
        await get(pool, url)
    stats = pool.stats()
    assert (stats["stale_discarded"], stats["idle"], stats["in_use"]) == (1, {}, 0)


async def test_connect_refused(pool):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(UpstreamConnectError):
        await get(pool, f"http://127.0.0.1:{port}")
    assert pool.stats()["opened"] == 0


async def test_connect_timeout():
    with listener_that_never_accepts() as port:
        async with UpstreamPool(connect_timeout_s=0.2) as pool:
            started = trio.current_time()
            with pytest.raises(UpstreamConnectError, match="timed out"):
                await get(pool, f"http://127.0.0.1:{port}", timeout_s=5)
            assert 0.2 <= trio.current_time() - started < 1.0


async def test_https_origin_is_refused(pool):
    with pytest.raises(UpstreamConnectError, match="only http"):
        await get(pool, "https://127.0.0.1:1")


async def test_invalid_request_raises_value_error_before_sending(start, pool):
    server = await start()
    with pytest.raises(ValueError):
        await get(pool, server.url, headers=[(b"x-bad", b"a\r\nx-injected: 1")])
    with pytest.raises(ValueError):
        await get(pool, server.url, "/has space")
    assert server.accepted == 0


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_mid_body_disconnect(start, pool, framing):
    async def handler(ex: Exchange) -> bool:
        if framing == "content-length":
            await ex.send_raw(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"a" * 100)
        else:
            await ex.send_raw(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n64\r\n" + b"a" * 100 + b"\r\n")
        await trio.sleep(0.02)
        return False

    server = await start(handler)
    received = 0
    with pytest.raises(UpstreamDisconnect) as info:
        async with pool.request(server.url, "GET", "/", [], b"", timeout_s=5) as resp:
            async for chunk in resp.iter_chunks():
                received += len(chunk)
    assert received == info.value.bytes_received == 100
    assert isinstance(info.value, UpstreamError)
    assert pool.stats()["in_use"] == 0


# ---------------------------------------------------------------- cancellation and early exit


async def test_cancel_while_waiting_for_head_closes_connection_and_pool_stays_usable(start, pool):
    async def handler(ex: Exchange) -> bool | None:
        if ex.request.target == b"/hang":
            await ex.wait_client_close()
            return False
        await ex.respond(body=b"ok")
        return None

    server = await start(handler)
    await get(pool, server.url)  # leaves one idle connection, which the cancelled request reuses
    with trio.move_on_after(0.1) as scope:
        await get(pool, server.url, "/hang")
    assert scope.cancelled_caught
    await eventually(lambda: server.client_closes == 1)
    stats = pool.stats()
    assert (stats["idle"], stats["in_use"]) == ({}, 0)
    assert (await get(pool, server.url))[2] == b"ok"


async def test_cancel_mid_body_closes_connection(start, pool):
    async def handler(ex: Exchange) -> bool:
        await ex.send_raw(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await ex.wait_client_close()
        return False

    server = await start(handler)
    with trio.move_on_after(0.1):
        async with pool.request(server.url, "GET", "/", [], b"", timeout_s=5) as resp:
            async for _ in resp.iter_chunks():
                pass
    await eventually(lambda: server.client_closes == 1)
    assert pool.stats()["in_use"] == 0


async def test_cancel_during_connect_leaks_nothing():
    with listener_that_never_accepts() as port:
        async with UpstreamPool() as pool:
            with trio.move_on_after(0.1) as scope:
                await get(pool, f"http://127.0.0.1:{port}")
            assert scope.cancelled_caught
            assert pool.stats()["opened"] == pool.stats()["closed"] == 0


async def test_leaving_without_reading_the_body_closes_the_connection(start, pool):
    async def handler(ex: Exchange) -> bool:
        await ex.respond(body=b"unread")
        await ex.wait_client_close()
        return False

    server = await start(handler)
    async with pool.request(server.url, "GET", "/", [], b"", timeout_s=5) as resp:
        assert resp.status == 200
    await eventually(lambda: server.client_closes == 1)
    stats = pool.stats()
    assert (stats["idle"], stats["closed"], stats["in_use"]) == ({}, 1, 0)
    with pytest.raises(UpstreamDisconnect):
        await resp.read()


async def test_exception_inside_the_block_closes_the_connection(start, pool):
    server = await start()
    with pytest.raises(RuntimeError):
        async with pool.request(server.url, "GET", "/", [], b"", timeout_s=5):
            raise RuntimeError("caller failed")
    assert (pool.stats()["idle"], pool.stats()["closed"]) == ({}, 1)


async def test_pool_aclose_closes_idle_connections(start):
    server = await start()
    pool = UpstreamPool()
    await get(pool, server.url)
    await pool.aclose()
    await eventually(lambda: server.client_closes == 1)
    assert pool.stats()["idle"] == {}
    with pytest.raises(RuntimeError):
        await get(pool, server.url)


# ---------------------------------------------------------------- many origins, concurrency, hypercorn


async def test_each_origin_has_its_own_idle_connections(start, pool):
    async def tagged(tag: bytes) -> Handler:
        async def handler(ex: Exchange) -> None:
            await ex.respond(body=tag)
        return handler

    a, b = await start(await tagged(b"A")), await start(await tagged(b"B"))
    for _ in range(3):
        assert (await get(pool, a.url))[2] == b"A"
        assert (await get(pool, b.url))[2] == b"B"
    assert (a.accepted, b.accepted) == (1, 1)
    assert pool.stats()["idle"] == {a.url: 1, b.url: 1}


async def test_200_concurrent_requests(start):
    async def handler(ex: Exchange) -> None:
        await trio.sleep(random.random() * 0.02)
        await ex.respond(body=ex.body[::-1])

    server = await start(handler)
    results: dict[int, bytes] = {}

    async with UpstreamPool(max_idle_per_origin=64) as pool:
        async def one(i: int) -> None:
            for _ in range(3):
                _, _, body = await get(pool, server.url, f"/r/{i}", method="POST", body=b"req-%05d" % i)
                assert body == (b"req-%05d" % i)[::-1]
            results[i] = body

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, i)
        assert len(results) == 200
        stats = pool.stats()
        assert server.requests == 600
        assert stats["opened"] <= 600 and stats["reused"] >= 1
        assert stats["idle"] == {server.url: 64}  # capped
        assert stats["in_use"] == 0


async def test_chaos_no_cross_talk_and_no_leaks(start):
    rng = random.Random(1234)

    async def handler(ex: Exchange) -> bool | None:
        roll = rng.random()
        echo = b"re:" + ex.body
        if roll < 0.05 and ex.index_on_connection > 0:
            ex.abort()  # RST on a kept-alive connection
            return False
        if roll < 0.15:
            return False  # dropped without a response
        if roll < 0.25:
            await ex.respond(body=echo)
            return False  # closed right after the response, unannounced
        if roll < 0.30:
            await ex.respond(headers=[(b"content-length", b"%d" % len(echo)), (b"connection", b"close")], body=echo)
            return None
        if roll < 0.40:
            await trio.sleep(rng.random() * 0.01)
        await ex.respond(body=echo)
        return None

    seen: dict[bytes, int] = {}

    async def counting_handler(ex: Exchange) -> bool | None:
        seen[ex.body] = seen.get(ex.body, 0) + 1
        return await handler(ex)

    server = await start(counting_handler)
    outcomes = {"ok": 0, "disconnect": 0}
    async with UpstreamPool() as pool:
        async def client(i: int) -> None:
            for j in range(5):
                body = b"%d-%d" % (i, j)
                try:
                    _, _, got = await get(pool, server.url, method="POST", body=body)
                except UpstreamDisconnect:
                    outcomes["disconnect"] += 1
                    continue
                assert got == b"re:" + body  # never another request's answer
                outcomes["ok"] += 1

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(client, i)
        assert outcomes["ok"] > 600 and outcomes["disconnect"] > 0
        assert pool.stats()["in_use"] == 0
        assert pool.stats()["not_resent"] > 0  # POSTs read, then dropped or reset on kept-alive connections
        assert max(seen.values()) == 1  # ... and none of them reached the worker twice
    await eventually(lambda: server.connections_done == server.accepted)


async def test_against_hypercorn(nursery, pool):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for i in range(5):
                await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        else:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})

    shutdown = trio.Event()
    url = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0, shutdown_trigger=shutdown.wait))
    try:
        for i in range(5):
            assert (await get(pool, url, "/echo?i=1", method="POST", body=b'{"i":%d}' % i))[2] == b'{"i":%d}' % i
            async with pool.request(url, "POST", "/stream", [(b"accept", b"text/event-stream")], b"{}",
                                    timeout_s=5) as resp:
                events = [chunk async for chunk in resp.iter_chunks()]
            assert b"".join(events) == b"".join(b"data: %d\n\n" % i for i in range(5)) + b"data: [DONE]\n\n"
        stats = pool.stats()
        assert (stats["opened"], stats["reused"]) == (1, 9)
    finally:
        await pool.aclose()
        shutdown.set()


async def test_request_body_can_be_bytearray_or_memoryview(start, pool):
    async def echo(ex: Exchange) -> None:
        await ex.respond(body=ex.body)

    server = await start(echo)
    big = os.urandom(200_000)
    for body in (bytearray(b"abc"), memoryview(b"xyz"), memoryview(big)):
        assert (await get(pool, server.url, method="POST", body=body))[2] == bytes(body)
