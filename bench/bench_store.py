"""Durable trajectory store benchmark: what durability costs, bytes on disk, restart time vs store size.

    python bench/bench_store.py                      # throughput (c=64, 2 rounds x 3 modes, 8 s each) + bytes/token
    python bench/bench_store.py --restart-gb 0.25,1,4  # also: restart time on generated stores of these sizes
    python bench/bench_store.py --quick              # 4 s per point, 1 round
    python bench/bench_store.py --pg                 # also the PostgreSQL store (a throwaway local cluster)

Throughput: a real router process (`python -m router --config <tmp toml>`, radix-cache pipeline, log level
warning) in front of two simulated SGLang workers in their own processes (`python -m router sim-worker`, tiny
vocabulary, no latency), loaded by a separate client process with `--concurrency` keep-alive connections sending
`/generate {"text": <unique prompt>, max_new_tokens 32}`; every reply is checked (status 200). Modes, alternated
within each round so drift hits all of them alike:
  * memory: `[store] enabled = false` (the cache only, as before the store existed);
  * off:    the store with `sync = "off"` (written by the writer thread, nobody waits);
  * commit: the store with `sync = "commit"` (fsync per group commit; the reply waits for it);
  * with --pg, pg-off and pg-commit: the same two over the PostgreSQL store (`[store] url`), on a throwaway
    cluster started from Debian's binaries (tests/pg.py; its own process, same disk, `fsync` on), a fresh
    database per point; or on `--pg-url URL` (a database the bench may create tables in).
Router CPU per request = utime+stime of the router process (from /proc) / requests completed.
Bytes on disk per token: the commit run's store (record bytes, and whole-file bytes incl. SQLite's index and
free pages) / stored tokens (prompt + output).

Restart: a store of N GB is generated directly through the store's record format (`--restart-tokens` per
trajectory, default 1,000, no routed experts: ~8 KB each; every text >= 64 bytes with its own prefix key, the worst
case for the one thing startup loads, the distinct prefix keys), then the router is started on it and timed until
`/health` answers and until the first exact `/retrieve_from_text` of a stored trajectory (read back from disk),
and its RSS is read once it is ready. An empty store is the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PROCS: list[subprocess.Popen] = []


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def spawn(cmd, log) -> subprocess.Popen:
    p = subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, "PYTHONPATH": REPO})
    PROCS.append(p)
    return p


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_http(url: str, timeout: float = 60.0, check=lambda b: True) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200 and check(r.read()):
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(args) -> dict[int, float] | None:
    """CPU seconds of the local PostgreSQL server's processes (the postmaster and its children), by pid."""
    if args.cluster is None:
        return None
    root = int((args.cluster.data / "postmaster.pid").read_text().split()[0])
    out = {root: cpu_seconds(root)}
    for stat in os.listdir("/proc"):
        try:
            with open(f"/proc/{stat}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == root:
                    out[int(stat)] = cpu_seconds(int(stat))
        except (OSError, ValueError, IndexError):
            continue
    return out


def router_config(tmp: str, port: int, sims: list[int], mode: str, store_path: str) -> str:
    path = os.path.join(tmp, f"router-{mode}-{port}.toml")
    if mode == "memory":
        store = 'enabled = false'
    elif mode.startswith("pg-"):  # store_path is a database URL
        store = f'url = "{store_path}"\nsync = "{mode[3:]}"'
    else:
        store = f'path = "{store_path}"\nsync = "{mode}"'
    with open(path, "w") as f:
        f.write(f"""[server]
port = {port}
log_level = "warning"
[workers]
urls = [{", ".join(f'"http://127.0.0.1:{p}"' for p in sims)}]
[tokenizer]
path = "builtin:tiny"
[store]
{store}
[[routes]]
path = "/generate"
pipeline = "{REPO}/pipelines/radix-cache.toml"
""")
    return path


# ------------------------------------------------------------------ load client (its own process)
def load_main(argv) -> None:
    import trio

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    ap.add_argument("--concurrency", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--warmup", type=float)
    ap.add_argument("--tag")
    a = ap.parse_args(argv)
    counts = {"ok": 0, "bad": 0}

    async def conn(i: int, measuring: list) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", a.port)
        buf = b""
        seq = 0
        while True:
            body = json.dumps({"text": f"[{a.tag}-{i}-{seq}] Write a short note about item {seq * 7919 % 1000}.",
                               "sampling_params": {"max_new_tokens": 32}, "return_logprob": True}).encode()
            seq += 1
            await stream.send_all(b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(65536)
            head, _, buf = buf.partition(b"\r\n\r\n")
            status = int(head[9:12])
            length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
            while len(buf) < length:
                buf += await stream.receive_some(65536)
            buf = buf[length:]
            if measuring[0]:
                counts["ok" if status == 200 else "bad"] += 1

    async def main():
        measuring = [False]
        async with trio.open_nursery() as n:
            for i in range(a.concurrency):
                n.start_soon(conn, i, measuring)
            await trio.sleep(a.warmup)
            measuring[0] = True
            t0 = time.perf_counter()
            await trio.sleep(a.seconds)
            measuring[0] = False
            counts["elapsed"] = time.perf_counter() - t0
            n.cancel_scope.cancel()

    trio.run(main)
    print(json.dumps(counts))


def measure(tmp: str, sims: list[int], mode: str, args, round_: int) -> dict:
    port = free_port()
    store_path = args.pg_database() if mode.startswith("pg-") else os.path.join(tmp, f"store-{mode}-{round_}.db")
    cfg = router_config(tmp, port, sims, mode, store_path)
    router = spawn([sys.executable, "-m", "router", "--config", cfg], os.path.join(tmp, f"router-{mode}.log"))
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        client = subprocess.Popen([sys.executable, __file__, "_load", "--port", str(port), "--concurrency",
                                   str(args.concurrency), "--seconds", str(args.seconds), "--warmup", "1.0",
                                   "--tag", f"{mode}{round_}"], stdout=subprocess.PIPE, cwd=REPO)
        PROCS.append(client)
        time.sleep(1.0)  # the client's warm-up
        c0, d0 = cpu_seconds(router.pid), server_cpu(args)
        out, _ = client.communicate(timeout=args.seconds + 60)
        c1, d1 = cpu_seconds(router.pid), server_cpu(args)
        res = json.loads(out)
        if mode != "memory":  # group commit as the router saw it
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                m = dict(re.findall(r"^(miles_router_store_\w+(?:_sum|_count)) (\S+)$", r.read().decode(), re.M))
            commits = float(m.get("miles_router_store_commit_seconds_count", 0)) or 1.0
            res.update(batch=float(m["miles_router_store_batch_records_sum"]) / commits,
                       commit_ms=1e3 * float(m["miles_router_store_commit_seconds_sum"]) / commits)
    finally:
        stop(router)
    res.update(mode=mode, rps=res["ok"] / res["elapsed"], cpu_us=(c1 - c0) * 1e6 / max(res["ok"], 1))
    if mode.startswith("pg-") and d0 is not None:  # the database server's own work (in-process for SQLite)
        res["db_cpu_us"] = sum(t - d0.get(pid, 0.0) for pid, t in d1.items()) * 1e6 / max(res["ok"], 1)
    if mode == "commit":
        conn = sqlite3.connect(store_path)
        rows, tokens, payload = conn.execute("SELECT count(*), total(ntokens), total(nbytes) FROM trajectories").fetchone()
        conn.close()
        files = sum(os.path.getsize(store_path + s) for s in ("", "-wal", "-shm") if os.path.exists(store_path + s))
        res.update(rows=rows, tokens=tokens, record_bytes_per_token=payload / tokens, file_bytes_per_token=files / tokens)
    for s in ("", "-wal", "-shm"):
        if os.path.exists(store_path + s):
            os.unlink(store_path + s)
    return res


# ------------------------------------------------------------------ restart vs store size
def generate_store(path: str, gigabytes: float, tokens_per: int = 1000) -> tuple[int, str]:
    import numpy as np

    from router.core.radix import text_digest
    from router.core.store import text_head
    from router.net.store_sqlite import open_database
    from router.wire import store as wire

    conn, _ = open_database(__import__("pathlib").Path(path), sync="off")
    rng = np.random.default_rng(0)
    prompt = min(200, tokens_per // 2)
    rec = wire.pack(rid="x", created=time.time(), prompt_len=prompt, finish="stop", worker=None, weight_version="v1",
                    versions=["v1"], tokens=rng.integers(0, 151000, tokens_per).astype(np.int32),
                    logprobs=rng.normal(size=tokens_per).astype(np.float32),
                    loss_mask=np.r_[np.zeros(prompt, np.uint8), np.ones(tokens_per - prompt, np.uint8)], experts=None)
    blob = wire.encode(rec)
    n = int(gigabytes * 1e9 / len(blob))
    batch = 5000
    for start in range(0, n, batch):
        ids = range(start, min(n, start + batch))
        conn.execute("BEGIN")
        for i in ids:
            # every text its own 64-byte prefix key (the worst case for startup, which loads the distinct keys)
            text = _stored_text(i)
            cur = conn.execute("INSERT INTO trajectories (digest, created, retrieved, version, ntokens, nbytes, head, "
                               "vlen) VALUES (?, ?, 0, 'v1', ?, ?, ?, ?)",
                               (text_digest(text), time.time(), tokens_per, len(blob), text_head(text), len(text)))
            conn.execute("INSERT INTO payloads (id, data) VALUES (?, ?)", (cur.lastrowid, blob))
        conn.execute("COMMIT")
    conn.close()
    return n, _stored_text(n // 2).decode()


def _stored_text(i: int) -> bytes:
    return f"stored text {i:09d}: a generated trajectory's visible text, long enough for a prefix key.".encode()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def restart_time(tmp: str, sims: list[int], store_path: str, probe_text: str | None
                 ) -> tuple[float, float | None, float]:
    port = free_port()
    cfg = router_config(tmp, port, sims, "commit", store_path)
    t0 = time.perf_counter()
    router = spawn([sys.executable, "-m", "router", "--config", cfg], os.path.join(tmp, "router-restart.log"))
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=600)
        ready = time.perf_counter() - t0
        rss = _rss_mb(router.pid)
        first = None
        if probe_text is not None:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/retrieve_from_text",
                                         data=json.dumps({"text": probe_text}).encode(), method="POST")
            with urllib.request.urlopen(req, timeout=60) as r:
                got = json.loads(r.read())
            assert got["exact"] and got["match"] == "trajectory", got["match"]
            first = time.perf_counter() - t0
        return ready, first, rss
    finally:
        stop(router)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--restart-gb", default="", help="comma-separated store sizes in GB for the restart table")
    ap.add_argument("--restart-tokens", type=int, default=1000, help="tokens per generated trajectory")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--tmp", help="folder for stores and logs (default: a new temp folder)")
    ap.add_argument("--pg", action="store_true", help="also measure the PostgreSQL store (pg-off, pg-commit) on a "
                                                       "throwaway local cluster (Debian's postgresql package)")
    ap.add_argument("--pg-url", help="with --pg: this database instead of a throwaway cluster")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 4.0, 1
    tmp = args.tmp or tempfile.mkdtemp(prefix="bench_store_")
    os.makedirs(tmp, exist_ok=True)
    sims = [free_port() for _ in range(2)]
    for i, p in enumerate(sims):
        spawn([sys.executable, "-m", "router", "sim-worker", "--port", str(p), "--tokenizer", "builtin:tiny",
               "--seed", str(i)], os.path.join(tmp, f"sim{i}.log"))
    for p in sims:
        wait_http(f"http://127.0.0.1:{p}/health")
    print(f"# bench_store.py  (c={args.concurrency}, {args.seconds:g} s per point, {args.rounds} round(s); "
          f"logs in {tmp})")
    modes = ["memory", "off", "commit"] + (["pg-off", "pg-commit"] if args.pg else [])
    cluster = None
    if args.pg and not args.pg_url:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from pg import TempCluster  # tests/pg.py: initdb + pg_ctl in a temp folder

        cluster = TempCluster()
        cluster.start()
        args.pg_database = lambda: cluster.create_database("bench")
    else:
        args.pg_database = lambda: args.pg_url
    args.cluster = cluster
    try:
        if not args.skip_throughput:
            results = []
            for r in range(args.rounds):
                for mode in modes if r % 2 == 0 else modes[::-1]:
                    res = measure(tmp, sims, mode, args, r)
                    results.append(res)
                    extra = (f"  {res['batch']:.1f} trajectories/commit, {res['commit_ms']:.2f} ms/commit"
                             if "batch" in res else "")
                    if "db_cpu_us" in res:
                        extra += f", database server {res['db_cpu_us']:.0f} µs/req"
                    print(f"round {r} {mode:>9}: {res['rps']:7.0f} req/s  router {res['cpu_us']:6.0f} µs/req  "
                          f"bad {res['bad']}{extra}", flush=True)
            med = {m: statistics.median(x["rps"] for x in results if x["mode"] == m) for m in modes}
            cpu = {m: statistics.median(x["cpu_us"] for x in results if x["mode"] == m) for m in modes}
            print("\n| mode | req/s (median) | router CPU µs/req | vs off |\n|---|---|---|---|")
            for m in modes:
                print(f"| {m} | {med[m]:.0f} | {cpu[m]:.0f} | {med[m] / med['off']:.2f}× |")
            c = [x for x in results if x["mode"] == "commit"][-1]
            print(f"\ncommit/off throughput: {med['commit'] / med['off']:.2f}× (target >= 0.8)")
            if args.pg:
                if args.cluster is not None:
                    db = {m: statistics.median(x["db_cpu_us"] for x in results if x["mode"] == m)
                          for m in ("pg-off", "pg-commit")}
                    print(f"PostgreSQL server CPU per request (its own processes, not in the router's): "
                          f"pg-off {db['pg-off']:.0f} µs, pg-commit {db['pg-commit']:.0f} µs")
                print(f"PostgreSQL vs SQLite, router CPU per request: sync=commit "
                      f"{cpu['pg-commit'] / cpu['commit']:.2f}× ({cpu['pg-commit'] - cpu['commit']:+.0f} µs), sync=off "
                      f"{cpu['pg-off'] / cpu['off']:.2f}× ({cpu['pg-off'] - cpu['off']:+.0f} µs); throughput: commit "
                      f"{med['pg-commit'] / med['commit']:.2f}×, off {med['pg-off'] / med['off']:.2f}×")
            print(f"bytes on disk per token (no R3): records {c['record_bytes_per_token']:.2f} B, whole file "
                  f"{c['file_bytes_per_token']:.2f} B  ({c['rows']} trajectories, {c['tokens']:.0f} tokens)")
        if args.restart_gb:
            print(f"\n{args.restart_tokens}-token trajectories\n"
                  "| store | trajectories | file size | ready (/health) | first exact retrieve from disk | router RSS "
                  "when ready |\n|---|---|---|---|---|---|")
            path = os.path.join(tmp, "empty.db")
            ready, _, rss = restart_time(tmp, sims, path, None)
            print(f"| empty | 0 | {os.path.getsize(path) / 1e6:.1f} MB | {ready:.2f} s | – | {rss:.0f} MB |", flush=True)
            for gb in (float(x) for x in args.restart_gb.split(",")):
                path = os.path.join(tmp, f"gen-{gb:g}.db")
                t0 = time.perf_counter()
                n, probe = generate_store(path, gb, args.restart_tokens)
                gen_s = time.perf_counter() - t0
                ready, first, rss = restart_time(tmp, sims, path, probe)
                print(f"| {gb:g} GB | {n} | {os.path.getsize(path) / 1e9:.2f} GB | {ready:.2f} s | {first:.2f} s | "
                      f"{rss:.0f} MB |  (generated in {gen_s:.0f} s)", flush=True)
                os.unlink(path)
    finally:
        for p in PROCS:
            stop(p)
        if cluster is not None:
            cluster.destroy()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        load_main(sys.argv[2:])
    else:
        raise SystemExit(main())
