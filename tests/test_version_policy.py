"""Version-aware routing (issue 20 item 3), over sockets: routing.version_policy and the x-smg-version-policy
header keep generation off workers with stale weights; every proxied reply names the serving worker's weight
version (x-miles-router-weight-version)."""

from __future__ import annotations

import trio

from harness import client, start_router, start_sim, wait_until
from test_health import gen_body


async def fleet(nursery, n=3, **routing):
    sims = [await start_sim(nursery, seed=i) for i in range(n)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims], "health_interval_s": 30},
                                routing=routing)
    await wait_until(lambda: all(w.weight_version is not None for w in router.runtime.pool.all))
    return router, sims


async def set_version(c, router, sim, version: str) -> None:
    wid = router.runtime.pool.get(sim.url).id
    r = await c.post(f"/v1/rl/workers/{wid}/engine/update_weight_version",
                     json={"new_version": version, "abort_all_requests": False})
    assert r.status_code == 200


async def test_latest_only_sends_nothing_to_an_old_version_worker(nursery):
    router, sims = await fleet(nursery, version_policy="latest-only")
    async with client(router) as c:
        await set_version(c, router, sims[1], "step-2")
        served = []
        async with trio.open_nursery() as n:
            async def gen(i):
                r = await c.post("/generate", json=gen_body(f"g{i}", 8))
                assert r.status_code == 200
                served.append((r.headers["x-miles-router-worker"], r.headers["x-miles-router-weight-version"],
                               r.json()["meta_info"]["weight_version"]))
            for i in range(12):
                n.start_soon(gen, i)
        assert set(served) == {(sims[1].url, "step-2", "step-2")}
        assert [s.worker.stats.generate_requests for s in sims] == [0, 12, 0]
        # requests that do not generate may still use the old ones (a weight update sent through the proxy)
        seen = {(await c.get("/model_info")).headers["x-miles-router-worker"] for _ in range(6)}
        assert seen == {s.url for s in sims}
        # per request, the header wins: `any` spreads over every worker again
        seen = set()
        for i in range(9):
            r = await c.post("/generate", json=gen_body(f"a{i}"), headers={"x-smg-version-policy": "any"})
            seen.add(r.headers["x-miles-router-weight-version"])
        assert seen == {"default", "step-2"}
        r = await c.post("/generate", json=gen_body("bad"), headers={"x-smg-version-policy": "newest"})
        assert r.status_code == 400 and "x-smg-version-policy" in r.json()["error"]
        # once the others catch up, they serve again
        for s in (sims[0], sims[2]):
            await set_version(c, router, s, "step-2")
        workers = {(await c.post("/generate", json=gen_body(f"c{i}"))).headers["x-miles-router-worker"]
                   for i in range(9)}
        assert workers == {s.url for s in sims}


async def test_max_staleness_allows_k_versions_behind(nursery):
    router, sims = await fleet(nursery, version_policy="max-staleness:1")
    async with client(router) as c:
        await set_version(c, router, sims[1], "v2")
        await set_version(c, router, sims[2], "v3")  # default is now two behind, v2 one
        workers = {(await c.post("/generate", json=gen_body(f"m{i}"))).headers["x-miles-router-worker"]
                   for i in range(10)}
        assert workers == {sims[1].url, sims[2].url}
        workers = {(await c.post("/generate", json=gen_body(f"l{i}"), headers={
            "x-smg-version-policy": "latest-only"})).headers["x-miles-router-worker"] for i in range(5)}
        assert workers == {sims[2].url}


async def test_latest_only_holds_while_the_new_weights_are_paused(nursery):
    """Mid-update: the updated engine is still paused, the others serve old weights. latest-only holds generation
    for the updated one rather than serving the old weights, and it runs once that engine continues."""
    router, sims = await fleet(nursery, 2, version_policy="latest-only")
    rt = router.runtime
    async with client(router) as c:
        wid = rt.pool.get(sims[0].url).id
        await c.post(f"/v1/rl/workers/{wid}/engine/pause_generation", json={"mode": "retract"})
        await c.post(f"/v1/rl/workers/{wid}/engine/update_weights_from_disk",
                     json={"model_path": "/ckpt", "weight_version": "v2"})
        outs = []
        async with trio.open_nursery() as n:
            async def gen():
                r = await c.post("/generate", json=gen_body("wait"))
                outs.append((r.status_code, r.headers["x-miles-router-worker"]))
            n.start_soon(gen)
            await wait_until(lambda: len(rt.workers.hold_queue) == 1)
            assert sims[1].worker.stats.generate_requests == 0
            await c.post(f"/v1/rl/workers/{wid}/engine/continue_generation", json={})
        assert outs == [(200, sims[0].url)]


async def test_replies_name_the_weight_version_and_session_turns_record_it(nursery):
    sims = [await start_sim(nursery, weight_version="w7")]
    router = await start_router(nursery, workers={"urls": [sims[0].url]})
    await wait_until(lambda: router.runtime.pool.get(sims[0].url).weight_version == "w7")
    async with client(router) as c:
        r = await c.get("/model_info")
        assert r.headers["x-miles-router-weight-version"] == "w7"
        sid = (await c.post("/sessions")).json()["session_id"]
        r = await c.post(f"/sessions/{sid}/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300})
        assert r.status_code == 200 and r.headers["x-miles-router-weight-version"] == "w7"
        (rec,) = (await c.get(f"/sessions/{sid}")).json()["records"]
        assert rec["response"]["metadata"]["weight_version"] == "w7"


def test_a_bad_version_policy_stops_startup_with_one_line(tmp_path):
    import pytest

    from router.config import ConfigError, load_config

    p = tmp_path / "router.toml"
    p.write_text('[routing]\nversion_policy = "max-staleness:2"\nhold_timeout_s = 5\n')
    assert load_config(p).routing.version_policy == "max-staleness:2"
    p.write_text('[routing]\nversion_policy = "newest"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: routing.version_policy: must be any, latest-only or max-staleness:K (K >= 0)"
