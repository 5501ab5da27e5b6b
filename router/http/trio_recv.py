"""Receives into one reused buffer: a receive allocates what arrived, not `max_bytes`. The router's
server reads every client connection through `ReusedBufferStream` (router/http/serve.py); trio
itself is not changed.

trio's `SocketStream.receive_some(max_bytes)` is `socket.recv(max_bytes)`: CPython mallocs a bytes
object of `max_bytes`, receives into it, then shrinks it to what arrived. hypercorn reads every
client connection with `max_bytes` = 64 KiB, so each request the router serves costs a 64 KiB malloc
that glibc shrinks in place, freeing the tail. Later allocations land in that tail, and some of them
live long (the trajectory cache's arrays, written on every insert), so the next 64 KiB receive no
longer fits in the hole and takes fresh heap. Under `bench/soak.py` that left glibc's heap with tens
of MB free but resident in thousands of 8-64 KiB holes, growing for as long as the cache churned,
while the memory in use stayed flat (RELIABILITY.md, Known issues). The data path's upstream pool
avoids `recv(n)` for the same reason (`router/net/upstream.py`). (The control client's reads, httpx
on trio for health probes and admin fan-out, a few per second, keep trio's own receive.)

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

_DEFAULT_RECEIVE_SIZE = 65536  # trio's default when max_bytes is None
_local = threading.local()


def _buffer(size: int) -> memoryview:
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < size:
        buf = _local.buf = memoryview(bytearray(max(size, _DEFAULT_RECEIVE_SIZE)))
    return buf


async def receive_some(stream: trio.SocketStream, max_bytes: int | None = None) -> bytes:
    """trio's `stream.receive_some(max_bytes)`, receiving into the reused buffer."""
    if max_bytes is None:
        max_bytes = _DEFAULT_RECEIVE_SIZE
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    sock = stream.socket
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


class ReusedBufferStream(trio.abc.HalfCloseableStream):
    """A trio `SocketStream` whose `receive_some` is the one above; everything else is the stream's own.
    (trio's SocketStream is final, so this wraps it.) `socket` is there for hypercorn, which reads the
    peer's address from it, and for the direct writes of router/http/hypercorn_fixes.py."""

    __slots__ = ("_stream", "socket")

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await receive_some(self._stream, max_bytes)

    async def send_all(self, data) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def reused_buffer_stream(stream: trio.SocketStream) -> trio.abc.HalfCloseableStream:
    """`stream` reading through the reused buffer (POSIX: os.readv); elsewhere the stream itself."""
    return ReusedBufferStream(stream) if hasattr(os, "readv") else stream
