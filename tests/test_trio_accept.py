"""router/http/trio_accept.py: the router's listener takes every waiting connection in one scheduler
round.

trio's own accept yields after each connection, so `serve_listeners` took one per round of a busy
run loop and a burst of connections waited seconds (BENCHMARKS.md, the c=256 tail). The rounds are
counted here with a task that steps once per round, not with timing.
"""

from __future__ import annotations

import socket
from contextlib import asynccontextmanager

import pytest
import trio

from router.http.trio_accept import BATCH, BatchAcceptListener


@asynccontextmanager
async def queued(n: int, batched: bool = True):
    """A listener (the router's, or trio's own) with n plain client sockets already connected (the kernel
    queues them until accepted). Closes the listener (if the test did not), the clients, and every
    stream the test hands to `streams`."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=512)
    if batched:
        listener = BatchAcceptListener(listener)
    clients = [socket.create_connection(listener.socket.getsockname()) for _ in range(n)]
    streams: list[trio.SocketStream] = []
    try:
        yield listener, clients, streams
    finally:
        for stream in streams:
            await stream.aclose()
        await listener.aclose()
        for c in clients:
            c.close()


async def _rounds_to_accept(listener, n: int) -> tuple[int, list[trio.SocketStream]]:
    """Scheduler rounds that pass while `accept` takes n queued connections."""
    rounds = 0

    async def ticker():
        nonlocal rounds
        while True:
            await trio.sleep(0)
            rounds += 1

    streams = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0)
        start = rounds
        for _ in range(n):
            streams.append(await listener.accept())
        used = rounds - start
        nursery.cancel_scope.cancel()
    return used, streams


@pytest.mark.parametrize("n", [40, 300])
async def test_queued_connections_are_accepted_in_a_round_or_two(n):
    async with queued(n) as (listener, clients, streams):
        rounds, accepted = await _rounds_to_accept(listener, n)
        streams += accepted
        # One round for the first accept, one per further batch of BATCH connections.
        assert rounds <= 1 + n // BATCH, rounds
        # Each stream is the client's own connection, in the order they connected.
        for stream, client in zip(accepted, clients):
            assert stream.socket.getpeername() == client.getsockname()


async def test_trio_alone_takes_a_round_per_connection():
    """The measurement can tell: trio's accept yields once per connection."""
    async with queued(40, batched=False) as (listener, _, streams):
        rounds, accepted = await _rounds_to_accept(listener, 40)
        streams += accepted
        assert rounds >= 39, rounds


async def test_closing_the_listener_closes_connections_taken_but_not_handed_out():
    async with queued(5) as (listener, clients, streams):
        streams.append(await listener.accept())  # takes the other four into the listener's queue
        await listener.aclose()
        for c in clients[1:]:
            c.settimeout(5)
            try:
                assert c.recv(1) == b""  # closed, not left hanging
            except ConnectionResetError:
                pass
        with pytest.raises(trio.ClosedResourceError):
            await listener.accept()


async def test_a_cancelled_accept_takes_nothing():
    async with queued(3) as (listener, clients, streams):
        streams.append(await listener.accept())
        with trio.CancelScope() as scope:
            scope.cancel()
            await listener.accept()  # raises Cancelled at its checkpoint: the queued one stays
        assert scope.cancelled_caught
        streams.append(await listener.accept())
        assert streams[1].socket.getpeername() == clients[1].getsockname()
        streams.append(await listener.accept())
