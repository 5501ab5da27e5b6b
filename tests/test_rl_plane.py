"""The RL control plane (`/v1/rl/...`), over sockets, driven by a client written to smg 1.13's documented API
(`smg.rl.RL`: workers(), worker(id), call(id, path, body, method=), fanout(path, body, selector=,
allow_partial=), and `paused(rl, selector)`, which always resumes). Labels from the config, POST /workers and
/add_worker; selectors choosing subsets; 207 with `failed[]`; smg's error codes; the admin key; bounded
parallelism; control calls that update the router's view of each engine."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from urllib.parse import quote

import pytest

from router.core.labels import SelectorError, check_labels, matches, parse_label_list, parse_selector
from tests.harness import client, start_router, start_sim, wait_until


class RlError(Exception):
    def __init__(self, status: int, payload) -> None:
        super().__init__(f"{status}: {payload}")
        self.status, self.payload = status, payload
        self.code = payload.get("error") if isinstance(payload, dict) else None


class FanoutError(RlError):
    pass


class RL:
    """What smg's docs promise of `smg.rl.RL`, over httpx (not smg's code)."""

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = client(base_url, headers=headers)

    async def _request(self, method, path, body=None, params=None):
        r = await self.http.request(method, path, params=params,
                                    json=body if body is not None else None)
        return r.status_code, (r.json() if r.content else None)

    async def workers(self) -> list[dict]:
        status, payload = await self._request("GET", "/v1/rl/workers")
        if status >= 400:
            raise RlError(status, payload)
        return payload["workers"]

    async def worker(self, worker_id: str) -> dict:
        status, payload = await self._request("GET", f"/v1/rl/workers/{worker_id}")
        if status >= 400:
            raise RlError(status, payload)
        return payload

    async def call(self, worker_id, path, body=None, *, method="POST", params=None) -> dict:
        status, payload = await self._request(method, f"/v1/rl/workers/{worker_id}/engine/{path.lstrip('/')}",
                                              body, params)
        if isinstance(payload, dict) and "latency_ms" in payload and "error" not in payload:
            return payload
        raise RlError(status, payload)

    async def fanout(self, path, body=None, *, selector, method="POST", allow_partial=False) -> dict:
        status, payload = await self._request(method, f"/v1/rl/engine/{path.lstrip('/')}", body,
                                              {"selector": selector})
        if status in (200, 207) and isinstance(payload, dict) and "results" in payload:
            if payload["failed"] and not allow_partial:
                raise FanoutError(status, payload)
            return payload
        raise RlError(status, payload)


@asynccontextmanager
async def paused(rl: RL, selector: str, mode: str | None = None):
    try:
        yield await rl.fanout("pause_generation", {"mode": mode} if mode else {}, selector=selector)
    finally:
        await rl.fanout("continue_generation", {}, selector=selector)


# ---- pure: selectors and labels -------------------------------------------------------------------

def test_selector_grammar_and_matching():
    labels = {"pool": "a", "engine": "sglang", "url": "http://127.0.0.1:1"}
    ok = {"pool=a": True, "pool!=a": False, "zone!=x": True, "pool in (b,a)": True, "pool notin (a)": False,
          "zone notin (a)": True, "pool=a,engine=sglang": True, "pool=a,engine=vllm": False, "zone=a": False,
          "url=http://127.0.0.1:1": True, " pool = a , engine in ( sglang ) ": True}
    for text, want in ok.items():
        assert matches(parse_selector(text), labels.get) is want, text
    for text, offset in {"bogus": 5, "engine==sglang": 7, "!engine": 0, "a=b,": 4, "a=b c=d": 4, "a in b": 5,
                         "a in (b": 7, "": 0}.items():
        with pytest.raises(SelectorError) as e:
            parse_selector(text)
        assert e.value.offset == offset and f"at byte {offset}" in str(e.value), text


def test_labels_are_checked():
    assert check_labels({"tp": 2, "spot": True, "pool": "a"}) == {"tp": "2", "spot": "true", "pool": "a"}
    assert parse_label_list("pool=a, zone=us-east") == {"pool": "a", "zone": "us-east"}
    for bad in ({"a b": "x"}, {"k": "has space"}, {"k": ["x"]}, {"k": ""}, ["pool=a"]):
        with pytest.raises(ValueError):
            check_labels(bad)
    with pytest.raises(ValueError, match="expected key=value"):
        parse_label_list("pool")


# ---- over sockets ----------------------------------------------------------------------------------

async def rl_fleet(nursery, n=3, labels=None, **router_sections):
    sims = [await start_sim(nursery, seed=i) for i in range(n)]
    workers = {"urls": [s.url for s in sims[:n]], "health_interval_s": 30}
    if labels:
        workers["labels"] = {sims[i].url: lab for i, lab in labels.items()}
    router = await start_router(nursery, workers=workers, **router_sections)
    await wait_until(lambda: all(w.weight_version is not None for w in router.runtime.pool.all))
    return router, sims


def by_url(rows: list[dict]) -> dict[str, dict]:
    return {w["url"]: w for w in rows}


async def test_discovery_lists_workers_with_labels_from_config_registration_and_add_worker(nursery):
    router, sims = await rl_fleet(nursery, 2, labels={0: {"pool": "train"}, 1: {"pool": "eval", "tp": 1}})
    extra = [await start_sim(nursery, seed=9), await start_sim(nursery, seed=10)]
    async with client(router) as c:
        r = await c.post("/workers", json={"url": extra[0].url, "labels": {"pool": "train", "zone": "b"}})
        assert r.status_code == 202
        r = await c.post(f"/add_worker?url={quote(extra[1].url)}&labels=pool%3Dspare,zone%3Dc")
        assert r.status_code == 200
        assert (await c.post("/workers", json={"url": extra[0].url, "labels": {"bad key": "x"}})).status_code == 400
        assert (await c.post(f"/add_worker?url={quote(extra[1].url)}&labels=nokey")).status_code == 400
    rl = RL(router.url)
    await wait_until(lambda: all(w.weight_version is not None for w in router.runtime.pool.all))
    rows = by_url(await rl.workers())
    assert len(rows) == 4
    assert rows[sims[0].url]["labels"]["pool"] == "train" and rows[sims[1].url]["labels"]["tp"] == "1"
    assert rows[extra[0].url]["labels"] == {"pool": "train", "zone": "b", "weight_version": "default"}
    assert rows[extra[1].url]["labels"]["pool"] == "spare"
    row = rows[sims[0].url]
    for key, value in {"url": sims[0].url, "base_url": sims[0].url, "control_url": sims[0].url, "engine": "sglang",
                       "connection_mode": "http", "worker_type": "regular", "health": "ready", "tp_size": 1,
                       "dp_size": 1, "pp_size": 1, "dp_ranks": 1, "role": None, "weight_version": "default",
                       "control_state": "running"}.items():
        assert row[key] == value, key
    assert row["engine_version"] and row["model_id"] == "sim/qwen" and len(row["id"]) >= 32
    assert row["capabilities"]["pause_modes"] == ["abort", "retract", "in_place"]
    one = await rl.worker(row["id"])
    assert one["id"] == row["id"] and one["labels"] == row["labels"]
    with pytest.raises(RlError) as e:
        await rl.worker("no-such-worker")
    assert e.value.status == 404 and e.value.code == "worker_not_found" and e.value.payload["id"] == "no-such-worker"


async def test_engine_call_is_verbatim_and_reports_the_engine_status(nursery):
    router, sims = await rl_fleet(nursery, 2)
    rl = RL(router.url)
    ids = {w["url"]: w["id"] for w in await rl.workers()}
    body = {"model_path": "/ckpt/step-42", "weight_version": "42", "flush_cache": True}
    res = await rl.call(ids[sims[0].url], "update_weights_from_disk", body, params={"keep": "1"})
    assert res["worker_id"] == ids[sims[0].url] and res["url"] == sims[0].url and res["status"] == 200
    assert res["body"]["success"] is True and isinstance(res["latency_ms"], int)
    last = sims[0].worker.stats.last_requests[-1]
    assert last["path"] == "/update_weights_from_disk" and last["query"] == "keep=1"
    import json
    assert json.loads(last["body"]) == body  # the engine got the client's JSON
    assert not any(r["path"] == "/update_weights_from_disk" for r in sims[1].worker.stats.last_requests)
    # the router now knows the new version (smg 1.13 does not: its M2 does)
    assert (await rl.worker(ids[sims[0].url]))["weight_version"] == "42"
    assert router.runtime.pool.get(sims[1].url).weight_version == "default"
    # GET routes too, and an engine 404 is the reply's status with the engine's body
    res = await rl.call(ids[sims[1].url], "model_info", method="GET")
    assert res["status"] == 200 and res["body"]["weight_version"] == "default"
    async with client(router) as c:
        r = await c.post(f"/v1/rl/workers/{ids[sims[1].url]}/engine/no_such_route", json={})
        assert r.status_code == 404 and r.json()["status"] == 404 and r.json()["body"] == {"detail": "Not Found"}
        r = await c.get(f"/v1/rl/workers/{ids[sims[1].url]}/bogus")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        sims[1].kill()
        r = await c.post(f"/v1/rl/workers/{ids[sims[1].url]}/engine/continue_generation", json={})
        assert r.status_code == 502
        assert r.json()["error"] == "upstream_unreachable" and r.json()["worker_id"] == ids[sims[1].url]


async def test_selectors_choose_subsets_and_paused_always_resumes(nursery):
    router, sims = await rl_fleet(nursery, 3, labels={0: {"pool": "a"}, 1: {"pool": "a"}, 2: {"pool": "b"}})
    rl = RL(router.url)
    ids = {w["url"]: w["id"] for w in await rl.workers()}
    async with paused(rl, "pool=a", mode="retract") as res:
        assert res["total"] == 2 and res["succeeded"] == 2 and res["failed"] == []
        assert set(res["results"]) == {ids[sims[0].url], ids[sims[1].url]}
        assert all(r["body"] == {"message": "Generation paused successfully.", "status": "ok"}
                   for r in res["results"].values())
        assert [s.worker.paused for s in sims] == [True, True, False]
        rows = by_url(await rl.workers())
        assert [rows[s.url]["control_state"] for s in sims] == ["paused", "paused", "running"]
    assert [s.worker.paused for s in sims] == [False, False, False]
    assert {w["control_state"] for w in await rl.workers()} == {"running"}
    # by id, by a built-in field, by negation
    res = await rl.fanout("flush_cache", selector=f"id in ({ids[sims[2].url]},nope)")
    assert list(res["results"]) == [ids[sims[2].url]] and res["total"] == 1
    res = await rl.fanout("model_info", method="GET", selector=f"url={sims[1].url}")
    assert res["results"][ids[sims[1].url]]["body"]["model_path"] == "sim/qwen"
    res = await rl.fanout("update_weight_version", {"new_version": "v2", "abort_all_requests": False},
                          selector="pool!=b")
    assert res["succeeded"] == 2
    assert [router.runtime.pool.get(s.url).weight_version for s in sims] == ["v2", "v2", "default"]
    res = await rl.fanout("flush_cache", selector="weight_version=default,engine=sglang")
    assert list(res["results"]) == [ids[sims[2].url]]


async def test_partial_failure_is_207_with_failed_and_errors_are_smg_codes(nursery):
    router, sims = await rl_fleet(nursery, 3)
    rl = RL(router.url)
    ids = {w["url"]: w["id"] for w in await rl.workers()}
    sims[2].kill()
    with pytest.raises(FanoutError) as e:
        await rl.fanout("pause_generation", {"mode": "in_place"}, selector="engine=sglang")
    assert e.value.status == 207
    body = e.value.payload
    assert body["total"] == 3 and body["succeeded"] == 2 and len(body["results"]) == 2
    (failure,) = body["failed"]
    assert failure["worker_id"] == ids[sims[2].url] and failure["url"] == sims[2].url
    assert failure["error"] == "upstream_unreachable" and sims[2].url in failure["message"]
    # the dead worker's pause did not happen: the router does not think it paused
    assert router.runtime.pool.get(sims[2].url).control.paused is False
    assert router.runtime.pool.get(sims[0].url).control.paused is True
    res = await rl.fanout("continue_generation", {}, selector="engine=sglang", allow_partial=True)
    assert res["succeeded"] == 2 and len(res["failed"]) == 1
    # an engine 4xx is a failure with its status
    with pytest.raises(FanoutError) as e:
        await rl.fanout("pause_generation", {"mode": "bogus"}, selector=f"url={sims[0].url}")
    (failure,) = e.value.payload["failed"]
    assert failure == {"worker_id": ids[sims[0].url], "url": sims[0].url, "error": "upstream_error",
                       "message": "HTTP 400", "status": 400}
    assert e.value.payload["results"][ids[sims[0].url]]["body"] == {"error": {"message": "Invalid pause mode: bogus"}}
    assert router.runtime.pool.get(sims[0].url).control.paused is False  # undone: the engine said no
    async with client(router) as c:
        for query, code in (("", "selector_required"), ("?selector=", "selector_required"),
                            ("?selector=bogus", "invalid_selector"), ("?selector=pool%3Dnone", "no_workers_match")):
            r = await c.post(f"/v1/rl/engine/flush_cache{query}", json={})
            assert r.status_code == 400 and r.json()["error"] == code, (query, r.text)
        r = await c.post("/v1/rl/engine/flush_cache?selector=bogus", json={})
        assert r.json()["offset"] == 5 and "at byte 5" in r.json()["message"]
        r = await c.get("/v1/rl/nothing")
        assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_rl_plane_needs_the_admin_key_and_can_be_turned_off(nursery):
    router, sims = await rl_fleet(nursery, 1, server={"admin_api_key": "sekret"})
    async with client(router) as c:
        for method, path in (("GET", "/v1/rl/workers"), ("POST", "/v1/rl/engine/flush_cache?selector=engine%3Dsglang"),
                             ("GET", "/v1/rl/workers/x"), ("POST", "/v1/rl/workers/x/engine/flush_cache")):
            r = await c.request(method, path)
            assert r.status_code == 401, path
    rows = await RL(router.url, api_key="sekret").workers()
    assert len(rows) == 1
    # the key is the router's: the engine never sees it (its other headers it does)
    res = await RL(router.url, api_key="sekret").fanout("_sim/echo", {}, selector="engine=sglang")
    (echo,) = res["results"].values()
    headers = {k.lower(): v for k, v in echo["body"]["headers"]}
    assert "authorization" not in headers and "sekret" not in str(echo["body"])
    assert headers["content-type"] == "application/json"
    off = await start_router(nursery, workers={"urls": [sims[0].url]}, rl={"enabled": False})
    async with client(off) as c:
        r = await c.get("/v1/rl/workers")
        assert r.status_code != 200 and "x-miles-router-worker" in r.headers  # not the router's: proxied


async def test_fanout_parallelism_is_bounded(nursery):
    """Three workers each take ~0.6 s to answer a /generate: with rl.fanout_concurrency = 1 the fan-out takes
    about three times as long as with the default (all at once)."""
    async def timed(concurrency: int) -> float:
        sims = [await start_sim(nursery, seed=i, token_latency_s=0.03) for i in range(3)]
        router = await start_router(nursery, workers={"urls": [s.url for s in sims]},
                                    rl={"fanout_concurrency": concurrency})
        await wait_until(lambda: len(router.runtime.pool.healthy()) == 3)
        t0 = time.monotonic()
        res = await RL(router.url).fanout("generate", {"text": "x", "sampling_params": {
            "max_new_tokens": 20, "ignore_eos": True}}, selector="engine=sglang")
        assert res["succeeded"] == 3
        return time.monotonic() - t0

    one, wide = await timed(1), await timed(32)
    assert one > 1.8 * wide, (one, wide)
    assert one >= 3 * 0.6 * 0.95


async def test_rl_calls_never_count_as_load_or_breaker_outcomes(nursery):
    router, sims = await rl_fleet(nursery, 2, breaker={"failures": 1})
    rl = RL(router.url)
    for _ in range(3):
        with pytest.raises(FanoutError):
            await rl.fanout("pause_generation", {"mode": "bogus"}, selector="engine=sglang")
        async with client(router) as c:
            await c.post("/v1/rl/engine/no_route?selector=engine%3Dsglang", json={})
    for w in router.runtime.pool.all:
        assert w.breaker.state.value == "closed" and w.inflight == 0 and w.requests_total == 0


async def test_workers_listing_shows_labels_and_control_state(nursery):
    router, sims = await rl_fleet(nursery, 1, labels={0: {"pool": "a"}})
    async with client(router) as c:
        r = await c.post("/pause_generation", json={"mode": "in_place"})
        assert r.status_code == 200
        (w,) = (await c.get("/workers")).json()["workers"]
        assert w["labels"] == {"pool": "a"} and w["control_state"] == "paused"
        await c.post("/continue_generation", json={})
        (w,) = (await c.get("/workers")).json()["workers"]
        assert w["control_state"] == "running"


def test_worker_labels_in_the_config_are_checked(tmp_path):
    from router.config import ConfigError, load_config

    p = tmp_path / "router.toml"
    p.write_text('[workers.labels."http://127.0.0.1:9000"]\npool = "a"\ntp = 2\n[rl]\nfanout_concurrency = 4\n')
    cfg = load_config(p)
    assert cfg.workers.labels == {"http://127.0.0.1:9000": {"pool": "a", "tp": 2}} and cfg.rl.fanout_concurrency == 4
    for text, message in (
            ('[workers.labels."ftp://x"]\npool = "a"\n', 'workers.labels."ftp://x": '),
            ('[workers.labels."http://h:1"]\n"bad key" = "a"\n', "invalid label key 'bad key'"),
            ('[workers.labels."http://h:1"]\npool = "two words"\n', 'workers.labels."http://h:1".pool: invalid label'),
            ('[rl]\nfanout_concurrency = 0\n', "rl.fanout_concurrency: must be >= 1")):
        p.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(p)
        assert message in str(e.value) and str(e.value).startswith(str(p)), str(e.value)


def test_control_calls_change_the_engine_view_as_sglang_would():
    from router.core import control

    st = control.ControlState()
    p = control.plan("/pause_generation", b'{"mode":"retract"}')
    undo = control.before(st, p)
    assert st.name == "paused"  # before the call is sent
    assert control.after(st, p, 400, b"{}", undo) is None and st.name == "running"  # refused: undone
    undo = control.before(st, p)
    control.after(st, p, None, b"", undo)
    assert st.name == "running"  # no reply at all: undone too
    undo = control.before(st, p)
    control.after(st, p, 200, b"{}", undo)
    assert st.name == "paused"
    p = control.plan("continue_generation", b"")
    undo = control.before(st, p)
    assert st.name == "paused"  # still paused until the engine said yes
    control.after(st, p, 200, b"", undo)
    assert st.name == "running"
    # sleep: every tag, or some; awake once weights and kv_cache are back
    for release, resumes in ((b"{}", [b'{"tags": null}']), (b'{"tags": ["weights", "kv_cache", "cuda_graph"]}',
                                                           [b'{"tags": ["weights"]}', b'{"tags": ["kv_cache"]}'])):
        p = control.plan("release_memory_occupation", release)
        control.after(st, p, 200, b"null", control.before(st, p))
        assert st.name == "asleep"
        for i, body in enumerate(resumes):
            p = control.plan("resume_memory_occupation", body)
            control.after(st, p, 200, b"null", control.before(st, p))
            assert st.name == ("running" if i == len(resumes) - 1 else "asleep")
    # versions: only a success names one
    for path, body, reply, want in (("update_weight_version", b'{"new_version": 7}', b"{}", "7"),
                                    ("update_weights_from_disk", b'{"weight_version": "s2"}', b'{"success": true}', "s2"),
                                    ("update_weights_from_tensor", b'{"weight_version": "s3"}', b'{"success": false}', None),
                                    ("update_weights_from_distributed", b"{}", b'{"success": true}', None),
                                    ("flush_cache", b"", b"", None)):
        p = control.plan(path, body)
        assert control.after(st, p, 200, reply, control.before(st, p)) == want, path
    assert not control.plan("/generate", b"{}").changes_anything
