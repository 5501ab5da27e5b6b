"""A store's writer in a process of its own: the router's side (the child's is router/net/writer_child.py).

Why a process and not a thread: the event loop's thread is busy nearly all the time and releases the GIL around
every system call it makes. A writer thread takes the GIL back after every sqlite3 call, so while it waits for it,
each of the loop's GIL releases wakes it (a futex call and a context switch), and it rarely wins the race before
the loop takes the GIL again. Measured (BENCHMARKS.md §5): with a writer thread the loop made ~5 futex calls per
`/generate` and none without a store, and the writer's own context switches were ~7 per request, nearly all in
`take_gil` after `sqlite3_step`. With the writer in a process, the loop sends it each write over a socketpair and
reads its answers as it reads any socket, so no thread of the router's process competes for its GIL.

The parent side (`ProcessQueue`, under router/net/store_writer.py's `QueuedStore`) numbers each operation and pickles
`(seq, kind, args)` into an outbox; one task on the event loop sends the outbox, another reads the answers
`(seqs, outcome, results)` and finishes those operations (`QueuedStore._committed`, then the waiters' wake-up,
directly: it runs on the loop). The child (`serve`) reads whatever has arrived, writes it in ONE transaction
(group commit: what arrives during a commit shares the next), and answers. A write is acknowledged only by that
answer, which the child sends after its commit returned.

The outbox is sent only while the child has nothing unanswered: what queues during a commit goes in one `send`
when its answer arrives (the child could not read it sooner anyway), not in one `send` per operation, each a system
call on the event loop (measured: BENCHMARKS.md §5).

If the child dies, every operation it had not answered fails (`StoreWriteError` for whoever waits: it may or may
not have been written) and a new child starts. If the router dies, the child reads the end of its socket, writes
what it had received, and exits: nothing outlives the router. On close the parent sends everything queued, shuts
its side down and waits for the child to finish.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable

import trio

from router.net.writer_child import Op, frame, unframe


log = logging.getLogger("miles_router")

RESTART_DELAY_S = (0.05, 2.0)  # shortest and longest wait before a new child, after one that never answered died


class ProcessQueue:
    """The router's side of a store's writer process (router/net/store_writer.py's QueuedStore builds on it). The
    store supplies `_child_module` (run as `python -m <module> <fd>`, it calls router/net/writer_child.py's
    `serve` on that socket), `_child_config()` (the first message:
    what the child opens) and may extend `_batch_done`."""

    name: str
    _child_module: str
    _committed: Callable

    def _child_config(self) -> object:
        raise NotImplementedError

    def _child_args(self, op: Op) -> object:
        """What the child gets of `op`'s arguments."""
        return op.args

    def _start_writer(self) -> None:
        self._seq = 0
        self._inflight: dict[int, Op] = {}  # sent (or about to be), not answered yet
        self._outbox: list[bytes] = []
        self._sent_unanswered = 0  # operations sent to the current child that it has not answered
        self._outbox_lot = trio.lowlevel.ParkingLot()
        self._closing = False
        self._answered = False  # the current child answered a batch (a new one after it died starts at once)
        self._child: subprocess.Popen | None = None
        self._writer_done = trio.Event()
        trio.lowlevel.spawn_system_task(self._run_writer, name=f"{self.name}: writer process")

    def _enqueue(self, op: Op) -> None:
        self._seq += 1
        self._inflight[self._seq] = op
        self._outbox.append(frame((self._seq, op.kind, self._child_args(op))))
        if not self._sent_unanswered:  # (otherwise the child's answer wakes the sender)
            self._outbox_lot.unpark_all()

    async def _stop_writer(self, timeout_s: float | None = None) -> bool:
        """Send what is queued, then wait for the child to write it and exit; False if it did not finish within
        `timeout_s` (it is then killed, and what it had not answered fails)."""
        if not hasattr(self, "_writer_done"):
            return True
        self._closing = True
        self._outbox_lot.unpark_all()
        with trio.move_on_after(float("inf") if timeout_s is None else timeout_s) as waited:
            await self._writer_done.wait()
        if waited.cancelled_caught:
            if self._child is not None:
                self._child.kill()
            await self._writer_done.wait()
        return not waited.cancelled_caught

    def _batch_done(self, ops: list[Op], outcome: dict) -> None:
        """On the event loop, when the child answered for `ops`."""
        self._committed(ops, **outcome)

    def _fail_unanswered(self, error: str) -> None:
        """The child is gone: whatever it had not answered fails, sent or not (a new child gets only what comes
        after)."""
        ops = list(self._inflight.values())
        self._inflight.clear()
        self._outbox.clear()
        self._sent_unanswered = 0
        if ops:
            self._committed(ops, elapsed=0.0, records=0, error=error)

    async def _run_writer(self) -> None:
        delay = RESTART_DELAY_S[0]
        try:
            while True:
                ours, theirs = socket.socketpair()
                env = dict(os.environ)  # the child imports the same router package as this process
                root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
                try:
                    self._child = subprocess.Popen([sys.executable, "-m", self._child_module, str(theirs.fileno())],
                                                   pass_fds=[theirs.fileno()], env=env,
                                                   start_new_session=True)  # (Ctrl-C: the router drains it)
                except OSError as e:
                    self._child, error = None, f"cannot start the writer process: {e}"
                else:
                    theirs.close()  # the child's now: its end of the socket closes when the child exits
                    with trio.socket.from_stdlib_socket(ours) as sock:
                        async with trio.open_nursery() as nursery:
                            # the configuration first, over the socket (a database URL may hold a password: not
                            # in argv)
                            nursery.start_soon(self._send, sock, frame(self._child_config()))
                            await self._receive(sock)
                            nursery.cancel_scope.cancel()
                    status = await trio.to_thread.run_sync(self._child.wait)
                    error = "writer process " + (f"killed by signal {-status}" if status < 0 else
                                                 f"exited with status {status}")
                finally:
                    theirs.close()
                    ours.close()
                self._fail_unanswered(error)  # (nothing, when it exited after answering everything at close)
                if self._closing:
                    return
                log.error("%s: %s; starting another", self.name, error)
                if self._answered:
                    delay = RESTART_DELAY_S[0]
                self._answered = False
                await trio.sleep(delay)
                delay = min(2 * delay, RESTART_DELAY_S[1])
        except BaseException:
            if self._child is not None and self._child.poll() is None:
                self._child.kill()
            raise
        finally:
            self._writer_done.set()

    async def _send(self, sock, config: bytes) -> None:
        try:
            await self._send_all(sock, config)
            while True:
                if self._outbox and not self._sent_unanswered:
                    data = b"".join(self._outbox)
                    self._sent_unanswered += len(self._outbox)
                    self._outbox.clear()
                    await self._send_all(sock, data)
                elif self._closing and not self._outbox:
                    sock.shutdown(socket.SHUT_WR)
                    return
                else:
                    await self._outbox_lot.park()
        except OSError:
            return  # the child is gone: `_receive` sees it too

    @staticmethod
    async def _send_all(sock, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await sock.send(view):]

    async def _receive(self, sock) -> None:
        buf = bytearray()
        while True:
            try:
                data = await sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            buf += data
            for seqs, outcome, results in unframe(buf):
                self._answered = True
                ops = {seq: self._inflight.pop(seq) for seq in seqs}
                self._sent_unanswered -= len(seqs)
                if not self._sent_unanswered and self._outbox:
                    self._outbox_lot.unpark_all()
                for seq, (result, error) in results.items():
                    ops[seq].result, ops[seq].error = result, error
                self._batch_done(list(ops.values()), outcome)
