"""A listener that takes every connection already waiting, not one per scheduler round. The router's
server listens through `BatchAcceptListener` (router/http/serve.py); trio itself is not changed.

trio's `SocketListener.accept` makes one `accept()` call and then yields to the scheduler, so the loop
in `trio.serve_listeners` (which serves the router's connections) takes one new connection per round
of the run loop. On a busy router a round lasts tens of milliseconds (every runnable request task
steps once), so a burst of new connections, such as a rollout opening hundreds at once, waited in
the kernel's accept queue for seconds: at c=256 the first request of the last-accepted connections
took 1-2 s while every other request took ~120 ms (BENCHMARKS.md, the c=256 tail).

Here the accept that had to wait is followed by up to `BATCH - 1` non-blocking accepts of the
connections already queued, which later calls hand out without a schedule point (a cancelled call
still takes nothing). Closing the listener closes any connection taken but not handed out yet, as
the kernel does with its own queue. The rest of the contract is trio's.
"""

from __future__ import annotations

import collections

import trio

BATCH = 128


class BatchAcceptListener(trio.abc.Listener[trio.SocketStream]):
    """Wraps a trio `SocketListener` (final in trio, hence not a subclass); `socket` is its socket."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self._listener = listener
        self.socket = listener.socket
        self._pending: collections.deque = collections.deque()  # trio sockets taken, not handed out yet

    async def accept(self) -> trio.SocketStream:
        pending = self._pending
        if pending:
            await trio.lowlevel.checkpoint_if_cancelled()
            return trio.SocketStream(pending.popleft())
        stream = await self._listener.accept()
        listening = self.socket._sock  # the stdlib socket: non-blocking, as trio keeps it
        for _ in range(BATCH - 1):
            try:
                sock, _ = listening.accept()
            except OSError:  # empty queue (EAGAIN), or an error the next trio accept reports or skips
                break
            pending.append(trio.socket.from_stdlib_socket(sock))
        return stream

    async def aclose(self) -> None:
        while self._pending:
            self._pending.popleft().close()
        await self._listener.aclose()
