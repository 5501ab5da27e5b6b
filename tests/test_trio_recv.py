"""router/http/trio_recv.py: the router's server streams receive into a reused buffer.

trio's own receive mallocs `max_bytes` (64 KiB from hypercorn and httpx) per call and shrinks it;
under the soak that fragmented glibc's heap until RSS grew for as long as the cache churned
(RELIABILITY.md, Known issues). These tests pin the allocation (tracemalloc, not timing) and the
trio contract the replacement keeps.
"""

from __future__ import annotations

import socket
import struct
import tracemalloc

import pytest
import trio
import trio.testing

from router.http.trio_recv import ReusedBufferStream


def reusing(sock) -> ReusedBufferStream:
    return ReusedBufferStream(trio.SocketStream(sock))


@pytest.fixture
def pair():
    """(the router's stream over a socket, its peer as a plain blocking socket: sends here are small)."""
    a, b = socket.socketpair()
    stream = reusing(trio.socket.from_stdlib_socket(a))
    yield stream, b
    a.close()  # the stdlib socket trio's wraps (the run is over: no trio close here)
    b.close()


async def _receive_reusing(stream, n):
    return await stream.receive_some(n)


async def _receive_trio(stream, n):  # trio's own, on the stream the router's wraps
    return await stream._stream.receive_some(n)


async def _peak_while_receiving(receive, stream, peer, nbytes: int) -> tuple[int, bytes]:
    """Peak traced bytes above the starting point while `receive` reads `nbytes` already sent."""
    await receive(stream, 65536)  # first call: the per-thread buffer is allocated here, not below
    peer.send(b"x" * nbytes)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        data = await receive(stream, 65536)
        return tracemalloc.get_traced_memory()[1] - base, data
    finally:
        tracemalloc.stop()


async def test_a_receive_allocates_what_arrived_not_max_bytes(pair):
    stream, peer = pair
    peer.send(b"warm-up")
    peak, data = await _peak_while_receiving(_receive_reusing, stream, peer, 300)
    assert data == b"x" * 300
    assert peak < 8192, peak
    # The measurement can tell: trio's own receive allocates the whole 64 KiB for 300 bytes.
    peer.send(b"warm-up")
    peak, data = await _peak_while_receiving(_receive_trio, stream, peer, 300)
    assert data == b"x" * 300 and peak >= 65536, peak


async def test_max_bytes_eof_and_bad_arguments(pair):
    stream, peer = pair
    peer.sendall(bytes(range(256)) * 4)
    got = b""
    while len(got) < 1024:
        chunk = await stream.receive_some(100)
        assert 0 < len(chunk) <= 100
        got += chunk
    assert got == bytes(range(256)) * 4
    big = b""
    async with trio.open_nursery() as n:  # more than the socket buffers hold: sent from a thread
        n.start_soon(trio.to_thread.run_sync, peer.sendall, b"y" * 200_000)
        while len(big) < 200_000:
            chunk = await stream.receive_some(150_000)  # larger than the buffer's default size
            assert 0 < len(chunk) <= 150_000
            big += chunk
    assert big == b"y" * 200_000
    peer.shutdown(socket.SHUT_WR)
    assert await stream.receive_some() == b""
    with pytest.raises(ValueError):
        await stream.receive_some(0)


async def test_waits_for_data_and_concurrent_receivers_keep_their_own_bytes():
    pairs = [socket.socketpair() for _ in range(3)]
    streams = [reusing(trio.socket.from_stdlib_socket(a)) for a, _ in pairs]
    got = {}

    async def receive(i):
        got[i] = await streams[i].receive_some(65536)

    async with trio.open_nursery() as n:
        for i in range(3):
            n.start_soon(receive, i)
        await trio.testing.wait_all_tasks_blocked()
        assert got == {}  # all three are waiting, none holds data
        for i, (_, b) in enumerate(pairs):
            b.send(bytes([65 + i]) * (1000 * (i + 1)))
    assert got == {i: bytes([65 + i]) * (1000 * (i + 1)) for i in range(3)}
    for st, (_, b) in zip(streams, pairs):
        st.socket.close()
        b.close()


async def test_a_cancelled_receive_takes_nothing(pair):
    stream, peer = pair
    peer.send(b"keep me")
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.receive_some()
    assert scope.cancelled_caught
    assert await stream.receive_some() == b"keep me"


async def test_closed_and_broken_sockets_raise_trio_errors():
    a, b = trio.socket.socketpair()
    stream = reusing(a)
    a.close()
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    b.close()

    # closed by another task while waiting
    a, b = trio.socket.socketpair()
    stream = reusing(a)
    raised = []

    async def receive():
        try:
            await stream.receive_some()
        except trio.ClosedResourceError as e:
            raised.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()
    assert raised
    b.close()

    # reset by the peer
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST
    stream = reusing(server)
    with pytest.raises(trio.BrokenResourceError):
        await stream.receive_some()
    server.close()
    listener.close()
