"""The admin surface (issue #5): an optional admin API key guards the calls that change the router
or every worker (/add_worker, /remove_worker, the fan-out endpoints); reading state and the data
path stay open; the key never travels on to a worker; /add_worker only accepts hosts in
`[workers] allowed_hosts` (names, addresses or CIDRs).
"""

from __future__ import annotations

from functools import partial

import pytest

from harness import client, start_router, start_sim
from router.http.serve import serve_asgi

KEY = "s3cret-admin-key"
FANOUT = ["/abort_request", "/pause_generation", "/continue_generation", "/update_weight_version", "/flush_cache"]
BODIES = {"/update_weight_version": {"new_version": "v1", "abort_all_requests": False}, "/pause_generation": {"mode": "abort"}}


def admin_calls(extra_url: str):
    """(method, path, kwargs) of every admin call, each one that succeeds when authorized."""
    calls = [("POST", "/add_worker", {"json": {"url": extra_url}}),
             ("POST", "/remove_worker", {"json": {"url": extra_url}})]
    for path in FANOUT:
        calls.append(("POST", path, {"json": BODIES.get(path, {})}))
    calls.append(("GET", "/flush_cache", {}))
    return calls


def assert_401(r) -> None:
    assert r.status_code == 401, (r.status_code, r.text)
    assert "admin API key" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_admin_key_guards_changes_and_leaves_reads_and_data_open(nursery):
    a, b = await start_sim(nursery), await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [a.url]}, server={"port": 0, "admin_api_key": KEY})
    calls = admin_calls(b.url)
    async with client(router) as c:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"x-admin-key": "wrong"},
                        {"authorization": f"Basic {KEY}"}, {"authorization": KEY}, {"x-admin-key": KEY[:-1]},
                        {"authorization": "Bearer"}, {"x-admin-key": ""}):
            for method, path, kw in calls:
                assert_401(await c.request(method, path, headers=headers, **kw))
        # Nothing changed, and no worker saw any of it.
        assert (await c.get("/list_workers")).json()["urls"] == [a.url]
        assert not any(p in a.worker.stats.paths for p in FANOUT)
        # Reads and the data path need no key.
        for path in ("/health", "/workers", "/list_workers", "/metrics"):
            assert (await c.get(path)).status_code == 200, path
        r = await c.post("/generate", json={"text": "open", "sampling_params": {"max_new_tokens": 4}})
        assert r.status_code == 200 and r.headers["x-miles-router-worker"] == a.url
        assert (await c.get("/model_info")).status_code == 200  # proxied, not admin
        # With the key, by either header, everything goes through.
        for i, headers in enumerate(({"authorization": f"Bearer {KEY}"}, {"x-admin-key": KEY},
                                     {"authorization": f"bearer  {KEY}"})):
            for method, path, kw in calls:
                r = await c.request(method, path, headers=headers, **kw)
                assert r.status_code == 200, (headers, path, r.status_code, r.text)
        assert (await c.get("/list_workers")).json()["urls"] == [a.url]  # b added, then removed again


async def test_env_var_overrides_the_configured_key(nursery, monkeypatch):
    monkeypatch.setenv("MILES_ROUTER_ADMIN_KEY", "from-env")
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]}, server={"port": 0, "admin_api_key": KEY})
    async with client(router) as c:
        assert_401(await c.post("/abort_request", json={}, headers={"authorization": f"Bearer {KEY}"}))
        r = await c.post("/abort_request", json={}, headers={"authorization": "Bearer from-env"})
        assert r.status_code == 200
        r = await c.post("/add_worker", json={"url": sim.url}, headers={"x-admin-key": "from-env"})
        assert r.status_code == 200


async def test_env_var_alone_turns_the_key_on(nursery, monkeypatch):
    monkeypatch.setenv("MILES_ROUTER_ADMIN_KEY", "only-env")
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]})
    async with client(router) as c:
        assert_401(await c.post("/remove_worker", json={"url": sim.url}))
        assert (await c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 2}})).status_code == 200


async def test_no_key_configured_means_open_admin(nursery, monkeypatch):
    monkeypatch.delenv("MILES_ROUTER_ADMIN_KEY", raising=False)
    sim = await start_sim(nursery)
    router = await start_router(nursery)
    async with client(router) as c:
        assert (await c.post("/add_worker", json={"url": sim.url})).status_code == 200
        assert (await c.post("/flush_cache")).status_code == 200


class HeaderRecorder:
    """A minimal worker that answers 200 to everything and records the headers it received."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        while (await receive()).get("more_body"):
            pass
        self.seen.append((scope["path"], {k.decode(): v.decode() for k, v in scope["headers"]}))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})


async def test_admin_key_is_never_forwarded_to_a_worker(nursery):
    rec = HeaderRecorder()
    url = await nursery.start(partial(serve_asgi, rec, "127.0.0.1", 0))
    router = await start_router(nursery, workers={"urls": [url], "health_interval_s": 30},
                                server={"port": 0, "admin_api_key": KEY})
    async with client(router) as c:
        for headers in ({"authorization": f"Bearer {KEY}"}, {"x-admin-key": KEY}):
            assert (await c.post("/abort_request", json={}, headers={**headers, "x-trace": "1"})).status_code == 200
            # A client that sends the key on every call (e.g. a session default) doesn't leak it either.
            assert (await c.post("/generate", json={}, headers={**headers, "x-trace": "1"})).status_code == 200
        # Other credentials meant for the workers (SGLang's own --api-key) pass untouched.
        r = await c.post("/generate", json={}, headers={"authorization": "Bearer sglang-key", "x-trace": "2"})
        assert r.status_code == 200
    traced = [(p, h) for p, h in rec.seen if "x-trace" in h]
    assert [p for p, _ in traced] == ["/abort_request", "/generate", "/abort_request", "/generate", "/generate"]
    for _, h in traced[:4]:
        assert KEY not in str(h) and "x-admin-key" not in h and "authorization" not in h, h
    assert traced[4][1]["authorization"] == "Bearer sglang-key"


async def test_allowed_hosts_names_addresses_and_cidrs(nursery):
    sim = await start_sim(nursery)  # on 127.0.0.1
    router = await start_router(nursery, workers={"allowed_hosts": ["10.0.0.0/8", "127.0.0.1", "gpu-node-1",
                                                                    "fd00::/8"], "health_interval_s": 30})
    allowed = [sim.url, "http://10.1.2.3:30000", "http://gpu-node-1:30000", "http://GPU-NODE-1:30001",
               "http://[fd00::5]:30000"]
    refused = ["http://11.0.0.1:30000", "http://127.0.0.2:30000", "http://localhost:30000",
               "http://gpu-node-1.evil.com:30000", "http://gpu-node-10:30000", "http://[fe00::5]:30000",
               "http://169.254.169.254:80", "http://[::ffff:10.0.0.1]:80", "http://10.0.0.1.nip.io:80"]
    async with client(router) as c:
        for url in refused:
            r = await c.post("/add_worker", json={"url": url})
            assert r.status_code == 403, (url, r.text)
            assert "allowed_hosts" in r.json()["error"]
        for url in allowed:
            assert (await c.post("/add_worker", json={"url": url})).status_code == 200, url
        listed = (await c.get("/list_workers")).json()["urls"]
    assert len(listed) == len(allowed)
    assert not any("11.0.0.1" in u or "127.0.0.2" in u or "localhost" in u for u in listed)


async def test_key_is_checked_before_the_allowlist(nursery):
    router = await start_router(nursery, workers={"allowed_hosts": ["10.0.0.0/8"]},
                                server={"port": 0, "admin_api_key": KEY})
    async with client(router) as c:
        assert_401(await c.post("/add_worker", json={"url": "http://11.0.0.1:1"}))  # no hint about the allowlist
        r = await c.post("/add_worker", json={"url": "http://11.0.0.1:1"}, headers={"x-admin-key": KEY})
        assert r.status_code == 403


@pytest.mark.parametrize("entry, url, ok", [
    ("127.0.0.1", "http://127.0.0.1:1", True),
    ("::1", "http://[0:0::1]:1", True),           # addresses compare as addresses
    ("[::1]", "http://[::1]:1", True),
    ("127.0.0.0/8", "http://127.200.0.1:1", True),
    ("127.0.0.0/8", "http://127.1:1", False),     # not an address in dotted form: not in the CIDR
    ("10.0.0.0/8", "http://[::ffff:10.0.0.1]:1", False),
    ("worker", "http://worker.:1", False),
])
def test_host_allowed_unit(entry, url, ok):
    from router.core.urls import host_allowed, normalize_worker_url

    assert host_allowed(normalize_worker_url(url), [entry]) is ok
