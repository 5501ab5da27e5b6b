"""The embedded trajectory store: SQLite (the standard library's sqlite3) in WAL mode.

One writer owns the write connection: `SqliteWriter` (router/net/sqlite_writer.py, with the schema), in a process
of its own (`python -m router.net.sqlite_writer`, started and restarted by the router: router/net/writer_process.py
says why not a thread). The router queues writes as the PostgreSQL store does (router/net/store_writer.py; this
module is the store around the writer: the reads and the statistics). The writer takes everything
that arrived, writes it in ONE transaction and commits (group commit): records that finish while a commit is in
progress share the next one, so the fsync cost is paid per batch, not per record, and no artificial delay is added
at low load (a 1 ms one cost more router CPU, not less: BENCHMARKS.md §5). Each caller is woken on the event loop
once the writer answered that its batch committed or failed.

`sync = "commit"`: PRAGMA synchronous=FULL (the WAL is fsynced at every commit) and the reply's end waits for its
commit. `sync = "off"`: synchronous=NORMAL and nobody waits (a crash may lose the last few ms; a read still sees
records not yet committed, from `_pending`).

Reads (the /retrieve_from_text fallback) run in worker threads on their own connections: WAL readers never wait
for the writer. Torn writes (kill -9 mid-commit) are SQLite's job: an uncommitted transaction is simply absent.

Schema: `trajectories` holds one small row per record (digest, created, retrieved, version, sizes) and is what
startup, statistics and retention scan; `payloads` holds the record blobs, read only by id.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import trio

from router.core.store import KeyFilter, RetentionPlan, StoreError, StoreStats
from router.net.sqlite_writer import SqliteWriter, _connect, _describe, open_database
from router.net.store_writer import QueuedStore
from router.net.writer_child import Op
from router.wire import store as wire
from router.wire.store import StoredTrajectory

log = logging.getLogger("miles_router")


def check_openable(path: Path) -> str | None:
    """Startup check (before the event loop): raises StoreOpenError, or returns why it is read-only."""
    conn, reason = open_database(path)
    conn.close()
    return reason


class SqliteStore(QueuedStore):
    """A TrajectoryStore (router/core/store.py) on one SQLite file, written by one router process."""

    shared = False  # this process is the store's only writer: sessions in memory are up to date, and so is
    # what `may_continue` knows (the keys stored before it started; its own it remembers itself)

    def __init__(self, path: str | Path, *, sync: str = "commit", retention_s: float = 0.0, max_bytes: int = 0,
                 metrics=None) -> None:
        self.path = Path(path)
        self.name = f"trajectory store {self.path}"
        self.sync = sync
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._conn, self.write_error = open_database(self.path, sync=sync)
        self.read_only = self.write_error is not None
        row = self._conn.execute("SELECT count(*), total(nbytes), total(retrieved = 0) FROM trajectories").fetchone()
        self.rows, self.payload_bytes, self.unretrieved = int(row[0]), int(row[1]), int(row[2])
        self._init_queue()
        # prefix keys (router/core/store.py text_head) of the texts stored before this process started: a cheap
        # "maybe" before a query (`may_continue`; this process's own writes are the router's to remember)
        cols = {r[1] for r in self._conn.execute("PRAGMA table_info(trajectories)")}
        self._heads = KeyFilter()
        if "head" in cols:
            self._heads.load(self._conn.execute("SELECT DISTINCT head FROM trajectories WHERE head IS NOT NULL"))
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.read_only:  # (a read-only store refuses every write before it is queued)
            self._start_writer()

    async def aclose(self) -> None:
        await self._stop_writer()
        with self._readers_lock:
            for c in self._readers:
                c.close()
            self._readers.clear()
        self._conn.close()

    # ---- writes (router/net/store_writer.py queues them; the writer process runs SqliteWriter.write) --------
    def _retention_due(self) -> bool:
        return self.retention_s > 0 or 0 < self.max_bytes < self.payload_bytes

    def _session_turns(self, sid: str, after: int) -> list[bytes] | None:
        conn = self._reader()
        try:  # one statement, one snapshot: no row at all when the session has none
            rows = conn.execute("SELECT t.data FROM sessions s LEFT JOIN session_turns t ON t.session = s.id "
                                "AND t.turn > ? WHERE s.id = ? ORDER BY t.turn", (after, sid)).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"{self.name}: cannot read: {_describe(e)}") from None
        finally:
            self._release(conn)
        if not rows:
            return None
        return [r[0] for r in rows if r[0] is not None]

    async def session_turns(self, sid: str, after: int = -1) -> list[bytes] | None:
        return await trio.to_thread.run_sync(self._session_turns, sid, after)

    def meta_setdefault(self, key: str, value: str) -> str:
        """Synchronous, before the writer starts (startup only)."""
        if not self.read_only:
            self._conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return value if row is None else row[0]

    _child_module = "router.net.sqlite_writer"  # its writer process

    def _child_config(self) -> tuple:
        return str(self.path), self.sync, self.retention_s, self.max_bytes

    def _batch_done(self, ops: list[Op], outcome: dict) -> None:
        """On the event loop, when the writer process answered: what its retention passes deleted, then the rest."""
        if outcome["error"] is None:
            for op in ops:
                plan = op.result if op.kind == "maintain" else None
                if plan is not None and plan.delete:
                    self.rows -= len(plan.delete)
                    self.payload_bytes -= plan.freed_bytes
                    self.deleted += len(plan.delete)
                    self.deleted_unretrieved += plan.evicted_unretrieved
        self._committed(ops, **outcome)

    # ---- reads -------------------------------------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        with self._readers_lock:
            if self._readers:
                return self._readers.pop()
        if self.read_only:
            conn, _ = open_database(self.path)
            return conn
        return _connect(self.path, read_only=False)

    def _release(self, conn: sqlite3.Connection) -> None:
        with self._readers_lock:
            self._readers.append(conn)

    def _read_all(self, digest: bytes) -> list[bytes]:
        conn = self._reader()
        try:
            return [row[0] for row in conn.execute(
                "SELECT p.data FROM trajectories t JOIN payloads p ON p.id = t.id WHERE t.digest = ? ORDER BY t.id",
                (digest,))]
        finally:
            self._release(conn)

    async def _read_committed(self, digest: bytes) -> list[bytes]:
        return await trio.to_thread.run_sync(self._read_all, digest)

    def may_continue(self, head: int) -> bool:
        """Keys of the records stored before this process opened the store; its own writes it does not count
        (router/core/store.py TrajectoryStore.may_continue: the router remembers those it evicts)."""
        return head in self._heads

    def _candidates(self, heads: Sequence[int], max_len: int) -> list[tuple[int, int, bytes]]:
        conn = self._reader()
        try:
            out = []
            for head in heads:
                out += conn.execute("SELECT id, vlen, digest FROM trajectories WHERE head = ? AND vlen <= ? "
                                    "ORDER BY id DESC LIMIT 256", (head, max_len)).fetchall()
            return out
        finally:
            self._release(conn)

    async def prefix_candidates(self, heads: Sequence[int], max_len: int) -> list[tuple[int, int, bytes]]:
        return await trio.to_thread.run_sync(self._candidates, heads, max_len)

    def _by_ids(self, ids: Sequence[int]) -> list[bytes]:
        conn = self._reader()
        try:
            return [conn.execute("SELECT data FROM payloads WHERE id = ?", (i,)).fetchone()[0] for i in ids]
        finally:
            self._release(conn)

    async def get_ids(self, ids: Sequence[int]) -> list[StoredTrajectory]:
        return [wire.decode(b) for b in await trio.to_thread.run_sync(self._by_ids, list(ids))]

    def scan(self, *, unretrieved_only: bool) -> Iterator[tuple[int, StoredTrajectory]]:
        conn = self._reader()
        try:
            sql = ("SELECT t.id, p.data FROM trajectories t JOIN payloads p ON p.id = t.id"
                   + (" WHERE t.retrieved = 0" if unretrieved_only else "") + " ORDER BY t.id")
            for rid, blob in conn.execute(sql):
                yield rid, wire.decode(blob)
        finally:
            self._release(conn)

    def summary(self) -> tuple[float | None, float | None, int]:
        """(oldest created, newest created, stored tokens): offline statistics."""
        oldest, newest, tokens = self._conn.execute(
            "SELECT min(created), max(created), total(ntokens) FROM trajectories").fetchone()
        return oldest, newest, int(tokens)

    def session_counts(self) -> tuple[int, int]:
        """(stored sessions, stored turns): offline statistics."""
        try:
            sessions = self._conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
            turns = self._conn.execute("SELECT count(*) FROM session_turns").fetchone()[0]
        except sqlite3.OperationalError:  # a read-only store written before sessions were stored
            return 0, 0
        return int(sessions), int(turns)

    def apply_retention_now(self, now: float) -> RetentionPlan:
        """Offline (no writer process): one retention pass in its own transaction."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            plan = SqliteWriter(self._conn, retention_s=self.retention_s, max_bytes=self.max_bytes).apply_retention(
                now, frozenset())
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return plan

    def close_sync(self) -> None:
        """Close every connection (offline tools; the router uses aclose)."""
        with self._readers_lock:
            for c in self._readers:
                c.close()
            self._readers.clear()
        self._conn.close()

    def vacuum(self) -> None:
        self._conn.execute("VACUUM")
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ---- statistics --------------------------------------------------------------------------------
    def file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except OSError:
                pass
        return total

    def stats(self) -> StoreStats:
        return StoreStats(path=str(self.path), rows=self.rows, unretrieved=self.unretrieved,
                          payload_bytes=self.payload_bytes, file_bytes=self.file_bytes(),
                          pending_writes=self._pending_writes, writable=self.write_error is None,
                          write_error=self.write_error, commits=self.commits, deleted=self.deleted,
                          deleted_unretrieved=self.deleted_unretrieved)
