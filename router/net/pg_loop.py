"""PostgreSQL reads on the trio event loop, through libpq's nonblocking API (`psycopg.pq`, psycopg's documented
libpq wrapper): a query is sent, and the loop waits for the socket as for any other, instead of a worker thread
blocking on it.

Why not a thread: a router of a fleet asks the database once per request (a prompt's prefix keys, a session's
new turns), and a worker thread plus a thread-safe pool cost ~180-240 µs of router CPU per query where this costs
~90 µs (bench/bench_store_reads.py). Why not psycopg's async API (and psycopg_pool's async pool): they run on
asyncio only, and the router runs on trio. So the few connections are kept here: idle ones in a list, at most
`size` in use (a query waits for one), one query at a time on each. Each statement is prepared once per connection
(named after its place in `_names`) and then only executed: the server parses and plans it once, not per request
(the lookup a fleet makes for every `/generate` cost the database ~2x the CPU unprepared: BENCHMARKS.md §8).

Parameters go as text, except `bytes` (binary: bytea), lists of ints as array literals (`$1::bigint[]`); results
come back in binary and are decoded for the column types the store reads (bigint, integer, bytea). A connection
that breaks (the server restarted or went away) is dropped and the query tried once on a fresh one; a query cut
off by its deadline drops its connection too (its answer may still be on the way).

Writes (`query(..., retry=False)`: the PostgreSQL store's trajectory inserts, router/net/store_pg.py) are never sent
twice: a write whose connection broke may have committed, so it fails instead. So that a database restart does not
fail the first write after it, an idle connection is checked before a write is sent on it: one on which anything
arrived meanwhile (a closing server's notice, the end of its socket) is replaced (one `poll` with no wait).
"""

from __future__ import annotations

import select

import psycopg
import trio
from psycopg import pq

_DECODE = {
    20: lambda v: int.from_bytes(v, "big", signed=True),  # bigint
    23: lambda v: int.from_bytes(v, "big", signed=True),  # integer
    17: bytes,  # bytea
}


class QueryFailed(Exception):
    """The database answered the query with an error, or could not be reached: the reason, on one line."""


class _Broken(Exception):
    pass


def _describe(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join((text or "").split()) or "the connection failed"


def _param(p) -> tuple[bytes | None, int]:
    """(value, format): text, except bytes (binary)."""
    if p is None:
        return None, 0
    if isinstance(p, bytes):
        return p, 1
    if isinstance(p, (list, tuple)):
        return ("{" + ",".join(map(str, map(int, p))) + "}").encode(), 0
    return str(p).encode(), 0


def _still_open(pg: pq.PGconn) -> bool:
    """Whether an idle connection may take a write. Nothing arrives on a healthy idle connection (these connections
    neither LISTEN nor change settings after they are made); a server closing it (a restart, an administrator's
    termination) sends a notice, then the end of the socket. So anything waiting to be read retires it."""
    poller = select.poll()  # (not select.select: a busy router's descriptors pass 1024)
    poller.register(pg.socket, select.POLLIN)
    return not poller.poll(0) and pg.status == pq.ConnStatus.OK


class LoopConnections:
    def __init__(self, conninfo: str, *, size: int = 8, settings: dict[str, str] | None = None) -> None:
        """`settings`: run-time parameters SET on each new connection (the writes' `synchronous_commit`)."""
        self._info = conninfo
        self._settings = dict(settings or {})
        self._idle: list[psycopg.Connection] = []  # queried through their libpq connection (`.pgconn`) only
        self._slots = trio.Semaphore(size)
        self._names: dict[bytes, bytes] = {}  # statement -> its prepared name (the same on every connection)
        self._prepared: dict[psycopg.Connection, set[bytes]] = {}  # connection -> the names prepared on it

    async def query(self, sql: bytes, params: tuple = (), *, retry: bool = True) -> list[tuple]:
        """The rows of one query (QueryFailed). Bound it with a cancel scope: cancelled, its connection goes.
        `retry=False` for a write: not sent again after its connection broke (it may have committed)."""
        values, formats = zip(*map(_param, params)) if params else ((), ())
        try:  # a free slot is taken without a checkpoint: the query yields to the loop while it waits anyway
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            return await self._query(sql, values, formats, retry)
        finally:
            self._slots.release()

    async def _query(self, sql: bytes, values, formats, retry: bool) -> list[tuple]:
        for attempt in range(2):
            conn = None
            while self._idle and conn is None:
                conn = self._idle.pop()
                if not retry and not _still_open(conn.pgconn):
                    self._drop(conn)
                    conn = None
            if conn is None:
                conn = await self._connect()
            name = self._names.get(sql)
            if name is None:  # (not setdefault: that would format a name on every query)
                name = self._names[sql] = b"miles_router_%d" % len(self._names)
            try:
                prepared = self._prepared.setdefault(conn, set())
                if name not in prepared:
                    await self._run(conn.pgconn, lambda pg: pg.send_prepare(name, sql))
                    prepared.add(name)
                rows = await self._run(conn.pgconn, lambda pg: pg.send_query_prepared(
                    name, list(values), param_formats=list(formats), result_format=1))
            except _Broken as e:  # the server restarted or went away: the idle connections went with it
                self._drop(conn)
                self.close()
                if attempt or not retry:
                    raise QueryFailed(str(e)) from None
                continue
            except BaseException:  # an error answer keeps the connection usable; anything else does not
                pg = conn.pgconn
                if pg.status == pq.ConnStatus.OK and pg.transaction_status == pq.TransactionStatus.IDLE:
                    self._idle.append(conn)
                else:
                    self._drop(conn)
                raise
            self._idle.append(conn)
            return rows
        raise AssertionError("unreachable")

    async def _connect(self) -> psycopg.Connection:
        # psycopg's connect (bounded by the conninfo's connect_timeout), in a thread: connections are made rarely
        # (at the first queries, and after the database came back). Not libpq's PQconnectdb: it holds the GIL
        # while it waits for a server that does not answer, which would stop the event loop with it.
        try:
            conn = await trio.to_thread.run_sync(self._connect_sync, abandon_on_cancel=True)
        except psycopg.Error as e:
            raise QueryFailed(_describe(str(e))) from None
        conn.pgconn.nonblocking = 1
        return conn

    def _connect_sync(self) -> psycopg.Connection:
        conn = psycopg.connect(self._info, autocommit=True)
        # Every statement here is an index lookup whose generic plan is the right one. Left to choose (`auto`),
        # the server keeps planning the array-parameter statements anew at each execution, since its generic
        # cost estimate is higher: the fleet's per-request lookup then cost the server ~120 µs instead of ~50
        # (bench/bench_store_reads.py). PostgreSQL 11 and older lack the setting.
        try:
            conn.execute("SET plan_cache_mode = force_generic_plan")
        except psycopg.errors.UndefinedObject:
            pass
        for name, value in self._settings.items():
            conn.execute(f"SET {name} = {value}")
        return conn

    def _drop(self, conn: psycopg.Connection) -> None:
        self._prepared.pop(conn, None)
        conn.close()

    @staticmethod
    async def _run(conn: pq.PGconn, send) -> list[tuple]:
        """Send one command (`send(conn)`) and read its results to the end: the rows of a query."""
        results = []
        try:
            send(conn)
            while conn.flush():
                await trio.lowlevel.wait_writable(conn.socket)
            while True:
                conn.consume_input()
                while not conn.is_busy():
                    res = conn.get_result()
                    if res is None:
                        break
                    results.append(res)
                else:
                    await trio.lowlevel.wait_readable(conn.socket)
                    continue
                break
        except psycopg.OperationalError as e:
            raise _Broken(_describe(str(e))) from None
        rows: list[tuple] = []
        for res in results:
            if res.status == pq.ExecStatus.TUPLES_OK:
                decode = [_DECODE[res.ftype(c)] for c in range(res.nfields)]
                for r in range(res.ntuples):
                    row = []
                    for c, d in enumerate(decode):
                        v = res.get_value(r, c)
                        row.append(None if v is None else d(v))
                    rows.append(tuple(row))
            elif res.status != pq.ExecStatus.COMMAND_OK:
                message = _describe(res.error_message)
                if conn.status != pq.ConnStatus.OK:
                    raise _Broken(message)
                raise QueryFailed(message)
        return rows

    def close(self) -> None:
        while self._idle:
            self._drop(self._idle.pop())
