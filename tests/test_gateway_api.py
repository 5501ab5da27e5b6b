"""The SGLang Model Gateway worker API (issue 9 item 4), over sockets, with the calls a miles engine
makes (miles/backends/sglang_utils/sglang_engine.py: _init_normal registers, shutdown deregisters)."""

from __future__ import annotations

import uuid
from urllib.parse import quote

import trio

from harness import client, start_router, start_sim, wait_until

KEY = "gateway-admin-key"


async def generate(c, text="hello", **kw):
    return await c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": 4}}, **kw)


async def test_engine_registers_and_deregisters_through_the_gateway_api(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery)
    async with client(router) as c:
        assert (await c.get("/readiness")).status_code == 503
        # _init_normal, sglang_router >= 0.2.2: POST /workers {url, worker_type}, then raise_for_status
        r = await c.post("/workers", json={"url": sim.url, "worker_type": "regular"})
        assert r.status_code == 202, r.text
        body = r.json()
        worker_id = body["worker_id"]
        assert str(uuid.UUID(worker_id)) == worker_id
        assert r.headers["location"] == body["location"] == f"/workers/{worker_id}"
        assert body["status"] == "accepted" and body["url"] == sim.url
        # registering again is idempotent: same id
        again = await c.post("/workers", json={"url": sim.url, "worker_type": "regular"})
        assert again.status_code == 202 and again.json()["worker_id"] == worker_id

        r = await generate(c)
        assert r.status_code == 200 and r.headers["x-miles-router-worker"] == sim.url
        ready = await c.get("/readiness")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "healthy_workers": 1, "total_workers": 1}

        listing = (await c.get("/workers")).json()
        assert listing["total"] == 1 and listing["stats"] == {"regular_count": 1, "prefill_count": 0,
                                                              "decode_count": 0}
        (info,) = listing["workers"]
        assert info["id"] == worker_id and info["url"] == sim.url and info["is_healthy"] is True
        assert info["load"] == 0 and info["worker_type"] == "regular"
        assert info["state"] == "healthy" and info["inflight"] == 0  # today's fields stay
        one = await c.get(f"/workers/{worker_id}")
        assert one.status_code == 200 and one.json()["url"] == sim.url and one.json()["id"] == worker_id

        # shutdown, sglang_router >= 0.3: GET /workers, find the url, DELETE /workers/{id}
        workers = (await c.get("/workers")).json()["workers"]
        (entry,) = [w for w in workers if w["url"] == sim.url]
        r = await c.delete(f"/workers/{entry['id']}")
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "accepted" and r.json()["worker_id"] == worker_id
        assert (await c.get("/list_workers")).json()["urls"] == []
        gone = await c.get(f"/workers/{worker_id}")
        assert gone.status_code == 404
        assert gone.json() == {"error": f"Worker {worker_id} not found", "code": "WORKER_NOT_FOUND"}
        assert (await c.delete(f"/workers/{worker_id}")).status_code == 404
        assert (await generate(c)).status_code == 503
        assert (await c.get("/readiness")).json()["status"] == "not_ready"

        # re-registered: the same id (a hash of the URL: every router process names a worker the same)
        r = await c.post("/workers", json={"url": sim.url, "worker_type": "regular"})
        assert r.status_code == 202 and r.json()["worker_id"] == worker_id
        assert worker_id == str(uuid.uuid5(uuid.NAMESPACE_URL, sim.url))
        # shutdown, sglang_router < 0.3: DELETE /workers/{quote(url, safe="")}
        r = await c.delete(f"/workers/{quote(sim.url, safe='')}")
        assert r.status_code == 202, r.text
        assert (await c.get("/list_workers")).json()["urls"] == []

        # the miles router's own path still works and shows in the same pool
        assert (await c.post(f"/add_worker?url={sim.url}")).status_code == 200
        (info,) = (await c.get("/workers")).json()["workers"]
        assert str(uuid.UUID(info["id"])) == info["id"] and info["is_healthy"]
        assert (await c.get(f"/workers/{info['id']}")).status_code == 200
        assert (await c.post(f"/remove_worker?url={sim.url}")).status_code == 200
        assert (await c.get("/workers")).json()["workers"] == []


async def test_gateway_error_shapes(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"allowed_hosts": ["127.0.0.1"]})
    async with client(router) as c:
        cases = [
            ({}, 400, 'invalid JSON body: missing required field "url"'),
            ({"url": 5}, 400, "invalid JSON body: expected a string, got an integer at $.url"),
            ({"url": sim.url, "worker_type": "prefill", "bootstrap_port": 8998}, 400, "prefill/decode"),
            ({"url": sim.url, "worker_type": "gpu"}, 400, "worker_type must be one of"),
            ({"url": "ftp://x:1"}, 400, "http://host:port"),
            ({"url": "http://10.1.2.3:8000"}, 403, "allowed_hosts"),
        ]
        for body, status, fragment in cases:
            r = await c.post("/workers", json=body)
            assert r.status_code == status, (body, r.text)
            err = r.json()
            assert fragment in err["error"], (body, err)
            assert err["code"] == ("FORBIDDEN" if status == 403 else "BAD_REQUEST")
        r = await c.post("/workers", content=b'{"url": ', headers={"content-type": "application/json"})
        assert r.json() == {"error": "invalid JSON body: JSON is truncated at byte 8", "code": "BAD_REQUEST"}
        r = await c.get("/workers/not-a-uuid")
        assert r.status_code == 400 and r.json()["code"] == "BAD_REQUEST" and "Invalid worker_id" in r.json()["error"]
        r = await c.delete(f"/workers/{uuid.uuid4()}")
        assert r.status_code == 404 and r.json()["code"] == "WORKER_NOT_FOUND"
        r = await c.put(f"/workers/{uuid.uuid4()}", json={"priority": 1})
        assert r.status_code == 405 and "x-miles-router-worker" not in r.headers  # never proxied
        for method in ("PUT", "PATCH", "DELETE"):  # the list itself: the router's too, never proxied
            r = await c.request(method, "/workers")
            assert r.status_code == 405 and "x-miles-router-worker" not in r.headers
            assert r.json() == {"error": f"{method} /workers is not supported (GET or POST)",
                                "code": "METHOD_NOT_ALLOWED"}
        assert (await c.get("/workers")).json()["workers"] == []
        live = await c.get("/liveness")
        assert live.status_code == 200 and live.text == "OK"


async def test_gateway_admin_endpoints_need_the_admin_key(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, server={"port": 0, "admin_api_key": KEY})
    auth = {"authorization": f"Bearer {KEY}"}
    async with client(router) as c:
        r = await c.post("/workers", json={"url": sim.url, "worker_type": "regular"})
        assert r.status_code == 401 and (await c.get("/workers")).json()["workers"] == []
        r = await c.post("/workers", json={"url": sim.url, "worker_type": "regular"}, headers=auth)
        assert r.status_code == 202
        worker_id = r.json()["worker_id"]
        assert (await c.get(f"/workers/{worker_id}")).status_code == 200  # reading needs no key
        assert (await c.delete(f"/workers/{worker_id}")).status_code == 401
        assert (await c.get("/list_workers")).json()["urls"] == [sim.url]
        assert (await c.delete(f"/workers/{worker_id}", headers=auth)).status_code == 202
        assert (await c.get("/list_workers")).json()["urls"] == []


async def test_load_and_v1_loads_count_requests_in_flight(nursery):
    slow = await start_sim(nursery, token_latency_s=0.05)
    router = await start_router(nursery, workers={"urls": [slow.url]})
    async with client(router) as c:
        loads = (await c.get("/v1/loads")).json()
        assert loads == {"loads": [{"worker": slow.url, "worker_type": None, "load": 0}],
                         "total_workers": 1, "successful": 1, "failed": 0}
        async with trio.open_nursery() as n:
            for i in range(3):
                n.start_soon(lambda i=i: c.post("/generate", json={
                    "text": f"slow {i}", "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}))
            await wait_until(lambda: router.runtime.pool.all[0].inflight == 3)
            assert (await c.get("/workers")).json()["workers"][0]["load"] == 3
            assert (await c.get("/v1/loads")).json()["loads"][0]["load"] == 3
            assert (await c.get("/get_loads")).json()["loads"][0]["load"] == 3
        assert (await c.get("/v1/loads")).json()["loads"][0]["load"] == 0
