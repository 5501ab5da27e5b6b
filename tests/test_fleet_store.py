"""A fleet: several routers on one PostgreSQL store (tests/pg.py), in process over loopback (the main cases over real
router processes, with kill -9 and the database stopped: tests/test_fleet.py).

- any router answers `/retrieve_from_text` (single, batch, binary) exactly for a trajectory another router stored,
  continues a text conversation from the exact tokens of turns another router stored, and treats a text that two
  routers stored with different token spellings as ambiguous, as one router does;
- any router serves any turn: a session is read from the store when a request names it, and a router holding it
  in memory appends the turns other routers committed since before it uses it;
- two routers extending one session at once both succeed and neither overwrites the other: the turn whose write
  comes second is stored under the next id, a sibling (what one router does with two concurrent requests);
- deletion and idle expiry are the fleet's: 410 on every router, and a session one router keeps using is never
  reclaimed by another router's expiry."""

from __future__ import annotations

import trio

from harness import assistant_message, chat_turn, client, generate_text, start_router, start_sim, text_conversations
from test_store import _two_spellings
from test_store_crash import ROOT
from router.tokenizer import load_tokenizer

SYSTEM = "You are a careful assistant who answers briefly and precisely, in one sentence. "  # > 64 bytes


async def _generator(nursery, sim, url: str):
    return await start_router(nursery, workers={"urls": [sim.url]}, store={"enabled": True, "url": url},
                              routes=[{"path": "/generate", "pipeline": str(ROOT / "pipelines/radix-cache-r3.toml")}])


async def test_any_router_answers_for_trajectories_another_stored(nursery, pg_url):
    """Router A serves text conversations (two turns each); router B then answers every trajectory exactly as A does,
    single, batched and in the binary form, and a conversation's next turn on B starts with the exact tokens A's
    turns got from the worker (which spells half its text non-canonically: a fresh tokenization would differ)."""
    sim = await start_sim(nursery, seed=21, noncanonical_rate=0.5)
    a, b = await _generator(nursery, sim, pg_url), await _generator(nursery, sim, pg_url)
    async with client(a) as ca, client(b) as cb:
        texts = await text_conversations(ca, SYSTEM, 4)
        for i, t in enumerate(texts):
            body = {"text": t} if i % 2 else {"texts": [t]}
            assert (await cb.post("/retrieve_from_text", json=body)).json() == \
                (await ca.post("/retrieve_from_text", json=body)).json()
        answers = (await cb.post("/retrieve_from_text", json={"texts": texts})).json()["results"]
        assert all(x["exact"] and x["match"] == "trajectory" and x["routed_experts"] for x in answers)
        binary = {"texts": texts, "format": "safetensors"}
        assert (await cb.post("/retrieve_from_text", json=binary)).content == \
            (await ca.post("/retrieve_from_text", json=binary)).content
        # the next turn of a conversation A served, on B
        out = await generate_text(cb, texts[3] + " Thanks. One more?")
        async with client(sim.url) as s:
            sent = (await s.get("/_sim/stats")).json()["last_bodies"][-1]["input_ids"]
        stored = answers[3]["tokens"]
        assert out["cached"] >= len(stored) - 1 and sent[:out["cached"]] == stored[:out["cached"]]


async def test_one_text_spelled_differently_on_two_routers_is_ambiguous_on_both(nursery, pg_url):
    """A GRPO group spread over two routers, whose samples spelled the same text differently, one on each: neither
    router answers the text alone as exact (each held one spelling in memory); by rid each is exact, and a batch
    naming the text twice gets each spelling once, on either router."""
    text = "<0003> Say hello to the wonderful world, please, and then stop."
    sim = await start_sim(nursery, seed=22)
    a, b = await _generator(nursery, sim, pg_url), await _generator(nursery, sim, pg_url)
    async with client(a) as ca, client(b) as cb:
        want, rids = await _two_spellings(ca, load_tokenizer("builtin:tiny"), text, cb)
        for c in (ca, cb):
            got = (await c.post("/retrieve_from_text", json={"text": text})).json()
            assert got["exact"] is False and got["match"] == "ambiguous" and got["alternatives"] == 2, got
            for rid, toks in zip(rids, want):
                got = (await c.post("/retrieve_from_text", json={"text": text, "rid": rid})).json()
                assert got["exact"] is True and got["tokens"] == toks
            batch = (await c.post("/retrieve_from_text", json={"texts": [text, text]})).json()["results"]
            assert sorted(x["tokens"] for x in batch) == sorted(want) and all(x["exact"] for x in batch)


async def _router(nursery, sim, url: str, **sessions):
    return await start_router(
        nursery, workers={"urls": [sim.url]}, store={"enabled": True, "url": url},
        sessions={"enabled": True, "pipeline": str(ROOT / "pipelines/session-chat-r3.toml"), **sessions})


async def _sent(sim) -> list:
    async with client(sim.url) as c:
        return (await c.get("/_sim/stats")).json()["last_bodies"][-1]["input_ids"]


async def test_any_router_serves_every_turn_of_a_session(nursery, pg_url):
    """An agent's turns alternate between two routers: each turn's worker input starts with every earlier turn's
    stored tokens verbatim, whichever router stored them, and both routers answer GET and /samples identically."""
    sim = await start_sim(nursery, seed=11, chat_replies=True, noncanonical_rate=0.5)
    a, b = await _router(nursery, sim, pg_url), await _router(nursery, sim, pg_url)
    async with client(a) as ca, client(b) as cb:
        assert (await ca.get("/health")).json()["session_server_instance_id"] == \
            (await cb.get("/health")).json()["session_server_instance_id"]
        sid = (await ca.post("/sessions")).json()["session_id"]
        msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "count to three"}]
        before: list = []
        for t, c in enumerate([ca, cb, ca, ca, cb, cb, ca]):
            reply = await chat_turn(c, sid, msgs)
            sent = await _sent(sim)
            assert sent[:len(before)] == before and len(sent) > len(before), t
            state = (await c.get(f"/sessions/{sid}")).json()
            before = state["metadata"]["accumulated_token_ids"]
            assert len(state["metadata"]["tree"]["nodes"]) == t + 1
            msgs += [assistant_message(reply), {"role": "user", "content": f"and then {t}?"}]
        assert (await ca.get(f"/sessions/{sid}")).json() == (await cb.get(f"/sessions/{sid}")).json()
        assert (await ca.post(f"/sessions/{sid}/samples", json={})).content == \
            (await cb.post(f"/sessions/{sid}/samples", json={})).content


async def test_two_routers_extending_one_session_at_once_make_siblings(nursery, pg_url):
    """Six requests from the same parent at once, three on each router (the worker is slow enough that they all
    overlap): all succeed, the session holds all six as children of that parent, each with its own reply's tokens,
    and nothing was overwritten; both routers then show the same tree."""
    sim = await start_sim(nursery, seed=12, chat_replies=True, token_latency_s=0.003)
    a, b = await _router(nursery, sim, pg_url), await _router(nursery, sim, pg_url)
    async with client(a) as ca, client(b) as cb:
        sid = (await ca.post("/sessions")).json()["session_id"]
        msgs = [{"role": "user", "content": "start"}]
        first = await chat_turn(ca, sid, msgs)
        msgs += [assistant_message(first), {"role": "user", "content": "now branch"}]
        await chat_turn(cb, sid, [{"role": "user", "content": "warm b"}])  # b holds the session in memory too
        replies = []

        async def one(c, seed):
            replies.append(await chat_turn(c, sid, msgs, seed=seed, temperature=1.0))

        async with trio.open_nursery() as n:
            for i in range(3):
                n.start_soon(one, ca, i)
                n.start_soon(one, cb, 10 + i)
        async with client(sim.url) as s:
            assert (await s.get("/_sim/stats")).json()["peak_in_flight"] >= 4
        got_a, got_b = (await ca.get(f"/sessions/{sid}")).json(), (await cb.get(f"/sessions/{sid}")).json()
        assert got_a == got_b
        nodes = got_a["metadata"]["tree"]["nodes"]
        assert [n["id"] for n in nodes] == list(range(8))
        children = [n for n in nodes if n["parent"] == 0]
        assert len(children) == 6
        assert sorted(n["response_id"] for n in children) == sorted(r["id"] for r in replies)
        # each stored child holds its own reply's tokens, on both routers
        for router in (a, b):
            turns = {t.response_id: t for t in router.runtime.sessions.get(sid).tree.turns}
            for r in replies:
                want = [t[1] for t in r["choices"][0]["meta_info"]["output_token_logprobs"]]
                assert turns[r["id"]].output_ids.tolist() == want and turns[r["id"]].parent == 0


async def test_deletion_and_idle_expiry_are_the_fleets(nursery, pg_url):
    """DELETE on one router is 410 on the other (which held the session in memory). With a 1 s idle timeout, a
    session kept busy on router B outlives router A's expiry passes, however long A did not see it; once nobody uses
    it, both routers answer 410."""
    sim = await start_sim(nursery, seed=13, chat_replies=True)
    a = await _router(nursery, sim, pg_url, idle_timeout_s=1.0)
    b = await _router(nursery, sim, pg_url, idle_timeout_s=1.0)
    async with client(a) as ca, client(b) as cb:
        gone = (await ca.post("/sessions")).json()["session_id"]
        busy = (await ca.post("/sessions")).json()["session_id"]
        await chat_turn(cb, gone, [{"role": "user", "content": "hello"}])
        assert (await ca.delete(f"/sessions/{gone}")).status_code == 204
        r = await cb.get(f"/sessions/{gone}")
        assert r.status_code == 410 and r.json()["error"].startswith("session reclaimed"), r.text
        with trio.fail_after(10):
            for i in range(12):  # 3 s of use on b only, every 0.25 s: a's expiry passes run 4 times a second
                await chat_turn(cb, busy, [{"role": "user", "content": f"still here {i}"}], max_tokens=4)
                await trio.sleep(0.25)
        assert (await ca.get(f"/sessions/{busy}")).status_code == 200
        with trio.fail_after(10):
            while (await cb.get(f"/sessions/{busy}")).status_code != 410:
                await trio.sleep(0.1)
        assert (await ca.get(f"/sessions/{busy}")).status_code == 410
