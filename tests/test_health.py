"""A sick worker must not keep eating traffic (issue 13), end to end over real sockets and under
concurrent traffic: probes vs. request outcomes, the circuit breaker, retries of error replies,
sticky placement, prefix affinity for OpenAI bodies, admission control and the per-worker cap.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import trio

from harness import client, start_router, start_sim, wait_until

GEN = {"sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}


def gen_body(tag: str, tokens: int = 4) -> dict:
    return {"text": f"[{tag}] hello|", "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True}}


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", re.M)
    for m in pat.finditer(text):
        if sorted((m.group(1) or "").split(",")) == sorted(want.split(",")) if want else not m.group(1):
            return float(m.group(2))
    return 0.0


async def traffic(c, stop: trio.Event, results: list, clients: int = 4, tag: str = "t") -> None:
    """`clients` concurrent loops of POST /generate until `stop`: (time, status, worker)."""

    async def loop(k: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = await c.post("/generate", json=gen_body(f"{tag}{k}-{i}"))
                results.append((time.monotonic(), r.status_code, r.headers.get("x-miles-router-worker")))
            except httpx.HTTPError as e:
                results.append((time.monotonic(), type(e).__name__, None))

    async with trio.open_nursery() as n:
        for k in range(clients):
            n.start_soon(loop, k)


# ---- 1. probes are evidence of their own -----------------------------------------------------

async def test_failing_health_quarantines_a_worker_that_keeps_serving_under_traffic(nursery):
    interval, threshold = 0.25, 3
    a, b = [await start_sim(nursery, token_latency_s=0.005, seed=i) for i in range(2)]
    router = await start_router(nursery, workers={"urls": [a.url, b.url], "health_interval_s": interval,
                                                  "failure_threshold": threshold, "success_threshold": 1})
    pool = router.runtime.pool
    results: list = []
    stop = trio.Event()
    async with client(router) as c, trio.open_nursery() as n:
        n.start_soon(traffic, c, stop, results)
        await trio.sleep(0.5)
        t0 = time.monotonic()
        a.worker.set_faults(health_status=503)  # a still answers every request with 200
        await wait_until(lambda: pool.get(a.url).state.value == "quarantined", timeout=10)
        took = time.monotonic() - t0
        served_meanwhile = [r for r in results if r[0] >= t0]
        a_after = a.worker.stats.generate_requests
        await trio.sleep(0.5)
        stop.set()
    rate = len(served_meanwhile) / took
    assert rate >= 10, f"only {rate:.1f} req/s while waiting for quarantine"
    assert any(w == a.url for _, _, w in served_meanwhile)  # a kept serving until it was taken out...
    # ... and that did not erase its failed probes: out within `threshold` probe intervals (+1 for the
    # probe in progress when the fault began, + margin for a loaded machine).
    assert took <= (threshold + 1) * interval + 1.0, took
    assert a.worker.stats.generate_requests - a_after <= 4  # only requests already in flight
    assert all(s == 200 for _, s, _ in results)


# ---- 2. circuit breaker ------------------------------------------------------------------------

async def test_breaker_bounds_what_a_fast_failing_worker_gets_under_traffic(nursery):
    # The case: a answers 500 at once (looks idle to least-in-flight), health OK;
    # b is healthy with ~40 ms latency; 8 clients, 200 requests.
    a = await start_sim(nursery, seed=0, faults={"generate_status": 500})
    b = await start_sim(nursery, seed=1, token_latency_s=0.01)
    router = await start_router(nursery, workers={"urls": [a.url, b.url], "health_interval_s": 0.1})
    statuses: list = []

    async def one(c, i):
        r = await c.post("/generate", json=gen_body(f"ff{i}"))
        statuses.append((r.status_code, r.headers["x-miles-router-worker"]))

    async with client(router) as c:
        limit = trio.Semaphore(8)

        async def bounded(i):
            async with limit:
                await one(c, i)

        async with trio.open_nursery() as n:
            for i in range(200):
                n.start_soon(bounded, i)
        workers = (await c.get("/workers")).json()["workers"]
        text = (await c.get("/metrics")).text
    got_a = a.worker.stats.generate_requests
    # Breaker failures (5) plus what 8 clients had in flight when it opened.
    assert got_a <= 5 + 8, got_a
    assert all(s == (200, b.url) for s in statuses), statuses  # each of a's 500s was retried on b
    wa = next(w for w in workers if w["url"] == a.url)
    assert wa["state"] == "healthy" and wa["breaker"]["state"] == "open"
    assert "consecutive failed requests" in wa["breaker"]["reason"]
    assert wa["request_failures_total"] == got_a
    assert metric(text, "miles_router_worker_breaker_state", worker=a.url, state="open") == 1.0
    assert metric(text, "miles_router_worker_breaker_transitions_total", worker=a.url, from_state="closed",
                  to_state="open") == 1.0
    assert metric(text, "miles_router_worker_breaker_state", worker=b.url, state="closed") == 1.0


async def test_breaker_open_half_open_closed_and_reopen_per_worker(nursery):
    a = await start_sim(nursery, seed=0, token_latency_s=0.0)
    b = await start_sim(nursery, seed=1, token_latency_s=0.0)
    cooldown = 0.6
    # Probes far apart: here only the trial requests decide. No retries: each outcome is visible.
    router = await start_router(nursery, workers={"urls": [a.url, b.url], "health_interval_s": 60},
                                breaker={"failures": 2, "cooldown_s": cooldown}, retry={"max_attempts": 1})
    pool = router.runtime.pool
    wa, wb = pool.get(a.url), pool.get(b.url)
    async with client(router) as c:
        a.worker.set_faults(generate_status=500)
        seen = []
        for i in range(4):
            r = await c.post("/generate", json=gen_body(f"o{i}"))
            seen.append(r.status_code)
        assert seen.count(500) == 2 and wa.breaker.state.value == "open"
        assert wb.breaker.state.value == "closed"  # per worker: b's breaker never moved
        # Open: every request goes to b.
        for i in range(6):
            r = await c.post("/generate", json=gen_body(f"b{i}"))
            assert (r.status_code, r.headers["x-miles-router-worker"]) == (200, b.url)
        # Cooldown over: half-open admits ONE trial even under concurrent traffic; it fails -> open.
        await trio.sleep(cooldown + 0.1)
        a.worker.set_faults(generate_status=500, delay_s=0.3)
        before = a.worker.stats.generate_requests
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(lambda i=i: c.post("/generate", json=gen_body(f"h{i}")))
        assert a.worker.stats.generate_requests - before == 1
        assert wa.breaker.state.value == "open" and wa.breaker.transitions == {
            "closed->open": 1, "open->half_open": 1, "half_open->open": 1}
        # Next cooldown: the worker recovered; the trial succeeds -> closed, a is back in rotation.
        a.worker.set_faults(generate_status=None, delay_s=0.0)
        await trio.sleep(cooldown + 0.1)
        workers = set()
        for i in range(6):
            r = await c.post("/generate", json=gen_body(f"c{i}"))
            assert r.status_code == 200
            workers.add(r.headers["x-miles-router-worker"])
        assert workers == {a.url, b.url} and wa.breaker.state.value == "closed"
        assert wa.breaker.transitions["half_open->closed"] == 1
        desc = next(w for w in (await c.get("/workers")).json()["workers"] if w["url"] == a.url)
        assert desc["breaker"]["state"] == "closed" and desc["breaker"]["transitions"]["half_open->open"] == 1
        assert wb.breaker.transitions == {}


async def test_when_every_breaker_is_open_requests_still_reach_the_workers(nursery):
    """Both workers answer 500 for a moment, so both breakers open (cooldown 30 s). Requests are not
    refused with the router's 503: they reach the workers (whose own 500 passes through), and once
    the workers recover the next request is a 200 that closes its worker's breaker, long before the
    cooldown. With `admit_when_all_open = false` the router answers 503 at once instead."""
    a = await start_sim(nursery, seed=0, token_latency_s=0.0)
    b = await start_sim(nursery, seed=1, token_latency_s=0.0)
    common = dict(workers={"urls": [a.url, b.url], "health_interval_s": 60}, retry={"max_attempts": 1})
    router = await start_router(nursery, breaker={"failures": 2, "cooldown_s": 30}, **common)
    strict = await start_router(nursery, breaker={"failures": 2, "cooldown_s": 30, "admit_when_all_open": False},
                                **common)
    a.worker.set_faults(generate_status=500)
    b.worker.set_faults(generate_status=500)
    for r_ in (router, strict):
        pool = r_.runtime.pool
        async with client(r_) as c:
            for i in range(4):
                assert (await c.post("/generate", json=gen_body(f"f{i}"))).status_code == 500
            assert {w.breaker.state.value for w in pool.active} == {"open"}
            r = await c.post("/generate", json=gen_body("all-open"))
            if r_ is strict:
                assert r.status_code == 503 and r.json()["error"] == "no healthy worker available"
            else:
                assert r.status_code == 500 and "stage" not in r.json()  # the worker's own reply
                assert r.headers["x-miles-router-worker"] in (a.url, b.url)
    a.worker.set_faults(generate_status=None)
    b.worker.set_faults(generate_status=None)
    async with client(router) as c:
        r = await c.post("/generate", json=gen_body("recovered"))
        assert r.status_code == 200
        first = router.runtime.pool.get(r.headers["x-miles-router-worker"])
        assert first.breaker.state.value == "closed" and first.breaker.transitions == {"closed->open": 1,
                                                                                        "open->closed": 1}
        for i in range(4):  # the other breaker is still cooling down: the closed worker takes the load
            r = await c.post("/generate", json=gen_body(f"after{i}"))
            assert (r.status_code, r.headers["x-miles-router-worker"]) == (200, first.url)


async def test_a_worker_whose_health_passes_but_requests_fail_gets_one_trial_per_cooldown(nursery):
    """Issue 20's half-open case: /health answers 200, every request 500. The probes (every 30 ms) pass
    all along; a passing probe used to close the breaker once the cooldown was over, so each burst of
    traffic after a cooldown sent the sick worker `breaker.failures` more requests. Now only a successful
    request closes it: one trial per cooldown (failed, and retried on b), and the transitions say so in
    GET /workers and /metrics."""
    failures, cooldown, cycles = 3, 1.0, 3
    a = await start_sim(nursery, seed=0, faults={"generate_status": 500})
    b = await start_sim(nursery, seed=1)
    router = await start_router(nursery, workers={"urls": [a.url, b.url], "health_interval_s": 0.03},
                                breaker={"failures": failures, "cooldown_s": cooldown})
    wa = router.runtime.pool.get(a.url)
    statuses = []

    async def post(c, tag):
        r = await c.post("/generate", json=gen_body(tag))
        statuses.append((r.status_code, r.headers["x-miles-router-worker"]))

    async with client(router) as c:
        while wa.breaker.state.value == "closed":
            await post(c, "open")
        assert a.worker.stats.generate_requests == failures
        received, allowed = [], []  # what a got in each burst, and its trials' worth (one per cooldown begun)
        for cycle in range(cycles):
            await trio.sleep(cooldown + 0.15)  # the cooldown runs out; probes keep passing meanwhile
            assert wa.consecutive_successes >= 3
            before, started = a.worker.stats.generate_requests, trio.current_time()
            for i in range(6):  # a burst, normally well within one cooldown
                await post(c, f"burst{cycle}-{i}")
            received.append(a.worker.stats.generate_requests - before)
            allowed.append(1 + int((trio.current_time() - started) / cooldown))  # 1 unless the machine crawls
        desc = next(w for w in (await c.get("/workers")).json()["workers"] if w["url"] == a.url)
        text = (await c.get("/metrics")).text
    assert received == allowed, (received, allowed)  # before the fix: `failures` (3) per burst
    assert wa.state.value == "healthy"  # the probes decide quarantine, and they passed
    assert all(s == (200, b.url) for s in statuses), statuses  # every failure was retried on b
    assert desc["breaker"]["state"] == "open"
    trials = sum(received)
    assert desc["breaker"]["transitions"] == {"closed->open": 1, "open->half_open": trials, "half_open->open": trials}
    assert metric(text, "miles_router_worker_breaker_transitions_total", worker=a.url, from_state="half_open",
                  to_state="open") == trials
    assert metric(text, "miles_router_worker_breaker_transitions_total", worker=a.url, from_state="open",
                  to_state="closed") == 0.0


async def test_breaker_ignores_4xx_and_can_be_disabled(nursery):
    a = await start_sim(nursery, seed=0)
    router = await start_router(nursery, workers={"urls": [a.url]}, breaker={"failures": 2})
    router2 = await start_router(nursery, workers={"urls": [a.url]}, breaker={"failures": 2, "enabled": False})
    async with client(router) as c, client(router2) as c2:
        a.worker.set_faults(generate_status=400)
        for i in range(5):
            assert (await c.post("/generate", json=gen_body(f"x{i}"))).status_code == 400
        assert router.runtime.pool.get(a.url).breaker.state.value == "closed"  # the client's fault
        a.worker.set_faults(generate_status=500)
        for i in range(5):
            assert (await c2.post("/generate", json=gen_body(f"y{i}"))).status_code == 500
        assert router2.runtime.pool.get(a.url).breaker.state.value == "closed"  # disabled
        assert (await c.post("/generate", json=gen_body("z1"))).status_code == 500
        assert (await c.post("/generate", json=gen_body("z2"))).status_code == 500
        assert router.runtime.pool.get(a.url).breaker.state.value == "open"
        r = await c.post("/generate", json=gen_body("z3"))  # open, but the only worker: still sent to it
        assert r.status_code == 500 and "stage" not in r.json()
        assert router.runtime.pool.get(a.url).breaker.state.value == "open"


# ---- 3. retries of error replies ------------------------------------------------------------

async def test_stream_retried_before_its_first_event_never_after(nursery):
    a = await start_sim(nursery, seed=0, token_latency_s=0.01)
    b = await start_sim(nursery, seed=1, token_latency_s=0.01)
    router = await start_router(nursery, workers={"urls": [a.url, b.url]})
    async with client(router) as c:
        a.worker.set_faults(generate_status=503)
        retried = 0
        for i in range(4):  # whichever worker is picked first, the client gets b's stream
            async with c.stream("POST", "/generate", json={**gen_body(f"s{i}", 6), "stream": True}) as r:
                assert r.status_code == 200 and r.headers["x-miles-router-worker"] == b.url
                lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and len(lines) >= 2
            if "x-miles-router-retried" in r.headers:
                assert r.headers["x-miles-router-retried"] == f"{a.url} 503"
                assert r.headers["x-miles-router-route-reason"] == "least_inflight, retry"
                retried += 1
        # ties go round-robin: a was picked first for some of them, and its 503 never reached the client
        assert retried >= 1 and a.worker.stats.generate_requests == retried
        # A stream that breaks after its first event is never resent (it was delivered and may have run).
        a.worker.set_faults(generate_status=None, drop_after_bytes=60)
        b.worker.set_faults(drop_after_bytes=60)
        before = a.worker.stats.generate_requests + b.worker.stats.generate_requests
        events = []
        try:
            async with c.stream("POST", "/generate", json={**gen_body("late", 20), "stream": True}) as r:
                assert r.status_code == 200
                async for ln in r.aiter_lines():
                    events.append(ln)
        except httpx.HTTPError:
            pass
        assert "data: [DONE]" not in events
        assert a.worker.stats.generate_requests + b.worker.stats.generate_requests == before + 1


async def test_retry_attempts_are_bounded_and_counted(nursery):
    sims = [await start_sim(nursery, seed=i, faults={"generate_status": 502}) for i in range(4)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims]}, retry={"max_attempts": 3})
    async with client(router) as c:
        await c.get("/health")  # a connection is open: the time below is the router's
        t0 = time.monotonic()
        r = await c.post("/generate", json=gen_body("all-bad"))
        took = time.monotonic() - t0
        # retried at once, never after a blind sleep (miles' own client sleeps 1 s between its retries)
        assert took < 0.5, took
        assert r.status_code == 502 and r.json()["message"] == "Simulated fault: status 502"  # the worker's own
        assert r.headers["x-miles-router-route-reason"] == "least_inflight, retry, retry"
        assert len(r.headers["x-miles-router-retried"].split(", ")) == 2
        assert sum(s.worker.stats.generate_requests for s in sims) == 3
        text = (await c.get("/metrics")).text
    assert metric(text, "miles_router_status_retries_total", status="502") == 2.0
    assert metric(text, "miles_router_retries_exhausted_total") == 1.0


# ---- 4. sticky placement -----------------------------------------------------------------------

async def test_sticky_new_keys_spread_with_two_workers_and_even_requests_per_key(nursery):
    sims = [await start_sim(nursery, seed=i) for i in range(2)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims]},
                                routes=[{"path": "/generate", "policy": "sticky"}])
    owner: dict[str, set] = {}
    async with client(router) as c:
        for rnd in range(2):  # every key twice, in turn: the old cursor put every key on one worker
            for k in range(32):
                r = await c.post("/generate", json=gen_body(f"k{k}"), headers={"x-smg-routing-key": f"key-{k}"})
                owner.setdefault(f"key-{k}", set()).add(r.headers["x-miles-router-worker"])
    assert all(len(v) == 1 for v in owner.values())  # sticky
    per_worker = {s.url: sum(1 for v in owner.values() if s.url in v) for s in sims}
    assert min(per_worker.values()) >= 8, per_worker  # spread by each key's rendezvous weights


async def test_sticky_keys_go_to_their_rendezvous_worker_and_spill_past_the_load_bound(nursery):
    """A key goes to its rendezvous (highest random weight) worker, whatever the load, until that worker is past
    the bounded-load rule: then that request spills to the least-loaded worker (and the key stays home)."""
    from router.core.sticky import rendezvous_order

    slow = await start_sim(nursery, seed=0, token_latency_s=0.05)
    fast = await start_sim(nursery, seed=1)
    router = await start_router(nursery, workers={"urls": [slow.url, fast.url]},
                                routing={"balance_abs_threshold": 2, "balance_rel_threshold": 1.5},
                                routes=[{"path": "/generate", "policy": "sticky"}])
    home = {k: rendezvous_order(k, [slow.url, fast.url])[0] for k in (f"new-{i}" for i in range(64))}
    by_home = {u: [k for k in home if home[k] == u] for u in (slow.url, fast.url)}
    keys = by_home[slow.url][:3] + by_home[fast.url][:3] + by_home[slow.url][3:6] + by_home[fast.url][3:6]
    async with client(router) as c:
        for k in keys[:6]:  # light load: every key at home
            r = await c.post("/generate", json=gen_body(k), headers={"x-smg-routing-key": k})
            assert r.headers["x-miles-router-worker"] == home[k] and r.headers["x-miles-router-route-reason"] == "sticky_new"
        slow_keys = [k for k in (f"busy-{i}" for i in range(40)) if rendezvous_order(k, [slow.url, fast.url])[0] == slow.url]
        async with trio.open_nursery() as n:
            for k in slow_keys[:3]:  # the slow worker gets 3 long requests: 3 > 2 + 0 and 3 > 1.5 x 0
                n.start_soon(lambda k=k: c.post("/generate", json=gen_body(k, 40), headers={"x-smg-routing-key": k}))
            pool = router.runtime.pool
            await wait_until(lambda: pool.get(slow.url).inflight == 3)
            for k in keys[6:]:
                r = await c.post("/generate", json=gen_body(k), headers={"x-smg-routing-key": k})
                if home[k] == slow.url:
                    assert r.headers["x-miles-router-route-reason"] == "spill"
                    assert r.headers["x-miles-router-worker"] == fast.url
                else:
                    assert r.headers["x-miles-router-worker"] == fast.url
            assert pool.get(slow.url).inflight == 3
            n.cancel_scope.cancel()


# ---- 5. prefix affinity for OpenAI bodies and short prompts ---------------------------------

def chat_body(messages, tools=None) -> dict:
    b = {"model": "m", "messages": messages, "max_tokens": 4}
    if tools is not None:
        b["tools"] = tools
    return b


async def _affinity_chat(nursery, with_tokenizer: bool):
    sims = [await start_sim(nursery, seed=i) for i in range(3)]
    routes = [{"path": "/v1/chat/completions", "policy": "prefix_affinity"},
              {"path": "/v1/completions", "policy": "prefix_affinity"},
              {"path": "/generate", "policy": "prefix_affinity"}]
    if with_tokenizer:  # a radix route makes the router load a tokenizer: chat bodies use its template
        routes.append({"path": "/other", "pipeline": "pipelines/radix-cache.toml"})
    router = await start_router(nursery, workers={"urls": [s.url for s in sims]}, routes=routes,
                                base_dir=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    if with_tokenizer:
        assert router.runtime.tokenizer is not None
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    async with client(router) as c:
        for group in range(3):  # groups of identical short requests (GRPO samples) and their next turn
            msgs = [{"role": "system", "content": "You are a helpful assistant. Answer briefly and kindly."},
                    {"role": "user", "content": f"hi {group}"}]
            first = await c.post("/v1/chat/completions", json=chat_body(msgs, tools))
            w = first.headers["x-miles-router-worker"]
            for _ in range(3):
                r = await c.post("/v1/chat/completions", json=chat_body(msgs, tools))
                assert (r.headers["x-miles-router-route-reason"], r.headers["x-miles-router-worker"]) == (
                    "affinity_hit", w)
            nxt = msgs + [{"role": "assistant", "content": "hello!"}, {"role": "user", "content": "more"}]
            r = await c.post("/v1/chat/completions", json=chat_body(nxt, tools))
            assert (r.headers["x-miles-router-route-reason"], r.headers["x-miles-router-worker"]) == (
                "affinity_hit", w)
        # Short completions prompts and short /generate texts (shorter than one 64-byte block).
        for path, body in (("/v1/completions", {"model": "m", "prompt": "2+2=", "max_tokens": 2}),
                           ("/v1/completions", {"model": "m", "prompt": [1, 2, 3], "max_tokens": 2}),
                           ("/generate", {"text": "short", **GEN})):
            first = await c.post(path, json=body)
            for _ in range(3):
                r = await c.post(path, json=body)
                assert r.headers["x-miles-router-route-reason"] == "affinity_hit", (path, body)
                assert r.headers["x-miles-router-worker"] == first.headers["x-miles-router-worker"]
        # Unreadable for affinity: said so, counted, still served by load.
        r = await c.post("/v1/chat/completions", content=b"not json", headers={"content-type": "application/json"})
        assert r.headers["x-miles-router-route-reason"] == "affinity_unreadable"
        r = await c.post("/v1/completions", json={"model": "m"})
        assert r.headers["x-miles-router-route-reason"] == "affinity_unreadable"
        text = (await c.get("/metrics")).text
    assert metric(text, "miles_router_affinity_unreadable_total", route="/v1/chat/completions") == 1.0
    assert metric(text, "miles_router_affinity_unreadable_total", route="/v1/completions") == 1.0


async def test_prefix_affinity_reads_openai_bodies_as_text(nursery):
    await _affinity_chat(nursery, with_tokenizer=False)


async def test_prefix_affinity_reads_chat_bodies_through_the_chat_template(nursery):
    await _affinity_chat(nursery, with_tokenizer=True)


# ---- 6. admission control and the per-worker cap ------------------------------------------

async def test_admission_queue_429_when_full_408_on_timeout_router_endpoints_not_queued(nursery):
    sim = await start_sim(nursery, token_latency_s=0.1)
    router = await start_router(nursery, workers={"urls": [sim.url]},
                                server={"max_concurrent_requests": 2, "queue_size": 2, "queue_timeout_s": 0.5})
    results = {}

    async def send(c, tag, tokens=15):
        r = await c.post("/generate", json=gen_body(tag, tokens))
        results[tag] = (r.status_code, r.json())

    async with client(router) as c, trio.open_nursery() as n:
        for tag in ("run1", "run2"):
            n.start_soon(send, c, tag)
        await wait_until(lambda: router.runtime.admission.active == 2)
        for tag in ("wait1", "wait2"):
            n.start_soon(send, c, tag)
        await wait_until(lambda: len(router.runtime.admission.queue) == 2)
        r = await c.post("/generate", json=gen_body("over"))
        assert r.status_code == 429 and "server.queue_size" in r.json()["error"]
        # Router-owned endpoints answer at once while generation traffic is queued.
        with trio.fail_after(1.0):
            assert (await c.get("/health")).status_code == 200
            text = (await c.get("/metrics")).text
            assert (await c.get("/workers")).status_code == 200
            r = await c.post("/retrieve_from_text", json={"text": "anything"})
            assert r.status_code == 404 and "trajectory cache is not enabled" in r.json()["error"]  # answered
            sid = (await c.post("/sessions")).json()["session_id"]  # sessions API control routes
            assert (await c.get(f"/sessions/{sid}")).status_code == 200
            # admin fan-out reaches the worker past the queue (which, like SGLang, refuses to flush while
            # requests run: its own 400 came back)
            fan = (await c.post("/flush_cache")).json()
            assert fan["results"][sim.url]["status"] == 400 and "running" in fan["results"][sim.url]["body"], fan
        assert metric(text, "miles_router_queue_depth", queue="admission") == 2.0
        assert metric(text, "miles_router_admitted_requests") == 2.0
    assert results["run1"][0] == results["run2"][0] == 200
    for tag in ("wait1", "wait2"):
        assert results[tag][0] == 408 and "server.queue_timeout_s" in results[tag][1]["error"]
    async with client(router) as c:
        text = (await c.get("/metrics")).text
    assert metric(text, "miles_router_queue_rejections_total", queue="admission", reason="full") == 1.0
    assert metric(text, "miles_router_queue_rejections_total", queue="admission", reason="timeout") == 2.0
    assert router.runtime.admission.active == 0


async def test_admission_queue_is_fifo_and_waits_are_measured(nursery):
    sim = await start_sim(nursery, token_latency_s=0.05)
    router = await start_router(nursery, workers={"urls": [sim.url]},
                                server={"max_concurrent_requests": 1, "queue_size": 10, "queue_timeout_s": 20})
    done = []

    async def send(c, i):
        r = await c.post("/generate", json=gen_body(f"q{i}", 40 if i == 0 else 2))
        assert r.status_code == 200
        done.append(i)

    async with client(router) as c:
        async with trio.open_nursery() as n:
            n.start_soon(send, c, 0)
            await wait_until(lambda: router.runtime.admission.active == 1)
            for i in range(1, 6):  # queued one after the other while request 0 runs (2 s)
                n.start_soon(send, c, i)
                await wait_until(lambda i=i: len(router.runtime.admission.queue) == i)
        assert done == list(range(6))  # served in arrival order
        text = (await c.get("/metrics")).text
    assert metric(text, "miles_router_queue_wait_seconds_count", queue="admission") == 5.0
    assert sim.worker.stats.peak_in_flight == 1


async def test_per_worker_cap_queues_fairly_and_places_on_the_least_loaded(nursery):
    sims = [await start_sim(nursery, seed=i, token_latency_s=0.02) for i in range(2)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims], "max_inflight_per_worker": 2,
                                                  "queue_timeout_s": 20})
    statuses = []
    order = []

    async def send(c, i):
        r = await c.post("/generate", json=gen_body(f"p{i}", 6))
        statuses.append(r.status_code)
        order.append(i)

    async with client(router) as c:
        async with trio.open_nursery() as n:
            for i in range(16):
                n.start_soon(send, c, i)
                await trio.sleep(0.005)
            await wait_until(lambda: len(router.runtime.workers.slot_queue) > 0)
            text = (await c.get("/metrics")).text
            assert metric(text, "miles_router_queue_depth", queue="worker_slot") > 0
        text = (await c.get("/metrics")).text
    assert statuses == [200] * 16
    assert all(s.worker.stats.peak_in_flight <= 2 for s in sims)  # the cap held on each worker
    assert all(s.worker.stats.generate_requests >= 4 for s in sims)  # and both workers took waiters
    assert metric(text, "miles_router_queue_wait_seconds_count", queue="worker_slot") >= 8


async def test_per_worker_cap_places_a_waiter_on_the_worker_whose_slot_frees_first(nursery):
    """Selection happens when a slot frees, not when a request starts waiting: with one worker busy for 3 s and
    the other free again after ~0.4 s, every waiting request goes to the second one (a waiter pinned to a worker
    at arrival would wait out the long request)."""
    sims = [await start_sim(nursery, seed=i, token_latency_s=0.05) for i in range(2)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims], "max_inflight_per_worker": 1,
                                                  "queue_timeout_s": 20})
    pool = router.runtime.pool
    served = {}

    async def send(c, tag, tokens):
        r = await c.post("/generate", json=gen_body(tag, tokens))
        assert r.status_code == 200
        served[tag] = (r.headers["x-miles-router-worker"], time.monotonic())

    async with client(router) as c:
        async with trio.open_nursery() as n:
            n.start_soon(send, c, "long", 60)
            await wait_until(lambda: sum(w.inflight for w in pool.all) == 1)
            busy = next(w.url for w in pool.all if w.inflight == 1)
            n.start_soon(send, c, "short", 8)
            await wait_until(lambda: sum(w.inflight for w in pool.all) == 2)
            for i in range(4):  # both workers full: these wait
                n.start_soon(send, c, f"w{i}", 4)
                await wait_until(lambda i=i: len(router.runtime.workers.slot_queue) == i + 1)
    other = next(s.url for s in sims if s.url != busy)
    assert served["long"][0] == busy and served["short"][0] == other
    assert all(served[f"w{i}"][0] == other for i in range(4)), served
    assert all(served[f"w{i}"][1] < served["long"][1] for i in range(4))  # none waited for the long request


async def test_per_worker_cap_wait_past_timeout_is_503(nursery):
    sim = await start_sim(nursery, token_latency_s=0.1)
    router = await start_router(nursery, workers={"urls": [sim.url], "max_inflight_per_worker": 1,
                                                  "queue_timeout_s": 0.3})
    async with client(router) as c, trio.open_nursery() as n:
        n.start_soon(lambda: c.post("/generate", json=gen_body("long", 20)))
        await wait_until(lambda: router.runtime.pool.get(sim.url).inflight == 1)
        r = await c.post("/generate", json=gen_body("waits"))
        assert r.status_code == 503
        assert "workers.max_inflight_per_worker" in r.json()["error"] and r.json()["waited_s"] >= 0.3
        text = (await c.get("/metrics")).text
        assert metric(text, "miles_router_queue_rejections_total", queue="worker_slot", reason="timeout") == 1.0
    assert sim.worker.stats.generate_requests == 1


async def test_per_worker_cap_queue_is_fifo(nursery):
    sim = await start_sim(nursery, token_latency_s=0.05)
    router = await start_router(nursery, workers={"urls": [sim.url], "max_inflight_per_worker": 1,
                                                  "queue_timeout_s": 20})
    done = []

    async def send(c, i):
        r = await c.post("/generate", json=gen_body(f"w{i}", 40 if i == 0 else 2))
        assert r.status_code == 200
        done.append(i)

    async with client(router) as c:
        async with trio.open_nursery() as n:
            n.start_soon(send, c, 0)
            await wait_until(lambda: router.runtime.pool.get(sim.url).inflight == 1)
            for i in range(1, 6):
                n.start_soon(send, c, i)
                await wait_until(lambda i=i: len(router.runtime.workers.slot_queue) == i)
    assert done == list(range(6)) and sim.worker.stats.peak_in_flight == 1


async def test_stream_retry_through_the_radix_pipeline_records_only_the_attempt_that_succeeded(nursery):
    from pathlib import Path

    from router.tokenizer import load_tokenizer

    root = Path(__file__).resolve().parent.parent
    a = await start_sim(nursery, seed=0, faults={"generate_status": 503})
    b = await start_sim(nursery, seed=1, token_latency_s=0.005)
    router = await start_router(nursery, workers={"urls": [a.url, b.url]},
                                routes=[{"path": "/generate", "pipeline": str(root / "pipelines/radix-cache.toml")}])
    tok = load_tokenizer("builtin:tiny")
    async with client(router) as c:
        for i in range(4):
            body = {**gen_body(f"rs{i}", 6), "stream": True}
            async with c.stream("POST", "/generate", json=body) as r:
                assert r.status_code == 200 and r.headers["x-miles-router-worker"] == b.url
                data = [ln[6:] async for ln in r.aiter_lines() if ln.startswith("data: ")]
            final = json.loads(data[-2])
            got = (await c.post("/retrieve_from_text", json={"text": body["text"] + final["text"]})).json()
            assert got["exact"] and got["tokens"] == tok.encode(body["text"]) + final["output_ids"]
        stats = (await c.get("/cache/stats")).json()
    assert stats["trajectories"] == 4
    assert a.worker.stats.generate_requests >= 1  # a was tried (and its 503 retried), never recorded
