"""The child's side of a store's writer process (router/net/writer_process.py is the router's side and says why):
the operations, their framing on the socket, and the loop that serves one writer. It imports no trio, so that a
writer process starts fast.
"""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable


class Op:
    """One queued write: `kind` names it, `args` are the backend's, `done` (when someone waits) is set on the event
    loop once the writer answered for it (`error` if it failed, `result` what it returned)."""

    __slots__ = ("kind", "args", "done", "error", "result")

    def __init__(self, kind: str, args, done) -> None:  # done: trio.Event | None
        self.kind, self.args, self.done = kind, args, done
        self.error: str | None = None
        self.result = None


_HEADER = 4  # little-endian length of the pickle that follows


def frame(obj) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(_HEADER, "little") + data


def unframe(buf: bytearray) -> list:
    """The complete messages at the start of `buf` (removed from it)."""
    out, at = [], 0
    while len(buf) - at >= _HEADER:
        n = int.from_bytes(buf[at:at + _HEADER], "little")
        if len(buf) - at - _HEADER < n:
            break
        out.append(pickle.loads(buf[at + _HEADER:at + _HEADER + n]))
        at += _HEADER + n
    del buf[:at]
    return out


def serve(open_writer: Callable[[object], Callable[[list[Op]], dict]], fd: int) -> None:
    """The child's loop on the inherited socket `fd`. The first message is the store's configuration;
    `open_writer(config)` returns `write(batch)`, which writes one batch (setting each op's `result`, and `error`
    when that op alone failed) and returns its outcome (QueuedStore._committed's keywords). Returns at the end of
    the socket."""
    sock = socket.socket(fileno=fd)
    # SCHED_BATCH: woken by the router's send, this process does not preempt the router's event loop on its CPU (it
    # runs on a free CPU, or when the loop yields). Measured: 0.25 fewer context switches of the router per
    # `/generate`, 4.6 records per commit instead of 4.0 (BENCHMARKS.md §5). Not on every OS: then the default.
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    buf = bytearray()
    # received into one buffer: `recv(1 << 20)` allocated 1 MiB per call, above glibc's mmap threshold, which cost an
    # mmap, an mremap and a munmap (and the page faults) per batch
    into = memoryview(bytearray(1 << 20))
    write = None
    while True:
        n = sock.recv_into(into)
        if not n:  # the router closed its side (or died): everything it sent has been written
            return
        buf += into[:n]
        msgs = unframe(buf)
        if write is None and msgs:
            write = open_writer(msgs.pop(0))
        if not msgs:
            continue
        batch = [Op(kind, args, None) for _, kind, args in msgs]
        outcome = write(batch)
        results = {seq: (op.result, op.error) for (seq, _, _), op in zip(msgs, batch)
                   if op.result is not None or op.error is not None}
        try:
            sock.sendall(frame(([seq for seq, _, _ in msgs], outcome, results)))
        except OSError:  # the router is gone
            return
