"""The networked trajectory store: PostgreSQL (psycopg 3; reads on the event loop through libpq's nonblocking API).

`[store] url = "postgresql://user@host/db"` selects it (router/net/store_open.py). Same record format
(router/wire/store.py, router/wire/session_store.py) and same guarantees as the SQLite store:

- **Trajectories and reads on the loop, the rest in a writer process.** psycopg's async API runs on asyncio only,
  and the router runs on trio. Reads, which a fleet makes once per request, and the trajectory records, which
  every persisting reply writes, go over libpq's nonblocking API on the event loop itself
  (router/net/pg_loop.py): the loop sends a statement and waits for its socket as for any other. A record's
  commit is then one round trip the loop waits on, not a hop to another process and that process's round
  trips: about half the router CPU per `/generate` the store cost through the writer process (BENCHMARKS.md
  §5: +247 µs over memory-only against +496). Everything else (session turns, retrieve marks, retention) uses
  psycopg's synchronous API in ONE writer (`PgWriter`, router/net/pg_writer.py with the schema, in a process of
  its own: router/net/writer_process.py) exactly as router/net/store_sqlite.py does; the event loop only sends
  it work and reads its answers.
- **Group commit.** Records that finish while a commit of records is in progress share the next one: ONE
  `INSERT` of all of them, its own transaction (`_write_records`). The writer process takes everything queued
  and writes it in ONE transaction (a pipeline, a single round trip). A retrieve mark of a record still being
  written waits for that record's commit (an earlier mark would find no row). `sync = "commit"`:
  `synchronous_commit = on` and the reply's end waits for the commit; `sync = "off"`: `synchronous_commit = off`
  and nobody waits (a read still sees records not yet committed).
- **The database away.** Every wait is bounded: connecting by `store.timeout_s`;
  a read, and a reply's wait for its commit, by `wait_s` = 2 × `timeout_s` + 1 s (the batch in progress, then its
  own). While the database cannot be reached, or stops answering, a write fails with StoreWriteError (the
  request: 503 naming the store) and a read with StoreError (503 too); the writer reconnects at its next batch,
  so writes resume as soon as the database is back, without a restart. A commit whose outcome is unknown (the
  connection broke during it) is reported as failed and not retried: the client got a 503, and the record may
  or may not be there, as for a request in flight at a crash.
- **Shared by several routers** (`store.shared`, the default). Ids come from an identity sequence; schema creation and
  retention take PostgreSQL advisory locks (one retention pass at a time across routers); nothing in the tables is
  process-local, and nothing in memory claims to know what other routers wrote: `may_continue` says "maybe" for
  every key (the prompt's keys the memory cache does not cover cost one indexed query, all keys at once), and a
  session in memory is brought up to date before use (its turns after the last one known: one indexed query). A
  batch that writes sessions first locks their rows, in id order (two routers' writers never deadlock), so a turn
  id is taken once (`INSERT ... ON CONFLICT DO NOTHING`, the loser told), a deleted or expired session gets no
  turns, and expiry skips a session some router is writing. The counters behind `stats()` are re-read from the
  database every `TOTALS_EVERY_S` by the retention pass. `store.shared = false` (one router owns the database)
  answers `may_continue` as SQLite does instead, from the keys stored before it started, and keeps no session
  up to date from the database.

Schema `miles_router` (created if missing): `trajectories` (one row per record, the blob in `data`, stored
out of line and uncompressed), `sessions` (with `last_used`, wall clock), `session_turns`, `meta`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Sequence

import trio

from router.core.store import KeyFilter, RetentionPlan, StoreError, StoreStats
from router.net.pg_loop import LoopConnections, QueryFailed
from router.net.pg_writer import (_CANDIDATES, _FILE_BYTES, _OWN_TRANSACTION, _SESSION_TURNS, _TABLES, PgWriter,
                                  conninfo, open_database, read_totals, redact)
from router.net.store_writer import QueuedStore
from router.net.writer_child import Op
from router.wire import store as wire
from router.wire.store import StoredTrajectory

log = logging.getLogger("miles_router")

MAX_RECORDS_PER_INSERT = 256
_INSERT_COLUMNS = (("digest", "bytea"), ("created", "float8"), ("version", "text"), ("ntokens", "integer"),
                   ("nbytes", "integer"), ("head", "bigint"), ("vlen", "integer"), ("data", "bytea"))


@functools.cache
def _insert_records(n: int) -> bytes:
    """The INSERT of `n` records (router/net/pg_loop.py prepares it once per connection and size)."""
    width = len(_INSERT_COLUMNS)
    rows = ", ".join("(" + ", ".join(f"${i * width + j + 1}::{t}" for j, (_, t) in enumerate(_INSERT_COLUMNS)) + ")"
                     for i in range(n))
    return (f"INSERT INTO miles_router.trajectories ({', '.join(c for c, _ in _INSERT_COLUMNS)}) VALUES {rows}"
            ).encode()


class PgStore(QueuedStore):
    """A TrajectoryStore (router/core/store.py) on a PostgreSQL database, shareable by several routers."""

    shared = True  # any router of a fleet may have written anything a moment ago (`store.shared`)

    def __init__(self, url: str, *, sync: str = "commit", retention_s: float = 0.0, max_bytes: int = 0,
                 metrics=None, timeout_s: float = 5.0, shared: bool = True) -> None:
        self.url = url
        self.path = redact(url)
        self.name = f"trajectory store {self.path}"
        self.sync = sync
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.wait_s = 2 * timeout_s + 1.0  # a reply's wait for its commit: the batch in progress, then its own
        # startup and offline work use this connection (the writer process has its own)
        self._conn, self.write_error = open_database(url, timeout_s=timeout_s, sync=sync)
        self._info = conninfo(url, timeout_s)
        self.read_only = self.write_error is not None
        self.rows, self.payload_bytes, self.unretrieved, self._file_bytes = read_totals(self._conn)
        self._init_queue()
        self.shared = shared
        self._heads = None
        if not shared:  # this router is the database's only writer: what `may_continue` needs is SQLite's
            self._heads = KeyFilter()
            with self._conn.cursor() as cur:
                cur.execute("SELECT DISTINCT head FROM miles_router.trajectories WHERE head IS NOT NULL")
                self._heads.load(cur)
        self._reads: LoopConnections | None = None
        self._writes: LoopConnections | None = None  # the records' connection (one: a commit at a time)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the writer process and the records' writer task; connections are made when first used."""
        self._reads = LoopConnections(self._info)
        if not self.read_only:  # (a read-only store refuses every write before it is queued)
            self._writes = LoopConnections(self._info, size=1, settings={
                "synchronous_commit": "on" if self.sync == "commit" else "off"})
            self._records: list[Op] = []  # puts queued for the next INSERT
            self._records_lot = trio.lowlevel.ParkingLot()
            self._marks_after: list[Op] = []  # retrieve marks of records not committed yet
            self._records_done = trio.Event()
            self._start_writer()
            trio.lowlevel.spawn_system_task(self._write_records, name=f"{self.name}: records")

    async def aclose(self) -> None:
        """Stop the writers after what is queued, within `wait_s`: a database that hangs must not hang the
        router's shutdown (a writer stuck in a commit is killed, what it had not answered fails)."""
        if self._writes is not None:
            self._closing = True
            self._records_lot.unpark_all()
            with trio.move_on_after(self.wait_s):
                await self._records_done.wait()
        if not await self._stop_writer(self.wait_s):
            log.warning("%s: the writer did not finish within %g s (the database does not answer); "
                        "stopped it", self.name, self.wait_s)
        self.close_sync()

    def close_sync(self) -> None:
        """Close the connections (offline tools; the router uses aclose)."""
        for loop_conns in (self._reads, self._writes):
            if loop_conns is not None:
                loop_conns.close()
        self._reads = self._writes = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ---- writes (router/net/store_writer.py queues them; the writer process runs PgWriter.write) -----------
    def _retention_due(self) -> bool:
        return True  # the pass also re-reads the totals other routers moved (PgWriter, every TOTALS_EVERY_S)

    _child_module = "router.net.pg_writer"

    def _child_args(self, op: Op) -> object:
        """A retention pass gets the router's payload total with it: the writer process does not see the records
        the loop writes."""
        if op.kind == "maintain":
            return (*op.args, self.payload_bytes)
        return op.args

    def _enqueue(self, op: Op) -> None:
        """Records go to the loop's INSERT (`_write_records`), everything else to the writer process; a retrieve
        mark of a record still being written waits for its commit."""
        if op.kind == "put":  # (a read-only store, which has no `_writes`, refuses every put before it is queued)
            self._records.append(op)
            self._records_lot.unpark_all()
        elif op.kind == "retrieved" and op.args in self._pending:
            self._marks_after.append(op)
        else:
            super()._enqueue(op)

    async def _write_records(self) -> None:
        """The records' group commit, on the event loop: whatever was queued while the last INSERT ran is the
        next one, ONE statement (its own transaction, flushed before its answer with `sync = "commit"`). An INSERT
        whose connection broke is not sent again (it may have committed): its records fail, as a commit whose
        outcome is unknown does in the writer process."""
        try:
            while True:
                if not self._records:
                    if self._closing:
                        return
                    await self._records_lot.park()
                    continue
                # at most MAX_RECORDS_PER_INSERT rows (whole operations): a statement has at most 65,535 parameters,
                # and each size is a statement prepared once per connection
                take = rows = 0
                for op in self._records:
                    if take and rows + len(op.args) > MAX_RECORDS_PER_INSERT:
                        break
                    rows, take = rows + len(op.args), take + 1
                batch, self._records = self._records[:take], self._records[take:]
                params: list = []
                added = added_bytes = 0
                for op in batch:
                    for r in op.args:  # the columns of _INSERT_COLUMNS
                        blob = wire.encode(r.record)
                        params += (r.digest, r.record.created, r.record.weight_version, r.record.ntokens, len(blob),
                                   r.head, r.vlen, blob)
                        added += 1
                        added_bytes += len(blob)
                t0, error = time.perf_counter(), None
                with trio.move_on_after(self.wait_s) as waited:
                    try:
                        await self._writes.query(_insert_records(added), tuple(params), retry=False)
                    except QueryFailed as e:
                        error = str(e)
                    except Exception as e:  # noqa: BLE001 - a bug fails these records, not the router
                        log.exception("%s: writing records failed", self.name)
                        error = f"{type(e).__name__}: {e}"
                if waited.cancelled_caught:
                    error = self._no_commit
                ok = error is None
                self._committed(batch, elapsed=time.perf_counter() - t0, records=added, error=error,
                                added=added if ok else 0, added_bytes=added_bytes if ok else 0)
                if self._marks_after:
                    marks, self._marks_after = self._marks_after, []
                    for op in marks:
                        self._enqueue(op)
        finally:
            self._records_done.set()

    def _child_config(self) -> tuple:
        return self._info, self.sync, self.retention_s, self.max_bytes, self.payload_bytes, self.name

    def _batch_done(self, ops: list[Op], outcome: dict) -> None:
        """On the event loop, when the writer process answered: the counters it re-read from the database (other
        routers' writes), what its retention passes deleted, then the batch's own writes (`_committed`) and the
        operations that ran in transactions of their own (each with its own result or error)."""
        totals = outcome.pop("totals")
        writes = [op for op in ops if op.kind not in _OWN_TRANSACTION]
        if writes:
            self._committed(writes, **outcome)
        if totals is not None:  # read after those writes: they are counted in it
            self.rows, self.payload_bytes, self.unretrieved, self._file_bytes = totals
        own = [op for op in ops if op.kind in _OWN_TRANSACTION]
        for op in own:
            plan = op.result if op.kind == "maintain" else None
            if plan is not None and plan.delete:
                self.deleted += len(plan.delete)
                self.deleted_unretrieved += plan.evicted_unretrieved
        self._finish(own)

    # ---- reads -------------------------------------------------------------------------------------
    async def _query(self, query: bytes, params: tuple) -> list[tuple]:
        """One query on the event loop (router/net/pg_loop.py), bounded like a write: a database that stopped
        answering (its connections open, nothing coming back) costs a request `wait_s`, then a StoreError."""
        with trio.move_on_after(self.wait_s):
            try:
                return await self._reads.query(query, params)
            except QueryFailed as e:
                raise StoreError(f"{self.name}: cannot read: {e}") from None
        raise StoreError(f"{self.name}: cannot read: no answer within {self.wait_s:g} s (the database does not answer)")

    async def _read_committed(self, digest: bytes) -> list[bytes]:
        rows = await self._query(b"SELECT data FROM miles_router.trajectories WHERE digest = $1 ORDER BY id",
                                 (digest,))
        return [r[0] for r in rows]

    def may_continue(self, head: int) -> bool:
        # shared: another router may have stored it a moment ago, only the database knows. Else: the keys stored
        # before this router started (its own it remembers itself)
        return self._heads is None or head in self._heads

    async def prefix_candidates(self, heads: Sequence[int], max_len: int) -> list[tuple[int, int, bytes]]:
        return await self._query(_CANDIDATES, (heads, max_len))

    async def get_ids(self, ids: Sequence[int]) -> list[StoredTrajectory]:
        rows = await self._query(b"SELECT id, data FROM miles_router.trajectories WHERE id = ANY($1::bigint[])",
                                 (ids,))
        by_id = {i: data for i, data in rows}
        missing = [i for i in ids if i not in by_id]
        if missing:  # deleted meanwhile (retention, here or in another router)
            raise StoreError(f"{self.name}: trajectories {missing[:5]} are no longer stored")
        return [wire.decode(by_id[i]) for i in ids]

    # ---- sessions ----------------------------------------------------------------------------------
    async def session_turns(self, sid: str, after: int = -1) -> list[bytes] | None:
        rows = await self._query(_SESSION_TURNS, (after, sid))
        if not rows:
            return None
        return [r[0] for r in rows if r[0] is not None]

    def meta_setdefault(self, key: str, value: str) -> str:
        """Synchronous, before the writer starts (startup only)."""
        if not self.read_only:
            self._conn.execute("INSERT INTO miles_router.meta (key, value) VALUES (%s, %s) "
                               "ON CONFLICT (key) DO NOTHING", (key, value))
        row = self._conn.execute("SELECT value FROM miles_router.meta WHERE key = %s", (key,)).fetchone()
        return value if row is None else row[0]

    # ---- offline (`miles-router store ...`: no writer process, the startup connection) --------------
    def scan(self, *, unretrieved_only: bool) -> Iterator[tuple[int, StoredTrajectory]]:
        sql = ("SELECT id, data FROM miles_router.trajectories" + (" WHERE NOT retrieved" if unretrieved_only else "")
               + " ORDER BY id")
        with self._conn.transaction(), self._conn.cursor(name="miles_router_scan") as cur:  # streamed
            cur.itersize = 256
            cur.execute(sql)
            for rid, blob in cur:
                yield rid, wire.decode(blob)

    def summary(self) -> tuple[float | None, float | None, int]:
        """(oldest created, newest created, stored tokens): offline statistics."""
        oldest, newest, tokens = self._conn.execute(
            "SELECT min(created), max(created), coalesce(sum(ntokens), 0) FROM miles_router.trajectories").fetchone()
        return oldest, newest, int(tokens)

    def session_counts(self) -> tuple[int, int]:
        """(stored sessions, stored turns): offline statistics."""
        sessions = self._conn.execute("SELECT count(*) FROM miles_router.sessions").fetchone()[0]
        turns = self._conn.execute("SELECT count(*) FROM miles_router.session_turns").fetchone()[0]
        return int(sessions), int(turns)

    def apply_retention_now(self, now: float) -> RetentionPlan:
        """Offline: one retention pass (if no router is applying one right now)."""
        writer = PgWriter(self._info, sync=self.sync, retention_s=self.retention_s, max_bytes=self.max_bytes,
                          payload_bytes=self.payload_bytes, name=self.name, conn=self._conn)
        plan = writer.apply_retention(now, frozenset())
        if plan.delete:
            self.rows, self.payload_bytes, self.unretrieved, self._file_bytes = writer._totals
            self.deleted += len(plan.delete)
            self.deleted_unretrieved += plan.evicted_unretrieved
        return plan

    def vacuum(self) -> None:
        """Plain VACUUM ANALYZE: frees dead rows' space for reuse without the exclusive lock of VACUUM FULL (routers
        may be using the database)."""
        for table in _TABLES:
            self._conn.execute(f"VACUUM ANALYZE miles_router.{table}")

    def file_bytes(self) -> int:
        """What the store's tables occupy (heap, TOAST, indexes), read now."""
        return int(self._conn.execute(_FILE_BYTES).fetchone()[0])

    # ---- statistics --------------------------------------------------------------------------------
    def stats(self) -> StoreStats:
        return StoreStats(path=self.path, rows=self.rows, unretrieved=self.unretrieved,
                          payload_bytes=self.payload_bytes, file_bytes=self._file_bytes,
                          pending_writes=self._pending_writes, writable=self.write_error is None,
                          write_error=self.write_error, commits=self.commits, deleted=self.deleted,
                          deleted_unretrieved=self.deleted_unretrieved)
