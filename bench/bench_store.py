"""Durable trajectory store benchmark: what durability costs, bytes on disk, restart time vs store size.

    python bench/bench_store.py                      # throughput (c=64, 2 rounds x 3 modes, 8 s each) + bytes/token
    python bench/bench_store.py --workload shared-system   # the RL norm: one long system prompt, c=16, Qwen vocab
    python bench/bench_store.py --workload shared-system --compare-ref HEAD~1   # also the router as of a commit
    python bench/bench_store.py --restart-gb 0.25,1,4  # also: restart time on generated stores of these sizes
    python bench/bench_store.py --pg                 # also the PostgreSQL store (a throwaway local cluster)
    python bench/bench_store.py --pg --pg-alone      # also PostgreSQL owned by one router (store.shared = false)
    python bench/bench_store.py --pg --processes 1,2 # the PostgreSQL points with 1 and with 2 router processes
    python bench/bench_store.py --workload sessions --pg   # agents' chat turns on /sessions (per-turn cost)
    python bench/bench_store.py --quick              # 4 s per point, 1 round

Throughput: a real router process (`python -m router --config <tmp toml>`, radix-cache pipeline, log level
warning) in front of two simulated SGLang workers in their own processes (`python -m router sim-worker`, tiny
vocabulary, no latency), loaded by a separate client process with `--concurrency` keep-alive connections sending
`/generate {"text": <unique prompt>, max_new_tokens 32}`; every reply is checked (status 200). Modes, alternated
within each round so drift hits all of them alike:
  * memory: `[store] enabled = false` (the cache only, as before the store existed);
  * off:    the store with `sync = "off"` (written in the background, nobody waits);
  * commit: the store with `sync = "commit"` (fsync per group commit; the reply waits for it);
  * with --pg, pg-off and pg-commit: the same two over the PostgreSQL store (`[store] url`), on a throwaway
    cluster started from Debian's binaries (tests/pg.py; its own process, same disk, `fsync` on), a fresh
    database per point (not prefilled); or on `--pg-url URL` (a database the bench may create tables in). The
    store is `shared` (a fleet's: every prompt key past the memory cache's match is looked up in the database);
  * with --pg-alone, pg1-off and pg1-commit: the same with `store.shared = false` (one router owns the database;
    this checkout only: a --compare-ref older than the key has no such mode).
  * with --processes N,...: each pg-* point once per N, the router run with `[server] processes = N` (N router
    processes on the port under one supervisor; this checkout only). The SQLite, memory-only and pg1-* modes serve
    one process (the router refuses N > 1 over a store it cannot share), so they run with N = 1 only.
Router CPU per request = utime+stime of the router process (from /proc; with several processes, the supervisor's
and all its router processes') / requests completed.

`--workload shared-system` is the RL norm instead: every prompt is the same ~2 KB ChatML system prompt
(`<|im_start|>system ...`) followed by a distinct question, real Qwen vocabulary (builtin:qwen, router and worker),
64 new tokens with logprobs, c=16, one simulated worker in its own process; modes memory and commit (`--modes`
picks others). Each store point starts on a store already holding `--prefill` (default 20,000) earlier
trajectories of the same workload (an RL run's earlier steps; written once per router version through the record
format, keyed by that version's own code). Every prompt then shares its first ~2 KB with every stored trajectory,
which is what a store lookup keyed on a prompt's head must not pay for. It prints the store's cost as router CPU
per request, commit / memory (target <= 1.25x): the median over rounds of each round's own ratio (the points of a
round run minutes apart at most, so a shared host's drift between rounds cancels out), with their range and the
ratio of the two modes' medians.

`--slices K` (default 4 for `shared-system`, 1 for the others) measures each round's points in K slices instead of
one: every point's router is started first, then each is loaded for `--seconds` / K at a time (each slice after its
own 1 s warm-up), K times, the order reversed in every other slice. A point's figures are its slices' sums. On a
shared host whose speed drifts by 10-30% from one point to the next (the memory-only point alone read 979-1,354 µs
per request within one 6-round run), adjacent slices a few seconds apart see nearly the same host, so each round's
ratio carries much less of the drift.

`--workload sessions` is agents on /sessions instead: each of c=16 connections is one agent at a time, POST
/sessions, 8 chat turns (`/sessions/{id}/v1/chat/completions`, the same ~2 KB system prompt, the simulator's reply
and a short tool result appended each turn), then DELETE; one "request" is one turn (the create and delete calls
are in the CPU but not counted), so router CPU per request is the per-turn cost.

`--pin` runs the router on CPU 0 alone and this script, the simulated worker, the load generator and the PostgreSQL
server on the other CPUs (a host where the router's core is its own; the store's writer process shares it).

`--compare-ref GITREF` also runs the router as of GITREF (a temporary git worktree) in the same run, its modes
alternating with this checkout's: an A/B of a change.
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
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import gitref  # bench/gitref.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PROCS: list[subprocess.Popen] = []


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def spawn(cmd, log, repo: str = REPO, cpus: set[int] | None = None) -> subprocess.Popen:
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    p = subprocess.Popen(cmd, cwd=repo, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, "PYTHONPATH": repo}, preexec_fn=pin)
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


def cpu_seconds(pid: int, stat: str = "stat") -> float:
    """utime + stime of a process (all its threads, exited ones included), or of one thread with
    stat=f"task/{tid}/stat" (the main thread's id is the pid)."""
    with open(f"/proc/{pid}/{stat}") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return found


def router_cpu(pid: int, processes: int) -> tuple[float, float, int]:
    """(CPU seconds of the router, of its event loop threads, their context switches so far): the router process and
    its children (the SQLite store's writer process; with --processes, the supervisor's router processes and
    theirs)."""
    loops = [pid] if processes == 1 else children(pid)
    pids = [pid, *children(pid)]
    if processes > 1:
        pids += [c for p in loops for c in children(p)]
    return (sum(cpu_seconds(p) for p in pids), sum(cpu_seconds(p, f"task/{p}/stat") for p in loops),
            sum(context_switches(p) for p in loops))


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of a process's main thread (its event loop)."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")))


def wait_processes(port: int, n: int, timeout: float = 60.0) -> None:
    """Until n different router processes answered /health, each on a new connection."""
    seen, t0 = set(), time.perf_counter()
    while len(seen) < n:
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"only {len(seen)} of {n} router processes answered on port {port}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                seen.add(json.loads(r.read())["pid"])
        except OSError:
            time.sleep(0.01)


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


# The shared-system workload's system prompt: one long instruction block every request starts with (~2 KB).
SYSTEM_PROMPT = (
    "<|im_start|>system\nYou are a meticulous mathematical reasoning assistant trained with reinforcement learning. "
    "For every problem you receive, think step by step before answering. First restate the problem in your own "
    "words and list the quantities it gives, with their units. Then decide which relations connect them: rates "
    "and times, ratios and proportions, areas and volumes, probabilities of independent events, or modular "
    "arithmetic. Write each intermediate result on its own line, keep exact fractions until the end, and check "
    "the units of every quantity you compute. When a problem can be solved in more than one way, prefer the "
    "shortest argument that is still fully rigorous, and mention a second method only when it verifies the first. "
    "Never guess: if the problem is ambiguous, say which reading you chose and why. If a step needs a known "
    "theorem, name it. Avoid rounding until the last step, and then round to the precision the problem asks for. "
    "Your final line must be of the form `Answer: <value>` with the value alone, no units and no explanation, so "
    "that an automatic grader can compare it with the reference. Answers that do not follow this format receive "
    "no reward even when the reasoning is correct. Keep the whole reply under four hundred words. Do not repeat "
    "the problem statement verbatim, do not apologise, and do not address the user by name. Treat every problem "
    "as independent of the previous ones. Use plain text for formulas (for example 3/4 * (x + 2)), never LaTeX. "
    "If the problem contains a mistake that makes it unsolvable, explain the mistake in one sentence and answer "
    "`Answer: none`. Think carefully, be concise, and be correct.<|im_end|>\n")


def shared_system_prompt(tag: str, conn: int, seq: int) -> str:
    a, b = (seq * 7919 + conn * 104729) % 997, (seq * 31 + conn) % 89 + 2
    return (f"{SYSTEM_PROMPT}<|im_start|>user\nProblem {tag}.{conn}.{seq}: a train covers {a} km in {b} hours at a "
            f"constant speed. How far does it travel in {b + 3} hours, and what is its speed in m/s?<|im_end|>\n"
            "<|im_start|>assistant\n")


def unique_prompt(tag: str, conn: int, seq: int) -> str:
    return f"[{tag}-{conn}-{seq}] Write a short note about item {seq * 7919 % 1000}."


def session_messages(tag: str, conn: int, seq: int) -> list[dict]:
    """An agent's first messages (the sessions workload): a system prompt and a task of its own."""
    return [{"role": "system", "content": SYSTEM_PROMPT.removeprefix("<|im_start|>system\n").removesuffix(
                "<|im_end|>\n")},
            {"role": "user", "content": f"Task {tag}.{conn}.{seq}: plan the next step, then call a tool."}]


SESSION_TURNS = 8  # chat turns per session in the sessions workload (then DELETE and a new session)


WORKLOADS = {
    # unique prompts (their heads differ), tiny vocabulary, two workers: BENCHMARKS.md section 5's first table
    "unique": dict(prompt=unique_prompt, tokenizer="builtin:tiny", workers=2, concurrency=64, new_tokens=32,
                   modes=("memory", "off", "commit"), prefill=0, slices=1),
    # the RL norm: one long shared system prompt, a distinct question, real Qwen vocabulary (issue 19 item 6)
    "shared-system": dict(prompt=shared_system_prompt, tokenizer="builtin:qwen", workers=1, concurrency=16,
                          new_tokens=64, modes=("memory", "commit"), prefill=20_000, slices=4),
    # agents on /sessions (issue 19 item 7's per-turn cost): each connection is one agent at a time, 8 chat turns
    # per session (a ~2 KB system prompt; the simulator's chat replies end by themselves, 10-100 tokens; a tool
    # result back), then DELETE
    "sessions": dict(prompt=session_messages, tokenizer="builtin:qwen", workers=1, concurrency=16, new_tokens=400,
                     modes=("memory", "commit"), prefill=0, slices=1),
}


def router_config(tmp: str, port: int, sims: list[int], mode: str, store_path: str, *, repo: str = REPO,
                  tokenizer: str = "builtin:tiny", processes: int = 1) -> str:
    path = os.path.join(tmp, f"router-{mode}-{port}.toml")
    if mode == "memory":
        store = 'enabled = false'
    elif mode.startswith(("pg-", "pg1-")):  # store_path is a database URL
        store = f'url = "{store_path}"\nsync = "{mode.split("-", 1)[1]}"'
        if mode.startswith("pg1-"):
            store += "\nshared = false"
    else:
        store = f'path = "{store_path}"\nsync = "{mode}"'

    with open(path, "w") as f:
        f.write(f"""[server]
port = {port}
log_level = "warning"
{f"processes = {processes}" if processes > 1 else ""}
[workers]
urls = [{", ".join(f'"http://127.0.0.1:{p}"' for p in sims)}]
[tokenizer]
path = "{tokenizer}"
[store]
{store}
[[routes]]
path = "/generate"
pipeline = "{repo}/pipelines/radix-cache.toml"
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
    ap.add_argument("--workload", default="unique")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rate", type=float, default=0.0)
    a = ap.parse_args(argv)
    prompt = WORKLOADS[a.workload]["prompt"]
    counts = {"ok": 0, "bad": 0}

    async def conn(i: int, measuring: list) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", a.port)
        buf = b""
        seq = 0
        interval = a.concurrency / a.rate if a.rate else 0.0  # each connection's share of --rate
        due = trio.current_time() + interval * i / a.concurrency

        async def call(method: bytes, path: bytes, body: bytes = b"") -> tuple[int, bytes]:
            nonlocal buf
            await stream.send_all(b"%s %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                  b"content-length: %d\r\n\r\n%s" % (method, path, len(body), body))
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(65536)
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = int(next((l.split(b":")[1] for l in head.split(b"\r\n")
                               if l.lower().startswith(b"content-length")), 0))  # none: 204
            while len(buf) < length:
                buf += await stream.receive_some(65536)
            reply, buf = buf[:length], buf[length:]
            return int(head[9:12]), reply

        async def agent() -> None:
            """One session: SESSION_TURNS chat turns (each counted), then DELETE."""
            nonlocal seq
            status, reply = await call(b"POST", b"/sessions")
            sid = json.loads(reply)["session_id"].encode()
            messages = prompt(a.tag, i, seq)
            seq += 1
            for turn in range(SESSION_TURNS):
                status, reply = await call(b"POST", b"/sessions/%s/v1/chat/completions" % sid, json.dumps(
                    {"messages": messages, "max_tokens": a.new_tokens, "temperature": 1.0}).encode())
                if measuring[0]:
                    counts["ok" if status == 200 else "bad"] += 1
                if status != 200:
                    break
                messages = messages + [json.loads(reply)["choices"][0]["message"],
                                       {"role": "user", "content": f"Tool result {turn}: 42 rows, 3 columns."}]
            await call(b"DELETE", b"/sessions/%s" % sid)

        while True:
            if interval:
                await trio.sleep_until(due)
                due = max(due + interval, trio.current_time() - interval)  # behind schedule: no burst to catch up
            if a.workload == "sessions":
                await agent()
                continue
            body = json.dumps({"text": prompt(a.tag, i, seq), "sampling_params": {"max_new_tokens": a.new_tokens},
                               "return_logprob": True}).encode()
            seq += 1
            status, _ = await call(b"POST", b"/generate", body)
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


def is_pg(mode: str) -> bool:
    return mode.startswith(("pg-", "pg1-"))


def measure(tmp: str, sims: list[int], mode: str, args, round_: int, repo: str = REPO, label: str = "",
            processes: int = 1) -> dict:
    """One point: a fresh router (from `repo`; `processes` router processes) in `mode`, loaded for args.seconds
    after a 1 s warm-up."""
    point = start_point(tmp, sims, mode, args, round_, repo, label, processes)
    try:
        load_point(point, args, args.seconds, "")
    except BaseException:
        stop(point["router"])
        raise
    return finish_point(point, args)


def start_point(tmp: str, sims: list[int], mode: str, args, round_: int, repo: str, label: str,
                processes: int) -> dict:
    """A fresh router for one point, serving (not loaded yet)."""
    port = free_port()
    name = mode + label
    store_path = args.pg_database() if is_pg(mode) else os.path.join(tmp, f"store-{name}-{round_}.db")
    if mode in ("off", "commit") and args.prefill:
        shutil.copyfile(prefilled(tmp, repo, label, args.prefill), store_path)
    work = WORKLOADS[args.workload]
    cfg = router_config(tmp, port, sims, mode, store_path, repo=repo, tokenizer=work["tokenizer"],
                        processes=processes)
    router = spawn([sys.executable, "-m", "router", "--config", cfg], os.path.join(tmp, f"router-{name}.log"), repo,
                   cpus=args.router_cpus)
    point = dict(mode=mode, label=label, round=round_, port=port, store_path=store_path, router=router,
                 processes=processes, ok=0, bad=0, elapsed=0.0, cpu=0.0, main=0.0, switches=0, db={})
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        wait_processes(port, processes)
    except BaseException:
        stop(router)
        raise
    return point


def load_point(point: dict, args, seconds: float, slice_tag: str) -> None:
    """Load the point's router for `seconds` after a 1 s warm-up, adding the requests and the router's CPU to it."""
    mode, label, router, processes = point["mode"], point["label"], point["router"], point["processes"]
    work = WORKLOADS[args.workload]
    client = subprocess.Popen([sys.executable, __file__, "_load", "--port", str(point["port"]), "--concurrency",
                               str(args.concurrency), "--seconds", str(seconds), "--warmup", "1.0",
                               "--tag", f"{mode}{point['round']}{label.replace('@', '-')}{slice_tag}",
                               "--workload", args.workload, "--new-tokens", str(work["new_tokens"]),
                               "--rate", str(args.rate)], stdout=subprocess.PIPE, cwd=REPO)
    PROCS.append(client)
    time.sleep(1.0)  # the client's warm-up
    (c0, main0, sw0), d0 = router_cpu(router.pid, processes), server_cpu(args)
    out, _ = client.communicate(timeout=seconds + 60)
    (c1, main1, sw1), d1 = router_cpu(router.pid, processes), server_cpu(args)
    res = json.loads(out)
    point.update(ok=point["ok"] + res["ok"], bad=point["bad"] + res["bad"], elapsed=point["elapsed"] + res["elapsed"],
                 cpu=point["cpu"] + c1 - c0, main=point["main"] + main1 - main0,
                 switches=point["switches"] + sw1 - sw0)
    if is_pg(mode) and d0 is not None:  # the database server's own work (in-process for SQLite)
        for pid, t in d1.items():
            point["db"][pid] = point["db"].get(pid, 0.0) + t - d0.get(pid, 0.0)


def finish_point(point: dict, args) -> dict:
    """The point's figures (its router's group commits read from /metrics), its router stopped."""
    mode, store_path = point["mode"], point["store_path"]
    res = {}
    try:
        if mode != "memory":  # group commit as the router saw it (summed over processes: `process` labels)
            with urllib.request.urlopen(f"http://127.0.0.1:{point['port']}/metrics", timeout=5) as r:
                m: dict[str, float] = {}
                for name_, value in re.findall(r"^(miles_router_store_\w+(?:_sum|_count))(?:\{[^}]*\})? (\S+)$",
                                               r.read().decode(), re.M):
                    m[name_] = m.get(name_, 0.0) + float(value)
            commits = m.get("miles_router_store_commit_seconds_count", 0.0) or 1.0
            res.update(batch=m["miles_router_store_batch_records_sum"] / commits,
                       commit_ms=1e3 * m["miles_router_store_commit_seconds_sum"] / commits)
    finally:
        stop(point["router"])
    ok = max(point["ok"], 1)
    res.update(mode=mode, label=point["label"], round=point["round"], ok=point["ok"], bad=point["bad"],
               elapsed=point["elapsed"], rps=point["ok"] / max(point["elapsed"], 1e-9), cpu_us=point["cpu"] * 1e6 / ok,
               main_us=point["main"] * 1e6 / ok, switches=point["switches"] / ok)
    if is_pg(mode) and args.cluster is not None:
        res["db_cpu_us"] = sum(point["db"].values()) * 1e6 / ok
    if mode == "commit" and args.workload != "sessions":  # (session turns are not trajectories)
        conn = sqlite3.connect(store_path)
        rows, tokens, payload = conn.execute(
            "SELECT count(*), total(ntokens), total(nbytes) FROM trajectories").fetchone()
        conn.close()
        files = sum(os.path.getsize(store_path + s) for s in ("", "-wal", "-shm") if os.path.exists(store_path + s))
        res.update(rows=rows, tokens=tokens, record_bytes_per_token=payload / tokens,
                   file_bytes_per_token=files / tokens)
    for s in ("", "-wal", "-shm"):
        if os.path.exists(store_path + s):
            os.unlink(store_path + s)
    return res


def prefilled(tmp: str, repo: str, label: str, n: int) -> str:
    """A store holding n earlier trajectories of the shared-system workload, written once per router version (each
    keys texts its own way), copied for each point."""
    path = os.path.join(tmp, f"prefill{label.replace('@', '-')}.db")
    if not os.path.exists(path):
        subprocess.run([sys.executable, __file__, "_prefill", "--repo", repo, "--path", path, "--n", str(n)],
                       check=True, cwd=repo)
    return path


def paired_ratios(results: list[dict], mode: str, base: str, label: str) -> list[float]:
    """Router CPU per request of `mode` over `base`, per round: the points of a round run within a minute or two, so
    the machine's drift between rounds (±10-25% on a shared host) mostly cancels out of each ratio."""
    cpu = {(x["mode"], x["round"]): x["cpu_us"] for x in results if x["label"] == label}
    return [cpu[mode, r] / cpu[base, r] for (m, r) in sorted(cpu) if m == mode and (base, r) in cpu]


def sliced_round(tmp: str, sims: list[int], args, round_: int, points: list) -> list[dict]:
    """One round with --slices K: every point's router started first, then each loaded for args.seconds / K at a
    time, K times, the points' order reversed in every other slice, so that a shared host's drift at the scale of
    seconds hits every point alike (a router that is not loaded meanwhile idles)."""
    started = []
    try:
        for mode, repo, label, n in points:
            started.append(start_point(tmp, sims, mode, args, round_, repo, label, n))
        for k in range(args.slices):
            for point in started if k % 2 == 0 else started[::-1]:
                load_point(point, args, args.seconds / args.slices, f"s{k}")
    except BaseException:
        for point in started:
            stop(point["router"])
        raise
    return [finish_point(point, args) for point in started]


def throughput(tmp: str, sims: list[int], args, targets: list[tuple[str, str, int]]) -> None:
    """Every mode of every target (this checkout, --processes' counts of it for the PostgreSQL modes, and
    --compare-ref's), alternated within each round (reversed in odd rounds) so drift on a shared machine hits all
    of them alike; then the medians and the ratios."""
    modes = args.modes
    results = []
    for r in range(args.rounds):
        # N > 1 processes: the shared PostgreSQL modes only; pg1-*: this checkout's single process only
        points = [(m, repo, label, n) for m in modes for label, repo, n in targets
                  if (n == 1 or m.startswith("pg-")) and not (label and m.startswith("pg1-"))]
        ordered = points if r % 2 == 0 else points[::-1]
        if args.slices > 1:
            done = sliced_round(tmp, sims, args, r, ordered)
        else:
            done = (measure(tmp, sims, mode, args, r, repo, label, n) for mode, repo, label, n in ordered)
        for res in done:
            results.append(res)
            extra = (f"  {res['batch']:.1f} trajectories/commit, {res['commit_ms']:.2f} ms/commit"
                     if "batch" in res else "")
            if "db_cpu_us" in res:
                extra += f", database server {res['db_cpu_us']:.0f} µs/req"
            name = res["mode"] + res["label"]
            print(f"round {r} {name:>14}: {res['rps']:7.0f} req/s  router {res['cpu_us']:6.0f} µs/req "
                  f"(event loop thread {res['main_us']:.0f}, {res['switches']:.2f} context switches)  "
                  f"bad {res['bad']}{extra}", flush=True)
    measured = {(x["mode"], x["label"]) for x in results}

    def median(key: str) -> dict:
        return {(m, lb): statistics.median(x[key] for x in results if (x["mode"], x["label"]) == (m, lb))
                for m, lb in measured}

    med, cpu, main = median("rps"), median("cpu_us"), median("main_us")
    base = "memory" if "memory" in modes else modes[0]

    def who(label: str) -> str:
        return (label[1:] if label.startswith("@") else f"this checkout, {label[1:]} processes" if label
                else "this checkout")

    print(f"\n| router | mode | req/s (median) | router CPU µs/req | of it, event loop thread(s) | CPU vs {base} | "
          f"req/s vs {base} |\n|---|---|---|---|---|---|---|")
    for label, _, _ in targets:
        for m in (m for m in modes if (m, label) in measured):
            vs = ((f"{cpu[m, label] / cpu[base, label]:.2f}×", f"{med[m, label] / med[base, label]:.2f}×")
                  if (base, label) in measured else ("–", "–"))  # N processes: no memory-only point to compare
            print(f"| {who(label)} | {m} | {med[m, label]:.0f} | {cpu[m, label]:.0f} | "
                  f"{main[m, label]:.0f} | {vs[0]} | {vs[1]} |")
    print()
    for label, _, n in targets:
        if n > 1:
            for m in modes:
                if (m, label) in measured:
                    print(f"{m}: {n} router processes / 1: throughput {med[m, label] / med[m, '']:.2f}×, router CPU "
                          f"per request {cpu[m, label] / cpu[m, '']:.2f}× ({cpu[m, label]:.0f} vs {cpu[m, '']:.0f} µs)")
            continue
        name = who(label)
        if "commit" in modes and "off" in modes:
            print(f"{name}: commit/off throughput {med['commit', label] / med['off', label]:.2f}× (target >= 0.8)")
        for c in ("commit", "pg-commit", "pg1-commit"):
            if (c, label) in measured and "memory" in modes:
                paired = paired_ratios(results, c, "memory", label)
                print(f"{name}: store cost, router CPU per request {c}/memory {statistics.median(paired):.2f}× "
                      f"(target <= 1.25; the median of {len(paired)} rounds' ratios, each of two points of one "
                      f"round: {min(paired):.2f}-{max(paired):.2f}×; ratio of the medians "
                      f"{cpu[c, label] / cpu['memory', label]:.2f}×), "
                      f"throughput {med[c, label] / med['memory', label]:.2f}×")
    if args.pg:
        if args.cluster is not None:
            db = {(m, lb): statistics.median(x["db_cpu_us"] for x in results if (x["mode"], x["label"]) == (m, lb))
                  for m, lb in sorted(measured) if is_pg(m) and not lb.startswith("@")}
            print("PostgreSQL server CPU per request (its own processes, not in the router's): "
                  + ", ".join(f"{m}{f' ({lb[1:]} processes)' if lb else ''} {v:.0f} µs" for (m, lb), v in db.items()))
        for m in ("off", "commit"):
            if m in modes and "pg-" + m in modes:
                print(f"PostgreSQL vs SQLite, router CPU per request, sync={m}: "
                      f"{cpu['pg-' + m, ''] / cpu[m, '']:.2f}× ({cpu['pg-' + m, ''] - cpu[m, '']:+.0f} µs); "
                      f"throughput {med['pg-' + m, ''] / med[m, '']:.2f}×")
            if "pg1-" + m in modes and "pg-" + m in modes:
                print(f"PostgreSQL shared (a fleet's) vs one router's (shared = false), router CPU per request, "
                      f"sync={m}: {cpu['pg-' + m, ''] / cpu['pg1-' + m, '']:.2f}× "
                      f"({cpu['pg-' + m, ''] - cpu['pg1-' + m, '']:+.0f} µs); throughput "
                      f"{med['pg-' + m, ''] / med['pg1-' + m, '']:.2f}×")
    for ref, _, _ in targets:
        if not ref.startswith("@"):
            continue
        for m in (m for m in modes if (m, ref) in measured):
            print(f"{m}: router CPU per request, this checkout / {ref[1:]}: {cpu[m, ''] / cpu[m, ref]:.2f}×")
    commits = [x for x in results if x["mode"] == "commit" and not x["label"] and "rows" in x]
    if commits:
        c = commits[-1]
        print(f"bytes on disk per token (no R3): records {c['record_bytes_per_token']:.2f} B, whole file "
              f"{c['file_bytes_per_token']:.2f} B  ({c['rows']} trajectories, {c['tokens']:.0f} tokens)")


# ------------------------------------------------------------------ restart vs store size
def record_blob(tokens_per: int, prompt: int) -> bytes:
    """One trajectory in the store's record format (random ids and logprobs), as the router on sys.path writes it."""
    import numpy as np

    from router.wire import store as wire

    rng = np.random.default_rng(0)
    return wire.encode(wire.pack(
        rid="x", created=time.time(), prompt_len=prompt, finish="stop", worker=None, weight_version="v1",
        versions=["v1"], tokens=rng.integers(0, 151000, tokens_per).astype(np.int32),
        logprobs=rng.normal(size=tokens_per).astype(np.float32),
        loss_mask=np.r_[np.zeros(prompt, np.uint8), np.ones(tokens_per - prompt, np.uint8)], experts=None))


def write_records(path: str, n: int, text_of, blob: bytes, tokens_per: int) -> None:
    """Write n copies of `blob` straight into a store, the i-th under the visible text text_of(i), keyed as the
    router on sys.path keys texts."""
    from router.core.radix import text_digest
    from router.core.store import text_head
    from router.net.store_sqlite import open_database

    conn, _ = open_database(__import__("pathlib").Path(path), sync="off")
    for start in range(0, n, 5000):
        conn.execute("BEGIN")
        for i in range(start, min(n, start + 5000)):
            text = text_of(i)
            cur = conn.execute("INSERT INTO trajectories (digest, created, retrieved, version, ntokens, nbytes, head, "
                               "vlen) VALUES (?, ?, 0, 'v1', ?, ?, ?, ?)",
                               (text_digest(text), time.time(), tokens_per, len(blob), text_head(text), len(text)))
            conn.execute("INSERT INTO payloads (id, data) VALUES (?, ?)", (cur.lastrowid, blob))
        conn.execute("COMMIT")
    conn.close()


def generate_store(path: str, gigabytes: float, tokens_per: int = 1000) -> tuple[int, str]:
    blob = record_blob(tokens_per, min(200, tokens_per // 2))
    n = int(gigabytes * 1e9 / len(blob))
    # every text its own 64-byte prefix key (the worst case for startup, which loads the distinct keys)
    write_records(path, n, _stored_text, blob, tokens_per)
    return n, _stored_text(n // 2).decode()


def prefill_main(argv) -> None:
    """`_prefill --repo R --path P --n N`: N earlier trajectories of the shared-system workload (the system prompt,
    a question, a ~400-byte answer), keyed by the router in R (its own prefix-key scheme)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo")
    ap.add_argument("--path")
    ap.add_argument("--n", type=int)
    a = ap.parse_args(argv)
    sys.path.insert(0, a.repo)
    answer = "The speed is the distance over the time, so the train covers the same distance every hour. "
    write_records(a.path, a.n, lambda i: (shared_system_prompt("earlier", i % 16, i) + answer * 4).encode(),
                  record_blob(520, 456), 520)


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
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="unique",
                    help="unique: unique prompts, tiny vocabulary, c=64; shared-system: one long system prompt, "
                         "Qwen vocabulary, 64 tokens out, c=16")
    ap.add_argument("--modes", help="comma-separated of memory,off,commit (default: the workload's)")
    ap.add_argument("--concurrency", type=int, help="default: the workload's (64 unique, 16 shared-system)")
    ap.add_argument("--prefill", type=int,
                    help="trajectories already in the store when each store point starts (default: 20000 for "
                         "shared-system, earlier steps of an RL run behind the same system prompt; 0 for unique)")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="offer this many requests/s in total (each connection paced) instead of a closed loop: "
                         "CPU per request compared at equal throughput (0 = closed loop, the default)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--slices", type=int,
                    help="default: the workload's (4 shared-system, 1 the others). K > 1: each round starts every point's router first, then loads each for --seconds / K "
                         "at a time, K times, alternating (each slice after its own 1 s warm-up): drift on a shared "
                         "host at the scale of seconds then hits every point alike")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compare-ref", metavar="GITREF",
                    help="also measure the router as of GITREF (a temporary git worktree) in the same run")
    ap.add_argument("--pg", action="store_true", help="also measure the PostgreSQL store (pg-off, pg-commit) on a "
                                                       "throwaway local cluster (Debian's postgresql package)")
    ap.add_argument("--pg-url", help="with --pg: this database instead of a throwaway cluster")
    ap.add_argument("--pg-alone", action="store_true",
                    help="with --pg: also PostgreSQL owned by one router (store.shared = false: pg1-off, pg1-commit)")
    ap.add_argument("--processes", default="1", metavar="N,...",
                    help="with --pg: measure each shared PostgreSQL mode (pg-*) with each of these router process "
                         "counts (`[server] processes`), e.g. 1,2")
    ap.add_argument("--restart-gb", default="", help="comma-separated store sizes in GB for the restart table")
    ap.add_argument("--restart-tokens", type=int, default=1000, help="tokens per generated trajectory")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--tmp", help="folder for stores and logs (default: a new temp folder)")
    ap.add_argument("--pin", action="store_true",
                    help="the router on CPU 0 alone; this script, the simulated worker, the load generator and the "
                         "PostgreSQL server on the others (a host where the router's core is its own)")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 4.0, 1
    work = WORKLOADS[args.workload]
    args.concurrency = args.concurrency or work["concurrency"]
    args.slices = args.slices or work["slices"]
    args.modes = tuple(args.modes.split(",")) if args.modes else work["modes"]
    args.prefill = work["prefill"] if args.prefill is None else args.prefill
    if not set(args.modes) <= {"memory", "off", "commit"}:
        ap.error(f"--modes: {args.modes} (known: memory, off, commit)")
    args.processes = [int(n) for n in args.processes.split(",")]
    if max(args.processes) > 1 and not args.pg:
        ap.error("--processes above 1 needs --pg (the SQLite store and memory-only modes serve one process)")
    if args.pg:  # the store modes again, over PostgreSQL (shared, and with --pg-alone one router's)
        store_modes = [m for m in args.modes if m != "memory"]
        args.modes += tuple("pg-" + m for m in store_modes)
        if args.pg_alone:
            args.modes += tuple("pg1-" + m for m in store_modes)
    args.router_cpus = {0} if args.pin else None  # --pin: the routers' CPUs
    if args.pin:  # before anything starts: every process but the routers inherits the other CPUs
        others = os.sched_getaffinity(0) - args.router_cpus
        if not others:
            ap.error("--pin needs at least 2 CPUs")
        os.sched_setaffinity(0, others)
    tmp = args.tmp or tempfile.mkdtemp(prefix="bench_store_")
    os.makedirs(tmp, exist_ok=True)
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
    targets = [("", REPO, 1)] + [(f"x{n}", REPO, n) for n in args.processes if n > 1]
    if args.compare_ref:
        ref_repo = gitref.worktree(REPO, args.compare_ref, os.path.join(tmp, "compare_ref"))
        targets.append(("@" + args.compare_ref, ref_repo, 1))
    sims = [free_port() for _ in range(work["workers"])]
    for i, p in enumerate(sims):
        spawn([sys.executable, "-m", "router", "sim-worker", "--port", str(p), "--tokenizer", work["tokenizer"],
               "--seed", str(i)], os.path.join(tmp, f"sim{i}.log"))
    for p in sims:
        wait_http(f"http://127.0.0.1:{p}/health")
    print(f"# bench_store.py --workload {args.workload}  (c={args.concurrency}"
          f"{', router pinned to CPU 0' if args.pin else ''}"
          f"{f', paced to {args.rate:g} req/s' if args.rate else ''}, {args.seconds:g} s per point"
          f"{f' in {args.slices} slices' if args.slices > 1 else ''}, "
          f"{args.rounds} round(s), {args.prefill} trajectories in the store at the start of each store point; "
          f"logs in {tmp})")
    try:
        if not args.skip_throughput:
            throughput(tmp, sims, args, targets)
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
    elif len(sys.argv) > 1 and sys.argv[1] == "_prefill":
        prefill_main(sys.argv[2:])
    else:
        raise SystemExit(main())
