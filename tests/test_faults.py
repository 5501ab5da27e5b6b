"""Fault matrix (issue #5), end to end over real sockets: the router in front of simulated SGLang
workers whose faults are switched on and off (`/_sim/faults`, pause, kill, SIGKILL), and the router
itself SIGTERMed as a subprocess.

Every case states what the client of the faulty request sees, and checks that nothing else is lost:
concurrent healthy traffic all succeeds, every worker slot comes back (`inflight` 0, on the
router and on the worker), and trajectories stored before the fault are still retrieved exactly.
Cases already covered elsewhere (plain 504 on a hang, pass-through of a 503, quarantine/recovery,
disconnect with the passthrough pipeline, drain in-process, abort recorded) are not repeated;
these add the radix-cache pipeline and the "nothing else lost" checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

from harness import Sim, client, free_port, start_router, start_sim, wait_until
from router.sim import SimOptions, serve_sim_worker
from router.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
RADIX = str(ROOT / "pipelines/radix-cache.toml")
FAST_HEALTH = {"health_interval_s": 0.05, "failure_threshold": 2, "success_threshold": 1}


# ---- helpers -------------------------------------------------------------------------------

def tok():
    return load_tokenizer("builtin:tiny")  # what the sims and the routers here use


async def cache_router(nursery, n=2, latency=0.02, sims=None, **workers):
    sims = sims or [await start_sim(nursery, token_latency_s=latency, seed=i) for i in range(n)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims], **FAST_HEALTH, **workers},
                                routes=[{"path": "/generate", "pipeline": RADIX}])
    return router, sims


def body(tag: str, tokens: int = 8, **extra) -> dict:
    # "|" ends every prompt, so no prompt is a prefix of another (each is tokenized fresh).
    return {"text": f"[{tag}] tell me something|", "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True},
            **extra}


async def store(c, n: int, tag: str = "before") -> list[tuple[str, dict]]:
    """Generate and retrieve `n` trajectories: (visible text, what /retrieve_from_text said)."""
    out = []
    for i in range(n):
        b = body(f"{tag}-{i}")
        r = await c.post("/generate", json=b)
        assert r.status_code == 200, r.text
        text = b["text"] + r.json()["text"]
        got = await retrieve(c, text)
        assert got["exact"] and got["tokens"] == tok().encode(b["text"]) + r.json()["output_ids"]
        out.append((text, got))
    return out


async def retrieve(c, text: str) -> dict:
    r = await c.post("/retrieve_from_text", json={"text": text})
    assert r.status_code == 200, r.text
    return r.json()


async def assert_still_stored(c, stored) -> None:
    for text, want in stored:
        got = await retrieve(c, text)
        assert got["exact"], text
        for key in ("tokens", "loss_mask", "rollout_logp", "weight_versions"):
            assert got[key] == want[key], (text, key)


async def assert_recorded(c, b: dict, out: dict) -> None:
    got = await retrieve(c, b["text"] + out["text"])
    assert got["exact"] and got["tokens"] == tok().encode(b["text"]) + out["output_ids"]


async def trajectories(c) -> int:
    return (await c.get("/cache/stats")).json()["trajectories"]


def total_inflight(router) -> int:
    return sum(w.inflight for w in router.runtime.pool.all)


async def slots_free(router, sims, timeout=3.0) -> None:
    """Every slot is back: the router's in-flight counts and each live worker's own."""
    await wait_until(lambda: total_inflight(router) == 0, timeout=timeout)
    await wait_until(lambda: all(s.worker.stats.in_flight == 0 for s in sims), timeout=timeout)


async def gen(c, b: dict, results: list, **kw) -> None:
    """POST /generate, recording (body, status | exception name, reply json | None, worker)."""
    try:
        r = await c.post("/generate", json=b, **kw)
    except httpx.HTTPError as e:
        results.append((b, type(e).__name__, None, None))
        return
    results.append((b, r.status_code, r.json(), r.headers.get("x-miles-router-worker")))


async def stream(c, b: dict, results: list, started: trio.Event | None = None) -> None:
    """Streaming /generate, recording (body, "done" | exception name, data events, worker)."""
    events = []
    worker = None
    try:
        async with c.stream("POST", "/generate", json={**b, "stream": True}) as r:
            assert r.status_code == 200
            worker = r.headers["x-miles-router-worker"]
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if started is not None:
                        started.set()
    except httpx.HTTPError as e:
        results.append((b, type(e).__name__, events, worker))
        return
    results.append((b, "done" if events and events[-1] == "[DONE]" else "cut", events, worker))


async def start_spread(nursery, router, fn, c, bodies, results) -> None:
    """Start `fn(c, body, results)` per body, each only once the previous is in flight: least-in-flight
    then alternates them over the workers, so each worker holds the same share."""
    for i, b in enumerate(bodies):
        nursery.start_soon(fn, c, b, results)
        await wait_until(lambda: total_inflight(router) == i + 1)


async def start_sim_at(nursery, port: int, **options) -> Sim:
    """harness.start_sim on a given port (to bring a worker back at the same address)."""
    options.setdefault("tokenizer", "builtin:tiny")
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await serve_sim_worker(SimOptions(**options), "127.0.0.1", port, task_status=task_status)

    url, worker = await nursery.start(run)
    return Sim(url, worker, scope)


# ---- worker process killed mid-request -------------------------------------------------------

async def test_worker_killed_mid_request_loses_only_its_own_requests(nursery):
    """Non-stream requests on a killed worker get a 502 JSON error naming it, also those that went out
    on a reused keep-alive connection: the worker had read them and may have run them, so they are
    not resent (router/net/upstream.py; a /generate must not silently run twice). Requests sent
    during the fault find the dead worker's idle connections closed or its port refusing, and go to
    the other worker. Those and the other worker's requests succeed and are recorded; nothing is
    recorded for the 502s."""
    router, (victim, survivor) = await cache_router(nursery, latency=0.02)
    results = []
    async with client(router) as c:
        stored = await store(c, 4)
        n_before = await trajectories(c)
        async with trio.open_nursery() as n:
            # 3 slow requests on each worker (placement alternates).
            await start_spread(n, router, gen, c, [body(f"inflight-{i}", 40) for i in range(6)], results)
            assert router.runtime.pool.get(victim.url).inflight == 3
            victim.kill()
            for i in range(6):  # traffic during the fault: the dead worker may be picked, then retried
                n.start_soon(gen, c, body(f"during-{i}"), results)
        assert len(results) == 12
        lost = [r for r in results if r[1] != 200]
        assert len(lost) == 3 and all(r[0]["text"].startswith("[inflight") for r in lost)
        for _, status, err, _ in lost:
            assert status == 502 and err["stage"] == "forward" and err["worker"] == victim.url
            assert "closed the connection" in err["error"] and "not resent" in err["error"]
        ok = [r for r in results if r[1] == 200]
        assert {w for *_, w in ok} == {survivor.url}
        assert sum(1 for r in ok if r[0]["text"].startswith("[during")) == 6
        for b, _, out, _ in ok:
            await assert_recorded(c, b, out)
        assert await trajectories(c) == n_before + len(ok)  # nothing recorded for the broken ones
        await assert_still_stored(c, stored)
    await slots_free(router, [survivor])
    await wait_until(lambda: router.runtime.pool.get(victim.url).state.value == "quarantined")


async def test_worker_sigkilled_mid_stream(nursery):
    """A worker *process* SIGKILLed while streaming: its streams break off without [DONE] (never a
    complete-looking reply); the other worker's streams and new requests succeed."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "router", "sim-worker", "--port", str(port), "--tokenizer",
                             "builtin:tiny", "--token-latency-s", "0.02", "--name", "doomed"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        doomed = f"http://127.0.0.1:{port}"
        async with client(doomed, timeout=1) as d:
            with trio.fail_after(30):
                while True:
                    try:
                        if (await d.get("/health")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        await trio.sleep(0.05)
        survivor = await start_sim(nursery, token_latency_s=0.02)
        router = await start_router(nursery, workers={"urls": [doomed, survivor.url], **FAST_HEALTH},
                                    routes=[{"path": "/generate", "pipeline": RADIX}])
        results, during = [], []
        async with client(router) as c:
            stored = await store(c, 4)
            n_before = await trajectories(c)
            async with trio.open_nursery() as n:
                await start_spread(n, router, stream, c, [body(f"s-{i}", 40) for i in range(4)], results)
                await trio.sleep(0.15)  # every stream is under way
                proc.send_signal(signal.SIGKILL)
                # Once the process is gone (a request racing its teardown may be reset mid-exchange,
                # like the in-flight ones), every new request must succeed.
                assert await trio.to_thread.run_sync(lambda: proc.wait(timeout=5)) == -signal.SIGKILL
                for i in range(4):
                    n.start_soon(gen, c, body(f"during-{i}"), during)
            broken = [r for r in results if r[3] == doomed]
            done = [r for r in results if r[3] == survivor.url]
            assert len(broken) == len(done) == 2
            for _, outcome, events, _ in broken:
                assert outcome in ("RemoteProtocolError", "ReadError"), outcome
                assert events and "[DONE]" not in events
            for b, outcome, events, _ in done:
                assert outcome == "done"
                await assert_recorded(c, b, json.loads(events[-2]))
            assert [r[1] for r in during] == [200] * 4 and {r[3] for r in during} == {survivor.url}, during
            assert await trajectories(c) == n_before + 2 + 4
            await assert_still_stored(c, stored)
        await slots_free(router, [survivor])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- worker hangs ----------------------------------------------------------------------------

async def test_hanging_worker_times_out_frees_its_slots_and_cancels_upstream(nursery):
    """Before the reply: 504 JSON. Mid-stream (the worker stalls): the stream breaks off after the
    timeout. Either way the worker's own request is cancelled (its in_flight drops to 0), the slot
    is freed, and the other worker's traffic is untouched."""
    a, b = [await start_sim(nursery, token_latency_s=0.01, seed=i) for i in range(2)]
    router = await start_router(nursery, workers={"urls": [a.url, b.url], **FAST_HEALTH},
                                server={"port": 0, "request_timeout_s": 0.6},
                                routes=[{"path": "/generate", "pipeline": RADIX}])
    results = []
    async with client(router) as c:
        stored = await store(c, 2)
        a.worker.set_faults(hang=True)
        async with trio.open_nursery() as n:
            await start_spread(n, router, gen, c, [body(f"hang-{i}", 10) for i in range(4)], results)
        hung = [r for r in results if r[1] != 200]
        assert len(hung) == 2
        for _, status, err, _ in hung:
            assert status == 504 and err["worker"] == a.url and "did not answer" in err["error"]
        assert [r[3] for r in results if r[1] == 200] == [b.url] * 2
        await slots_free(router, [a, b])
        assert router.runtime.pool.get(a.url).state.value == "healthy"  # a timeout is not a health verdict
        a.worker.set_faults(hang=False)

        # Mid-stream stall: the worker pauses generation in place while streaming.
        results.clear()
        async with trio.open_nursery() as n:
            await start_spread(n, router, stream, c, [body(f"stall-{i}", 60) for i in range(2)], results)
            await trio.sleep(0.1)
            a.worker.pause("in_place")
        a.worker.resume()
        by_worker = {r[3]: r for r in results}
        assert by_worker[a.url][1] in ("RemoteProtocolError", "ReadError") and "[DONE]" not in by_worker[a.url][2]
        assert by_worker[b.url][1] == "done"  # the stream on the other worker ran to the end
        await assert_recorded(c, by_worker[b.url][0], json.loads(by_worker[b.url][2][-2]))
        await slots_free(router, [a, b])
        await assert_still_stored(c, stored)


# ---- worker answers 500 / 503 ----------------------------------------------------------------

async def test_worker_5xx_is_retried_elsewhere_recorded_once_and_only_health_quarantines(nursery):
    router, (a, b) = await cache_router(nursery, latency=0.0)
    pool = router.runtime.pool
    async with client(router) as c, client(a.url) as direct:
        stored = await store(c, 2)
        n_before = await trajectories(c)
        a.worker.set_faults(generate_status=500)
        want = (await direct.post("/generate", json=body("direct"))).content
        a_before = a.worker.stats.generate_requests
        for i in range(10):
            b_ = body(f"mixed-{i}")
            r = await c.post("/generate", json=b_)
            # a's 500 said it did not do the work: the request went on to b, at once.
            assert r.status_code == 200 and r.headers["x-miles-router-worker"] == b.url, r.text
            if "x-miles-router-retried" in r.headers:
                assert r.headers["x-miles-router-retried"] == f"{a.url} 500"
                assert r.headers["x-miles-router-route-reason"] == "least_inflight, retry"
            # The recorded trajectory is the attempt that succeeded (b's tokens), exactly.
            await assert_recorded(c, b_, r.json())
        tried_a = a.worker.stats.generate_requests - a_before
        assert 1 <= tried_a <= 5  # the breaker opened after 5 consecutive failures
        assert pool.get(a.url).breaker.state.value == "open"
        assert pool.get(a.url).state.value == "healthy" and pool.get(a.url).quarantines_total == 0
        assert await trajectories(c) == n_before + 10  # one per request, none for a 500
        metrics = (await c.get("/metrics")).text
        assert f'miles_router_status_retries_total{{status="500"}} {float(tried_a)}' in metrics
        # Every worker answers 500: the client gets the last worker's reply, byte for byte.
        b.worker.set_faults(generate_status=500)
        r = await c.post("/generate", json=body("all-fail"))
        assert r.status_code == 500 and r.content == want and "stage" not in r.json()
        assert await trajectories(c) == n_before + 10
        b.worker.set_faults(generate_status=None)
        # Now the health check fails too: quarantined, and all traffic goes to b.
        a.worker.set_faults(generate_status=503, health_status=503)
        await wait_until(lambda: pool.get(a.url).state.value == "quarantined")
        for i in range(6):
            r = await c.post("/generate", json=body(f"only-b-{i}"))
            assert r.status_code == 200 and r.headers["x-miles-router-worker"] == b.url
        a.worker.set_faults(generate_status=None, health_status=200)
        # Back in rotation once its probes pass; after the cooldown a trial request closes the breaker.
        pool.get(a.url).breaker.opened_at -= router.runtime.config.breaker.cooldown_s
        await wait_until(lambda: pool.get(a.url).state.value == "healthy")
        seen = {(await c.post("/generate", json=body(f"back-{i}"))).headers["x-miles-router-worker"] for i in range(4)}
        assert seen == {a.url, b.url} and pool.get(a.url).breaker.state.value == "closed"
        await assert_still_stored(c, stored)
    await slots_free(router, [a, b])


async def test_worker_5xx_passes_through_unchanged_without_retries(nursery):
    router, (a, b) = await cache_router(nursery, latency=0.0)
    router.runtime.config.retry.max_attempts = 1  # as `[retry] max_attempts = 1` would
    async with client(router) as c, client(a.url) as direct:
        await store(c, 2)
        n_before = await trajectories(c)
        a.worker.set_faults(generate_status=503)
        want = (await direct.post("/generate", json=body("direct"))).content
        statuses = []
        for i in range(6):
            r = await c.post("/generate", json=body(f"mixed-{i}"))
            statuses.append(r.status_code)
            if r.status_code != 200:  # the worker's own reply, byte for byte: not a router error
                assert r.status_code == 503 and r.headers["x-miles-router-worker"] == a.url
                assert r.content == want and "stage" not in r.json()
        assert statuses.count(503) == 3 and statuses.count(200) == 3
        assert await trajectories(c) == n_before + 3  # nothing recorded for the 503s
    await slots_free(router, [a, b])


# ---- health flapping -------------------------------------------------------------------------

async def answer_probes(sim, pattern: list[int], probes: int) -> None:
    """Answer the router's next `probes` health probes with pattern[0], pattern[1], ... (cycling)."""
    count = lambda: sim.worker.stats.paths.get("/health", 0)  # noqa: E731
    start = count()
    sim.worker.set_faults(health_status=pattern[0])
    seen = 0
    with trio.fail_after(10):
        while seen < probes:
            await trio.sleep(0.002)
            now = count() - start
            if now > seen:  # probe `now` has been answered: set the status for the next one
                seen = now
                sim.worker.set_faults(health_status=pattern[seen % len(pattern)])


async def test_health_flapping_does_not_churn(nursery):
    a, b = await start_sim(nursery), await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [a.url, b.url], "health_interval_s": 0.03,
                                                  "failure_threshold": 3, "success_threshold": 2})
    w = router.runtime.pool.get(a.url)
    states = []

    async def watch():
        while True:
            states.append(w.state.value)
            await trio.sleep(0.003)

    async def traffic(c, n):
        for i in range(n):
            r = await c.post("/generate", json={"text": f"t{i}", "sampling_params": {"max_new_tokens": 2}})
            assert r.status_code == 200
            await trio.sleep(0.02)

    async with client(router) as c, trio.open_nursery() as n:
        n.start_soon(watch)
        await wait_until(lambda: a.worker.stats.paths.get("/health", 0) >= 1)
        # Failing every other probe, or two in three: never 3 in a row, so never quarantined.
        n.start_soon(traffic, c, 20)
        await answer_probes(a, [503, 200], 12)
        await answer_probes(a, [503, 503, 200], 12)
        assert set(states) == {"healthy"} and w.quarantines_total == 0
        # Three in a row: quarantined. Then flapping ok/fail never gives 2 successes in a row.
        await answer_probes(a, [503], 3)
        await wait_until(lambda: w.state.value == "quarantined")
        states.clear()
        await answer_probes(a, [200, 503], 12)
        assert set(states) == {"quarantined"} and w.quarantines_total == 1
        a.worker.set_faults(health_status=503)  # hold it there (answer_probes left 200 armed for the next probe)
        for i in range(5):  # meanwhile only b serves
            r = await c.post("/generate", json={"text": "q", "sampling_params": {"max_new_tokens": 2}})
            assert r.headers["x-miles-router-worker"] == b.url
        await answer_probes(a, [200], 2)
        await wait_until(lambda: w.state.value == "healthy")
        n.cancel_scope.cancel()
    assert w.quarantines_total == 1


# ---- worker removed while it has in-flight requests ------------------------------------------

async def test_removed_worker_finishes_its_requests_and_shows_draining(nursery):
    router, (a, b) = await cache_router(nursery, latency=0.02)
    results = []
    async with client(router) as c:
        stored = await store(c, 2)
        async with trio.open_nursery() as n:
            await start_spread(n, router, gen, c, [body(f"drain-{i}", 30) for i in range(4)], results)
            r = await c.post("/remove_worker", json={"url": a.url})
            assert r.status_code == 200 and r.json()["inflight"] == 2
            listed = {w["url"]: w for w in (await c.get("/workers")).json()["workers"]}
            assert listed[a.url]["state"] == "draining" and listed[a.url]["inflight"] == 2
            assert (await c.get("/list_workers")).json()["urls"] == [b.url]
            for i in range(4):
                n.start_soon(gen, c, body(f"after-remove-{i}"), results)
        assert [r[1] for r in results] == [200] * 8
        assert sum(1 for r in results if r[3] == a.url) == 2  # the two it held, completed
        assert all(r[3] == b.url for r in results if r[0]["text"].startswith("[after-remove"))
        for b_, _, out, _ in results:
            await assert_recorded(c, b_, out)
        assert [w["url"] for w in (await c.get("/workers")).json()["workers"]] == [b.url]
        assert router.runtime.pool.get(a.url) is None
        probes = a.worker.stats.paths.get("/health", 0)
        await trio.sleep(0.2)
        assert a.worker.stats.paths.get("/health", 0) == probes  # no longer probed
        await assert_still_stored(c, stored)
    await slots_free(router, [a, b])


# ---- all workers down, and back --------------------------------------------------------------

async def test_all_workers_down_is_503_at_once_and_traffic_resumes_without_restart(nursery):
    ports = [free_port(), free_port()]
    sims = [await start_sim_at(nursery, p, token_latency_s=0.0) for p in ports]
    router, _ = await cache_router(nursery, sims=sims, failure_threshold=1)
    async with client(router) as c:
        stored = await store(c, 4)
        for s in sims:
            s.kill()
        await wait_until(lambda: not router.runtime.pool.healthy())
        for i in range(5):
            t0 = time.monotonic()
            r = await c.post("/generate", json=body(f"down-{i}"))
            assert time.monotonic() - t0 < 0.3
            assert r.status_code == 503 and "no healthy worker" in r.json()["error"]
        r = await c.post("/abort_request", json={"abort_all": True})
        assert r.status_code == 503 and "no healthy worker" in r.json()["error"]
        # Retrieval doesn't need a worker.
        await assert_still_stored(c, stored)
        # The workers come back at the same addresses (fresh processes): no router restart needed.
        sims = [await start_sim_at(nursery, p, token_latency_s=0.0) for p in ports]
        await wait_until(lambda: len(router.runtime.pool.healthy()) == 2)
        seen = set()
        for i in range(6):
            r = await c.post("/generate", json=body(f"back-{i}"))
            assert r.status_code == 200
            seen.add(r.headers["x-miles-router-worker"])
            await assert_recorded(c, body(f"back-{i}"), r.json())
        assert seen == {s.url for s in sims}
        await assert_still_stored(c, stored)
    await slots_free(router, sims)


# ---- client disconnects mid-stream -----------------------------------------------------------

async def test_client_disconnect_mid_stream_through_the_cache(nursery):
    router, (sim,) = await cache_router(nursery, n=1, latency=0.02)
    results = []
    async with client(router) as c:
        stored = await store(c, 2)
        n_before = await trajectories(c)
        async with trio.open_nursery() as n:
            for i in range(3):
                n.start_soon(stream, c, body(f"keep-{i}", 25), results)
            async with client(router) as quitter:
                async with quitter.stream("POST", "/generate", json={**body("quitter", 400), "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break  # leave after the first event: the connection closes
            # The worker's generation for it stops (cancelled upstream), the others go on.
            await wait_until(lambda: sim.worker.stats.in_flight <= 3, timeout=2)
        assert [r[1] for r in results] == ["done"] * 3
        for b, _, events, _ in results:
            await assert_recorded(c, b, json.loads(events[-2]))
        assert await trajectories(c) == n_before + 3  # the abandoned stream recorded nothing
        await assert_still_stored(c, stored)
    await slots_free(router, [sim])
    assert sim.worker.stats.generate_requests == 2 + 3 + 1


async def test_idle_keepalive_connections_time_out_on_proxied_paths(nursery, monkeypatch):
    """A client that goes silent on a keep-alive connection is dropped after the keep-alive timeout,
    on proxied paths too. Those used to be held forever: the disconnect watcher cancelled the reply's
    last send inside hypercorn, before hypercorn re-armed its idle timer (same fix as
    tests/test_bad_input.py::test_connection_close_is_honoured_on_proxied_paths)."""
    import router.http.serve as serving

    make = serving.hypercorn_config

    def short_keepalive(*args, **kw):
        cfg = make(*args, **kw)
        cfg.keep_alive_timeout = 0.5
        return cfg

    monkeypatch.setattr(serving, "hypercorn_config", short_keepalive)
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]})
    host, port = router.url.split("//")[1].rsplit(":", 1)
    for path in (b"/health", b"/_sim/echo", b"/model_info"):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET " + path + b" HTTP/1.1\r\nHost: r\r\n\r\n")
        assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
        with trio.fail_after(3):  # then say nothing: the router must hang up
            while await stream.receive_some(65536):
                pass
        await stream.aclose()


def close_wait_on(port: int) -> int:
    """Server-side sockets of `port` in CLOSE-WAIT: the client closed, the server hasn't."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "08" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    n += 1
    return n


async def test_client_closed_connections_are_released_promptly(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]})
    host, port = router.url.split("//")[1].rsplit(":", 1)
    for path in (b"/health", b"/_sim/echo"):  # a router endpoint and a proxied path
        for _ in range(3):
            # A keep-alive client that is done: it reads its reply, idles a moment, hangs up.
            s = await trio.open_tcp_stream(host, int(port))
            await s.send_all(b"GET " + path + b" HTTP/1.1\r\nHost: r\r\n\r\n")
            data = b""
            while not data.endswith(b"}"):
                data += await s.receive_some(65536)
            await trio.sleep(0.05)
            await s.aclose()
    await trio.sleep(0.5)
    assert close_wait_on(int(port)) == 0


def test_evicted_cache_nodes_are_freed_without_the_cycle_collector():
    import gc
    import weakref

    import numpy as np

    from router.core.radix import RadixTree, TrajectoryInput

    t = tok()
    tree = RadixTree(t.vocab)
    prompt = np.asarray(t.encode("evict me|"), np.int32)
    out = np.asarray(t.encode(" gone"), np.int32)
    tree.insert(TrajectoryInput(rid="x", prompt_ids=prompt, output_ids=out, output_logprobs=np.zeros(out.size, np.float32),
                                visible_text=t.text_bytes(prompt) + t.text_bytes(out), finish="length"), now=0.0)
    arrays = [weakref.ref(nd.data) for nd in tree.root.children.values()]
    gc.disable()
    try:
        tree.evict(budget_bytes=0, hard_budget_bytes=0)
        assert tree.stats()["nodes"] == 0
        assert all(r() is None for r in arrays)  # freed by refcounting, at once
    finally:
        gc.enable()


# ---- abort from the engine -------------------------------------------------------------------

async def test_abort_mid_stream_via_fanout_is_recorded_not_retried(nursery):
    router, sims = await cache_router(nursery, latency=0.02)
    results = []
    async with client(router) as c:
        stored = await store(c, 2)
        n_requests = sum(s.worker.stats.generate_requests for s in sims)
        async with trio.open_nursery() as n:
            await start_spread(n, router, stream, c, [body(f"abort-{i}", 500) for i in range(2)], results)
            await trio.sleep(0.2)
            r = await c.post("/abort_request", json={"abort_all": True})
            assert r.status_code == 200 and r.json()["succeeded"] == 2
        assert sum(s.worker.stats.generate_requests for s in sims) == n_requests + 2  # no retry
        assert {r[3] for r in results} == {s.url for s in sims}
        for b, outcome, events, _ in results:
            assert outcome == "done"  # an abort is a complete reply: final chunk, then [DONE]
            final = json.loads(events[-2])
            assert final["meta_info"]["finish_reason"]["type"] == "abort"
            assert 0 < len(final["output_ids"]) < 500
            await assert_recorded(c, b, final)
        await assert_still_stored(c, stored)
    await slots_free(router, sims)


# ---- router SIGTERM under load ---------------------------------------------------------------

async def test_router_sigterm_under_load_drains_then_exits_0(nursery, tmp_path):
    sims = [await start_sim(nursery, token_latency_s=0.02, seed=i) for i in range(2)]
    cfg = tmp_path / "router.toml"
    cfg.write_text(
        '[server]\nhost = "127.0.0.1"\nport = 0\ndrain_timeout_s = 10.0\n'
        f'[workers]\nurls = {json.dumps([s.url for s in sims])}\nhealth_interval_s = 0.2\n'
        '[tokenizer]\npath = "builtin:tiny"\n'
    )
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "router", "--config", str(cfg), "--log-level", "info"],
        cwd=ROOT, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = bytearray()
    url = None
    try:
        async def read_log():
            async for chunk in proc.stderr:
                log.extend(chunk)

        with trio.fail_after(20):
            async for chunk in proc.stderr:
                log.extend(chunk)
                if b"listening on " in log:
                    url = log.split(b"listening on ", 1)[1].split()[0].decode()
                    break
        nursery.start_soon(read_log)
        results = []
        n_streams, n_plain, tokens = 6, 6, 30
        async with client(url) as c:
            async with trio.open_nursery() as n:
                for i in range(n_streams):
                    n.start_soon(stream, c, {"text": f"s{i}", "sampling_params": {"max_new_tokens": tokens,
                                                                                  "ignore_eos": True}}, results)
                for i in range(n_plain):
                    n.start_soon(gen, c, {"text": f"p{i}", "sampling_params": {"max_new_tokens": tokens,
                                                                               "ignore_eos": True}}, results)
                await wait_until(lambda: sum(s.worker.stats.in_flight for s in sims) == n_streams + n_plain)
                t_term = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                await trio.sleep(0.2)
                # New connections are refused while the in-flight requests finish.
                with trio.fail_after(2):
                    try:
                        async with client(url) as fresh:
                            await fresh.get("/health")
                        refused = False
                    except httpx.ConnectError:
                        refused = True
                assert refused
        with trio.fail_after(10):
            code = await proc.wait()
        assert code == 0, log.decode(errors="replace")
        assert time.monotonic() - t_term < 10
        assert len(results) == n_streams + n_plain
        for b, outcome, payload, _ in results:
            if isinstance(outcome, int):
                assert outcome == 200 and payload["meta_info"]["completion_tokens"] == tokens, (b, outcome)
            else:
                assert outcome == "done" and json.loads(payload[-2])["meta_info"]["completion_tokens"] == tokens
        assert b"draining" in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert all(s.worker.stats.in_flight == 0 for s in sims)
