"""What both durable stores share (router/net/store_sqlite.py, router/net/store_pg.py): one writer that owns the
write connection and commits whatever arrived meanwhile in one transaction (group commit), in a process of its own
(router/net/writer_process.py: the transport, and why not a thread), and the trio side that queues a write and,
when the caller must know it is durable, waits for its commit.

A backend subclasses `QueuedStore` and supplies its writer (`_child_module`, which serves a `write(batch)` that
writes one group commit and returns its outcome), `_read_committed(digest)` (the stored blobs of one digest) and
`_retention_due()`; it may route some operations elsewhere by overriding `_enqueue` (the PostgreSQL store
inserts trajectory records from the event loop: router/net/store_pg.py). Everything else here is the same for
every backend: the operations' queue, the records queued but not yet committed (reads see them, so a trajectory
is retrievable from the moment its reply ends, whatever `store.sync` says), the counters a batch moves, a write
error's logging and recovery, and the waiters' wake-up.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from router.core.store import Keyed, RetentionPlan, SessionWrite, StoreWriteError
from router.net.writer_process import Op, ProcessQueue
from router.wire import store as wire
from router.wire.store import StoredTrajectory

log = logging.getLogger("miles_router")


class QueuedStore(ProcessQueue):
    """The write API of a TrajectoryStore (router/core/store.py) over its writer process. The subclass sets `name`,
    `read_only`, `write_error`, `metrics`, `rows`, `payload_bytes`, `unretrieved` before `_init_queue`, and what
    ProcessQueue needs (`_child_module`, `_child_config`)."""

    name: str
    wait_s: float | None = None  # how long a caller waits for its commit; None: as long as it takes (a local file)

    def _init_queue(self) -> None:
        self.commits = self.deleted = self.deleted_unretrieved = 0
        self._pending: dict[bytes, list[StoredTrajectory]] = {}  # digest -> records not yet committed, oldest first
        self._pending_writes = 0

    def _child_args(self, op: Op) -> object:
        """A put's records go to the writer encoded (router/wire/store.py), as the rows it writes: (digest, blob,
        created, weight version, tokens, prefix key, visible length). The writer needs no record types."""
        if op.kind != "put":
            return op.args
        return [(r.digest, wire.encode(r.record), r.record.created, r.record.weight_version, r.record.ntokens, r.head,
                 r.vlen) for r in op.args]

    def _committed(self, batch: list[Op], *, elapsed: float, records: int, error: str | None, added: int = 0,
                   added_bytes: int = 0, retrieved: int = 0, unretrieved: int | None = None) -> None:
        """On the event loop, when the writer answered for a batch: the counters it moved (`unretrieved`: the
        count read back, when the batch deleted rows), the write error it set or cleared, its metrics, then the
        waiters' wake-up. `error` fails every operation in it."""
        if error is None:
            self.commits += 1
            self.rows += added
            self.payload_bytes += added_bytes
            self.unretrieved = self.unretrieved + added - retrieved if unretrieved is None else unretrieved
            if self.write_error is not None and not self.read_only:
                log.info("%s: writes succeed again", self.name)
                self.write_error = None
        else:
            if self.write_error != error:
                log.error("%s: write failed: %s", self.name, error)
            self.write_error = error
            for op in batch:
                op.error = error
        if self.metrics is not None:
            self.metrics.store_commit(elapsed, records, error is not None)
        self._finish(batch)

    def _finish(self, batch: list[Op]) -> None:
        """On the event loop: forget the pending records, wake the waiters."""
        for op in batch:
            if op.kind == "put":
                self._pending_writes -= len(op.args)
                for r in op.args:
                    waiting = self._pending.get(r.digest)
                    if waiting is not None:
                        waiting[:] = [x for x in waiting if x is not r.record]
                        if not waiting:
                            del self._pending[r.digest]
            if op.done is not None:
                op.done.set()

    # ---- writes (on the event loop) --------------------------------------------------------------
    async def _submit(self, op: Op):
        """Queue a write; with a waiter, its result once committed (StoreWriteError if it failed, or if no commit
        came within `wait_s`)."""
        self._enqueue(op)
        if op.done is None:
            return None
        if self.wait_s is None:  # a local file: no deadline (and no cancel scope, ~1.5% of the loop per request)
            await op.done.wait()
        else:
            with trio.move_on_after(self.wait_s):
                await op.done.wait()
        if not op.done.is_set():
            raise StoreWriteError(f"{self.name}: cannot write: {self._no_commit}")
        if op.error is not None:
            raise StoreWriteError(f"{self.name}: cannot write: {op.error}")
        return op.result

    @property
    def _no_commit(self) -> str:
        """Why a write bounded by `wait_s` failed when its commit did not come in time."""
        return f"no commit within {self.wait_s:g} s (the database does not answer)"

    def _refuse_writes(self) -> None:
        if self.read_only:
            raise StoreWriteError(f"{self.name}: cannot write: {self.write_error}")

    async def put(self, records: Sequence[Keyed | tuple[bytes, StoredTrajectory]], *, wait: bool) -> None:
        if not records:
            return
        self._refuse_writes()
        records = [r if isinstance(r, Keyed) else Keyed(*r) for r in records]
        for r in records:
            self._pending.setdefault(r.digest, []).append(r.record)
        self._pending_writes += len(records)
        await self._submit(Op("put", records, trio.Event() if wait else None))

    async def put_session(self, sid: str, at: float, header: bytes | None,
                          turns: Sequence[tuple[int, bytes]], *, wait: bool) -> SessionWrite:
        """Create a session (header given) or note its use, and add turns (each id written once); durable on
        return when wait=True."""
        self._refuse_writes()
        done = await self._submit(Op("session", (sid, at, header, list(turns)), trio.Event() if wait else None))
        return done or SessionWrite()

    async def delete_session(self, sid: str, *, wait: bool) -> None:
        """A deleted (or expired) session's rows go; 410 for its id needs no per-id row (the registry's key)."""
        if self.read_only:
            if wait:
                self._refuse_writes()
            return
        await self._submit(Op("session_delete", sid, trio.Event() if wait else None))

    def touch_session(self, sid: str, at: float) -> None:
        if not self.read_only:
            self._enqueue(Op("touch", (sid, at), None))

    async def expire_sessions(self, before: float, keep: Sequence[str]) -> list[str]:
        if self.read_only:
            return []
        return await self._submit(Op("session_expire", (before, sorted(keep)), trio.Event()))

    def mark_retrieved(self, digest: bytes) -> None:
        if not self.read_only:
            self._enqueue(Op("retrieved", digest, None))

    def _retention_due(self) -> bool:
        """Whether a retention pass may delete anything (cheap, on the event loop)."""
        raise NotImplementedError

    async def maintain(self, *, now: float, stale_versions: frozenset = frozenset()) -> RetentionPlan:
        if self.read_only or not self._retention_due():
            return RetentionPlan()
        op = Op("maintain", (now, stale_versions), trio.Event())
        self._enqueue(op)
        await op.done.wait()  # not bounded: nobody's reply waits for retention
        if op.error is not None:
            raise StoreWriteError(f"{self.name}: retention pass failed: {op.error}")
        return op.result

    # ---- reads -----------------------------------------------------------------------------------
    async def _read_committed(self, digest: bytes) -> list[bytes]:
        """The stored blobs of `digest`, oldest first."""
        raise NotImplementedError

    async def get_all(self, digest: bytes) -> list[StoredTrajectory]:
        pending = list(self._pending.get(digest, ()))
        found = [wire.decode(b) for b in await self._read_committed(digest)]
        # a record committed while it is still listed as pending (its wake-up not run yet) is there once
        return found + [rec for rec in pending if rec not in found]

    async def get(self, digest: bytes) -> StoredTrajectory | None:
        records = await self.get_all(digest)
        if not records:
            return None
        newest = records[-1]
        if any(rec.tokens != newest.tokens for rec in records):
            return None  # several spellings of one text: not determined by the text alone
        return newest
