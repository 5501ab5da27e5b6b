"""`trio.SocketListener.accept` that takes every connection already waiting, not one per scheduler
round. Applied once when `router.net.server` is imported (`apply()`).

trio's accept makes one `accept()` call and then yields to the scheduler, so the loop in
`trio.serve_listeners` (which hypercorn's trio worker runs) takes one new connection per round of
the run loop. On a busy router a round lasts tens of milliseconds (every runnable request task
steps once), so a burst of new connections, such as a rollout opening hundreds at once, waited in
the kernel's accept queue for seconds: at c=256 the first request of the last-accepted connections
took 1-2 s while every other request took ~120 ms (BENCHMARKS.md, the c=256 tail).

Here the accept that had to wait is followed by up to `_BATCH - 1` non-blocking accepts of the
connections already queued, which later calls hand out without a schedule point (a cancelled call
still takes nothing). Closing the listener closes any connection taken but not handed out yet, as
the kernel does with its own queue. The rest of the contract is trio's.
"""

from __future__ import annotations

import collections

import trio

from router.net._patch import replace, replaced

_BATCH = 128
_original_accept = None
_original_aclose = None


async def accept(self: trio.SocketListener) -> trio.SocketStream:
    pending = getattr(self, "_miles_pending", None)
    if pending:
        await trio.lowlevel.checkpoint_if_cancelled()
        return trio.SocketStream(pending.popleft())
    stream = await _original_accept(self)
    if pending is None:
        pending = self._miles_pending = collections.deque()
    listening = self.socket._sock  # the stdlib socket: non-blocking, as trio keeps it
    for _ in range(_BATCH - 1):
        try:
            sock, _ = listening.accept()
        except OSError:  # empty queue (EAGAIN), or an error the next trio accept reports or skips
            break
        pending.append(trio.socket.from_stdlib_socket(sock))
    return stream


async def aclose(self: trio.SocketListener) -> None:
    pending = getattr(self, "_miles_pending", None)
    while pending:
        pending.popleft().close()
    await _original_aclose(self)


def applied() -> bool:
    return replaced(trio.SocketListener, "accept")


def original_accept():
    return _original_accept


def apply() -> None:
    global _original_accept, _original_aclose
    if applied():
        return
    _original_accept = replace(trio.SocketListener, "accept", accept)
    _original_aclose = replace(trio.SocketListener, "aclose", aclose)
