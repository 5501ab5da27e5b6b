"""Stickiness that survives how agents name requests (issue 20 item 4) and placement that agrees without talking
(issue 19 item 3): request-id lineage keys, ordered routing-key headers, a key's in-flight cap, rendezvous
placement the same from every router."""

from __future__ import annotations

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import client, start_router, start_sim, wait_until
from router.core.sticky import KeyInflight, preferred, rendezvous_order, routing_key, strip_lineage
from test_health import gen_body


def test_lineage_strips_one_retry_then_one_turn_suffix():
    cases = {"conv_t2_r1": "conv", "conv_t2": "conv", "conv_r3": "conv", "conv": "conv", "conv_r1_t2": "conv_r1",
             "a_t1_t2": "a_t1", "a_r1_r2": "a_r1", "conv_tx": "conv_tx", "conv_t": "conv_t", "_t1": "_t1",
             "_t1_r2": "_t1_r2", "x_T2": "x_T2", "multi_word_id_t10_r99": "multi_word_id", "conv_t2_r1\n": "conv_t2_r1\n"}
    for rid, want in cases.items():
        assert strip_lineage(rid) == want, rid


def test_routing_key_order():
    assert routing_key("sid", ["h_t1"], "b", ["r"]) == ("sid", "router")
    assert routing_key(None, [None, " ", "conv_t3_r1", "other"], "b", ["r"]) == ("conv", "header")
    assert routing_key(None, [None], "body_t1", ["r"]) == ("body", "body")
    assert routing_key(None, [], None, [None, "", "agent7_t4"]) == ("agent7", "lineage")
    assert routing_key(None, ["x" * 300], None, []) is None  # too long: not a key
    assert routing_key(None, [], None, iter(())) is None


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=30, unique=True),
       n=st.integers(2, 8), gone=st.integers(0, 7))
def test_rendezvous_moves_only_the_keys_of_a_worker_that_leaves_or_joins(keys, n, gone):
    urls = [f"http://10.0.0.{i}:30000" for i in range(n)]
    gone_url = urls[gone % n]
    before = {k: rendezvous_order(k, urls)[0] for k in keys}
    after = {k: rendezvous_order(k, [u for u in urls if u != gone_url])[0] for k in keys}
    for k in keys:
        assert sorted(rendezvous_order(k, urls)) == sorted(urls)
        assert preferred(k, urls, lambda u: 0, 2) == (rendezvous_order(k, urls)[0], False)
        assert rendezvous_order(k, list(reversed(urls))) == rendezvous_order(k, urls)  # order of the list: no matter
        if before[k] != gone_url:
            assert after[k] == before[k]  # only the leaving worker's keys move
        else:
            assert after[k] == rendezvous_order(k, urls)[1]  # ... to their second choice
    # and the reverse: a joining worker takes keys only for itself
    assert all(before[k] in (after[k], gone_url) for k in keys)


def test_rendezvous_is_the_same_in_another_process():
    """No per-process salt (Python's hash() would have one): a router on another host ranks the same way."""
    import json
    import os
    import subprocess
    import sys

    urls = [f"http://10.1.0.{i}:30000" for i in range(6)]
    keys = [f"session-{i}" for i in range(20)] + ["conv", "日本語", ""]
    code = ("import json, sys; from router.core.sticky import rendezvous_order; "
            f"print(json.dumps([rendezvous_order(k, {urls!r}) for k in {keys!r}]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True).stdout
    assert json.loads(out) == [rendezvous_order(k, urls) for k in keys]


def test_preferred_under_the_cap_and_key_counts():
    urls = ["http://a:1", "http://b:1", "http://c:1"]
    order = rendezvous_order("k", urls)
    counts = KeyInflight()
    assert preferred("k", urls, lambda u: counts.count("k", u), 2) == (order[0], False)
    counts.add("k", order[0])
    counts.add("k", order[0])
    assert preferred("k", urls, lambda u: counts.count("k", u), 2) == (order[1], True)
    assert preferred("k", urls, lambda u: counts.count("k", u), 3) == (order[0], False)
    assert preferred("k", urls, lambda u: counts.count("k", u), 0) == (order[0], False)  # no cap
    for u in order[1:]:
        counts.add("k", u)
        counts.add("k", u)
    assert preferred("k", urls, lambda u: counts.count("k", u), 2) == (order[0], False)  # all at the cap: home
    counts.done("k", order[0])
    assert counts.count("k", order[0]) == 1 and preferred("k", urls, lambda u: counts.count("k", u), 2)[0] == order[0]
    for u in urls:
        while counts.count("k", u):
            counts.done("k", u)
    assert len(counts) == 0 and preferred("k", [], lambda u: 0, 2) == (None, False)


async def sticky_fleet(nursery, n=3, latency=0.0, **routing):
    sims = [await start_sim(nursery, seed=i, token_latency_s=latency) for i in range(n)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims]}, routing=routing,
                                routes=[{"path": "/generate", "policy": "sticky"},
                                        {"path": "/v1/chat/completions", "policy": "sticky"}])
    return router, sims


async def test_lineage_keys_keep_an_agents_turns_and_retries_on_one_worker(nursery):
    router, sims = await sticky_fleet(nursery)
    urls = [s.url for s in sims]
    async with client(router) as c:
        for conv in (f"conv{i}" for i in range(6)):
            home = rendezvous_order(conv, urls)[0]
            for rid in (f"{conv}_t1", f"{conv}_t1_r1", f"{conv}_t2", f"{conv}_t3_r2"):
                body = {**gen_body(rid), "rid": rid}
                r = await c.post("/generate", json=body)
                assert r.status_code == 200 and r.headers["x-miles-router-worker"] == home, rid
                assert r.json()["meta_info"]["id"] == rid  # the rid itself reaches the engine unchanged
            # the request id headers carry the lineage too (an OpenAI client's x-request-id)
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 2}, headers={"x-request-id": f"{conv}_t4"})
            assert r.headers["x-miles-router-worker"] == home
    # lineage off: a rid is no key, requests route by load
    router, sims = await sticky_fleet(nursery, sticky_lineage=False)
    async with client(router) as c:
        r = await c.post("/generate", json={**gen_body("x"), "rid": "conv_t1"})
        assert r.headers["x-miles-router-route-reason"] == "least_inflight"


async def test_routing_key_headers_are_tried_in_order(nursery):
    router, sims = await sticky_fleet(nursery, routing_key_headers=["X-Agent-Session", "x-smg-routing-key"])
    urls = [s.url for s in sims]
    async with client(router) as c:
        for i in range(6):
            both = {"x-agent-session": f"agent{i}", "x-smg-routing-key": f"other{i}_t1"}
            r = await c.post("/generate", json=gen_body(f"a{i}"), headers=both)
            assert r.headers["x-miles-router-worker"] == rendezvous_order(f"agent{i}", urls)[0]
            r = await c.post("/generate", json=gen_body(f"b{i}"), headers={"x-smg-routing-key": f"other{i}_t2"})
            assert r.headers["x-miles-router-worker"] == rendezvous_order(f"other{i}", urls)[0]  # stripped too
            r = await c.post("/generate", json=gen_body(f"c{i}"), headers={"x-agent-session": ""})
            assert r.headers["x-miles-router-route-reason"] == "least_inflight"  # blank: no key


async def test_a_keys_inflight_cap_sends_its_third_request_to_its_next_worker(nursery):
    router, sims = await sticky_fleet(nursery, latency=0.03)
    urls = [s.url for s in sims]
    order = rendezvous_order("conv", urls)
    pool = router.runtime.pool
    async with client(router) as c:
        got = []

        async def turn(i):
            r = await c.post("/generate", json=gen_body(f"p{i}", 20), headers={"x-smg-routing-key": "conv"})
            got.append((r.headers["x-miles-router-worker"], r.headers["x-miles-router-route-reason"]))

        async with trio.open_nursery() as n:
            for i in range(2):
                n.start_soon(turn, i)
            await wait_until(lambda: pool.get(order[0]).inflight == 2)
            n.start_soon(turn, 2)
            await wait_until(lambda: pool.get(order[1]).inflight == 1)
            n.start_soon(turn, 3)
            await wait_until(lambda: pool.get(order[1]).inflight == 2)
            assert len(router.runtime.routing.key_inflight) == 2  # (conv, first) and (conv, second)
        assert sorted(got) == sorted([(order[0], "sticky_new"), (order[0], "sticky"), (order[1], "sticky_cap"),
                                      (order[1], "sticky_cap")])
        assert len(router.runtime.routing.key_inflight) == 0  # every count returned
        r = await c.post("/generate", json=gen_body("after"), headers={"x-smg-routing-key": "conv"})
        assert (r.headers["x-miles-router-worker"], r.headers["x-miles-router-route-reason"]) == (order[0], "sticky")
    # sticky_inflight_cap = 0: no cap
    router, sims = await sticky_fleet(nursery, latency=0.03, sticky_inflight_cap=0)
    pool, home = router.runtime.pool, rendezvous_order("conv", [s.url for s in sims])[0]
    async with client(router) as c, trio.open_nursery() as n:
        for i in range(4):
            n.start_soon(lambda i=i: c.post("/generate", json=gen_body(f"q{i}", 20), headers={"x-smg-routing-key": "conv"}))
        await wait_until(lambda: pool.get(home).inflight == 4)


async def test_two_routers_place_every_key_on_the_same_worker(nursery):
    """Two routers over the same workers (registered in different orders, one through /add_worker) and no link
    between them: every key's requests land on one worker whichever router they go through."""
    sims = [await start_sim(nursery, seed=i) for i in range(4)]
    urls = [s.url for s in sims]
    a = await start_router(nursery, workers={"urls": urls}, routing={"default_policy": "sticky"})
    b = await start_router(nursery, workers={"urls": list(reversed(urls[1:]))}, routing={"default_policy": "sticky"})
    async with client(b) as cb:
        await cb.post("/add_worker", params={"url": urls[0]})
    await wait_until(lambda: len(b.runtime.pool.healthy()) == 4 and len(a.runtime.pool.healthy()) == 4)
    placed: dict[str, set] = {}
    async with client(a) as ca, client(b) as cb:
        for i in range(40):
            key = f"session-{i}"
            for c, header in ((ca, {"x-smg-routing-key": key}), (cb, {"x-smg-routing-key": key}),
                              (ca, {"x-request-id": f"{key}_t2"}), (cb, {"x-request-id": f"{key}_t3_r1"})):
                r = await c.post("/generate", json=gen_body(key), headers=header)
                assert r.status_code == 200
                placed.setdefault(key, set()).add(r.headers["x-miles-router-worker"])
    assert all(len(v) == 1 for v in placed.values()), placed
    assert len({next(iter(v)) for v in placed.values()}) == 4  # and the keys spread over all four
    # a worker leaves both routers: only its keys move, to the same new worker from both
    gone = urls[2]
    for router in (a, b):
        async with client(router) as c:
            await c.post("/remove_worker", params={"url": gone})
    async with client(a) as ca, client(b) as cb:
        for key, (was,) in placed.items():
            seen = {(await c.post("/generate", json=gen_body(key), headers={"x-smg-routing-key": key}
                                  )).headers["x-miles-router-worker"] for c in (ca, cb)}
            assert len(seen) == 1 and (was == gone or seen == {was}), (key, was, seen)
