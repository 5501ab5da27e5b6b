"""What a fleet's reads cost the router: the store calls a router makes on a shared (PostgreSQL) store that it skips
on a store it owns, timed one after another from a trio loop as the router makes them.

    python bench/bench_store_reads.py            # a throwaway PostgreSQL cluster (tests/pg.py) and an SQLite file
    python bench/bench_store_reads.py --pg-url postgresql://user@host/db   # a database the bench may write to

Calls, each `--calls` times after a warm-up, on stores holding `--rows` trajectories keyed like the shared-system
workload's (bench/bench_store.py) and one session of `--turns` turns:
  * prefix_candidates: the lookup a shared store makes for every `/generate` whose prompt goes past the memory
    cache's match (6 keys, none stored: a new question);
  * session_turns: the re-read before a session in memory is used (the turns after the last one known: none new);
  * get_all: the check of a retrieve the memory cache answered exactly (one record under the digest).
Printed per call: router CPU (the whole process, worker threads included), wall time and, on the throwaway
cluster, the PostgreSQL server's CPU (its processes share the router's cores). SQLite is shown for scale; a router
on SQLite (or `store.shared = false`) makes the first two only for what memory does not hold.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np
import trio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import bench_store  # noqa: E402  (bench/bench_store.py: the PostgreSQL server's CPU)
from router.core.radix import text_digest  # noqa: E402
from router.core.store import Keyed, text_head  # noqa: E402
from router.wire import store as wire  # noqa: E402


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def record(i: int) -> wire.StoredTrajectory:
    n = 600
    return wire.pack(rid=f"r{i}", created=time.time(), prompt_len=500, finish="stop", worker=None, weight_version="v",
                     versions=["v"], tokens=np.arange(n, dtype=np.int32), logprobs=np.zeros(n, np.float32),
                     loss_mask=np.r_[np.zeros(500, np.uint8), np.ones(100, np.uint8)], experts=None)


def server_seconds(args) -> float | None:
    """The local PostgreSQL server's CPU seconds; None for SQLite, or a database of --pg-url's (not on this host's
    books)."""
    cpu = bench_store.server_cpu(args)
    return sum(cpu.values()) if cpu else None


async def run(store, args) -> list[tuple[str, float, float, float | None]]:
    store.start()
    texts = [f"{'system prompt ' * 150} question {i}: reply {i}".encode() for i in range(args.rows)]
    for start in range(0, args.rows, 500):
        await store.put([Keyed(text_digest(t), record(i), text_head(t), len(t))
                         for i, t in enumerate(texts[start:start + 500], start)], wait=True)
    sid = "f" * 32
    await store.put_session(sid, time.time(), b"header", [], wait=True)
    await store.put_session(sid, time.time(), None, [(t, b"x" * 4000) for t in range(args.turns)], wait=True)
    heads = [0x1234_5678 + i for i in range(6)]
    digest = text_digest(texts[0])
    calls = {"prefix_candidates": lambda: store.prefix_candidates(heads, 3000),
             "session_turns": lambda: store.session_turns(sid, args.turns - 1),
             "get_all": lambda: store.get_all(digest)}
    out = []
    for name, call in calls.items():
        for _ in range(50):
            await call()
        c0, t0, s0 = cpu(), time.perf_counter(), server_seconds(args)
        for _ in range(args.calls):
            await call()
        s1 = server_seconds(args)
        out.append((name, (cpu() - c0) / args.calls * 1e6, (time.perf_counter() - t0) / args.calls * 1e6,
                    None if s0 is None else (s1 - s0) / args.calls * 1e6))
    await store.aclose()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pg-url", help="this database instead of a throwaway cluster")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--turns", type=int, default=20)
    args = ap.parse_args()
    from router.net.store_pg import PgStore
    from router.net.store_sqlite import SqliteStore

    cluster = None
    url = args.pg_url
    if url is None:
        from pg import TempCluster  # tests/pg.py: initdb + pg_ctl in a temp folder

        cluster = TempCluster()
        cluster.start()
        url = cluster.create_database("bench")
    try:
        args.cluster = cluster
        results = {"PostgreSQL": trio.run(run, PgStore(url), args)}
        args.cluster = None
        with tempfile.TemporaryDirectory() as tmp:
            results["SQLite"] = trio.run(run, SqliteStore(os.path.join(tmp, "reads.db")), args)
    finally:
        if cluster is not None:
            cluster.destroy()
    print(f"# bench_store_reads.py: {args.calls} calls each, {args.rows} trajectories, a session of {args.turns} "
          f"turns\n| call | store | router CPU µs/call | wall µs/call | database server CPU µs/call |\n"
          "|---|---|---|---|---|")
    for store, rows in results.items():
        for name, cpu_us, wall_us, server_us in rows:
            server = "–" if server_us is None else f"{server_us:.0f}"
            print(f"| {name} | {store} | {cpu_us:.0f} | {wall_us:.0f} | {server} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
