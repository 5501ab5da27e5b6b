"""A sick worker under traffic: how many requests reach it before it is taken out, and how long that takes
(issue 13; the figures in RELIABILITY.md's "under traffic" rows).

One router and two simulated workers, all in this process on loopback; `--clients` concurrent clients send
`--requests` POST /generate (4 tokens). Worker `a` is sick, worker `b` healthy with `--latency-ms` per token.
Scenarios (each run with the default breaker and retries, and again with both off, in the same run):

  health_fails_serves   a's /health answers 503 from t0, its requests still succeed (probe interval 0.25 s,
                        failure_threshold 3): time to quarantine, requests a took after t0
  fast_500_health_503   the issue's case: a answers every request 500 at once and /health 503
  fast_500_health_ok    a answers 500 at once, /health OK: only the breaker can take it out

Prints one JSON object per scenario and setting:
  sick_requests   requests that reached worker a (after t0 for health_fails_serves)
  taken_out_s     seconds from the first request (t0) until a left selection (quarantine or breaker open)
  client_statuses status -> count as the clients saw them

    python bench/sick_worker.py [--clients 8] [--requests 200] [--latency-ms 12]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from functools import partial

import httpx
import msgspec
import trio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from router.config import Config  # noqa: E402
from router.net.server import run_router  # noqa: E402
from router.sim import SimOptions, serve_sim_worker  # noqa: E402


async def start_sim(nursery, **options):
    opts = SimOptions(tokenizer="builtin:tiny", **options)
    return await nursery.start(partial(serve_sim_worker, opts, "127.0.0.1", 0))


async def run(scenario: str, protected: bool, args) -> dict:
    async with trio.open_nursery() as nursery:
        a_url, a = await start_sim(nursery, seed=0)
        b_url, b = await start_sim(nursery, seed=1, token_latency_s=args.latency_ms / 1000)
        cfg = {
            "server": {"port": 0},
            "workers": {"urls": [a_url, b_url], "health_interval_s": 0.25, "failure_threshold": 3},
            "tokenizer": {"path": "builtin:tiny"},
            "breaker": {"enabled": protected},
            "retry": {"max_attempts": 3 if protected else 1},
        }
        handle = await nursery.start(partial(run_router, msgspec.convert(cfg, Config), install_signals=False))
        pool = handle.runtime.pool
        wa = pool.get(a_url)
        async with httpx.AsyncClient(base_url=handle.url, trust_env=False, timeout=30) as c:
            for i in range(8):  # warm up both workers (connections, tokenizers) before the fault
                await c.post("/generate", json={"text": f"warm{i}|", "sampling_params": {"max_new_tokens": 1}})
        out_at = None
        statuses: Counter = Counter()
        sent = 0

        async def watch():
            nonlocal out_at
            while out_at is None:
                if wa.state.value != "healthy" or wa.breaker.state.value == "open":
                    out_at = time.monotonic()
                await trio.sleep(0.002)

        # Clients are made before t0 (an httpx client costs ~50 ms of CPU to create).
        conns = [httpx.AsyncClient(base_url=handle.url, trust_env=False, timeout=30) for _ in range(args.clients)]

        if scenario == "health_fails_serves":
            a.set_faults(health_status=503)
        elif scenario == "fast_500_health_503":
            a.set_faults(health_status=503, generate_status=500)
        else:
            a.set_faults(generate_status=500)
        before = a.stats.generate_requests
        t0 = time.monotonic()

        async def client(c):
            nonlocal sent
            async with c:
                while sent < args.requests:
                    sent += 1
                    r = await c.post("/generate", json={"text": f"q{sent}|", "sampling_params": {
                        "max_new_tokens": 4, "ignore_eos": True}})
                    statuses[r.status_code] += 1

        async with trio.open_nursery() as n:
            n.start_soon(watch)
            async with trio.open_nursery() as clients:
                for c in conns:
                    clients.start_soon(client, c)
            elapsed = time.monotonic() - t0
            if out_at is None:
                n.cancel_scope.cancel()
        result = {
            "scenario": scenario, "breaker_and_retries": protected, "clients": args.clients,
            "requests": args.requests, "req_per_s": round(args.requests / elapsed, 1),
            "sick_requests": a.stats.generate_requests - before,
            "taken_out_s": None if out_at is None else round(out_at - t0, 3),
            "client_statuses": dict(sorted(statuses.items())),
        }
        nursery.cancel_scope.cancel()
    return result


async def main(args) -> None:
    for scenario in ("health_fails_serves", "fast_500_health_503", "fast_500_health_ok"):
        for protected in (True, False):
            print(json.dumps(await run(scenario, protected, args)), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--latency-ms", type=float, default=12.0, help="worker b's per-token latency (4 tokens)")
    trio.run(main, p.parse_args())
