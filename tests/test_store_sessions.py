"""Agent sessions survive a restart: the durable store keeps every session's tree (messages, tokens, logprobs,
routed experts, records) and the registry's key (so deleted ids stay 410). After a restart on the same store,
GET /sessions/{id} and the samples are byte-identical, and the next turn's worker input starts with the exact
stored tokens. Under kill -9 of a real router process: tests/test_store_crash.py."""

from __future__ import annotations

import trio

from harness import assistant_message, chat_turn, client, start_router, start_sim
from test_store_crash import ROOT


async def _router(nursery, sim, store_at):
    return await start_router(
        nursery, workers={"urls": [sim.url]},
        sessions={"enabled": True, "pipeline": str(ROOT / "pipelines/session-chat-r3.toml")},
        store=store_at.config())


async def _last_input_ids(sim) -> list:
    async with client(sim.url) as c:
        return (await c.get("/_sim/stats")).json()["last_bodies"][-1]["input_ids"]


async def test_sessions_survive_restart_exactly(nursery, store_at):
    sim = await start_sim(nursery, seed=4, chat_replies=True)
    histories: dict[str, list] = {}
    async with trio.open_nursery() as n1:
        router = await _router(n1, sim, store_at)
        async with client(router) as c:
            for s in range(2):
                sid = (await c.post("/sessions")).json()["session_id"]
                msgs = [{"role": "system", "content": "You are terse."},
                        {"role": "user", "content": f"Session {s}: what is {s} + 2?"}]
                for t in range(3 - s):
                    msgs.append(assistant_message(await chat_turn(c, sid, msgs)))
                    msgs.append({"role": "user", "content": f"and times {t + 3}?"})
                histories[sid] = msgs
            gone = (await c.post("/sessions")).json()["session_id"]
            assert (await c.delete(f"/sessions/{gone}")).status_code == 204
            before = {sid: (await c.get(f"/sessions/{sid}")).json() for sid in histories}
            samples = {sid: (await c.post(f"/sessions/{sid}/samples", json={})).content for sid in histories}
            instance = (await c.get("/health")).json()["session_server_instance_id"]
        n1.cancel_scope.cancel()

    async with trio.open_nursery() as n2:
        router = await _router(n2, sim, store_at)
        async with client(router) as c:
            # the same sessions are served: miles' instance id names them, so it stays
            assert (await c.get("/health")).json()["session_server_instance_id"] == instance
            for sid in histories:
                assert (await c.get(f"/sessions/{sid}")).json() == before[sid]
                assert (await c.post(f"/sessions/{sid}/samples", json={})).content == samples[sid]
            assert (await c.get(f"/sessions/{gone}")).status_code == 410  # deleted before the restart
            assert (await c.get("/sessions/" + "0" * 32)).status_code == 404  # never issued
            # the next turn continues: the worker receives the stored tokens verbatim, then only the new part
            for sid, msgs in histories.items():
                stored = before[sid]["metadata"]["accumulated_token_ids"]
                await chat_turn(c, sid, msgs)
                sent = await _last_input_ids(sim)
                assert sent[:len(stored)] == stored and len(sent) > len(stored)
                assert len((await c.get(f"/sessions/{sid}")).json()["metadata"]["tree"]["nodes"]) == \
                    len(before[sid]["metadata"]["tree"]["nodes"]) + 1
        n2.cancel_scope.cancel()


# kill -9 of a real router process with agents looping turns (and /generate load at the same time):
# tests/test_store_crash.py::test_kill9_under_load_loses_no_acknowledged_trajectory (and its -m slow soak).
