"""Routing policies under an agentic RL workload, on simulated workers that pay for overload (issue 20 item 6).

What runs (2-core box; every router is its own process, fresh for every run):
- 8 simulated SGLang workers with the batch latency model (`latency_model = "batch"`, router/sim/batch.py), in
  `--sim-procs` child processes: a decode step costs `--step-ms` + `--per-request-ms` per request in the batch +
  `--per-context-ns` per context token, prefill `--prefill-us` per uncached prompt token (cached ones
  `--cached-prefill-us`), at most `--max-running` requests in a batch (the rest queue). So a worker with more than
  its share is slower for every request on it. Each has a `--cache-tokens` prefix cache; all share one seed, so
  every worker generates the same tokens for the same request. Before every run each cache is flushed and warmed
  with the shared system prompt (as after a previous rollout step), and the counters are reset.
- the router under test: miles-router (`python -m router`, `routing.default_policy` = least_inflight,
  prefix_affinity or sticky) or smg 1.13 (`smg launch --policy cache_aware|prefix_hash|consistent_hashing`, its
  defaults otherwise), both given the 8 worker URLs at startup. smg is `--smg PATH`, else `smg` next to this Python
  or on PATH; without an smg 1.x there (`pip install smg==1.13.0`; sglang-router's older `smg` alias lacks these
  policies) the smg runs are skipped with a note and the table has the miles-router rows only.
- the load generator, in this process: one keep-alive HTTP/1.1 connection per conversation.

Workload ("grpo"), identical for every router: input_ids (Qwen vocabulary) = a shared system prompt S + a problem P
per prompt; G prompts, each a GRPO group of n samples sent at once; each sample is a T-turn agent conversation (turn
t+1 = turn t's prompt + its output_ids + a tool result U, so prefixes grow). At most K groups run at a time (the next
starts when one ends), so K x n conversations are in flight. Every request carries `x-smg-routing-key: <conversation
id>` (miles' sticky and smg's consistent_hashing key on it; the other policies ignore it). "hot": one prompt sends
`hot_factor` x the groups of each other prompt.

Definitions (per run, from the run's own trace; the 16-token blocks and "the last prompt token is always computed"
rule of the simulator's prefix cache):
  hit            sum(meta_info.cached_tokens) / sum(prompt_tokens)
  ideal          the hit rate of ONE worker with an UNBOUNDED cache serving the same request stream: a request may
                 reuse the longest block prefix of its prompt that occurs in the warm-up sequence, in the prompt of any
                 request sent before it, or in prompt + output of any request answered before it was sent (what SGLang's
                 radix cache with in-batch prefix caching would give on one infinitely large worker)
  ÷ ideal        hit / ideal
  ∞-cache        the same, but a request sees only what was sent to / answered by ITS worker: the routing's hit rate
                 with unbounded caches (ideal - ∞-cache = lost to routing, ∞-cache - hit = lost to eviction)
  turn p50/p99   client-measured latency of a turn (one /generate), router included
  worker p99     the simulator's own e2e_latency (queue + prefill + decode), p99
  group p50      time from a group's first request to its last reply (a GRPO step waits for its slowest sample)
  req max/mean   requests per worker, the busiest worker over the mean (1.00 = perfect spread)
  busy max/mean  modeled compute seconds per worker (the sims' busy_s), busiest over mean
  peak           the highest number of requests a worker had in flight at once
  lag            how late the sims' step loops woke, mean over steps (ms; CPU contention: near 0 = the model's
                 timing held, so latency differences come from the routing, not from the host)
  CPU            CPU seconds of the router process / the sim processes / the load generator during the run

    python bench/bench_routing.py                       # every policy, 3 interleaved rounds (~8 min)
    python bench/bench_routing.py --rounds 1 --quick    # a smoke run (~1 min)
    python bench/bench_routing.py --policies prefix_affinity,smg:cache_aware --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial

import h11
import msgspec
import trio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from load_streams import free_port  # noqa: E402
from router.sim.model import PrefixCache  # noqa: E402  (the simulator's own block keys)

N_WORKERS = 8
MILES_POLICIES = ("least_inflight", "prefix_affinity", "sticky")
SMG_POLICIES = ("cache_aware", "prefix_hash", "consistent_hashing")
ALL_POLICIES = [*MILES_POLICIES, *(f"smg:{p}" for p in SMG_POLICIES)]


# ---------------------------------------------------------------- child processes: the simulated workers

async def _sims_main(spec: dict) -> None:
    from router.sim import SimOptions, serve_sim_worker

    urls = []
    async with trio.open_nursery() as n:
        for name in spec["names"]:
            opts = SimOptions(**spec["options"], name=name)
            url, _ = await n.start(partial(serve_sim_worker, opts, "127.0.0.1", 0))
            urls.append(url)
        print(json.dumps(urls), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin
        n.cancel_scope.cancel()


def sim_options(args) -> dict:
    return {"tokenizer": args.tokenizer, "seed": 0, "latency_model": "batch", "token_latency_s": args.step_ms / 1e3,
            "batch_step_s_per_request": args.per_request_ms / 1e3, "batch_step_s_per_context_token":
            args.per_context_ns / 1e9, "prefill_latency_s_per_token": args.prefill_us / 1e6,
            "cached_prefill_s_per_token": args.cached_prefill_us / 1e6, "max_running_requests": args.max_running,
            "prefix_cache_tokens": args.cache_tokens, "enable_routed_experts": False}


def start_sims(args) -> tuple[list[subprocess.Popen], list[str]]:
    names = [f"w{i}" for i in range(N_WORKERS)]
    procs, urls = [], []
    env = dict(os.environ, PYTHONPATH=ROOT)
    for k in range(args.sim_procs):
        spec = {"names": names[k::args.sim_procs], "options": sim_options(args)}
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_sims", json.dumps(spec)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True))
    by_name = {}
    for k, p in enumerate(procs):
        line = p.stdout.readline()
        if not line:
            raise SystemExit("a simulated-worker process failed to start")
        by_name.update(zip(names[k::args.sim_procs], json.loads(line)))
    urls = [by_name[n] for n in names]
    return procs, urls


# ---------------------------------------------------------------- a minimal keep-alive HTTP/1.1 client

class Conn:
    """One keep-alive connection (the load generator's per-conversation socket); reconnects when needed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.stream: trio.SocketStream | None = None
        self.h11: h11.Connection | None = None

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, dict, bytes]:
        for attempt in (0, 1):
            reused = self.stream is not None and self.h11.our_state is h11.IDLE
            if not reused:
                await self.close()
                self.stream = await trio.open_tcp_stream(self.host, self.port)
                self.h11 = h11.Connection(h11.CLIENT)
            fresh_bytes = 0
            try:
                c = self.h11
                hdrs = [(b"host", b"%s:%d" % (self.host.encode(), self.port)), (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body)), *headers]
                await self.stream.send_all(c.send(h11.Request(method=method, target=path, headers=hdrs))
                                           + c.send(h11.Data(data=body)) + c.send(h11.EndOfMessage()))
                status, rh, chunks = 0, {}, []
                while True:
                    ev = c.next_event()
                    if ev is h11.NEED_DATA:
                        data = await self.stream.receive_some(65536)
                        fresh_bytes += len(data)
                        c.receive_data(data)
                    elif isinstance(ev, h11.Response):
                        status, rh = ev.status_code, {k.decode(): v.decode() for k, v in ev.headers}
                    elif isinstance(ev, h11.Data):
                        chunks.append(ev.data)
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    elif isinstance(ev, h11.ConnectionClosed):
                        raise ConnectionError("closed")
                if c.our_state is h11.DONE and c.their_state is h11.DONE:
                    c.start_next_cycle()
                else:
                    await self.close()
                return status, rh, b"".join(chunks)
            except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
                await self.close()
                if attempt or fresh_bytes or not reused:  # only the keep-alive race is retried
                    raise
        raise AssertionError


async def call(url: str, method: str, path: str, obj=None) -> tuple[int, bytes]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    c = Conn(host, int(port))
    try:
        status, _, body = await c.request(method, path, b"" if obj is None else json.dumps(obj).encode())
        return status, body
    finally:
        await c.close()


# ---------------------------------------------------------------- the routers under test

def cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def find_smg(given: str | None) -> tuple[str | None, str]:
    """(the smg 1.x binary to run or None, what was found: its version line or why not)."""
    candidates = [given] if given else [os.path.join(os.path.dirname(sys.executable), "smg"), shutil.which("smg")]
    for path in candidates:
        if path and os.path.exists(path):
            try:
                out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
            except (OSError, subprocess.SubprocessError) as e:
                return None, f"{path}: {e}"
            version = out.splitlines()[0] if out else "no version"
            return (path if version.startswith("smg 1.") else None), f"{path}: {version}"
    return None, "no smg found"


class RouterProc:
    """A router process on a free loopback port; `ready()` waits until it routes to all 8 workers."""

    def __init__(self, label: str, worker_urls: list[str], tmp: str, args) -> None:
        self.label, self.port = label, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = open(os.path.join(tmp, f"{label.replace(':', '_')}.log"), "w")
        if label.startswith("smg:"):
            cmd = [args.smg, "launch", "--host", "127.0.0.1", "--port", str(self.port),
                   "--disable-tokenizer-autoload", "--prometheus-host", "127.0.0.1",
                   "--prometheus-port", str(free_port()), "--policy", label[4:], "--log-level", "warn",
                   "--worker-urls", *worker_urls]
            env = dict(os.environ)
        else:
            policy, *overrides = label.split("@")  # e.g. prefix_affinity@balance_abs_threshold=16
            routing = {"default_policy": policy}
            for o in overrides:
                key, _, value = o.partition("=")
                routing[key] = json.loads(value)
            cfg = os.path.join(tmp, "router.toml")
            with open(cfg, "w") as f:
                f.write(f'[server]\nhost = "127.0.0.1"\nport = {self.port}\nlog_level = "warning"\n'
                        f"[workers]\nurls = {json.dumps(worker_urls)}\nhealth_interval_s = 2.0\n"
                        f'[tokenizer]\npath = "builtin:tiny"\n[store]\nenabled = false\n[simulate]\nworkers = 0\n'
                        "[routing]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in routing.items()))
            cmd = [sys.executable, "-m", "router", "--config", cfg]
            env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)

    async def ready(self, timeout: float = 60.0) -> None:
        deadline = trio.current_time() + timeout
        while trio.current_time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.label}: router exited with code {self.proc.returncode} (see its log)")
            try:
                if self.label.startswith("smg:"):
                    st, body = await call(self.url, "GET", "/workers")
                    ok = st == 200 and json.loads(body).get("total") == N_WORKERS and all(
                        w.get("is_healthy", True) for w in json.loads(body)["workers"])
                else:
                    st, body = await call(self.url, "GET", "/health")
                    ok = st == 200 and json.loads(body).get("healthy_workers") == N_WORKERS
                if ok:
                    return
            except (OSError, ConnectionError, ValueError):
                pass
            await trio.sleep(0.1)
        raise SystemExit(f"{self.label}: not ready after {timeout:g} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- workload

@dataclass
class Sizes:
    system_tokens: int = 512
    problem_tokens: tuple[int, int] = (64, 192)
    user_tokens: tuple[int, int] = (96, 256)  # a tool result / user turn
    gen_tokens: tuple[int, int] = (16, 48)
    samples: int = 16
    turns: int = 4
    groups: int = 24
    active_groups: int = 6
    hot_factor: int = 10
    cold_families: int = 10  # hot scenario: prompts other than the hot one
    cold_groups_each: int = 1


@dataclass
class Workload:
    sizes: Sizes
    system: list[int]
    groups: list[tuple[int, list[int]]]  # (family, S + P)
    user: dict[tuple[int, int, int], list[int]]  # (group, sample, turn >= 1) -> U
    gen: dict[tuple[int, int, int], int]  # (group, sample, turn) -> max_new_tokens


def make_workload(scenario: str, sz: Sizes, seed: int) -> Workload:
    rng = random.Random(seed)

    def toks(n):
        return [rng.randrange(1000, 100000) for _ in range(n)]

    system = toks(sz.system_tokens)
    if scenario == "grpo":
        fams = list(range(sz.groups))  # one group per prompt (a GRPO step)
    elif scenario == "hot":
        fams = [0] * (sz.hot_factor * sz.cold_groups_each) + [f for f in range(1, sz.cold_families + 1)
                                                              for _ in range(sz.cold_groups_each)]
        rng.shuffle(fams)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    problems = {f: toks(rng.randint(*sz.problem_tokens)) for f in sorted(set(fams))}
    groups = [(f, system + problems[f]) for f in fams]
    user = {(g, s, t): toks(rng.randint(*sz.user_tokens))
            for g in range(len(groups)) for s in range(sz.samples) for t in range(1, sz.turns)}
    gen = {(g, s, t): rng.randint(*sz.gen_tokens)
           for g in range(len(groups)) for s in range(sz.samples) for t in range(sz.turns)}
    return Workload(sz, system, groups, user, gen)


# ---------------------------------------------------------------- one run

@dataclass
class Req:
    gid: int
    sample: int
    turn: int
    prompt: list[int]
    sent: float
    done: float = 0.0
    status: int = 0
    worker: str = ""
    reason: str = ""
    cached: int = 0
    output: list[int] = field(default_factory=list)
    e2e: float = 0.0  # the simulator's own latency


@dataclass
class Run:
    label: str
    round: int
    reqs: list[Req]
    warm: list[int]
    wall_s: float
    sim_stats: dict[str, dict]  # worker name -> /_sim/stats counters
    cpu: tuple[float, float, float]  # CPU seconds of the router, the sims, this process


async def prepare_workers(worker_urls: list[str], wl: Workload) -> list[int]:
    """Flush every cache, warm it with the system prompt, reset the counters: the same start for every run."""
    warm: list[int] = []
    for u in worker_urls:
        st, body = await call(u, "POST", "/flush_cache", {})
        assert st == 200, body
        st, body = await call(u, "POST", "/generate", {"input_ids": wl.system, "sampling_params": {
            "max_new_tokens": 1, "ignore_eos": True, "sampling_seed": 0}})
        assert st == 200, body
        warm = wl.system + json.loads(body)["output_ids"]
        st, body = await call(u, "POST", "/_sim/stats/reset", {})
        assert st == 200, body
    return warm


async def run_once(label: str, rnd: int, worker_urls: list[str], wl: Workload, args, tmp: str,
                   sim_pids: list[int]) -> Run:
    warm = await prepare_workers(worker_urls, wl)
    router = RouterProc(label, worker_urls, tmp, args)
    try:
        await router.ready()
        reqs: list[Req] = []
        sz = wl.sizes
        host, port = "127.0.0.1", router.port

        async def conversation(gid: int, s: int) -> None:
            conn = Conn(host, port)
            ids = list(wl.groups[gid][1])
            key = [(b"x-smg-routing-key", b"conv-%d-%d" % (gid, s))]
            try:
                for t in range(sz.turns):
                    if t:
                        ids = ids + wl.user[(gid, s, t)]
                    body = msgspec.json.encode({"input_ids": ids, "sampling_params": {
                        "max_new_tokens": wl.gen[(gid, s, t)], "ignore_eos": True, "temperature": 1.0,
                        "sampling_seed": args.seed * 1000003 + gid * 1009 + s * 31 + t}})
                    r = Req(gid, s, t, ids, time.perf_counter())
                    status, rh, out = await conn.request("POST", "/generate", body, key)
                    r.done, r.status = time.perf_counter(), status
                    r.worker, r.reason = rh.get("x-sim-worker", ""), rh.get("x-miles-router-route-reason", "")
                    reqs.append(r)
                    if status != 200:
                        raise SystemExit(f"{label}: HTTP {status}: {out[:300]!r}")
                    o = msgspec.json.decode(out)
                    meta = o["meta_info"]
                    if meta["prompt_tokens"] != len(ids) or len(o["output_ids"]) != wl.gen[(gid, s, t)]:
                        raise SystemExit(f"{label}: the reply does not match the request (prompt_tokens "
                                         f"{meta['prompt_tokens']} != {len(ids)} or a short output)")
                    r.cached, r.e2e, r.output = meta["cached_tokens"], meta["e2e_latency"], o["output_ids"]
                    ids = ids + o["output_ids"]
            finally:
                await conn.close()

        async def group(gid: int, sem: trio.Semaphore) -> None:
            async with sem, trio.open_nursery() as n:
                for s in range(sz.samples):
                    n.start_soon(conversation, gid, s)

        t0, c0 = time.perf_counter(), (cpu_s(router.proc.pid), sum(map(cpu_s, sim_pids)), time.process_time())
        sem = trio.Semaphore(sz.active_groups)
        async with trio.open_nursery() as n:
            for gid in range(len(wl.groups)):
                n.start_soon(group, gid, sem)
                await trio.sleep(0)  # start groups in order (trio.Semaphore is FIFO-fair)
        wall = time.perf_counter() - t0
        cpu = (cpu_s(router.proc.pid) - c0[0], sum(map(cpu_s, sim_pids)) - c0[1], time.process_time() - c0[2])
    finally:
        router.stop()
    stats = {}
    for i, u in enumerate(worker_urls):
        st, body = await call(u, "GET", "/_sim/stats")
        d = json.loads(body)
        stats[f"w{i}"] = {k: d[k] for k in ("generate_requests", "busy_s", "steps", "late_s", "peak_in_flight")}
    return Run(label, rnd, reqs, warm, wall, stats, cpu)


# ---------------------------------------------------------------- analysis

def _keys(ids: list[int], limit: int | None = None) -> list[int]:
    return PrefixCache.keys(ids, limit)


def _match(keys: list[int], seen) -> int:
    n = 0
    for k in keys:
        if k not in seen:
            break
        n += 1
    return n * 16


def cache_bounds(run: Run) -> tuple[int, int]:
    """(ideal, same-routing-with-unbounded-caches) cached tokens over the run (see the module docstring)."""
    events = []
    for r in run.reqs:
        events.append((r.sent, 1, r))
        events.append((r.done, 0, r))  # at equal times an answer counts before a send
    events.sort(key=lambda e: (e[0], e[1]))
    warm = set(_keys(run.warm))
    ideal_seen: set[int] = set(warm)
    per_worker: dict[str, set[int]] = defaultdict(lambda: set(warm))
    ideal = routed = 0
    for _, is_send, r in events:
        if is_send:
            keys = _keys(r.prompt, len(r.prompt) - 1)
            ideal += _match(keys, ideal_seen)
            routed += _match(keys, per_worker[r.worker])
            prompt_keys = _keys(r.prompt)
            ideal_seen.update(prompt_keys)
            per_worker[r.worker].update(prompt_keys)
        else:
            full = _keys(r.prompt + r.output)
            ideal_seen.update(full)
            per_worker[r.worker].update(full)
    return ideal, routed


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def summarize(run: Run) -> dict:
    reqs = run.reqs
    prompt = sum(len(r.prompt) for r in reqs)
    ideal, routed = cache_bounds(run)
    lat = [r.done - r.sent for r in reqs]
    groups: dict[int, list[Req]] = defaultdict(list)
    for r in reqs:
        groups[r.gid].append(r)
    group_s = [max(r.done for r in g) - min(r.sent for r in g) for g in groups.values()]
    st = run.sim_stats.values()
    reqs_w = [s["generate_requests"] for s in st]
    busy = [s["busy_s"] for s in st]
    prev = {(q.gid, q.sample, q.turn): q.worker for q in reqs}
    moved = sum(1 for r in reqs if r.turn and prev.get((r.gid, r.sample, r.turn - 1), r.worker) != r.worker)
    return {
        "label": run.label, "round": run.round, "n": len(reqs),
        "hit": sum(r.cached for r in reqs) / prompt, "ideal": ideal / prompt, "routed": routed / prompt,
        "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "wp99": pct([r.e2e for r in reqs], 0.99),
        "group_p50": statistics.median(group_s), "wall": run.wall_s,
        "req_spread": max(reqs_w) / statistics.fmean(reqs_w), "busy_spread": max(busy) / statistics.fmean(busy),
        "peak": max(s["peak_in_flight"] for s in st),
        "lag": sum(s["late_s"] for s in st) / max(1, sum(s["steps"] for s in st)), "cpu": run.cpu,
        "moves": moved / max(1, sum(1 for r in reqs if r.turn)),
        "reasons": Counter(r.reason for r in reqs if r.reason), "per_worker": reqs_w,
    }


COLS = ["policy", "hit", "÷ ideal", "∞-cache ÷ ideal", "turn p50 / p99 ms", "p99 ÷ best smg", "worker p99 ms",
        "group p50 s", "req max/mean", "busy max/mean", "peak", "conv moves", "lag ms", "CPU s router / sims / client"]


def row_cells(s: dict, best_smg_p99: float | None) -> list[str]:
    return [s["label"], f"{s['hit']:.3f}", f"{s['hit'] / s['ideal']:.3f}", f"{s['routed'] / s['ideal']:.3f}",
            f"{1e3 * s['p50']:.0f} / {1e3 * s['p99']:.0f}",
            f"{s['p99'] / best_smg_p99:.2f}" if best_smg_p99 else "–", f"{1e3 * s['wp99']:.0f}",
            f"{s['group_p50']:.2f}", f"{s['req_spread']:.2f}", f"{s['busy_spread']:.2f}", str(s["peak"]),
            f"{100 * s['moves']:.0f}%", f"{1e3 * s['lag']:.1f}", "{:.1f} / {:.1f} / {:.1f}".format(*s["cpu"])]


def table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report(summaries: list[dict], policies: list[str], rounds: int) -> str:
    """One table per round, then the medians over rounds of each column (ratios taken within each round)."""
    out = []
    by_round: dict[int, list[dict]] = defaultdict(list)
    for s in summaries:
        by_round[s["round"]].append(s)
    ratio: dict[str, list[float]] = defaultdict(list)
    for rnd in sorted(by_round):
        rs = by_round[rnd]
        smg = [s["p99"] for s in rs if s["label"].startswith("smg:")]
        best = min(smg) if smg else None
        for s in rs:
            if best:
                ratio[s["label"]].append(s["p99"] / best)
        out += [f"round {rnd + 1} (ideal {rs[0]['ideal']:.3f}):", "", table([row_cells(s, best) for s in rs]), ""]
    if rounds > 1:
        med = []
        for label in policies:
            ss = [s for s in summaries if s["label"] == label]
            if not ss:
                continue
            m = {k: statistics.median(s[k] for s in ss) for k in ("hit", "ideal", "routed", "p50", "p99", "wp99",
                                                                     "group_p50", "req_spread", "busy_spread",
                                                                     "peak", "moves", "lag")}
            m["cpu"] = tuple(statistics.median(s["cpu"][i] for s in ss) for i in range(3))
            m["label"] = label
            m["peak"] = int(m["peak"])
            cells = row_cells(m, None)
            cells[2] = f"{statistics.median(s['hit'] / s['ideal'] for s in ss):.3f}"
            cells[3] = f"{statistics.median(s['routed'] / s['ideal'] for s in ss):.3f}"
            if ratio.get(label):
                r = sorted(ratio[label])
                cells[5] = f"{statistics.median(r):.2f} ({r[0]:.2f}–{r[-1]:.2f})"
            med.append(cells)
        out += [f"median of {rounds} rounds (p99 ÷ best smg: median (min–max) of the per-round ratios):", "",
                table(med), ""]
    out.append("route reasons (miles-router) and requests per worker, last round:")
    out.append("")
    for s in by_round[max(by_round)]:
        reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].most_common())
        out.append(f"- {s['label']}: {s['per_worker']}" + (f"; {reasons}" if reasons else ""))
    return "\n".join(out)


def describe(sz: Sizes, args, scenario: str) -> str:
    return (f"scenario {scenario}: S={sz.system_tokens} tok, P={sz.problem_tokens}, U={sz.user_tokens}, "
            f"gen={sz.gen_tokens}, n={sz.samples}, turns={sz.turns}, groups={sz.groups}, active groups="
            f"{sz.active_groups} ({sz.active_groups * sz.samples} conversations in flight); 8 sims in "
            f"{args.sim_procs} processes: step {args.step_ms:g} ms + {args.per_request_ms:g} ms/request + "
            f"{args.per_context_ns:g} ns/context token, prefill {args.prefill_us:g} µs/uncached token "
            f"({args.cached_prefill_us:g} cached), max running {args.max_running or '∞'}, cache "
            f"{args.cache_tokens} tok/worker; seed {args.seed}")


# ---------------------------------------------------------------- main

async def amain(args) -> None:
    sz = Sizes()
    if args.quick:
        sz = Sizes(turns=3, groups=8, active_groups=4, cold_families=4, hot_factor=4)
    for k in ("groups", "active_groups", "turns", "system_tokens", "samples"):
        if getattr(args, k) is not None:
            setattr(sz, k, getattr(args, k))
    policies = args.policies.split(",")
    unknown = [p for p in policies if p.split("@")[0] not in ALL_POLICIES]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; known: {', '.join(ALL_POLICIES)}")
    if any(p.startswith("smg:") for p in policies):
        args.smg, found = find_smg(args.smg)
        if args.smg is None:
            print(f"note: no smg 1.x ({found}; pip install smg==1.13.0): the smg policies are skipped", flush=True)
            policies = [p for p in policies if not p.startswith("smg:")]
        else:
            print(f"smg: {found}", flush=True)
    procs, urls = start_sims(args)
    md_all = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_routing_") as tmp:
            for scenario in args.scenarios.split(","):
                wl = make_workload(scenario, sz, args.seed)
                head = describe(sz, args, scenario)
                print(head, flush=True)
                summaries = []
                for rnd in range(args.rounds):
                    order = policies[rnd % len(policies):] + policies[:rnd % len(policies)]  # rotate: interleaved
                    for label in order:
                        run = await run_once(label, rnd, urls, wl, args, tmp, [p.pid for p in procs])
                        s = summarize(run)
                        summaries.append(s)
                        print(f"  round {rnd + 1} {label}: hit {s['hit']:.3f} (÷ ideal {s['hit'] / s['ideal']:.3f}) "
                              f"p50/p99 {1e3 * s['p50']:.0f}/{1e3 * s['p99']:.0f} ms, worker p99 "
                              f"{1e3 * s['wp99']:.0f} ms, req max/mean {s['req_spread']:.2f}, busy max/mean "
                              f"{s['busy_spread']:.2f}, lag {1e3 * s['lag']:.1f} ms, CPU "
                              + "{:.1f}/{:.1f}/{:.1f} s".format(*s["cpu"]) + f", {s['wall']:.1f} s", flush=True)
                md = [f"### {head}", "", report(summaries, policies, args.rounds), ""]
                print("\n".join(md), flush=True)
                md_all += md
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(timeout=15)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "?"
        with open(args.out, "a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M:%S')} `{' '.join(sys.argv[1:])}` at {commit}\n\n"
                    + "\n".join(md_all) + "\n")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--_sims":
        trio.run(_sims_main, json.loads(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 groups of 3 turns, 4 at a time")
    p.add_argument("--rounds", type=int, default=3, help="every policy once per round, the order rotated per round")
    p.add_argument("--scenarios", default="grpo", help="grpo and/or hot")
    p.add_argument("--policies", default=",".join(ALL_POLICIES),
                   help="comma list of " + ", ".join(ALL_POLICIES) + "; a miles policy may carry [routing] "
                        "settings: prefix_affinity@balance_abs_threshold=16@balance_tokens_per_request=0")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--groups", type=int)
    p.add_argument("--active-groups", dest="active_groups", type=int)
    p.add_argument("--samples", type=int)
    p.add_argument("--turns", type=int)
    p.add_argument("--system-tokens", dest="system_tokens", type=int)
    p.add_argument("--cache-tokens", type=int, default=32768, help="prefix cache per worker")
    p.add_argument("--step-ms", type=float, default=8.0, help="a decode step's fixed cost")
    p.add_argument("--per-request-ms", type=float, default=1.5, help="a step's cost per request in the batch")
    p.add_argument("--per-context-ns", type=float, default=100.0, help="a step's cost per decoding context token")
    p.add_argument("--prefill-us", type=float, default=120.0, help="per uncached prompt token")
    p.add_argument("--cached-prefill-us", type=float, default=2.0, help="per cached prompt token")
    p.add_argument("--max-running", type=int, default=0, help="running-batch cap per worker (0 = none)")
    p.add_argument("--sim-procs", type=int, default=2, help="processes the 8 simulated workers are spread over")
    p.add_argument("--smg", help="the smg binary (default: next to this Python, else on PATH)")
    p.add_argument("--tokenizer", default="builtin:qwen")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "routing.md"))
    args = p.parse_args()
    trio.run(amain, args)


if __name__ == "__main__":
    main()
