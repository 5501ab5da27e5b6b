"""The embedded trajectory store: SQLite (the standard library's sqlite3) in WAL mode.

One writer owns the write connection: `SqliteWriter`, in a process of its own (`python -m router.net.store_sqlite`,
started and restarted by the router: router/net/writer_process.py says why not a thread). The router queues writes
as the PostgreSQL store does (router/net/store_writer.py; this module is the SQL). The writer takes everything
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
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

import trio

from router.core.store import (KeyFilter, RetentionPlan, RowInfo, SessionWrite, StoreError, StoreOpenError,
                               StoreStats, plan_retention)
from router.net.store_writer import QueuedStore
from router.net.writer_process import Op, serve
from router.wire import store as wire
from router.wire.store import StoredTrajectory

log = logging.getLogger("miles_router")

SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trajectories (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL,
    created REAL NOT NULL,
    retrieved INTEGER NOT NULL DEFAULT 0,
    version TEXT,
    ntokens INTEGER NOT NULL,
    nbytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS trajectories_digest ON trajectories (digest);
CREATE INDEX IF NOT EXISTS trajectories_created ON trajectories (created);
CREATE TABLE IF NOT EXISTS payloads (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, created REAL NOT NULL, data BLOB, last_used REAL);
CREATE TABLE IF NOT EXISTS session_turns (
    session TEXT NOT NULL,
    turn INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (session, turn)
) WITHOUT ROWID;
"""


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _connect(path: Path, *, read_only: bool, immutable: bool = False) -> sqlite3.Connection:
    if read_only:
        uri = f"file:{quote(str(path))}?mode=ro" + ("&immutable=1" if immutable else "")
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10.0)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
    return conn


def open_database(path: Path, *, sync: str = "commit") -> tuple[sqlite3.Connection, str | None]:
    """Open (creating if needed) the store at `path`: (connection, None) when writable, or a read-only
    connection and the reason writes are impossible. Raises StoreOpenError when it cannot be read at all."""
    name = f"trajectory store {path}"
    if not path.parent.is_dir():
        raise StoreOpenError(f"{name}: folder {path.parent} does not exist")
    writable = os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))
    try:
        if writable:
            conn = _connect(path, read_only=False)
            try:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if tables and "meta" not in tables:
                    raise StoreOpenError(f"{name}: not a miles-router store (it holds tables "
                                         f"{', '.join(sorted(tables))})")
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal":
                    raise StoreOpenError(f"{name}: cannot switch to WAL mode (journal_mode={mode})")
                conn.execute(f"PRAGMA synchronous={'FULL' if sync == 'commit' else 'NORMAL'}")
                conn.executescript(_SCHEMA)
                _check_schema(conn, name, create=True)
                _migrate(conn)
                return conn, None
            except sqlite3.OperationalError as e:
                if "readonly" not in str(e):
                    raise
                conn.close()
                writable = False
        if not path.exists():
            raise StoreOpenError(f"{name}: file does not exist and its folder is read-only")
        reason = "the store is read-only"
        for immutable in (False, True):  # a read-only WAL database without its -shm file needs immutable
            conn = _connect(path, read_only=True, immutable=immutable)
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError:
                conn.close()
                if immutable:
                    raise
                continue
            _check_schema(conn, name, create=False)
            return conn, reason
    except sqlite3.DatabaseError as e:
        raise StoreOpenError(f"{name}: cannot open: {_describe(e)}") from None
    raise AssertionError("unreachable")


def _check_schema(conn: sqlite3.Connection, name: str, *, create: bool) -> None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        conn.execute("SELECT id, digest, created, retrieved, version, ntokens, nbytes FROM trajectories LIMIT 0")
        conn.execute("SELECT id, data FROM payloads LIMIT 0")
    except sqlite3.OperationalError as e:
        raise StoreOpenError(f"{name}: not a miles-router store: {_describe(e)}") from None
    if row is None and create:
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
    elif row is None or row[0] != SCHEMA_VERSION:
        raise StoreOpenError(f"{name}: store schema {row[0] if row else '(none)'}, this router reads {SCHEMA_VERSION}")


def _migrate(conn: sqlite3.Connection) -> None:
    """Columns added after the first stores were written (ADD COLUMN: old rows get NULL, nothing is rewritten)."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(trajectories)")}
    for col in ("head", "vlen"):
        if col not in cols:
            conn.execute(f"ALTER TABLE trajectories ADD COLUMN {col} INTEGER")
    conn.execute("CREATE INDEX IF NOT EXISTS trajectories_head ON trajectories (head)")
    if "last_used" not in {r[1] for r in conn.execute("PRAGMA table_info(sessions)")}:
        conn.execute("ALTER TABLE sessions ADD COLUMN last_used REAL")
        # sessions stored before: used now, as a restart used to treat them (a fresh idle timer)
        conn.execute("UPDATE sessions SET last_used = ?", (time.time(),))


def check_openable(path: Path) -> str | None:
    """Startup check (before the event loop): raises StoreOpenError, or returns why it is read-only."""
    conn, reason = open_database(path)
    conn.close()
    return reason


class SqliteWriter:
    """The writing half of the store: the write connection and the SQL of one group commit. The router runs it in a
    process of its own (`python -m router.net.store_sqlite`, router/net/writer_process.py: no thread of the router
    waits for its GIL); the offline retention pass runs it in process."""

    def __init__(self, conn: sqlite3.Connection, *, retention_s: float, max_bytes: int) -> None:
        self._conn = conn
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.payload_bytes = int(conn.execute("SELECT total(nbytes) FROM trajectories").fetchone()[0])

    def write(self, batch: list[Op]) -> dict:
        """Write `batch` in one transaction (each op's `result` set) and return its outcome, the keywords of
        QueuedStore._committed."""
        conn = self._conn
        t0 = time.perf_counter()
        added = added_bytes = retrieved = records = 0
        error = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                if op.kind == "put":
                    for digest, rec, head, vlen in op.args:
                        blob = wire.encode(rec)
                        cur = conn.execute(
                            "INSERT INTO trajectories (digest, created, retrieved, version, ntokens, nbytes, head, "
                            "vlen) VALUES (?, ?, 0, ?, ?, ?, ?, ?)",
                            (digest, rec.created, rec.weight_version, rec.ntokens, len(blob), head, vlen))
                        conn.execute("INSERT INTO payloads (id, data) VALUES (?, ?)", (cur.lastrowid, blob))
                        added += 1
                        added_bytes += len(blob)
                    records += len(op.args)
                elif op.kind == "retrieved":
                    retrieved += conn.execute("UPDATE trajectories SET retrieved = 1 WHERE digest = ? AND retrieved = 0",
                                              (op.args,)).rowcount
                elif op.kind == "session":
                    op.result = self._write_session(conn, *op.args)
                    records += len(op.args[3])
                elif op.kind == "touch":
                    conn.execute("UPDATE sessions SET last_used = max(coalesce(last_used, created), ?) WHERE id = ?",
                                 (op.args[1], op.args[0]))
                elif op.kind == "session_delete":
                    conn.execute("DELETE FROM session_turns WHERE session = ?", (op.args,))
                    conn.execute("DELETE FROM sessions WHERE id = ?", (op.args,))
                elif op.kind == "session_expire":
                    before, keep = op.args[0], set(op.args[1])
                    gone = [sid for (sid,) in conn.execute(
                        "SELECT id FROM sessions WHERE coalesce(last_used, created) < ?", (before,)).fetchall()
                        if sid not in keep]
                    for sid in gone:
                        conn.execute("DELETE FROM session_turns WHERE session = ?", (sid,))
                        conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))
                    op.result = gone
                elif op.kind == "maintain":
                    op.result = self.apply_retention(*op.args)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            error = _describe(e)
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # no transaction left to roll back (SQLite rolled it back itself)
        unretrieved = None  # recounted after a retention pass deleted rows
        if error is None:
            self.payload_bytes += added_bytes
            for op in batch:
                plan = op.result if op.kind == "maintain" else None
                if plan is not None and plan.delete:
                    self.payload_bytes -= plan.freed_bytes
                    unretrieved = int(conn.execute("SELECT total(retrieved = 0) FROM trajectories").fetchone()[0])
        return dict(elapsed=time.perf_counter() - t0, records=records, error=error, added=added,
                    added_bytes=added_bytes, retrieved=retrieved, unretrieved=unretrieved)

    @staticmethod
    def _write_session(conn: sqlite3.Connection, sid: str, at: float, header: bytes | None,
                       turns: list[tuple[int, bytes]]) -> SessionWrite:
        if header is not None:
            conn.execute("INSERT INTO sessions (id, created, data, last_used) VALUES (?, ?, ?, ?) ON CONFLICT (id) "
                         "DO UPDATE SET data = excluded.data, last_used = max(coalesce(last_used, created), "
                         "excluded.last_used)", (sid, at, header, at))
        elif not conn.execute("UPDATE sessions SET last_used = max(coalesce(last_used, created), ?) WHERE id = ?",
                              (at, sid)).rowcount:
            return SessionWrite(gone=True)  # deleted or expired meanwhile: its turns must not bring it back
        taken = [t for t, blob in turns if not conn.execute(
            "INSERT OR IGNORE INTO session_turns (session, turn, data) VALUES (?, ?, ?)", (sid, t, blob)).rowcount]
        return SessionWrite(taken=tuple(taken))

    def apply_retention(self, now: float, stale_versions: frozenset) -> RetentionPlan:
        """One retention pass, in the caller's transaction."""
        conn = self._conn
        if self.max_bytes > 0 and self.payload_bytes > self.max_bytes:
            rows = conn.execute("SELECT id, created, retrieved, version, nbytes FROM trajectories")
        elif self.retention_s > 0:  # only what phase 1 may delete: old and retrieved or stale
            stale = sorted(v for v in stale_versions if v is not None)
            rows = conn.execute("SELECT id, created, retrieved, version, nbytes FROM trajectories "
                                f"WHERE created < ? AND (retrieved = 1 OR version IN ({','.join('?' * len(stale))}))",
                                (now - self.retention_s, *stale))
        else:
            return RetentionPlan()
        plan = plan_retention((RowInfo(i, c, bool(r), v, n) for i, c, r, v, n in rows), now=now,
                              total_bytes=self.payload_bytes, retention_s=self.retention_s, max_bytes=self.max_bytes,
                              stale_versions=stale_versions)
        for i in range(0, len(plan.delete), 500):
            chunk = [(x,) for x in plan.delete[i:i + 500]]
            conn.executemany("DELETE FROM trajectories WHERE id = ?", chunk)
            conn.executemany("DELETE FROM payloads WHERE id = ?", chunk)
        return plan


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

    _child_module = "router.net.store_sqlite"  # its writer process: _writer_main

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


def _open_writer(config: tuple):
    path, sync, retention_s, max_bytes = config
    conn, reason = open_database(Path(path), sync=sync)
    if reason is not None:
        raise SystemExit(f"trajectory store {path}: {reason}")
    return SqliteWriter(conn, retention_s=retention_s, max_bytes=max_bytes).write


if __name__ == "__main__":  # the router's writer process (router/net/writer_process.py): `... FD`
    serve(_open_writer, int(sys.argv[1]))
