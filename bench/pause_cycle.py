"""Weight updates under agentic traffic: how many turns a pause/update/continue cycle aborts (issue 20; the figures
in RELIABILITY.md's "Weight updates under traffic" table). Goal: 0.

One router, `--workers` simulated SGLang workers (Qwen's tiny builtin vocabulary), all in this process on
loopback. `--agents` session agents (OpenAI chat through /sessions, the session pipeline) and `--texts` text
conversations (/generate through the radix-cache pipeline) take turns without pause while a trainer runs
`--cycles` weight updates, one every `--interval` s. Three settings, same run:

  abort_all     what miles does today (miles#2589): pause_generation {"mode": "retract"}, update_weights_from_disk,
                then update_weight_version {"new_version"} whose default abort_all_requests=true aborts every
                request in the engines; continue_generation
  no_hold       pause (retract) -> update_weights_from_disk {weight_version, abort_all_requests: false} ->
                continue, through /v1/rl, with routing.hold_when_paused = false (new requests go to the paused
                engines, which block them)
  hold          the same cycle with the router holding new generation requests while the engines are paused

Prints one JSON object per setting: turns, aborted_turns, requests_at_paused_engines (generation requests that
reached an engine while it was paused), held (requests held at the router) and their mean/max hold time,
turn latency p50/p99.

    python bench/pause_cycle.py [--workers 2] [--agents 12] [--texts 6] [--cycles 5] [--interval 0.4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from functools import partial

import httpx
import msgspec
import numpy as np
import trio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from router.config import Config  # noqa: E402
from router.net.server import run_router  # noqa: E402
from router.sim import SimOptions, serve_sim_worker  # noqa: E402

SELECT = "?selector=engine%3Dsglang"


def metric(text: str, name: str, queue: str) -> float:
    m = re.search(rf'^{name}{{queue="{queue}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def run(setting: str, args) -> dict:
    async with trio.open_nursery() as nursery:
        sims = []
        for i in range(args.workers):
            url, sim = await nursery.start(partial(serve_sim_worker, SimOptions(
                tokenizer="builtin:tiny", seed=i, token_latency_s=args.token_ms / 1000), "127.0.0.1", 0))
            sims.append((url, sim))
        cfg = {"server": {"port": 0}, "tokenizer": {"path": "builtin:tiny"}, "store": {"enabled": False},
               "workers": {"urls": [u for u, _ in sims], "health_interval_s": 5},
               "routing": {"hold_when_paused": setting != "no_hold"},
               "routes": [{"path": "/generate", "pipeline": os.path.join(ROOT, "pipelines/radix-cache.toml")}]}
        handle = await nursery.start(partial(run_router, msgspec.convert(cfg, Config), install_signals=False))
        done = trio.Event()
        finishes, latencies = [], []
        async with httpx.AsyncClient(base_url=handle.url, trust_env=False, timeout=120) as c:
            async def turn(path, body) -> dict:
                t0 = time.perf_counter()
                r = await c.post(path, json=body)
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                return r.json()

            async def chat_agent(i):
                sid = (await c.post("/sessions")).json()["session_id"]
                messages = [{"role": "user", "content": f"agent {i}: begin"}]
                t = 0
                while not done.is_set():
                    reply = await turn(f"/sessions/{sid}/v1/chat/completions",
                                       {"messages": messages, "max_tokens": 300})
                    choice = reply["choices"][0]
                    finishes.append(choice["finish_reason"])
                    if choice["finish_reason"] in ("abort", "length"):
                        continue  # an aborted (or cut) turn is retried from the same history
                    # the reply whole: without its reasoning_content the next turn would start a branch
                    messages += [choice["message"], {"role": "user", "content": f"step {t}"}]
                    t += 1

            async def text_agent(i):
                text = f"conversation {i}:"
                t = 0
                while not done.is_set():
                    reply = await turn("/generate", {"text": text, "sampling_params": {"max_new_tokens": 48}})
                    finishes.append(reply["meta_info"]["finish_reason"]["type"])
                    if finishes[-1] != "abort":
                        text += reply["text"] + f" user {t}:"
                        t += 1

            async def trainer():
                await trio.sleep(args.interval)
                for cycle in range(args.cycles):
                    version = f"step-{cycle + 1}"
                    r = await c.post(f"/v1/rl/engine/pause_generation{SELECT}", json={"mode": "retract"})
                    assert r.status_code == 200, r.text
                    await trio.sleep(args.update_s)  # the weight transfer
                    if setting == "abort_all":
                        r = await c.post(f"/v1/rl/engine/update_weights_from_disk{SELECT}",
                                         json={"model_path": "/ckpt", "abort_all_requests": False})
                        assert r.status_code == 200, r.text
                        r = await c.post(f"/v1/rl/engine/update_weight_version{SELECT}", json={"new_version": version})
                    else:
                        r = await c.post(f"/v1/rl/engine/update_weights_from_disk{SELECT}",
                                         json={"model_path": "/ckpt", "weight_version": version,
                                               "abort_all_requests": False})
                    assert r.status_code == 200, r.text
                    r = await c.post(f"/v1/rl/engine/continue_generation{SELECT}", json={})
                    assert r.status_code == 200, r.text
                    await trio.sleep(args.interval)
                done.set()

            async with trio.open_nursery() as n:
                n.start_soon(trainer)
                for i in range(args.agents):
                    n.start_soon(chat_agent, i)
                for i in range(args.texts):
                    n.start_soon(text_agent, i)
            text = (await c.get("/metrics")).text
        held = metric(text, "miles_router_queue_wait_seconds_count", "pause_hold")
        hold_sum = metric(text, "miles_router_queue_wait_seconds_sum", "pause_hold")
        lat = np.array(latencies)
        nursery.cancel_scope.cancel()
    return {"setting": setting, "turns": len(finishes), "aborted_turns": finishes.count("abort"),
            "requests_at_paused_engines": sum(s.stats.generate_while_paused for _, s in sims),
            "held": int(held), "hold_mean_s": round(hold_sum / held, 3) if held else 0.0,
            "turn_p50_s": round(float(np.percentile(lat, 50)), 3), "turn_p99_s": round(float(np.percentile(lat, 99)), 3),
            "cycles": args.cycles, "workers": args.workers, "agents": args.agents, "texts": args.texts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--agents", type=int, default=12)
    ap.add_argument("--texts", type=int, default=6)
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--interval", type=float, default=0.4, help="seconds between weight updates")
    ap.add_argument("--update-s", type=float, default=0.2, help="seconds the weight transfer takes")
    ap.add_argument("--token-ms", type=float, default=2.0)
    ap.add_argument("--settings", default="abort_all,no_hold,hold")
    args = ap.parse_args()
    for setting in args.settings.split(","):
        print(json.dumps(trio.run(run, setting, args)), flush=True)


if __name__ == "__main__":
    main()
