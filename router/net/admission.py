"""Fair FIFO waiting for a scarce resource: the router's global concurrency limit
(`server.max_concurrent_requests`) and the per-worker in-flight cap (`workers.max_inflight_per_worker`).

One mechanism for both. A waiter brings a `take` function that grants the resource synchronously
(returns it, or None when none is free). Whenever something frees up, `wake()` runs the head
waiter's `take` and hands it the result before any other task can run, so a slot that frees goes to
the oldest waiter, never to a newcomer (newcomers queue behind waiters). For the per-worker cap
`take` is the worker selection itself, so a request that waited still goes to the least-loaded
worker at the moment a slot frees. Waits are bounded in time; a waiter that leaves (timeout,
client gone) leaves the queue, and a grant it could not use is handed back.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

# Waiters also re-check this often, so a resource that frees without a wake() call (a breaker's
# cooldown ending) is still noticed.
_RECHECK_S = 0.25


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    def __init__(self, waited_s: float) -> None:
        super().__init__(f"waited {waited_s:.3g}s")
        self.waited_s = waited_s


class _Waiter:
    __slots__ = ("take", "event", "result")

    def __init__(self, take: Callable[[], Any]) -> None:
        self.take = take
        self.event = trio.Event()
        self.result = None


class FifoQueue:
    def __init__(self, name: str, on_wait: Callable[[str, float], None] | None = None) -> None:
        self.name = name
        self._waiters: deque[_Waiter] = deque()
        self._on_wait = on_wait  # (queue name, seconds waited) for every waiter that got its grant

    def __len__(self) -> int:
        return len(self._waiters)

    async def acquire(self, take: Callable[[], Any], give_back: Callable[[Any], None], *, timeout_s: float,
                      max_waiting: int | None = None) -> Any:
        """`take()`'s first non-None result, in FIFO order with the other waiters.

        Raises QueueFull when `max_waiting` waiters are already queued, QueueTimeout after
        `timeout_s`. `give_back(result)` is called for a grant that arrives as the wait is cancelled.
        """
        if not self._waiters:
            got = take()
            if got is not None:
                return got
        if max_waiting is not None and len(self._waiters) >= max_waiting:
            raise QueueFull
        waiter = _Waiter(take)
        self._waiters.append(waiter)
        t0 = time.monotonic()
        deadline = trio.current_time() + timeout_s
        try:
            while waiter.result is None:
                with trio.move_on_at(min(deadline, trio.current_time() + _RECHECK_S)):
                    await waiter.event.wait()
                if waiter.result is None:
                    if trio.current_time() >= deadline:
                        raise QueueTimeout(time.monotonic() - t0)
                    self.wake()
        except BaseException:
            if waiter.result is not None:
                give_back(waiter.result)
                waiter.result = None
                self.wake()  # the slot it gave back may serve the next waiter
            raise
        finally:
            if waiter.result is None:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
        if self._on_wait is not None:
            self._on_wait(self.name, time.monotonic() - t0)
        return waiter.result

    def wake(self) -> None:
        """Grant whatever is free to waiters, oldest first; stop at the first that gets nothing."""
        waiters = self._waiters
        while waiters:
            head = waiters[0]
            got = head.take()
            if got is None:
                return
            waiters.popleft()
            head.result = got
            head.event.set()


class ConcurrencyLimit:
    """At most `limit` holders (0 = unlimited); the rest wait in a FIFO queue."""

    def __init__(self, limit: int, queue_size: int, timeout_s: float, on_wait=None) -> None:
        self.limit = limit
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.active = 0
        self.queue = FifoQueue("admission", on_wait)

    def _take(self) -> bool | None:
        if self.active < self.limit:
            self.active += 1
            return True
        return None

    def _give_back(self, _=None) -> None:
        self.active -= 1

    async def acquire(self) -> bool:
        """True when a slot is held (release it); False when there is no limit."""
        if not self.limit:
            return False
        await self.queue.acquire(self._take, self._give_back, timeout_s=self.timeout_s, max_waiting=self.queue_size)
        return True

    def release(self) -> None:
        self._give_back()
        self.queue.wake()
