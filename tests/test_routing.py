"""Routing that knows prefixes, sessions and weights; admin fan-out (issue #4), end to end."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import trio

from harness import client, start_router, start_sim, wait_until
from router.core.selection import PrefixIndex, SpillRule, StickyTable, choose, select_by_prefix
from router.core.workers import WorkerPool

ROOT = Path(__file__).resolve().parent.parent
LONG = "You are a careful math tutor. Explain every step and check the answer twice. " * 4


# ---- pure logic ----------------------------------------------------------------------------

def test_prefix_index_longest_block_match():
    idx = PrefixIndex(block_tokens=4, owners_per_block=2)
    a = np.arange(40, dtype=np.int32)
    idx.record(a[:20], "http://w1:1")
    idx.record(a[:12], "http://w2:1")  # w2 received the shorter prefix last
    assert idx.lookup(a) == (["http://w1:1"], 5)
    assert idx.lookup(a[:13]) == (["http://w2:1", "http://w1:1"], 3)  # most recent first
    assert idx.lookup(np.arange(3, dtype=np.int32)) == ([], 0)  # shorter than a block
    assert idx.lookup(a, usable=lambda u: u != "http://w1:1") == (["http://w2:1"], 3)
    idx.record(a[:4], "http://w3:1")  # a third owner pushes out the oldest
    assert idx.lookup(a[:4]) == (["http://w3:1", "http://w2:1"], 1)
    b = a.copy()
    b[0] = 99  # differs in the first block: nothing matches
    assert idx.lookup(b) == ([], 0)


def test_prefix_index_is_bounded():
    idx = PrefixIndex(block_tokens=1, capacity_blocks=10)
    idx.record(np.arange(100, dtype=np.int32), "http://w:1")
    assert len(idx) == 10


def test_spill_rule():
    pool = WorkerPool()
    a, _ = pool.add("http://a:1")
    b, _ = pool.add("http://b:1")
    rule = SpillRule(abs_threshold=4, rel_threshold=2.0)
    a.inflight, b.inflight = 4, 0
    assert choose(pool, a, rule, "hit") == (a, "hit")  # gap 4 is not > 4
    a.inflight = 5
    assert choose(pool, a, rule, "hit") == (b, "spill")
    b.inflight = 3  # gap 2: within bounds
    assert choose(pool, a, rule, "hit") == (a, "hit")


def test_spill_rule_weighs_the_stake():
    """Prefix affinity: each tokens_per_request tokens of stake allow one request of imbalance; below
    abs_threshold the gap alone decides. A larger stake keeps the abs-and-rel rule with rel_threshold
    raised by allowed / abs_threshold (up to 4x): a conversation leaves its history only for a worker
    that is nearly idle by comparison."""
    pool = WorkerPool()
    a, _ = pool.add("http://a:1")
    b, _ = pool.add("http://b:1")
    rule = SpillRule(abs_threshold=8, rel_threshold=1.5, tokens_per_request=64)
    a.inflight, b.inflight = 12, 9
    assert rule.overloaded(a, b, stake_tokens=128)  # 2 allowed, gap 3
    assert not rule.overloaded(a, b, stake_tokens=192)  # 3 allowed
    assert rule.overloaded(a, b, stake_tokens=0)  # nothing at stake: 1 allowed
    assert not rule.overloaded(a, b) and not rule.overloaded(a, b, stake_tokens=5000)  # the fixed rule: gap 3 <= 8
    assert not SpillRule(8, 1.5, tokens_per_request=0).overloaded(a, b, stake_tokens=0)  # off: the fixed rule
    a.inflight = 18  # gap 9 > 8 and 18 > 1.5 x 9: the fixed rule spills ...
    assert rule.overloaded(a, b) and rule.overloaded(a, b, stake_tokens=512)  # (512 tokens: 8 allowed, rel x 1)
    assert not rule.overloaded(a, b, stake_tokens=1024)  # ... a 1024-token stake wants 18 > 3 x 9
    assert choose(pool, a, rule, "hit", stake_tokens=1024) == (a, "hit")
    b.inflight = 2  # nearly idle: 18 > 6 x 2 (the raise stops at 4x) and gap 16 > 8
    assert rule.overloaded(a, b, stake_tokens=10**6)
    assert choose(pool, a, rule, "hit", stake_tokens=10**6) == (b, "spill")
    b.inflight = 4  # 18 < 6 x 4: a long history stays
    assert not rule.overloaded(a, b, stake_tokens=10**6) and rule.overloaded(a, b, stake_tokens=512)


def test_unheld_counts_the_blocks_a_worker_would_prefill_again():
    idx = PrefixIndex(block_tokens=4, owners_per_block=3)
    seq = np.arange(24, dtype=np.int32)  # 6 blocks
    keys = idx.keys(seq)
    idx.record(seq[:8], "http://x:1")
    idx.record(seq[:8], "http://y:1")
    idx.record(seq[:16], "http://b:1")  # b holds blocks 0-3; 0-1 now have a full owner list: held everywhere
    idx.record(seq, "http://a:1")
    assert idx.unheld(keys, 6, "http://a:1") == 0
    assert idx.unheld(keys, 6, "http://b:1") == 2
    assert idx.unheld(keys, 6, "http://z:1") == 4  # only the shared head
    assert idx.unheld(keys, 3, "http://z:1") == 1


def test_select_by_prefix_spreads_a_group_and_keeps_a_conversation():
    """Four workers, a system prompt every one of them received: the samples of a GRPO group
    (system + problem) arriving together spread once the first worker is 2 requests (128 tokens of
    problem / 64) busier than the least-loaded one, while a conversation's next turn (its whole
    history at stake) stays on its worker at the same imbalance."""
    pool = WorkerPool()
    ws = [pool.add(f"http://w{i}:1")[0] for i in range(4)]
    idx = PrefixIndex(block_tokens=16, owners_per_block=4)
    rule = SpillRule(abs_threshold=8, rel_threshold=1.5, tokens_per_request=64)
    system = np.arange(1000, 1512, dtype=np.int32)
    for w in ws:
        idx.record(system, w.url)
    prompt = np.concatenate([system, np.arange(5000, 5128, dtype=np.int32)])  # + a 128-token problem
    placed = []
    for _ in range(12):  # the group's samples arrive together: nothing finishes meanwhile
        w, reason = select_by_prefix(pool, idx, prompt, rule)
        w.inflight += 1
        placed.append((w.url, reason))
    first = placed[0][0]
    assert placed[:3] == [(first, "affinity_hit")] * 3  # the system prompt's owners, then its first worker
    assert Counter(u for u, _ in placed)[first] <= 4 and len({u for u, _ in placed}) >= 3
    assert max(w.inflight for w in ws) - min(w.inflight for w in ws) <= 3
    # a conversation's turn 2 on the first worker: its history is worth more than the imbalance
    history = np.concatenate([prompt, np.arange(7000, 7800, dtype=np.int32)])
    idx.record(history, first)
    owner = pool.get(first)
    owner.inflight = min(w.inflight for w in ws) + 5
    assert select_by_prefix(pool, idx, np.concatenate([history, [1, 2, 3]]), rule) == (owner, "affinity_hit")
    # ... but not at any imbalance: past the fixed rule (abs and rel) it spills too
    owner.inflight = 3 * min(w.inflight for w in ws) + 9
    w, reason = select_by_prefix(pool, idx, np.concatenate([history, [1, 2, 3]]), rule)
    assert reason == "spill" and w is not owner


def test_sticky_table_expires_idle_keys():
    t = StickyTable(idle_s=10)
    t.put("k", "http://w:1", now=0)
    assert t.get("k", now=5) == "http://w:1"
    assert t.get("k", now=16) is None


# ---- end to end ------------------------------------------------------------------------------

async def routed(nursery, n, policy, pipeline="passthrough", **routing):
    sims = [await start_sim(nursery, token_latency_s=0.01) for _ in range(n)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims]}, routing=routing,
                                routes=[{"path": "/generate", "pipeline": pipeline, "policy": policy}])
    return router, sims


async def test_prefix_affinity_keeps_a_grpo_group_together(nursery):
    # the fixed spill rule alone (balance_tokens_per_request = 0): a group of 8 stays on one of 4 workers
    router, sims = await routed(nursery, 4, "prefix_affinity", balance_tokens_per_request=0)
    got = []
    async with client(router) as c:
        async def sample(prompt, seed):
            r = await c.post("/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 8,
                                                                                    "sampling_seed": seed}})
            got.append((prompt, r.headers["x-miles-router-worker"], r.headers["x-miles-router-route-reason"]))

        for g in range(4):
            prompt = f"{LONG} Problem {g}: what is {g} + {g}?"
            async with trio.open_nursery() as n:
                for s in range(8):
                    n.start_soon(sample, prompt, s)
    by_prompt = {}
    for prompt, worker, _ in got:
        by_prompt.setdefault(prompt, set()).add(worker)
    assert all(len(ws) == 1 for ws in by_prompt.values()), by_prompt  # each group on one worker
    reasons = Counter(r for _, _, r in got)
    assert reasons["affinity_hit"] >= 4 * 7 - 2 and reasons["spill"] == 0


async def test_prefix_affinity_spreads_a_group_that_arrives_together(nursery):
    """With the stake-aware rule (the default) the samples of a group sent at once spread as soon as
    a worker is busier than the little they share is worth, and each sample's next turn still goes
    back to the worker that holds its history."""
    router, sims = await routed(nursery, 4, "prefix_affinity")
    first: dict[int, tuple[str, str]] = {}
    async with client(router) as c:
        async def sample(s):
            text = f"{LONG} Problem 7: what is 7 + 7?"
            r = await c.post("/generate", json={"text": text, "sampling_params": {
                "max_new_tokens": 160, "ignore_eos": True, "sampling_seed": s}})  # > a 64-byte block of its own
            first[s] = (r.headers["x-miles-router-worker"], text + r.json()["text"])

        async with trio.open_nursery() as n:
            for s in range(12):
                n.start_soon(sample, s)
        per_worker = Counter(w for w, _ in first.values())
        assert len(per_worker) >= 3 and max(per_worker.values()) - min(per_worker.values()) <= 3, per_worker
        for s, (worker, history) in first.items():  # one at a time: no load to weigh
            r = await c.post("/generate", json={"text": history + " And 8 + 8?", "sampling_params": {
                "max_new_tokens": 4}})
            assert r.headers["x-miles-router-worker"] == worker
            assert r.headers["x-miles-router-route-reason"] == "affinity_hit"


async def test_prefix_affinity_spills_a_hot_prefix(nursery):
    router, sims = await routed(nursery, 4, "prefix_affinity", balance_abs_threshold=2, balance_rel_threshold=1.5)
    got = []
    async with client(router) as c:
        async def sample(seed):
            r = await c.post("/generate", json={"text": LONG, "sampling_params": {"max_new_tokens": 30,
                                                                                  "ignore_eos": True,
                                                                                  "sampling_seed": seed}})
            got.append(r.headers["x-miles-router-route-reason"])

        async with trio.open_nursery() as n:
            for s in range(40):
                n.start_soon(sample, s)
    assert Counter(got)["spill"] > 0
    peak = max(w.requests_total for w in router.runtime.pool.all)
    assert peak < 40


async def test_multi_turn_follows_its_worker_through_the_cache(nursery):
    router, sims = await routed(nursery, 4, "prefix_affinity", pipeline=str(ROOT / "pipelines/radix-cache.toml"))
    async with client(router) as c:
        p = f"<|im_start|>user\n{LONG}<|im_end|>\n<|im_start|>assistant\n"
        r1 = await c.post("/generate", json={"text": p, "sampling_params": {"max_new_tokens": 20}})
        w1 = r1.headers["x-miles-router-worker"]
        text = p + r1.json()["text"]
        for turn in range(3):
            text += f"<|im_end|>\n<|im_start|>user\nfollow-up {turn}<|im_end|>\n<|im_start|>assistant\n"
            r = await c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": 20}})
            assert r.headers["x-miles-router-worker"] == w1
            assert r.headers["x-miles-router-route-reason"] == "affinity_hit"
            assert r.json()["meta_info"]["cached_tokens"] > 0  # the worker's KV cache was reused
            text += r.json()["text"]


async def test_input_ids_use_the_token_prefix(nursery):
    router, sims = await routed(nursery, 3, "prefix_affinity")
    ids = list(range(100, 400))
    async with client(router) as c:
        first = await c.post("/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 4}})
        for k in range(5):
            r = await c.post("/generate", json={"input_ids": ids + [k, k + 1], "sampling_params": {"max_new_tokens": 4}})
            assert r.headers["x-miles-router-worker"] == first.headers["x-miles-router-worker"]


async def test_sticky_routing_key(nursery):
    router, sims = await routed(nursery, 3, "sticky")
    async with client(router) as c:
        seen = {}
        for i in range(24):
            key = f"session-{i % 12}"
            r = await c.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 4}},
                             headers={"X-SMG-Routing-Key": key})
            seen.setdefault(key, set()).add(r.headers["x-miles-router-worker"])
            assert r.headers["x-miles-router-route-reason"] in ("sticky", "sticky_new")
        assert all(len(v) == 1 for v in seen.values())
        assert len({next(iter(v)) for v in seen.values()}) >= 2  # keys spread by their rendezvous weights
        # No key: plain least-in-flight.
        r = await c.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 4}})
        assert r.headers["x-miles-router-route-reason"] == "least_inflight"


async def test_sticky_repins_when_its_worker_leaves(nursery):
    router, sims = await routed(nursery, 2, "sticky")
    async with client(router) as c:
        r = await c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 4}},
                         headers={"x-smg-routing-key": "s"})
        first = r.headers["x-miles-router-worker"]
        await c.post("/remove_worker", params={"url": first})
        r = await c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 4}},
                         headers={"x-smg-routing-key": "s"})
        assert r.headers["x-miles-router-worker"] != first
        assert r.headers["x-miles-router-route-reason"] == "sticky_new"


async def test_recovery_is_gated_on_weight_version(nursery):
    a, b = await start_sim(nursery), await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [a.url, b.url], "health_interval_s": 0.05,
                                                  "failure_threshold": 1, "success_threshold": 1})
    pool = router.runtime.pool
    await wait_until(lambda: pool.get(a.url).weight_version == "default")
    async with client(a.url) as da:
        await da.post("/_sim/faults", json={"health_status": 503})
    await wait_until(lambda: pool.get(a.url).state.value == "quarantined")
    async with client(router) as c:
        # Weights move on while `a` is out: only healthy workers get the update.
        r = await c.post("/update_weight_version", json={"new_version": "step-2", "abort_all_requests": False})
        assert r.status_code == 200 and list(r.json()["results"]) == [b.url]
        assert pool.get(b.url).weight_version == "step-2"
        async with client(a.url) as da:
            await da.post("/_sim/faults", json={"health_status": 200})
        await wait_until(lambda: pool.get(a.url).held_reason is not None)
        w = next(w for w in (await c.get("/workers")).json()["workers"] if w["url"] == a.url)
        assert w["state"] == "quarantined" and "step-2" in w["held_reason"]
        # Once `a` serves the current weights it is re-admitted.
        async with client(a.url) as da:
            await da.post("/update_weight_version", json={"new_version": "step-2"})
        await wait_until(lambda: pool.get(a.url).state.value == "healthy")


async def test_admin_fanout_reaches_every_healthy_worker(nursery):
    sims = [await start_sim(nursery, token_latency_s=0.05) for _ in range(3)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims], "health_interval_s": 30})
    outs = []
    async with client(router) as c:
        async def long_gen():
            r = await c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1000,
                                                                                 "ignore_eos": True}})
            outs.append(r.json()["meta_info"]["finish_reason"]["type"])

        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(long_gen)
            await wait_until(lambda: sum(w.inflight for w in router.runtime.pool.all) == 3)
            r = await c.post("/abort_request", json={"abort_all": True})
            assert r.status_code == 200
            body = r.json()
            assert body["succeeded"] == 3 and set(body["results"]) == {s.url for s in sims}
        assert outs == ["abort"] * 3
        r = await c.post("/flush_cache")
        assert r.status_code == 200 and all(v["status"] == 200 for v in r.json()["results"].values())
        sims[2].kill()
        r = await c.post("/pause_generation", json={"mode": "abort"})
        assert r.status_code == 207
        res = r.json()["results"]
        assert res[sims[2].url]["ok"] is False and res[sims[2].url]["error"]
        assert res[sims[0].url] == {"ok": True, "status": 200, "body": {"message": "Generation paused successfully.",
                                                                        "status": "ok"}}
        r = await c.post("/continue_generation", json={})
        assert r.status_code == 207
        text = (await c.get("/metrics")).text
        assert 'miles_router_fanout_requests_total{outcome="error",path="/pause_generation"} 1.0' in text


async def test_fanout_can_be_turned_off_per_path(nursery):
    sims = [await start_sim(nursery) for _ in range(2)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims]},
                                routing={"fanout_paths": ["/abort_request"]})
    async with client(router) as c:
        r = await c.post("/flush_cache")
        assert r.status_code == 200 and r.text.startswith("Cache flushed.")  # one worker's own reply
        assert "x-miles-router-worker" in r.headers


async def test_next_turn_returns_to_the_worker_that_generated_it(nursery):
    """Passthrough + input_ids: the index learns each reply's output_ids, so a conversation's next
    turn follows its own history even when its GRPO siblings were spread over several workers."""
    router, sims = await routed(nursery, 4, "prefix_affinity", balance_abs_threshold=0, balance_rel_threshold=1.0)
    prompt = list(range(1000, 1100))
    first = {}
    async with client(router) as c:
        async def turn0(i):
            r = await c.post("/generate", json={"input_ids": prompt, "sampling_params": {
                "max_new_tokens": 40, "ignore_eos": True, "sampling_seed": i}})
            first[i] = (r.headers["x-miles-router-worker"], r.json()["output_ids"])

        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(turn0, i)
        assert len({w for w, _ in first.values()}) > 1  # spill spread the siblings
        for i, (worker, out) in first.items():
            r = await c.post("/generate", json={"input_ids": prompt + out + [7, 8, 9],
                                                "sampling_params": {"max_new_tokens": 4}})
            assert r.headers["x-miles-router-worker"] == worker, i
            assert r.json()["meta_info"]["cached_tokens"] >= len(prompt)


async def test_prefix_index_is_kept_only_when_a_route_uses_it(nursery):
    router, _ = await routed(nursery, 1, "least_inflight", pipeline=str(ROOT / "pipelines/radix-cache.toml"))
    async with client(router) as c:
        for i in range(3):
            await c.post("/generate", json={"text": f"{LONG} {i}", "sampling_params": {"max_new_tokens": 20}})
    assert len(router.runtime.routing.prefix_index) == 0


async def test_passthrough_replies_update_the_workers_weight_version(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url], "health_interval_s": 30})
    w = router.runtime.pool.get(sim.url)
    await wait_until(lambda: w.weight_version == "default")
    async with client(sim.url) as d:  # the engine's weights change behind the router's back
        await d.post("/update_weight_version", json={"new_version": "step-9"})
    async with client(router) as c:
        r = await c.post("/generate", json={"text": "v", "sampling_params": {"max_new_tokens": 2}})
        assert r.json()["meta_info"]["weight_version"] == "step-9"
    assert w.weight_version == "step-9"


# ---- routing.default_policy ------------------------------------------------------------------

async def test_default_policy_covers_every_path_and_routes_override_it(nursery):
    sims = [await start_sim(nursery) for _ in range(3)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims]},
                                routing={"default_policy": "sticky"},
                                routes=[{"path": "/generate", "pipeline": str(ROOT / "pipelines/radix-cache.toml")},
                                        {"path": "/v1/completions", "policy": "least_inflight"}])
    async with client(router) as c:
        for key in ("session-a", "session-b", "session-c"):
            pinned = set()
            for i in range(4):
                key_header = {"x-smg-routing-key": key}
                # no [[routes]] entry: the default policy
                r = await c.get(f"/_sim/echo?i={i}", headers=key_header)
                assert r.status_code == 200
                assert r.headers["x-miles-router-route-reason"] == ("sticky_new" if i == 0 else "sticky")
                pinned.add(r.headers["x-miles-router-worker"])
                # a route with a pipeline but no policy: the default policy too
                r = await c.post("/generate", headers=key_header,
                                 json={"text": f"turn {i}", "sampling_params": {"max_new_tokens": 2}})
                assert r.status_code == 200 and r.headers["x-miles-router-route-reason"] == "sticky"
                pinned.add(r.headers["x-miles-router-worker"])
                # a route's own policy wins
                r = await c.post("/v1/completions", headers=key_header,
                                 json={"prompt": "x", "max_tokens": 1})
                assert r.headers["x-miles-router-route-reason"] == "least_inflight"
            assert len(pinned) == 1, pinned  # every sticky request of a key on one worker


async def test_without_default_policy_paths_are_least_inflight(nursery):
    sims = [await start_sim(nursery) for _ in range(2)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims]})
    async with client(router) as c:
        r = await c.get("/_sim/echo", headers={"x-smg-routing-key": "k"})
        assert r.headers["x-miles-router-route-reason"] == "least_inflight"


def test_default_policy_is_checked_at_load(tmp_path):
    from router.config import ConfigError, load_config

    p = tmp_path / "r.toml"
    p.write_text('[routing]\ndefault_policy = "fastest"\n')
    with pytest.raises(ConfigError, match=r"routing.default_policy: invalid value 'fastest'"):
        load_config(p)
    p.write_text('[routing]\ndefault_policy = "prefix_affinity"\n')
    assert load_config(p).routing.default_policy == "prefix_affinity"
