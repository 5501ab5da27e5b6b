"""The SQLite store's writing half, and its process: the schema, opening a database, and `SqliteWriter`, the SQL of
one group commit. The router runs `python -m router.net.sqlite_writer <fd>` (router/net/writer_process.py says why a
process); router/net/store_sqlite.py is the store around it (the queue, the reads, the statistics).

This module imports neither trio nor numpy, so the writer process starts in a fraction of the router's start-up.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path
from urllib.parse import quote

from router.core.store import RetentionPlan, RowInfo, SessionWrite, StoreOpenError, plan_retention
from router.net.writer_child import Op, serve

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


class SqliteWriter:
    """The write connection and the SQL of one group commit. The router runs it in its writer process (no thread of
    the router waits for its GIL: router/net/writer_process.py); the offline retention pass runs it in process."""

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
                if op.kind == "put":  # (QueuedStore._child_args: the records encoded by the router)
                    for digest, blob, created, version, ntokens, head, vlen in op.args:
                        cur = conn.execute(
                            "INSERT INTO trajectories (digest, created, retrieved, version, ntokens, nbytes, head, "
                            "vlen) VALUES (?, ?, 0, ?, ?, ?, ?, ?)",
                            (digest, created, version, ntokens, len(blob), head, vlen))
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


def _open_writer(config: tuple):
    path, sync, retention_s, max_bytes = config
    conn, reason = open_database(Path(path), sync=sync)
    if reason is not None:
        raise SystemExit(f"trajectory store {path}: {reason}")
    return SqliteWriter(conn, retention_s=retention_s, max_bytes=max_bytes).write


if __name__ == "__main__":  # the router's writer process (router/net/writer_process.py): `... FD`
    serve(_open_writer, int(sys.argv[1]))
