"""Routing policies under a GRPO multi-turn workload against 8 simulated workers with finite prefix caches (issue #4).

Layout (2-core box): the 16 simulated SGLang workers (8 with `--cache-tokens` of prefix cache, 8 unbounded for the
ideal run) run in ONE child process (one trio.run, each sim on its own loopback port). The router runs in THIS
process, fresh for every run (cold router state), next to the load generator (a minimal keep-alive h11 client, one
connection per conversation) and an in-flight sampler reading `runtime.pool` every `--sample-ms`. Before every run
each worker's cache is flushed and warmed with the system prompt only (as after a previous rollout step).

Workload ("grpo"): input_ids (builtin:qwen vocab) = a shared system prompt S + a per-prompt problem P; G prompt
groups; a group's n=16 samples are sent together; each sample is a T-turn conversation (turn t+1 = turn t's prompt +
its output_ids + a new per-sample user/tool turn U). At most K groups run at a time (the next starts when one
finishes), so the caches see a stream of groups and evict. "hot": the same, but one family (prompt) sends
`hot_factor` x the groups of each of the other families.

Runs: least_inflight; sticky (X-SMG-Routing-Key = the sample's conversation id); prefix_affinity;
`ideal:pinned_inf` = every conversation family pinned to one fixed worker (families round-robin over workers, no
spill) on workers with an UNBOUNDED prefix cache; `pa+served` etc. = bench-only prototypes of selection changes
(see `POLICIES`). Columns:
  hit rate          sum(meta_info.cached_tokens) / sum(prompt_tokens)
  ÷ ideal           hit rate / the ideal run's hit rate
  trace bound       analytic upper bound from this run's own trace: every request may reuse the longest 16-token-block
                    prefix of anything (prompt + output) ANY worker had finished when the request's worker looked up
                    its cache (one global unbounded cache, sim clock). No routing can beat it on these sims.
  same routing, ∞   what this run's routing would get with unbounded caches (each request sees only what finished on
                    the worker it went to): bound - this = loss to routing, this - hit rate = loss to eviction
  model ms          the sim's modeled latency (prefill of uncached tokens + decode), free of CPU noise
  measured ms       client-side latency; "queueing" = measured - model (CPU contention on this shared box)
  gap               max - min in-flight across workers, sampled over time in the steady state (K groups running)
  >thr %            share of those samples beyond what the spill rule admits (gap > abs+1 and max > rel*min+1)
  decision gap      chosen worker's in-flight minus the least-loaded worker's, at each routing decision
  conv moves %      turns >= 1 served by a different worker than the conversation's previous turn

    python bench/bench_routing.py [--quick] [--scenarios grpo,hot] [--policies ...] [--cache-tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial

import h11
import msgspec
import numpy as np
import trio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BLOCK = 16  # the sim's PREFIX_BLOCK_TOKENS
N_WORKERS = 8


# ---------------------------------------------------------------- child process: the simulated workers

async def _sims_main(spec: dict) -> None:
    from router.sim import SimOptions, serve_sim_worker

    urls: dict[str, list[str]] = {}
    async with trio.open_nursery() as n:
        for name, cap in spec["sets"].items():
            urls[name] = []
            for i in range(spec["n"]):
                opts = SimOptions(tokenizer=spec["tokenizer"], seed=i, token_latency_s=spec["token_latency_s"],
                                  prefill_latency_s_per_token=spec["prefill_latency_s_per_token"],
                                  prefix_cache_tokens=cap, enable_routed_experts=False)
                url, _ = await n.start(partial(serve_sim_worker, opts, "127.0.0.1", 0))
                urls[name].append(url)
        print(json.dumps(urls), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin
        n.cancel_scope.cancel()


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def start_sim_process(sets: dict[str, int], args) -> tuple[subprocess.Popen, dict[str, list[str]]]:
    spec = {"n": N_WORKERS, "sets": sets, "tokenizer": args.tokenizer, "token_latency_s": args.token_latency_s,
            "prefill_latency_s_per_token": args.prefill_us / 1e6}
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_sims", json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("sim process failed to start")
    return proc, json.loads(line)


# ---------------------------------------------------------------- a minimal keep-alive HTTP/1.1 client

class Conn:
    """One keep-alive connection (the load generator's per-conversation socket); reconnects when needed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.stream: trio.SocketStream | None = None
        self.h11: h11.Connection | None = None

    async def _connect(self) -> None:
        self.stream = await trio.open_tcp_stream(self.host, self.port)
        self.h11 = h11.Connection(h11.CLIENT)

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None

    async def post(self, path: str, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, dict, bytes]:
        for attempt in (0, 1):
            reused = self.stream is not None and self.h11.our_state is h11.IDLE
            if not reused:
                await self.close()
                await self._connect()
            fresh_bytes = 0
            try:
                c = self.h11
                hdrs = [(b"host", b"%s:%d" % (self.host.encode(), self.port)), (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body)), *headers]
                await self.stream.send_all(c.send(h11.Request(method="POST", target=path, headers=hdrs))
                                           + c.send(h11.Data(data=body)) + c.send(h11.EndOfMessage()))
                status, rh, chunks = 0, {}, []
                while True:
                    ev = c.next_event()
                    if ev is h11.NEED_DATA:
                        data = await self.stream.receive_some(65536)
                        fresh_bytes += len(data)
                        c.receive_data(data)
                        continue
                    if isinstance(ev, h11.Response):
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


async def post_json(url: str, path: str, obj) -> tuple[int, bytes]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    c = Conn(host, int(port))
    try:
        status, _, body = await c.post(path, json.dumps(obj).encode())
        return status, body
    finally:
        await c.close()


# ---------------------------------------------------------------- workload

@dataclass
class Sizes:
    system_tokens: int = 384
    problem_tokens: tuple[int, int] = (64, 160)
    user_tokens: tuple[int, int] = (128, 256)
    gen_tokens: tuple[int, int] = (24, 40)
    samples: int = 16
    turns: int = 4
    groups: int = 24
    active_groups: int = 6
    hot_factor: int = 10
    cold_families: int = 10  # hot scenario: families other than the hot one
    cold_groups_each: int = 1


@dataclass
class Group:
    gid: int
    family: int
    prompt: list[int]  # S + P_family


@dataclass
class Req:
    policy: str
    gid: int
    family: int
    sample: int
    turn: int
    prompt_len: int
    sent: float
    done: float = 0.0
    cached: int = 0
    status: int = 0
    worker: str = ""
    reason: str = ""
    full: list[int] | None = None  # prompt + output ids, for the analytic bound
    gen: int = 0
    sim_done: float = 0.0  # sim wall clock: the worker inserted `full` into its cache just before this
    sim_match: float = 0.0  # sim wall clock: an upper estimate of when the worker looked up its cache


def make_groups(scenario: str, sz: Sizes, rng: random.Random) -> list[Group]:
    def toks(n):
        return [rng.randrange(1000, 100000) for _ in range(n)]

    system = toks(sz.system_tokens)
    if scenario == "grpo":
        fams = list(range(sz.groups))  # one group per prompt (a GRPO step)
    else:  # hot: family 0 sends hot_factor x the groups of each other family
        fams = [0] * (sz.hot_factor * sz.cold_groups_each) + [f for f in range(1, sz.cold_families + 1)
                                                              for _ in range(sz.cold_groups_each)]
        rng.shuffle(fams)
    problems = {f: toks(rng.randint(*sz.problem_tokens)) for f in sorted(set(fams))}
    return [Group(g, f, system + problems[f]) for g, f in enumerate(fams)]


# ---------------------------------------------------------------- prototypes of selection changes (bench-only copies)

class MultiOwnerPrefixIndex:
    """PrefixIndex where every block remembers up to `k` recent owners instead of only the last one.

    `lookup` returns all usable owners of the deepest matched block, so the caller can take the least-loaded worker
    that holds the prefix; `record` adds (or refreshes) an owner instead of overwriting the block's only owner, so a
    spill no longer drags a whole group's shared prefix (and every sibling after it) to the spill target."""

    def __init__(self, block_tokens: int = 16, block_bytes: int = 64, capacity_blocks: int = 1 << 20, k: int = 4):
        from router.core.selection import PrefixIndex

        self._keys = PrefixIndex(block_tokens, block_bytes, capacity_blocks)._keys
        self.capacity, self.k = capacity_blocks, k
        self._owners: dict[bytes, list[str]] = {}  # insertion-ordered: LRU over blocks

    def lookup(self, seq, usable=None) -> tuple[list[str], int]:
        keys = self._keys(seq)
        for i in range(len(keys) - 1, -1, -1):
            urls = self._owners.get(keys[i])
            if urls:
                ok = [u for u in urls if usable is None or usable(u)]
                if ok:
                    return ok, i + 1
        return [], 0

    def record(self, seq, url: str) -> None:
        owners = self._owners
        for key in self._keys(seq):
            lst = owners.pop(key, None) or []
            if url in lst:
                lst.remove(url)
            lst.append(url)  # most recent last
            if len(lst) > self.k:
                del lst[0]
            owners[key] = lst
        while len(owners) > self.capacity:
            del owners[next(iter(owners))]

    def __len__(self) -> int:
        return len(self._owners)


def patch_multi_owner(runtime, k: int = 4) -> None:
    """Prototype for router/net/runtime.py `_select_by_prefix` + a multi-owner PrefixIndex (see the report)."""
    from router.core.selection import choose

    g = runtime.config.routing
    runtime.prefix_index = idx = MultiOwnerPrefixIndex(block_tokens=g.prefix_block_tokens,
                                                       capacity_blocks=g.prefix_capacity_blocks, k=k)
    pool = runtime.pool

    def usable(u):
        w = pool.get(u)
        return w is not None and w.selectable

    def select_by_prefix(ex):
        seq = runtime._prefix_of(ex)
        if seq is None:
            return pool.pick(), "least_inflight"
        urls, _ = idx.lookup(seq, usable=usable)
        # among the workers holding the deepest matched prefix: the least loaded (ties: the most recent owner)
        pref = min((pool.get(u) for u in reversed(urls)), key=lambda w: w.inflight, default=None)
        w, reason = choose(pool, pref, runtime.spill, "affinity_hit")
        if reason == "least_inflight":
            reason = "affinity_miss"
        if w is not None:
            idx.record(seq, w.url)
        return w, reason

    runtime._select_by_prefix = select_by_prefix


def instrument(runtime, gaps: list[int]) -> None:
    """Record, at every routing decision, chosen worker's in-flight minus the least-loaded worker's."""
    inner = runtime.select

    def select(ex, exclude=()):
        w, reason = inner(ex, exclude)
        if w is not None:
            loads = [x.inflight for x in runtime.pool.healthy()]
            gaps.append(w.inflight - min(loads))
        return w, reason

    runtime.select = select


# ---------------------------------------------------------------- one run

@dataclass
class RunResult:
    label: str
    policy: str
    reqs: list[Req]
    inflight_samples: list[list[int]]
    worker_urls: list[str]
    wall_s: float
    cpu_s: float
    per_worker_requests: dict[str, int] = field(default_factory=dict)
    per_worker_peak: dict[str, int] = field(default_factory=dict)
    reasons: Counter = field(default_factory=Counter)
    warm: list = field(default_factory=list)
    decision_gaps: list = field(default_factory=list)
    abs_threshold: int = 8


async def run_once(label: str, policy: str, key_mode: str, worker_urls: list[str], groups: list[Group], sz: Sizes,
                   args, patch=None, record_served: bool = False, abs_threshold: int | None = None) -> RunResult:
    from router.config import Config
    from router.net.server import run_router

    warm = []
    for u in worker_urls:  # every run starts from the same caches: empty but for the system prompt (warm-up)
        st, body = await post_json(u, "/flush_cache", {})
        assert st == 200, body
        if args.warm and groups:
            system = groups[0].prompt[:sz.system_tokens]
            st, body = await post_json(u, "/generate", {"input_ids": system, "sampling_params": {
                "max_new_tokens": 1, "ignore_eos": True}})
            assert st == 200, body
            warm.append(system + json.loads(body)["output_ids"])
    no_spill = key_mode == "family"  # the ideal ignores load
    cfg = msgspec.convert({
        "server": {"port": 0, "drain_timeout_s": 1.0, "log_level": "warning"},
        "workers": {"urls": worker_urls, "health_interval_s": 2.0},
        "tokenizer": {"path": "builtin:tiny"},
        "routing": {"balance_abs_threshold": 1 << 30 if no_spill else abs_threshold,
                    "balance_rel_threshold": args.rel_threshold, "sticky_inflight_cap": 0 if no_spill else 2},
        "routes": [{"path": "/generate", "pipeline": "passthrough", "policy": policy}]}, Config)
    rng = random.Random(args.seed * 7919 + 1)
    reqs: list[Req] = []
    samples: list[list[int]] = []
    peak: dict[str, int] = defaultdict(int)
    family_worker = {}
    pin_key = {}  # worker index -> a routing key whose rendezvous worker it is (key_mode "family")
    async with trio.open_nursery() as root:
        handle = await root.start(partial(run_router, cfg, install_signals=False))
        runtime = handle.runtime
        if patch is not None:
            patch(runtime)
        decision_gaps: list[int] = []
        instrument(runtime, decision_gaps)
        pool = runtime.pool
        host, port = handle.url.split("//", 1)[1].rsplit(":", 1)
        port = int(port)
        if key_mode == "family":
            for i, f in enumerate(sorted({g.family for g in groups})):
                family_worker[f] = i
        # The router's health prober and first probe: wait until all workers are selectable.
        with trio.fail_after(10):
            while len(pool.healthy()) < len(worker_urls):
                await trio.sleep(0.02)
        # Pre-assign per-sample randomness so every policy sees the same workload.
        user_turns = {(g.gid, s, t): [rng.randrange(1000, 100000) for _ in range(rng.randint(*sz.user_tokens))]
                      for g in groups for s in range(sz.samples) for t in range(1, sz.turns)}
        gen_len = {(g.gid, s, t): rng.randint(*sz.gen_tokens)
                   for g in groups for s in range(sz.samples) for t in range(sz.turns)}
        stop_sampling = trio.Event()

        active = [0, len(groups)]  # groups running, groups not finished

        async def sampler():
            while not stop_sampling.is_set():
                loads = [w.inflight for w in pool.active]
                # steady state only: as many groups running as allowed (not the ramp-up or the final drain)
                if active[0] == min(sz.active_groups, active[1]) and active[1] > sz.active_groups:
                    samples.append(loads)
                for w in pool.active:
                    if w.inflight > peak[w.url]:
                        peak[w.url] = w.inflight
                await trio.sleep(args.sample_ms / 1000)

        async def conversation(g: Group, s: int):
            conn = Conn(host, port)
            ids = list(g.prompt)
            try:
                for t in range(sz.turns):
                    if t:
                        ids = ids + user_turns[(g.gid, s, t)]
                    body = msgspec.json.encode({"input_ids": ids, "sampling_params": {
                        "max_new_tokens": gen_len[(g.gid, s, t)], "ignore_eos": True, "temperature": 1.0,
                        "sampling_seed": args.seed * 1000003 + g.gid * 1009 + s * 31 + t}})
                    if key_mode == "conversation":
                        hdrs = [(b"x-smg-routing-key", b"conv-%d-%d" % (g.gid, s))]
                    elif key_mode == "family":
                        # the ideal: families assigned round-robin; a key per worker so least-load pinning
                        # of fresh keys cannot collide
                        hdrs = [(b"x-smg-routing-key", pin_key[family_worker[g.family] % len(worker_urls)])]
                    else:
                        hdrs = []
                    r = Req(label, g.gid, g.family, s, t, len(ids), time.perf_counter())
                    status, rh, out = await conn.post("/generate", body, hdrs)
                    r.done = time.perf_counter()
                    r.status = status
                    r.worker = rh.get("x-miles-router-worker", "")
                    r.reason = rh.get("x-miles-router-route-reason", "")
                    if status != 200:
                        reqs.append(r)
                        raise RuntimeError(f"{label}: HTTP {status}: {out[:200]!r}")
                    o = msgspec.json.decode(out)
                    r.cached = o["meta_info"]["cached_tokens"]
                    assert o["meta_info"]["prompt_tokens"] == len(ids)
                    ids = ids + o["output_ids"]
                    r.full = ids
                    if record_served and r.worker:
                        # prototype: the router records prompt + output_ids when the reply passes through it
                        runtime.record_served(np.asarray(ids, dtype=np.int32), r.worker)
                    r.gen = o["meta_info"]["completion_tokens"]
                    r.sim_done = o["meta_info"]["response_sent_to_client_ts"]
                    # the sim looks its cache up, then sleeps exactly prefill + decode (never less), then inserts
                    r.sim_match = r.sim_done - (args.prefill_us * 1e-6 * (r.prompt_len - r.cached)
                                                + args.token_latency_s * r.gen)
                    reqs.append(r)
            finally:
                await conn.close()

        async def group_task(g: Group, sem: trio.Semaphore):
            async with sem:
                active[0] += 1
                async with trio.open_nursery() as n:
                    for s in range(sz.samples):
                        n.start_soon(conversation, g, s)
                active[0] -= 1
                active[1] -= 1

        if key_mode == "family":
            # One key per worker: the first "worker-i-j" whose rendezvous worker (router/core/sticky.py) is the i-th.
            from router.core.sticky import rendezvous_order

            urls = [w.url for w in runtime.pool.active]
            for i, u in enumerate(urls):
                pin_key[i] = next(f"worker-{i}-{j}" for j in range(10_000) if rendezvous_order(f"worker-{i}-{j}", urls)[0] == u
                                  ).encode()
        t0, c0 = time.perf_counter(), time.process_time()
        root.start_soon(sampler)
        sem = trio.Semaphore(sz.active_groups)
        async with trio.open_nursery() as n:
            for g in groups:
                n.start_soon(group_task, g, sem)
                await trio.sleep(0)  # start groups in order (trio.Semaphore is FIFO-fair)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        stop_sampling.set()
        res = RunResult(label, policy, reqs, samples, [w.url for w in pool.active], wall, cpu)
        res.per_worker_requests = {w.url: w.requests_total for w in pool.active}
        res.per_worker_peak = dict(peak)
        res.reasons = Counter(r.reason for r in reqs)
        res.warm = warm
        res.decision_gaps = decision_gaps
        res.abs_threshold = abs_threshold
        handle.shutdown.set()
        root.cancel_scope.cancel()
    return res


# ---------------------------------------------------------------- analysis

def _chain(ids, limit):
    out, h = [], 0
    for start in range(0, limit - BLOCK + 1, BLOCK):
        h = hash((h, tuple(ids[start:start + BLOCK])))
        out.append(h)
    return out


def analytic_bound(reqs: list[Req], warm: list[list[int]] = ()) -> int:
    """Sum over requests of the best possible cached tokens: the longest block prefix of prompt[:-1] present in
    the union of everything (prompt + output) any worker had finished when this request's worker looked up its
    cache (one global, unbounded cache; sim clock; the lookup time is over-estimated, so this is an upper bound)."""
    seen: set[int] = set()
    for w in warm:
        seen.update(_chain(w, len(w)))
    done = sorted(reqs, key=lambda r: r.sim_done)
    j = 0
    total = 0
    for r in sorted(reqs, key=lambda r: r.sim_match):
        while j < len(done) and done[j].sim_done <= r.sim_match:
            seen.update(_chain(done[j].full, len(done[j].full)))
            j += 1
        prompt = r.full[:r.prompt_len]
        m = 0
        for h in _chain(prompt, len(prompt) - 1):
            if h not in seen:
                break
            m += BLOCK
        total += m
    return total


def routed_unbounded(reqs: list[Req], warm: list[list[int]] = ()) -> int:
    """Cached tokens this run's routing would have got with unbounded caches: like `analytic_bound`, but each request
    only sees what finished on the worker it was routed to. hit <= this <= bound; bound - this = loss to routing,
    this - hit = loss to eviction (finite prefix_cache_tokens)."""
    seen: dict[str, set[int]] = defaultdict(set)
    warm_keys = set()
    for w in warm:
        warm_keys.update(_chain(w, len(w)))
    done = sorted(reqs, key=lambda r: r.sim_done)
    j = 0
    total = 0
    for r in sorted(reqs, key=lambda r: r.sim_match):
        while j < len(done) and done[j].sim_done <= r.sim_match:
            seen[done[j].worker].update(_chain(done[j].full, len(done[j].full)))
            j += 1
        prompt = r.full[:r.prompt_len]
        mine = seen[r.worker]
        m = 0
        for h in _chain(prompt, len(prompt) - 1):
            if h not in mine and h not in warm_keys:
                break
            m += BLOCK
        total += m
    return total


def _p99(xs: list) -> float:
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else 0


def summarize(res: RunResult, args) -> dict:
    reqs = res.reqs
    lat = sorted(r.done - r.sent for r in reqs)
    model = sorted(args.prefill_us * 1e-6 * (r.prompt_len - r.cached) + args.token_latency_s * r.gen for r in reqs)
    prompt = sum(r.prompt_len for r in reqs)
    # in-flight imbalance over time (steady-state samples only, see sampler)
    gaps = sorted(max(s) - min(s) for s in res.inflight_samples)
    a, rel = res.abs_threshold, args.rel_threshold
    # share of samples where the busiest worker is beyond what the spill rule admits (+1: the admitted request)
    viol = sum(1 for s in res.inflight_samples if max(s) - min(s) > a + 1 and max(s) > rel * max(min(s), 1) + 1)
    dg = sorted(res.decision_gaps)
    by_turn = defaultdict(lambda: [0, 0])
    for r in reqs:
        by_turn[r.turn][0] += r.cached
        by_turn[r.turn][1] += r.prompt_len
    # conversation moves: a turn >= 1 served by another worker than the conversation's previous turn
    prev = {(r.gid, r.sample, r.turn): r.worker for r in reqs}
    later = [r for r in reqs if r.turn > 0]
    moves = sum(1 for r in later if prev.get((r.gid, r.sample, r.turn - 1)) != r.worker)
    # the most frequent family (the hot one in the "hot" scenario)
    hot = Counter(r.family for r in reqs).most_common(1)[0][0]
    hot_reqs = [r for r in reqs if r.family == hot]
    hot_t0 = [r for r in hot_reqs if r.turn == 0]
    hot_workers = Counter(r.worker for r in hot_reqs)
    peaks = [res.per_worker_peak.get(u, 0) for u in res.worker_urls]
    reqcounts = [res.per_worker_requests[u] for u in res.worker_urls]
    return {
        "label": res.label, "n": len(reqs),
        "hit": sum(r.cached for r in reqs) / prompt,
        "bound": analytic_bound(reqs, res.warm) / prompt,
        "unbounded": routed_unbounded(reqs, res.warm) / prompt,
        "by_turn": {t: v[0] / v[1] for t, v in sorted(by_turn.items())},
        "mean_ms": 1e3 * statistics.fmean(lat), "p99_ms": 1e3 * _p99(lat),
        "model_mean_ms": 1e3 * statistics.fmean(model), "model_p99_ms": 1e3 * _p99(model),
        # measured latency minus the sim's modeled service time: CPU queueing in router/sims/client
        "ovh_ms": 1e3 * (statistics.fmean(lat) - statistics.fmean(model)),
        "gap_p99": _p99(gaps), "gap_max": gaps[-1] if gaps else 0, "viol": viol / max(1, len(gaps)),
        "dgap_p99": _p99(dg), "dgap_max": dg[-1] if dg else 0,
        "moves": moves / max(1, len(later)),
        "reqs": reqcounts, "req_min": min(reqcounts), "req_max": max(reqcounts),
        "peaks": peaks, "peak_max": max(peaks),
        "reasons": dict(res.reasons), "wall_s": res.wall_s, "cpu": res.cpu_s / res.wall_s,
        "rps": len(reqs) / res.wall_s,
        "hot_share": len(hot_reqs) / len(reqs),
        "hot_hit": sum(r.cached for r in hot_reqs) / sum(r.prompt_len for r in hot_reqs),
        "hot_t0_hit": sum(r.cached for r in hot_t0) / max(1, sum(r.prompt_len for r in hot_t0)),
        "hot_workers": [hot_workers.get(u, 0) for u in res.worker_urls],
    }


def table(rows: list[dict], ideal_hit: float) -> str:
    cols = ["run", "reqs", "hit rate", "÷ ideal", "trace bound", "same routing, ∞ cache", "model mean/p99 ms",
            "measured mean/p99 ms", "queueing ms", "gap p99 / max", ">thr %", "decision gap p99 / max",
            "conv moves %", "req/worker min–max", "peak in-flight max", "route reasons"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        reasons = ", ".join(f"{k}:{v}" for k, v in sorted(r["reasons"].items(), key=lambda kv: -kv[1]))
        cells = [r["label"], r["n"], f"{r['hit']:.3f}", f"{r['hit'] / ideal_hit:.2f}", f"{r['bound']:.3f}",
                 f"{r['unbounded']:.3f}", f"{r['model_mean_ms']:.0f} / {r['model_p99_ms']:.0f}",
                 f"{r['mean_ms']:.0f} / {r['p99_ms']:.0f}", f"{r['ovh_ms']:.0f}", f"{r['gap_p99']} / {r['gap_max']}",
                 f"{100 * r['viol']:.1f}", f"{r['dgap_p99']} / {r['dgap_max']}", f"{100 * r['moves']:.1f}",
                 f"{r['req_min']}–{r['req_max']}", r["peak_max"], reasons]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

POLICIES = {
    # label: (route policy, routing-key mode, sim set, patch, record prompt+output after each reply)
    "least_inflight": ("least_inflight", None, "finite", None, False),
    "sticky": ("sticky", "conversation", "finite", None, False),
    "prefix_affinity": ("prefix_affinity", None, "finite", None, False),
    "ideal:pinned_inf": ("sticky", "family", "infinite", None, False),
    # prototypes (bench-only): see patch_multi_owner / record_served
    "pa+served": ("prefix_affinity", None, "finite", None, True),
    "pa+multi": ("prefix_affinity", None, "finite", patch_multi_owner, False),
    "pa+multi+served": ("prefix_affinity", None, "finite", patch_multi_owner, True),
}


def parse_policy(label: str, args):
    """`name[@absN][@kN]`: a POLICIES entry, optionally with its own spill abs threshold / multi-owner k."""
    name, *opts = label.split("@")
    policy, key_mode, simset, patch, served = POLICIES[name]
    abs_t = args.abs_threshold
    for o in opts:
        if o.startswith("abs"):
            abs_t = int(o[3:])
        elif o.startswith("k") and patch is patch_multi_owner:
            patch = partial(patch_multi_owner, k=int(o[1:]))
        else:
            raise SystemExit(f"unknown policy option {o!r} in {label!r}")
    return policy, key_mode, simset, patch, served, abs_t


async def amain(args) -> None:
    sz = Sizes()
    if args.quick:
        sz = Sizes(turns=3, groups=10, active_groups=4, cold_groups_each=1, cold_families=4, hot_factor=10)
    for k in ("groups", "active_groups", "turns", "system_tokens"):
        v = getattr(args, k)
        if v is not None:
            setattr(sz, k, v)
    if args.user_tokens:
        sz.user_tokens = tuple(int(x) for x in args.user_tokens.split(","))
    policies = args.policies.split(",")
    print(describe(sz, args), flush=True)
    proc, urls = start_sim_process({"finite": args.cache_tokens, "infinite": 1 << 40}, args)
    out_md = []
    try:
        for scenario in args.scenarios.split(","):
            groups = make_groups(scenario, sz, random.Random(args.seed))
            rows = []
            for label in policies:
                policy, key_mode, simset, patch, served, abs_t = parse_policy(label, args)
                res = await run_once(label, policy, key_mode, urls[simset], groups, sz, args, patch, served, abs_t)
                row = summarize(res, args)
                rows.append(row)
                print(f"  [{scenario}] {label}: hit {row['hit']:.3f} (same routing, inf cache {row['unbounded']:.3f}; "
                      f"bound {row['bound']:.3f}) mean {row['mean_ms']:.0f}ms (queueing {row['ovh_ms']:.0f}ms) "
                      f"gap p99 {row['gap_p99']} {row['rps']:.0f} req/s, cpu {row['cpu']:.2f}, {row['wall_s']:.1f}s",
                      flush=True)
            ideal = next((r["hit"] for r in rows if r["label"].startswith("ideal")), None) or max(
                r["bound"] for r in rows)
            md = [f"### scenario `{scenario}` (ideal = {ideal:.3f})", "", table(rows, ideal), ""]
            md.append("per-worker requests / peak in-flight:")
            md.append("")
            for r in rows:
                md.append(f"- {r['label']}: requests {r['reqs']}, peak {r['peaks']}, hit by turn "
                          + ", ".join(f"t{t}:{v:.2f}" for t, v in r["by_turn"].items())
                          + (f"; hot family ({100 * r['hot_share']:.0f}% of requests): hit {r['hot_hit']:.3f}, "
                             f"turn-0 hit {r['hot_t0_hit']:.3f}, requests per worker {r['hot_workers']}"
                             if scenario == "hot" else ""))
            md.append("")
            print("\n".join(md), flush=True)
            out_md += md
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M:%S')} `{' '.join(sys.argv[1:])}`\n\n")
            legend = __doc__.split("Columns:")[1].split("\n\n")[0]
            f.write(describe(sz, args) + "\n\n```" + legend + "\n```\n\n" + "\n".join(out_md) + "\n")


def describe(sz: Sizes, args) -> str:
    return (f"8 sims (one child process), router + client in-process; S={sz.system_tokens} tok, "
            f"P={sz.problem_tokens}, U={sz.user_tokens}, gen={sz.gen_tokens}, n={sz.samples}, turns={sz.turns}, "
            f"groups={sz.groups}, active groups={sz.active_groups}, cache={args.cache_tokens} tok/worker, "
            f"prefill {args.prefill_us} us/tok, "
            f"decode {args.token_latency_s * 1e3:g} ms/tok, spill abs={args.abs_threshold} rel={args.rel_threshold}; "
            f"hot scenario: 1 family x {sz.hot_factor * sz.cold_groups_each} groups + {sz.cold_families} families x "
            f"{sz.cold_groups_each} group(s); seed {args.seed}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--_sims":
        trio.run(_sims_main, json.loads(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scenarios", default="grpo,hot")
    p.add_argument("--policies", default="least_inflight,sticky,prefix_affinity,ideal:pinned_inf,pa+served",
                   help="comma list of " + ", ".join(POLICIES) + "; options: name@absN (spill threshold), "
                        "pa+multi...@kN (owners per block)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--groups", type=int)
    p.add_argument("--active-groups", dest="active_groups", type=int)
    p.add_argument("--turns", type=int)
    p.add_argument("--system-tokens", dest="system_tokens", type=int)
    p.add_argument("--user-tokens", help="min,max tokens of each follow-up user/tool turn")
    p.add_argument("--cache-tokens", type=int, default=6144)
    p.add_argument("--prefill-us", type=float, default=100.0)
    p.add_argument("--token-latency-s", type=float, default=0.005)
    p.add_argument("--no-warm", dest="warm", action="store_false",
                   help="don't pre-load the system prompt into every worker's cache")
    p.add_argument("--abs-threshold", type=int, default=8)
    p.add_argument("--rel-threshold", type=float, default=1.5)
    p.add_argument("--sample-ms", type=float, default=5.0)
    p.add_argument("--tokenizer", default="builtin:qwen")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "routing.md"))
    args = p.parse_args()
    trio.run(amain, args)


if __name__ == "__main__":
    main()
