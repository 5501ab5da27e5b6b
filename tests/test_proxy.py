"""End to end over loopback: router + simulated SGLang workers, plain passthrough routes."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import trio

from harness import client, free_port, start_router, start_sim, wait_until


async def set_faults(sim, **faults):
    async with client(sim.url) as c:
        r = await c.post("/_sim/faults", json=faults)
        assert r.status_code == 200, r.text


# ---- worker API ----------------------------------------------------------------------------

async def test_worker_api_add_list_remove(nursery):
    sims = [await start_sim(nursery) for _ in range(3)]
    router = await start_router(nursery)
    async with client(router) as c:
        assert (await c.get("/list_workers")).json() == {"urls": []}
        r = await c.post("/add_worker", params={"url": sims[0].url})
        assert r.status_code == 200
        assert r.json() == {"status": "success", "worker_urls": {sims[0].url: 0}}
        assert (await c.post("/add_worker", json={"url": sims[1].url})).status_code == 200
        assert (await c.post("/add_worker", json={"worker_url": sims[2].url})).status_code == 200
        # idempotent
        r = await c.post("/add_worker", params={"worker_url": sims[0].url})
        assert r.status_code == 200 and len(r.json()["worker_urls"]) == 3
        assert (await c.get("/list_workers")).json()["urls"] == [s.url for s in sims]
        ws = (await c.get("/workers")).json()["workers"]
        assert [w["state"] for w in ws] == ["healthy"] * 3
        assert set(ws[0]) >= {"url", "state", "inflight", "consecutive_failures", "last_error"}

        r = await c.post("/remove_worker", params={"url": sims[1].url})
        assert r.status_code == 200
        assert (await c.get("/list_workers")).json()["urls"] == [sims[0].url, sims[2].url]
        r = await c.post("/remove_worker", params={"url": sims[1].url})
        assert r.status_code == 404 and "unknown worker" in r.json()["error"]


@pytest.mark.parametrize(
    "kwargs, status, fragment",
    [
        ({}, 400, "worker_url is required"),
        ({"params": {"url": "ftp://x:1"}}, 400, "must be http://host:port"),
        ({"params": {"url": "https://x:1"}}, 400, "https:// workers are not supported"),
        ({"params": {"url": "http://u:p@h:1"}}, 400, "credentials"),
        ({"content": b"{not json"}, 400, "invalid JSON"),
        ({"json": {"url": 5}}, 400, "invalid JSON"),
    ],
)
async def test_add_worker_bad_input(nursery, kwargs, status, fragment):
    router = await start_router(nursery)
    async with client(router) as c:
        r = await c.post("/add_worker", **kwargs)
        assert r.status_code == status
        assert fragment in r.json()["error"]
        assert (await c.get("/list_workers")).json() == {"urls": []}


async def test_no_worker_503_immediately(nursery):
    router = await start_router(nursery)
    async with client(router) as c:
        with trio.fail_after(2):
            r = await c.post("/generate", json={"text": "hi"})
        assert r.status_code == 503
        assert "no healthy worker" in r.json()["error"]


# ---- proxying ------------------------------------------------------------------------------

async def test_generate_is_sglang_shaped_and_names_worker(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]})
    async with client(router) as c:
        r = await c.post("/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 8},
                                            "return_logprob": True})
    assert r.status_code == 200
    out = r.json()
    assert set(out) >= {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["finish_reason"]["type"] in ("stop", "length")
    assert len(meta["output_token_logprobs"]) == len(out["output_ids"]) == meta["completion_tokens"]
    assert all(len(t) == 3 and t[1] == i for t, i in zip(meta["output_token_logprobs"], out["output_ids"]))
    assert r.headers["x-miles-router-worker"] == sim.url
    assert r.headers["x-miles-router-route-reason"] == "least_inflight"


async def test_request_and_response_bytes_are_identical(nursery):
    """A 4 MB body with unknown fields and odd number spellings goes through untouched, both ways."""
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]})
    experts = base64.b64encode(bytes(range(256)) * (3 * 1024 * 1024 // 256)).decode()
    body = (b'{"input_ids":[1,2,3],"x_custom":{"deep":[1.50,2e3,null]},"sampling_params":'
            b'{"custom_params":{"a":1}},"return_routed_experts":true,   "meta_info":{"routed_experts":"'
            + experts.encode() + b'"}}')
    assert len(body) > 4_000_000
    await set_faults(sim, echo=True)
    async with client(router) as c:
        r = await c.post("/generate?trace=1&x=%2F", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert r.content == body  # the worker echoed exactly what it received; the router returned exactly that
    assert int(r.headers["content-length"]) == len(body)


async def test_echo_shows_query_and_header_hygiene(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]})
    async with client(router) as c:
        r = await c.post("/_sim/echo?a=1&b=%2Fx&a=2", content=b"payload",
                         headers={"x-keep": "1", "connection": "keep-alive, x-drop", "x-drop": "2",
                                  "te": "trailers", "keep-alive": "timeout=5", "content-type": "text/plain"})
    assert r.status_code == 200
    echo = r.json()
    assert echo["query"] == "a=1&b=%2Fx&a=2"
    assert base64.b64decode(echo["body_b64"]) == b"payload"
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert headers["x-keep"] == "1" and headers["content-type"] == "text/plain"
    assert headers["content-length"] == "7"
    for dropped in ("x-drop", "te", "keep-alive"):
        assert dropped not in headers
    assert headers.get("connection", "keep-alive") != "keep-alive, x-drop"


async def test_methods_and_unknown_paths_pass_through(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]})
    async with client(router) as c:
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            r = await c.request(method, "/_sim/echo?m=1", content=b"x")
            assert r.status_code == 200 and r.json()["method"] == method
        r = await c.get("/no/such/path")
        assert r.status_code == 404 and r.json() == {"detail": "Not Found"}  # the worker's own 404
        r = await c.get("/model_info")
        assert r.status_code == 200 and "weight_version" in r.json()


async def test_upstream_errors_pass_through_unchanged(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]})
    async with client(sim.url) as direct, client(router) as c:
        await set_faults(sim, generate_status=503)
        want = await direct.post("/generate", json={"text": "x"})
        got = await c.post("/generate", json={"text": "x"})
    assert got.status_code == want.status_code == 503
    assert got.content == want.content
    async with client(router) as c:
        workers = (await c.get("/workers")).json()["workers"]
    assert workers[0]["state"] == "healthy"  # a 5xx reply is not a connect failure


async def test_body_over_limit_is_413(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]}, server={"port": 0, "max_body_bytes": 1000})
    async with client(router) as c:
        # On one keep-alive client: the 413 says `Connection: close`, so the next request opens a
        # new connection instead of landing on one the router is closing (tests/test_bad_input.py).
        for _ in range(10):
            r = await c.post("/generate", content=b"x" * 5000)
            assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
            r = await c.post("/generate", json={"text": "fine"})
            assert r.status_code == 200


# ---- selection, health ----------------------------------------------------------------------

async def test_least_inflight_spreads_concurrent_requests(nursery):
    sims = [await start_sim(nursery, token_latency_s=0.01) for _ in range(3)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims]})
    served = []

    async def one(c):
        r = await c.post("/generate", json={"text": "spread", "sampling_params": {"max_new_tokens": 20,
                                                                                  "ignore_eos": True}})
        assert r.status_code == 200
        served.append(r.headers["x-miles-router-worker"])

    async with client(router) as c:
        async with trio.open_nursery() as n:
            for _ in range(30):
                n.start_soon(one, c)
    counts = {s.url: served.count(s.url) for s in sims}
    assert sum(counts.values()) == 30
    assert max(counts.values()) - min(counts.values()) <= 2, counts
    async with client(router) as c:
        assert all(w["inflight"] == 0 for w in (await c.get("/workers")).json()["workers"])


async def test_quarantine_and_recovery(nursery):
    a, b = await start_sim(nursery), await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [a.url, b.url], "health_interval_s": 0.05,
                                                  "failure_threshold": 2, "success_threshold": 2})
    pool = router.runtime.pool
    await set_faults(a, health_status=503)
    await wait_until(lambda: pool.get(a.url).state.value == "quarantined")
    async with client(router) as c:
        for _ in range(6):
            r = await c.post("/generate", json={"text": "q"})
            assert r.headers["x-miles-router-worker"] == b.url
        w = next(w for w in (await c.get("/workers")).json()["workers"] if w["url"] == a.url)
        assert w["state"] == "quarantined" and "503" in w["last_error"]
    await set_faults(a, health_status=200)
    await wait_until(lambda: pool.get(a.url).state.value == "healthy")
    async with client(router) as c:
        seen = {(await c.post("/generate", json={"text": "q"})).headers["x-miles-router-worker"] for _ in range(6)}
    assert seen == {a.url, b.url}


async def test_connect_failure_retries_on_another_worker(nursery):
    live = await start_sim(nursery)
    dead = f"http://127.0.0.1:{free_port()}"
    router = await start_router(nursery, workers={"urls": [dead, live.url], "health_interval_s": 30,
                                                  "failure_threshold": 100})
    async with client(router) as c:
        for _ in range(4):
            r = await c.post("/generate", json={"text": "retry"})
            assert r.status_code == 200 and r.headers["x-miles-router-worker"] == live.url
    w = router.runtime.pool.get(dead)
    assert w.failures_total >= 2 and "connect" in w.last_error and w.inflight == 0


async def test_all_workers_down_then_back(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url], "health_interval_s": 0.05,
                                                  "failure_threshold": 1, "success_threshold": 1})
    await set_faults(sim, health_status=500)
    await wait_until(lambda: not router.runtime.pool.healthy())
    async with client(router) as c:
        with trio.fail_after(1):
            assert (await c.post("/generate", json={"text": "x"})).status_code == 503
        await set_faults(sim, health_status=200)
        await wait_until(lambda: bool(router.runtime.pool.healthy()))
        assert (await c.post("/generate", json={"text": "x"})).status_code == 200


async def test_removing_a_worker_cancels_exactly_its_prober(nursery):
    a, b = await start_sim(nursery), await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [a.url, b.url], "health_interval_s": 0.02})
    rt = router.runtime
    assert set(rt.workers._probers) == {a.url, b.url}
    scope_a, scope_b = rt.workers._probers[a.url], rt.workers._probers[b.url]
    async with client(router) as c:
        await c.post("/remove_worker", params={"url": a.url})
    assert scope_a.cancel_called and not scope_b.cancel_called
    assert set(rt.workers._probers) == {b.url}


# ---- timeouts, streaming, disconnects --------------------------------------------------------

async def test_upstream_timeout_is_504_and_frees_slot(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]}, server={"port": 0, "request_timeout_s": 0.5})
    await set_faults(sim, hang=True)
    async with client(router) as c:
        r = await c.post("/generate", json={"text": "hang"})
        assert r.status_code == 504 and "did not answer" in r.json()["error"]
    assert router.runtime.pool.get(sim.url).inflight == 0


async def test_streaming_arrives_incrementally(nursery):
    sim = await start_sim(nursery, token_latency_s=0.05)
    router = await start_router(nursery, workers={"urls": [sim.url]})
    body = {"text": "stream", "stream": True, "sampling_params": {"max_new_tokens": 12, "ignore_eos": True}}
    times, events = [], []
    async with client(router) as c:
        t0 = trio.current_time()
        async with c.stream("POST", "/generate", json=body) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    times.append(trio.current_time() - t0)
                    events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 12 and chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert times[0] < times[-1] - 0.3  # the first token arrived long before the last


async def test_client_disconnect_mid_stream_frees_slot_and_cancels_upstream(nursery):
    sim = await start_sim(nursery, token_latency_s=0.05)
    router = await start_router(nursery, workers={"urls": [sim.url]})
    body = {"text": "long", "stream": True, "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    async with client(router) as c:
        async with c.stream("POST", "/generate", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break
        assert router.runtime.pool.get(sim.url).inflight in (0, 1)
    await wait_until(lambda: router.runtime.pool.get(sim.url).inflight == 0, timeout=3)
    async with client(sim.url) as direct:
        await wait_until_async(lambda: direct.get("/_sim/stats"), lambda s: s["in_flight"] == 0)


async def wait_until_async(fetch, check, timeout=5.0):
    with trio.fail_after(timeout):
        while True:
            r = await fetch()
            if check(r.json()):
                return
            await trio.sleep(0.05)


async def test_worker_dropping_connection_mid_body_never_looks_complete(nursery):
    sim = await start_sim(nursery, token_latency_s=0.01)
    router = await start_router(nursery, workers={"urls": [sim.url]})
    await set_faults(sim, drop_after_bytes=50)
    async with client(router) as c:
        # A small Content-Length reply is read whole before the client sees anything: a clean 502.
        r = await c.post("/generate", json={"text": "drop", "sampling_params": {"max_new_tokens": 64}})
        assert r.status_code == 502 and "closed the connection" in r.json()["error"]
        # A stream already under way can only be broken off: the client must see an error.
        with pytest.raises(httpx.HTTPError):
            async with c.stream("POST", "/generate", json={"text": "drop", "stream": True,
                                                           "sampling_params": {"max_new_tokens": 64}}) as s:
                async for _ in s.aiter_lines():
                    pass
    assert router.runtime.pool.get(sim.url).inflight == 0
    await set_faults(sim, drop_after_bytes=None)
    async with client(router) as c:
        assert (await c.post("/generate", json={"text": "ok"})).status_code == 200


async def test_drain_on_shutdown(nursery):
    sim = await start_sim(nursery, token_latency_s=0.05)
    router = await start_router(nursery, workers={"urls": [sim.url]})
    result = {}

    async def slow():
        async with client(router) as c:
            r = await c.post("/generate", json={"text": "drain", "sampling_params": {"max_new_tokens": 10,
                                                                                    "ignore_eos": True}})
            result["status"] = r.status_code
            result["body"] = r.json()

    async with trio.open_nursery() as n:
        n.start_soon(slow)
        await wait_until(lambda: router.runtime.pool.get(sim.url).inflight == 1)
        router.shutdown.set()
        await trio.sleep(0.1)
        with pytest.raises(httpx.ConnectError):
            async with client(router) as c:
                await c.get("/health")
    assert result["status"] == 200 and result["body"]["meta_info"]["completion_tokens"] == 10


async def test_metrics_endpoint(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]})
    async with client(router) as c:
        await c.post("/generate", json={"text": "m"})
        text = (await c.get("/metrics")).text
    assert 'miles_router_requests_total{route="(proxy)",status="200"} 1.0' in text
    assert f'miles_router_worker_healthy{{worker="{sim.url}"}} 1.0' in text
    assert 'miles_router_selections_total{reason="least_inflight"} 1.0' in text


async def test_router_out_of_fds_does_not_blame_the_worker(nursery, monkeypatch):
    """EMFILE on connect is the router's problem: 503, no retry, the worker's health untouched."""
    import errno

    import router.net.upstream as upstream

    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url], "failure_threshold": 1, "health_interval_s": 30})
    router.runtime.upstream.drop_origin(sim.url)  # no pooled socket to reuse: force a connect

    async def no_fds(host, port):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(upstream, "_open_socket", no_fds)
    async with client(router) as c:
        r = await c.post("/generate", json={"text": "x"})
        assert r.status_code == 503 and "router overloaded" in r.json()["error"]
        w = router.runtime.pool.get(sim.url)
        assert w.state.value == "healthy" and w.failures_total == 0 and w.inflight == 0
        monkeypatch.undo()
        assert (await c.post("/generate", json={"text": "x"})).status_code == 200
