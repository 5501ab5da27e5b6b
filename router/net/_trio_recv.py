"""`trio.SocketStream.receive_some` into one reused buffer: a receive allocates what arrived, not
`max_bytes`. Applied once when `router.net.server` is imported (`apply()`).

trio's `receive_some(max_bytes)` is `socket.recv(max_bytes)`: CPython mallocs a bytes object of
`max_bytes`, receives into it, then shrinks it to what arrived. hypercorn reads every client
connection with `max_bytes` = 64 KiB, and httpx's trio backend (health probes, admin fan-out) does
the same, so each request the router serves costs a 64 KiB malloc that glibc shrinks in place,
freeing the tail. Later allocations land in that tail, and some of them live long (the trajectory
cache's arrays, written on every insert), so the next 64 KiB receive no longer fits in the hole
and takes fresh heap. Under `bench/soak.py` that left glibc's heap with tens of MB free but
resident in thousands of 8-64 KiB holes, growing for as long as the cache churned, while the
memory in use stayed flat (RELIABILITY.md, Known issues). The data path's upstream pool already
avoids `recv(n)` for the same reason (`router/net/upstream.py`).

Here the kernel writes into a per-thread buffer that lives for the process and the call returns
an exact-size copy. The contract is trio's: at most `max_bytes`, b"" at EOF,
ClosedResourceError / BrokenResourceError for a closed / broken socket, a checkpoint on every
call (a cancelled call receives nothing). The buffer is never held across a wait: readability is
awaited first, then the read and the copy happen with no checkpoint between them, so tasks can't
overwrite each other's data.
"""

from __future__ import annotations

import errno
import os
import threading

import trio

from router.net._patch import replace, replaced

_DEFAULT_RECEIVE_SIZE = 65536  # trio's default when max_bytes is None
_local = threading.local()
_original = None  # trio's own receive_some, kept for tests/test_trio_recv.py


def _buffer(size: int) -> memoryview:
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < size:
        buf = _local.buf = memoryview(bytearray(max(size, _DEFAULT_RECEIVE_SIZE)))
    return buf


async def receive_some(self: trio.SocketStream, max_bytes: int | None = None) -> bytes:
    if max_bytes is None:
        max_bytes = _DEFAULT_RECEIVE_SIZE
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    sock = self.socket
    await trio.lowlevel.checkpoint_if_cancelled()
    waited = False
    while True:
        fd = sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("this socket was already closed")
        view = _buffer(max_bytes)[:max_bytes]
        try:
            n = os.readv(fd, (view,))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            waited = True
            continue
        except OSError as exc:  # as trio's _translate_socket_errors_to_stream_errors
            if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                raise trio.ClosedResourceError("this socket was already closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        data = bytes(view[:n])  # copied before any checkpoint: the buffer is shared
        break
    if not waited:  # as trio: a receive that didn't block still yields to the scheduler
        await trio.lowlevel.cancel_shielded_checkpoint()
    return data


def applied() -> bool:
    return replaced(trio.SocketStream, "receive_some")


def original_receive_some():
    return _original


def apply() -> None:
    global _original
    if applied() or not hasattr(os, "readv"):  # readv: POSIX; elsewhere trio's own receive stays
        return
    _original = replace(trio.SocketStream, "receive_some", receive_some)
