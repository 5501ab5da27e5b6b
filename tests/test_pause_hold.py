"""Pause without losing work (issue 20 item 2), over sockets: a pause through the router holds new generation
requests at the router (queued, never sent to a paused engine) until the matching continue; in-flight requests
follow SGLang's pause modes; a hold past routing.hold_timeout_s is a 503 naming it; sessions and the radix
pipeline go through pause/update/continue cycles with no aborted turn."""

from __future__ import annotations

import socket

import h11
import pytest
import trio

from harness import client, start_router, start_sim, wait_until
from router.core.eligibility import Eligibility, VersionPolicy, is_generation, parse_version_policy
from router.core.workers import Worker
from test_health import gen_body, metric


def test_eligibility_rules():
    order = {"v1": 0, "v2": 1, "v3": 2}
    w = {v: Worker(f"http://h:{i}", weight_version=v) for i, v in enumerate(["v1", "v2", "v3", None])}
    paused = Worker("http://h:9", weight_version="v3")
    paused.control.paused = True
    asleep = Worker("http://h:10", weight_version="v3")
    asleep.control.released = frozenset({"kv_cache"})
    gen = Eligibility(True, True, parse_version_policy("max-staleness:1"), order, 2)
    assert [gen.admits(w[v]) for v in ["v1", "v2", "v3", None]] == [False, True, True, False]
    assert not gen.admits(paused) and gen.waits_for(paused) and gen.waits_for(asleep)
    assert not gen.waits_for(w["v2"])
    latest = Eligibility(True, True, parse_version_policy("latest-only"), order, 2)
    assert [latest.admits(w[v]) for v in ["v1", "v2", "v3"]] == [False, False, True]
    assert not latest.waits_for(Worker("http://h:11", weight_version="v1", control=paused.control))
    assert Eligibility(False, True, parse_version_policy("latest-only"), order, 2).admits(w["v1"])  # not generating
    # nothing known yet: every version is fine; not a generation request, or holding off: paused ones serve
    assert Eligibility(True, True, VersionPolicy(0), order, None).admits(w[None])
    assert Eligibility(False, True).admits(paused) and Eligibility(True, False).admits(paused)
    for bad in ("latest", "max-staleness:", "max-staleness:-1", "min-version:3", ""):
        with pytest.raises(ValueError):
            parse_version_policy(bad)
    assert parse_version_policy(" Max-Staleness:3 ").text == "max-staleness:3"
    assert is_generation("POST", "/generate") and not is_generation("GET", "/generate")
    assert not is_generation("POST", "/update_weights_from_disk")


async def fleet(nursery, n=2, token_latency_s=0.01, **sections):
    sims = [await start_sim(nursery, seed=i, token_latency_s=token_latency_s) for i in range(n)]
    workers = {"urls": [s.url for s in sims], "health_interval_s": 30, **sections.pop("workers", {})}
    router = await start_router(nursery, workers=workers, **sections)
    await wait_until(lambda: all(w.weight_version is not None for w in router.runtime.pool.all))
    return router, sims


async def test_pause_holds_generation_until_continue_and_nothing_reaches_a_paused_engine(nursery):
    router, sims = await fleet(nursery)
    rt = router.runtime
    async with client(router) as c:
        r = await c.post("/pause_generation", json={"mode": "retract"})
        assert r.status_code == 200 and all(s.worker.paused for s in sims)
        outs = []

        async def gen(i):
            r = await c.post("/generate", json=gen_body(f"held-{i}", 8))
            outs.append((r.status_code, r.json()["meta_info"]["finish_reason"]["type"]))

        async with trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(gen, i)
            await wait_until(lambda: len(rt.workers.hold_queue) == 6)
            # held at the router: the engines received nothing
            assert sum(s.worker.stats.generate_requests for s in sims) == 0
            text = (await c.get("/metrics")).text
            assert metric(text, "miles_router_queue_depth", queue="pause_hold") == 6
            # a request that does not generate still goes to a (paused) engine, which answers it
            r = await c.get("/model_info")
            assert r.status_code == 200 and r.json()["model_path"] == "sim/qwen"
            await trio.sleep(0.2)
            assert outs == []
            r = await c.post("/continue_generation", json={})
            assert r.status_code == 200
        assert outs == [(200, "length")] * 6
        assert sum(s.worker.stats.generate_requests for s in sims) == 6
        assert sum(s.worker.stats.generate_while_paused for s in sims) == 0
        text = (await c.get("/metrics")).text
        assert metric(text, "miles_router_queue_wait_seconds_count", queue="pause_hold") == 6
        assert metric(text, "miles_router_queue_wait_seconds_sum", queue="pause_hold") >= 6 * 0.2
        assert metric(text, "miles_router_queue_depth", queue="pause_hold") == 0


@pytest.mark.parametrize("mode,finish", [("retract", "length"), ("in_place", "length"), ("abort", "abort")])
async def test_in_flight_requests_follow_the_pause_mode(nursery, mode, finish):
    """retract / in_place: an in-flight request waits in the engine and completes after continue; abort: the
    engine aborts it (SGLang's semantics, passed through)."""
    router, (sim,) = await fleet(nursery, 1)
    async with client(router) as c:
        outs = []

        async def long():
            r = await c.post("/generate", json=gen_body("long", 40))
            outs.append(r.json()["meta_info"]["finish_reason"]["type"])

        async with trio.open_nursery() as n:
            n.start_soon(long)
            await wait_until(lambda: sim.worker.stats.in_flight == 1)
            await trio.sleep(0.05)
            assert (await c.post("/pause_generation", json={"mode": mode})).status_code == 200
            await trio.sleep(0.3)
            if mode != "abort":
                assert outs == []  # it waits inside the engine
            assert (await c.post("/continue_generation", json={})).status_code == 200
        assert outs == [finish]


async def test_a_subset_paused_through_the_rl_plane_sends_traffic_to_the_rest(nursery):
    router, sims = await fleet(nursery, 3, workers={"labels": {}})
    rt = router.runtime
    ids = {w.url: w.id for w in rt.pool.all}
    async with client(router) as c:
        sel = f"id in ({ids[sims[0].url]},{ids[sims[1].url]})"
        r = await c.post(f"/v1/rl/engine/pause_generation?selector={sel}", json={"mode": "retract"})
        assert r.status_code == 200 and r.json()["succeeded"] == 2
        for i in range(6):
            r = await c.post("/generate", json=gen_body(f"s{i}"))
            assert r.status_code == 200 and r.headers["x-miles-router-worker"] == sims[2].url
        assert len(rt.workers.hold_queue) == 0
        assert [s.worker.stats.generate_requests for s in sims] == [0, 0, 6]
        r = await c.post(f"/v1/rl/engine/continue_generation?selector={sel}", json={})
        assert r.status_code == 200
        # sleeping engines (release_memory_occupation) are held the same way, and woken ones serve again
        r = await c.post("/v1/rl/engine/release_memory_occupation?selector=engine%3Dsglang", json={"tags": None})
        assert r.status_code == 200
        assert {w["control_state"] for w in (await c.get("/v1/rl/workers")).json()["workers"]} == {"asleep"}
        async with trio.open_nursery() as n:
            outs = []

            async def gen():
                outs.append((await c.post("/generate", json=gen_body("asleep"))).status_code)

            n.start_soon(gen)
            await wait_until(lambda: len(rt.workers.hold_queue) == 1)
            r = await c.post(f"/v1/rl/workers/{ids[sims[1].url]}/engine/resume_memory_occupation", json={})
            assert r.status_code == 200
        assert outs == [200] and sims[1].worker.stats.generate_requests == 1


async def test_a_hold_past_the_timeout_is_a_clear_503_and_holding_can_be_off(nursery):
    router, (sim,) = await fleet(nursery, 1, routing={"hold_timeout_s": 0.3})
    async with client(router) as c:
        await c.post("/pause_generation", json={"mode": "in_place"})
        r = await c.post("/generate", json=gen_body("late"))
        assert r.status_code == 503
        body = r.json()
        assert "routing.hold_timeout_s (0.3s)" in body["error"] and sim.url in body["error"]
        assert body["held_s"] >= 0.3 and body["stage"] == "forward"
        assert sim.worker.stats.generate_requests == 0
        text = (await c.get("/metrics")).text
        assert metric(text, "miles_router_queue_rejections_total", queue="pause_hold", reason="timeout") == 1
        await c.post("/continue_generation", json={})
        assert (await c.post("/generate", json=gen_body("after"))).status_code == 200
    # routing.hold_when_paused = false: the old behaviour, the request goes to the paused engine, which blocks it
    router, (sim,) = await fleet(nursery, 1, routing={"hold_when_paused": False})
    async with client(router) as c, trio.open_nursery() as n:
        await c.post("/pause_generation", json={"mode": "in_place"})
        n.start_soon(lambda: c.post("/generate", json=gen_body("blocked")))
        await wait_until(lambda: sim.worker.stats.generate_while_paused == 1)
        await c.post("/continue_generation", json={})


async def _chat_agent(c, done: trio.Event, finishes: list, tag: str, turns: dict) -> str:
    """Turns until `done`, then one more. Each sends the replies back whole and none is cut at max_tokens, so
    every turn extends the one before (a reply re-sent without its reasoning_content starts a branch, as miles'
    matcher says, and a truncated turn cannot be extended). `turns[session id]`: how many turns it made."""
    sid = (await c.post("/sessions")).json()["session_id"]
    messages = [{"role": "user", "content": f"agent {tag}: go"}]
    t, last = 0, False
    while not last:
        last, t = done.is_set(), t + 1
        r = await c.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": messages, "max_tokens": 4000})
        assert r.status_code == 200, r.text
        reply = r.json()
        finishes.append(reply["choices"][0]["finish_reason"])
        messages += [reply["choices"][0]["message"], {"role": "user", "content": f"step {t}"}]
        turns[sid] = t
    return sid


async def _text_agent(c, done: trio.Event, finishes: list, tag: str) -> None:
    text = f"conversation {tag}:"
    t, last = 0, False
    while not last:
        last, t = done.is_set(), t + 1
        r = await c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": 12}})
        assert r.status_code == 200, r.text
        finishes.append(r.json()["meta_info"]["finish_reason"]["type"])
        text += r.json()["text"] + f" user {t}:"


async def test_sessions_and_the_radix_pipeline_survive_pause_update_continue_cycles(nursery):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    router, sims = await fleet(nursery, 2, token_latency_s=0.002, routes=[{"path": "/generate",
                                                    "pipeline": str(root / "pipelines/radix-cache.toml")}])
    rt = router.runtime
    chat, text, sids, turns = [], [], [], {}
    done = trio.Event()
    async with client(router) as c:
        async def controller(n):
            await wait_until(lambda: len(chat) >= 4)
            for cycle in range(3):
                await trio.sleep(0.15)
                r = await c.post("/v1/rl/engine/pause_generation?selector=engine%3Dsglang", json={"mode": "retract"})
                assert r.status_code == 200
                # agents arriving during the update (most running ones wait inside the engines): held
                held = len(rt.workers.hold_queue)
                n.start_soon(chat_agent, f"late{cycle}")
                n.start_soon(_text_agent, c, done, text, f"late{cycle}")
                await wait_until(lambda: len(rt.workers.hold_queue) >= held + 2)
                r = await c.post("/v1/rl/engine/update_weights_from_disk?selector=engine%3Dsglang",
                                 json={"model_path": "/ckpt", "weight_version": f"v{cycle + 2}",
                                       "abort_all_requests": False})
                assert r.status_code == 200
                r = await c.post("/v1/rl/engine/continue_generation?selector=engine%3Dsglang", json={})
                assert r.status_code == 200
            done.set()

        async def chat_agent(i):
            sids.append(await _chat_agent(c, done, chat, f"c{i}", turns))

        async with trio.open_nursery() as n:
            n.start_soon(controller, n)
            for i in range(4):
                n.start_soon(chat_agent, i)
                n.start_soon(_text_agent, c, done, text, f"t{i}")
        assert len(chat) >= 15 and len(text) >= 15
        assert "abort" not in chat and "abort" not in text
        assert sum(s.worker.stats.generate_while_paused for s in sims) == 0
        assert sum(s.worker.stats.aborted for s in sims) == 0
        waited = metric((await c.get("/metrics")).text, "miles_router_queue_wait_seconds_count", queue="pause_hold")
        assert waited >= 6  # the late agents' first turns, at least, were held
        # each session is one line of turns (no turn lost to the cycles), and each turn records the weights that
        # served it: the first agents began on the first weights (one still running at the first pause may be retracted
        # and finish on the next), every agent ended on the last
        versions = {}
        for sid in sids:
            records = (await c.get(f"/sessions/{sid}")).json()["records"]
            assert len(records) == turns[sid], (sid, len(records), turns[sid])
            versions[sid] = [rec["response"]["metadata"]["weight_version"] for rec in records]
        assert all(v[-1] == "v4" for v in versions.values()), versions
        assert any(v[0] == "default" for v in versions.values()), versions
    assert rt.workers.current_version() == "v4"


async def test_an_engine_that_registers_again_is_running(nursery):
    """An engine registers itself when it starts: a restart while the router thought it paused must not leave it
    held forever. The held request runs on it."""
    router, (sim,) = await fleet(nursery, 1)
    rt = router.runtime
    async with client(router) as c:
        await c.post("/pause_generation", json={"mode": "in_place"})
        sim.worker.resume()  # the engine restarted: it generates again, the router has not seen a continue
        outs = []
        async with trio.open_nursery() as n:
            async def gen():
                outs.append((await c.post("/generate", json=gen_body("restart"))).status_code)
            n.start_soon(gen)
            await wait_until(lambda: len(rt.workers.hold_queue) == 1)
            r = await c.post("/workers", json={"url": sim.url})
            assert r.status_code == 202
        assert outs == [200] and rt.pool.get(sim.url).control.name == "running"


class SlowReadingEngine:
    """A raw engine (h11 over trio) that answers every request with 200 `{}`, except that it starts reading
    the body of a POST to `/slow` only `stall_s` after its head arrived, through a small receive buffer. It
    records how much of that body it had read when a `/pause_generation` arrived."""

    RCVBUF = 64 * 1024

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.slow_started = trio.Event()
        self.slow_read = 0  # body bytes of /slow read so far
        self.slow_read_at_pause: int | None = None
        self.url = ""

    async def start(self, nursery) -> SlowReadingEngine:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        # Set on the listener, so accepted sockets start with it (fixed: no autotuning past it).
        listeners[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
        await nursery.start(trio.serve_listeners, self._serve, listeners)
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        return self

    async def _serve(self, stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        target = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    target = event.target
                    if target == b"/pause_generation":
                        self.slow_read_at_pause = self.slow_read
                    if target == b"/slow":
                        self.slow_started.set()
                        await trio.sleep(self.stall_s)
                elif isinstance(event, h11.Data):
                    if target == b"/slow":
                        self.slow_read += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers))
                                          + conn.send(h11.Data(data=b"{}")) + conn.send(h11.EndOfMessage()))
                    conn.start_next_cycle()
                else:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass


async def test_a_pause_is_sent_only_after_the_requests_routed_before_it(nursery):
    """A request routed to an engine just before a pause can still be on its way (connecting, or writing a large
    body). The pause waits until it is written, so it cannot overtake it: the engine has read all of the earlier
    request but what the kernel buffers hold when the pause arrives. Without the wait, the pause arrived with
    none of it read."""
    engine = await SlowReadingEngine(stall_s=0.5).start(nursery)
    router = await start_router(nursery, workers={"urls": [engine.url], "health_interval_s": 30})
    wmem_max = int(open("/proc/sys/net/ipv4/tcp_wmem").read().split()[2])
    # What may still sit in buffers once the router wrote it all: its socket's send buffer (autotuned at most to
    # tcp_wmem's max) and the engine's receive buffer (the kernel doubles SO_RCVBUF).
    buffered_at_most = wmem_max + 2 * SlowReadingEngine.RCVBUF + 65536
    body = b"x" * (3 * buffered_at_most)
    replies = {}
    async with client(router, timeout=30) as c:
        async def slow() -> None:
            replies["slow"] = await c.post("/slow", content=body)

        async def pause() -> None:
            await engine.slow_started.wait()
            replies["pause"] = await c.post("/pause_generation", json={})

        async with trio.open_nursery() as n:
            n.start_soon(slow)
            n.start_soon(pause)
    assert replies["slow"].status_code == 200 and replies["pause"].status_code == 200
    assert engine.slow_read == len(body)
    assert len(body) - engine.slow_read_at_pause <= buffered_at_most, (engine.slow_read_at_pause, len(body))
    assert router.runtime.pool.all[0].unsent == 0


async def test_waiting_for_unsent_requests_is_bounded_and_counts_each_once(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url], "health_interval_s": 30})
    workers, w = router.runtime.workers, router.runtime.pool.all[0]
    first, second = workers.sending(w), workers.sending(w)
    with trio.fail_after(2):
        assert await workers.wait_sent(w, 0.05) is False  # bounded: both still unsent
    first(), first()  # a second call (a resend, or the forward stage's `finally`) counts nothing
    assert w.unsent == 1
    done = []

    async def waiter() -> None:
        done.append(await workers.wait_sent(w, 5))

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(0.05)
        assert not done
        second()
    assert done == [True] and w.unsent == 0
