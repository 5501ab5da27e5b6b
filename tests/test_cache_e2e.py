"""The exact trajectory cache end to end: router (radix-cache pipeline) + simulated workers +
Qwen's real vocabulary, over loopback. These are the exactness properties of issue #3."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import trio

from harness import client, start_router, start_sim, wait_until
from router.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
EOS = 151645  # <|im_end|>


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer("builtin:qwen")


def chat(messages, gen=True):
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + ("<|im_start|>assistant\n" if gen else "")


async def cache_router(nursery, n_workers=1, pipeline="pipelines/radix-cache.toml", **sim_kw):
    sim_kw.setdefault("tokenizer", "builtin:qwen")
    sims = [await start_sim(nursery, seed=i, **sim_kw) for i in range(n_workers)]
    router = await start_router(
        nursery,
        workers={"urls": [s.url for s in sims]},
        tokenizer={"path": "builtin:qwen"},
        routes=[{"path": "/generate", "pipeline": str(ROOT / pipeline)}],
    )
    return router, sims


async def last_received(sim) -> dict:
    async with client(sim.url) as c:
        return (await c.get("/_sim/stats")).json()["last_bodies"][-1]


async def retrieve(c, text):
    r = await c.post("/retrieve_from_text", json={"text": text})
    assert r.status_code == 200, r.text
    return r.json()


async def test_text_request_is_rewritten_and_retrieved_exactly(nursery, qwen):
    router, (sim,) = await cache_router(nursery)
    prompt = chat([{"role": "user", "content": "Name three prime numbers."}])
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 40, "temperature": 0.7},
            "return_logprob": True, "x_custom_field": {"keep": [1, 2.5, None]}, "rid": "req-1"}
    async with client(router) as c:
        r = await c.post("/generate", json=body)
        assert r.status_code == 200
        out = r.json()
        sent = await last_received(sim)
        # The rewrite reached the worker: input_ids instead of text, every other field kept.
        assert "text" not in sent and sent["input_ids"] == qwen.encode(prompt)
        assert {k: v for k, v in sent.items() if k != "input_ids"} == {k: v for k, v in body.items() if k != "text"}
        assert r.headers["x-miles-router-cached-prompt-tokens"] == "0"
        assert int(r.headers["x-miles-router-fresh-prompt-tokens"]) == len(sent["input_ids"])

        got = await retrieve(c, prompt + out["text"])
    O = out["output_ids"]
    assert got["exact"] is True and got["fresh_tokens"] == 0
    assert got["tokens"] == qwen.encode(prompt) + O
    if out["meta_info"]["finish_reason"]["type"] == "stop":
        assert O[-1] == EOS and not out["text"].endswith("<|im_end|>")  # stop token kept though its text was stripped
    P = len(qwen.encode(prompt))
    assert got["loss_mask"] == [0] * P + [1] * len(O)
    assert got["rollout_logp"][:P] == [0.0] * P
    assert got["rollout_logp"][P:] == [t[0] for t in out["meta_info"]["output_token_logprobs"]]
    assert got["token_length"] == got["loss_mask_length"] == P + len(O)
    assert got["weight_version"] == "default"


async def test_multi_turn_stop_token_neither_doubled_nor_lost(nursery, qwen):
    router, (sim,) = await cache_router(nursery)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi in 中文 🙂"}]
    sp = {"max_new_tokens": 256}
    async with client(router) as c:
        p1 = chat(msgs)
        for seed in range(20):  # find a sample that ended on the stop token
            o1 = (await c.post("/generate", json={"text": p1, "sampling_params": {**sp, "sampling_seed": seed}})).json()
            if o1["output_ids"][-1] == EOS:
                break
        assert o1["output_ids"][-1] == EOS
        # The next turn's text continues with the chat template, starting with the stop token's text.
        p2 = p1 + o1["text"] + "<|im_end|>\n" + "<|im_start|>user\nAnd in French?<|im_end|>\n<|im_start|>assistant\n"
        r2 = await c.post("/generate", json={"text": p2, "sampling_params": sp})
        o2 = r2.json()
        sent2 = (await last_received(sim))["input_ids"]
        new_part = qwen.encode("\n<|im_start|>user\nAnd in French?<|im_end|>\n<|im_start|>assistant\n")
        turn1 = qwen.encode(p1) + o1["output_ids"]
        assert sent2 == turn1 + new_part  # prompt_ids(P) + O + only the new part
        assert sent2.count(EOS) == turn1.count(EOS) + new_part.count(EOS)
        assert int(r2.headers["x-miles-router-cached-prompt-tokens"]) == len(turn1)
        assert int(r2.headers["x-miles-router-fresh-prompt-tokens"]) == len(new_part)

        whole = await retrieve(c, p2 + o2["text"])
        assert whole["exact"] and whole["tokens"] == sent2 + o2["output_ids"]
        P1, O1, N, O2 = len(qwen.encode(p1)), len(o1["output_ids"]), len(new_part), len(o2["output_ids"])
        assert whole["loss_mask"] == [0] * P1 + [1] * O1 + [0] * N + [1] * O2
        lp = whole["rollout_logp"]
        assert lp[P1:P1 + O1] == [t[0] for t in o1["meta_info"]["output_token_logprobs"]]
        assert lp[P1 + O1 + N:] == [t[0] for t in o2["meta_info"]["output_token_logprobs"]]
        # Turn 1 is still retrievable on its own.
        first = await retrieve(c, p1 + o1["text"])
        assert first["exact"] and first["tokens"] == turn1


async def test_engine_tokens_win_over_retokenization(nursery, qwen):
    """The simulator emits valid but non-canonical tokenizations; retrieve returns the engine's ids."""
    router, _ = await cache_router(nursery, noncanonical_rate=0.6)
    differs = 0
    async with client(router) as c:
        for i in range(6):
            p = chat([{"role": "user", "content": f"Question {i}: tell me a story"}])
            o = (await c.post("/generate", json={"text": p, "sampling_params": {"max_new_tokens": 60}})).json()
            got = await retrieve(c, p + o["text"])
            assert got["tokens"] == qwen.encode(p) + o["output_ids"]
            ids = o["output_ids"][:-1] if o["output_ids"][-1] == EOS else o["output_ids"]
            differs += qwen.encode(o["text"]) != ids
    assert differs > 0


async def test_prompts_sharing_a_system_prompt_reuse_its_tokens(nursery, qwen):
    """RL prompts start with the same long system prompt. The router cuts a new prompt after the last special
    token it shares with a prompt it tokenized itself (<|im_start|> of the user turn), reuses those tokens and
    tokenizes only the rest; the worker still receives exactly the tokens of the whole text. A prompt that came
    as input_ids is never cut inside (a client's ids may spell its text differently)."""
    router, (sim,) = await cache_router(nursery)
    system = {"role": "system", "content": "You are a careful assistant who shows every step. " * 30}
    first, second, third = (chat([system, {"role": "user", "content": q}])
                            for q in ("What is 2+2?", "Name a prime.", "Spell 'cat'."))
    shared = first[:first.index("<|im_start|>user") + len("<|im_start|>")]
    params = {"max_new_tokens": 8}
    async with client(router) as c:
        r1 = await c.post("/generate", json={"text": first, "sampling_params": params})
        assert r1.status_code == 200 and r1.headers["x-miles-router-cached-prompt-tokens"] == "0"
        r2 = await c.post("/generate", json={"text": second, "sampling_params": params})
        sent = await last_received(sim)
        assert sent["input_ids"] == qwen.encode(second)
        assert int(r2.headers["x-miles-router-cached-prompt-tokens"]) == len(qwen.encode(shared))
        assert int(r2.headers["x-miles-router-fresh-prompt-tokens"]) == len(qwen.encode(second)) - len(
            qwen.encode(shared))
        got = await retrieve(c, shared)  # a cut inside a prompt is still no generation boundary
        assert got["exact"] is False and got["match"] == "inside_prompt"

    router, (sim,) = await cache_router(nursery)
    async with client(router) as c:
        r1 = await c.post("/generate", json={"input_ids": qwen.encode(first), "sampling_params": params})
        assert r1.status_code == 200
        r3 = await c.post("/generate", json={"text": third, "sampling_params": params})
        assert r3.headers["x-miles-router-cached-prompt-tokens"] == "0"
        assert (await last_received(sim))["input_ids"] == qwen.encode(third)


async def test_grpo_samples_share_the_prompt(nursery, qwen):
    router, _ = await cache_router(nursery, n_workers=2)
    p = chat([{"role": "user", "content": "Solve 17 * 23 step by step."}])
    outs = []
    async with client(router) as c:
        async with trio.open_nursery() as n:
            async def sample(seed):
                r = await c.post("/generate", json={"text": p, "sampling_params": {"max_new_tokens": 50,
                                                                                   "sampling_seed": seed}})
                outs.append(r.json())
            for s in range(8):
                n.start_soon(sample, s)
        assert len({o["text"] for o in outs}) > 1
        for o in outs:
            got = await retrieve(c, p + o["text"])
            assert got["exact"] and got["tokens"] == qwen.encode(p) + o["output_ids"]
        stats = (await c.get("/cache/stats")).json()
    total = sum(len(qwen.encode(p)) + len(o["output_ids"]) for o in outs)
    assert stats["tokens"] <= total - 6 * len(qwen.encode(p))  # the prompt is stored (at most) twice, not 8 times


async def test_n_samples_in_one_request_are_each_recorded(nursery, qwen):
    router, _ = await cache_router(nursery)
    p = chat([{"role": "user", "content": "Give me a word."}])
    async with client(router) as c:
        outs = (await c.post("/generate", json={"text": p, "sampling_params": {"max_new_tokens": 20, "n": 3}})).json()
        assert isinstance(outs, list) and len(outs) == 3
        for o in outs:
            got = await retrieve(c, p + o["text"])
            assert got["exact"] and got["tokens"] == qwen.encode(p) + o["output_ids"]


async def test_unicode_split_across_tokens_round_trips(nursery, qwen):
    router, _ = await cache_router(nursery)
    p = chat([{"role": "user", "content": "表情符号 🧑‍🚀🏳️‍🌈 and ñandú — «quotes» 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"}])
    async with client(router) as c:
        o = (await c.post("/generate", json={"text": p, "sampling_params": {"max_new_tokens": 80}})).json()
        got = await retrieve(c, p + o["text"])
    assert got["exact"] and got["tokens"] == qwen.encode(p) + o["output_ids"]
    assert qwen.decode(got["tokens"], skip_special_tokens=False).startswith(p)


async def test_unmatched_text_is_fresh_and_reported(nursery, qwen):
    router, _ = await cache_router(nursery)
    async with client(router) as c:
        got = await retrieve(c, "never seen before")
        assert got["exact"] is False and got["matched_chars"] == 0
        assert got["tokens"] == qwen.encode("never seen before") and got["fresh_tokens"] == len(got["tokens"])
        assert set(got["loss_mask"]) == {0}
        p = chat([{"role": "user", "content": "hello"}])
        o = (await c.post("/generate", json={"text": p, "sampling_params": {"max_new_tokens": 10}})).json()
        # A text that extends a trajectory with something new: exact prefix, fresh tail, reported.
        got = await retrieve(c, p + o["text"] + " extra words")
        assert got["exact"] is False and got["fresh_tokens"] > 0
        assert got["matched_chars"] >= len(p)
        assert got["tokens"][:len(qwen.encode(p))] == qwen.encode(p)


async def test_stream_is_honoured_and_captured(nursery, qwen):
    router, _ = await cache_router(nursery, token_latency_s=0.01)
    p = chat([{"role": "user", "content": "stream please"}])
    async with client(router) as c:
        events = []
        async with c.stream("POST", "/generate", json={"text": p, "stream": True,
                                                       "sampling_params": {"max_new_tokens": 15}}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]" and len(events) > 2
        final = json.loads(events[-2])
        got = await retrieve(c, p + final["text"])
    assert got["exact"] and got["tokens"] == qwen.encode(p) + final["output_ids"]


async def test_input_ids_request_forwarded_unchanged_and_recorded(nursery, qwen):
    router, (sim,) = await cache_router(nursery)
    p = chat([{"role": "user", "content": "tokens in"}])
    ids = qwen.encode(p)
    raw = json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": 12}, "return_logprob": True,
                      "zz": 1}, separators=(",", " : ")).encode()
    async with client(router) as c:
        r = await c.post("/generate", content=raw, headers={"content-type": "application/json"})
        o = r.json()
        async with client(sim.url) as d:
            # the last /generate (a health probe may have come after it)
            last = [q for q in (await d.get("/_sim/stats")).json()["last_requests"] if q["path"] == "/generate"][-1]
        assert last["body"] == json.loads(raw)
        got = await retrieve(c, p + o["text"])
    assert got["exact"] and got["tokens"] == ids + o["output_ids"]


async def test_routed_experts_are_captured_and_stitched(nursery, qwen):
    router, (sim,) = await cache_router(nursery, pipeline="pipelines/radix-cache-r3.toml", num_layers=3, top_k=2)
    p1 = chat([{"role": "user", "content": "route me"}])
    async with client(router) as c:
        o1 = (await c.post("/generate", json={"text": p1, "sampling_params": {"max_new_tokens": 12}})).json()
        assert (await last_received(sim))["return_routed_experts"] is True
        rows1 = np.frombuffer(base64.b64decode(o1["meta_info"]["routed_experts"]), np.int32)
        got = await retrieve(c, p1 + o1["text"])
        assert got["routed_experts"] == o1["meta_info"]["routed_experts"]
        n1 = len(got["tokens"])
        assert got["routed_experts_shape"][0] == n1 - 1 and rows1.size == (n1 - 1) * 6
        p2 = p1 + o1["text"] + "<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"
        o2 = (await c.post("/generate", json={"text": p2, "sampling_params": {"max_new_tokens": 12}})).json()
        got2 = await retrieve(c, p2 + o2["text"])
    # Turn 2's engine rows cover the whole conversation; the cache returns exactly those.
    assert got2["routed_experts"] == o2["meta_info"]["routed_experts"]
    assert got2["routed_experts_shape"][0] == len(got2["tokens"]) - 1


async def test_abort_is_recorded_not_retried(nursery, qwen):
    router, (sim,) = await cache_router(nursery, token_latency_s=0.05)
    p = chat([{"role": "user", "content": "long answer"}])
    result = {}

    async def gen(c):
        r = await c.post("/generate", json={"text": p, "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}})
        result["out"] = r.json()

    async with client(router) as c:
        async with trio.open_nursery() as n:
            n.start_soon(gen, c)
            await trio.sleep(0.3)
            async with client(sim.url) as d:
                assert (await d.post("/abort_request", json={"abort_all": True})).status_code == 200
        out = result["out"]
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        got = await retrieve(c, p + out["text"])
        async with client(sim.url) as d:
            assert (await d.get("/_sim/stats")).json()["generate_requests"] == 1  # not retried
    assert got["exact"] and got["tokens"] == qwen.encode(p) + out["output_ids"]


async def test_retrieve_bad_bodies_and_batch(nursery, qwen):
    router, _ = await cache_router(nursery)
    async with client(router) as c:
        for bad in (b"{", b"[]", b'{"text": 5}', b'{"text": "a", "texts": ["b"]}', b"{}", b'{"txt": "a"}'):
            r = await c.post("/retrieve_from_text", content=bad)
            assert r.status_code == 400, bad
            assert "error" in r.json()
        p = chat([{"role": "user", "content": "batch"}])
        o = (await c.post("/generate", json={"text": p, "sampling_params": {"max_new_tokens": 8}})).json()
        r = await c.post("/retrieve_from_text", json={"texts": [p + o["text"], "unknown"]})
        res = r.json()["results"]
        assert res[0]["exact"] and not res[1]["exact"]


async def test_response_stage_failure_keeps_the_workers_reply(nursery):
    router, (sim,) = await cache_router(nursery)
    async with client(sim.url) as d:
        await d.post("/_sim/faults", json={"echo": True})
    async with client(router) as c:
        r = await c.post("/generate", json={"text": "echo me", "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 200
    assert json.loads(r.content)["input_ids"]  # the worker's bytes (here: the rewritten request) arrived
    assert "capture" in r.headers["x-miles-router-stage-error"]


async def test_abort_retry_is_opt_in_and_goes_elsewhere_at_once(nursery, tmp_path, qwen):
    """[options.forward] abort_retries = 1: an aborted reply is resent at once to another healthy
    worker (no sleep); the client and the cache see only the final, complete trajectory."""
    pipe = tmp_path / "retry.toml"
    pipe.write_text('stages = ["radix_lookup", "tokenize", "forward", "capture", "insert"]\n'
                    "[options.forward]\nabort_retries = 1\n")
    sims = [await start_sim(nursery, tokenizer="builtin:qwen", seed=i, token_latency_s=0.02) for i in range(2)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims]}, tokenizer={"path": "builtin:qwen"},
                                routes=[{"path": "/generate", "pipeline": str(pipe)}])
    p = chat([{"role": "user", "content": "retry me"}])
    result = {}

    async def gen(c):
        r = await c.post("/generate", json={"text": p, "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}})
        result["r"] = r

    async with client(router) as c:
        async with trio.open_nursery() as n:
            n.start_soon(gen, c)
            await wait_until(lambda: any(s.worker._live for s in sims))  # a worker is generating it
            first = next(w for w in router.runtime.pool.all if w.inflight == 1)
            async with client(first.url) as d:
                await d.post("/abort_request", json={"abort_all": True})
        r = result["r"]
        out = r.json()
        assert out["meta_info"]["finish_reason"]["type"] == "length"
        assert r.headers["x-miles-router-worker"] != first.url
        assert r.headers["x-miles-router-route-reason"] == "least_inflight, retry"  # one reason per attempt
        got = await retrieve(c, p + out["text"])
        assert got["exact"] and got["tokens"] == qwen.encode(p) + out["output_ids"]
        assert "miles_router_abort_retries_total 1.0" in (await c.get("/metrics")).text


async def test_evicted_trajectory_recovered_by_a_later_prompt_is_not_exact(nursery, qwen):
    """RELIABILITY.md open item 2 (found by the 4 MB soak): a reply cut inside a UTF-8 character shows
    U+FFFD in its text, so the next turn's text differs from turn 1's token bytes there and its prompt is
    tokenized fresh from that point. Once turn 1 is evicted, turn 1's text is still *covered* by turn 2's
    prompt tokens -- but they are not turn 1's tokens (a re-tokenized U+FFFD, loss mask 0 where turn 1
    generated), and no generation started or ended where the text ends. That is `exact: false`,
    `match: "inside_prompt"`; before eviction the same text is `match: "trajectory"`."""
    router, (sim,) = await cache_router(nursery, chat_replies=False)
    p1 = chat([{"role": "user", "content": "question 1"}])
    async with client(router) as c:
        # with sim seed 0 (plain-text replies), two tokens end inside a multi-byte character (found by searching SimModel)
        o1 = (await c.post("/generate", json={"text": p1, "sampling_params": {"max_new_tokens": 2}})).json()
        assert o1["text"].endswith("\ufffd")
        turn1 = qwen.encode(p1) + o1["output_ids"]
        t1 = p1 + o1["text"]
        first = await retrieve(c, t1)  # retrieved once: evictable before anything unretrieved
        assert first["exact"] and first["match"] == "trajectory" and first["tokens"] == turn1
        p2 = t1 + "<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"
        o2 = (await c.post("/generate", json={"text": p2, "sampling_params": {"max_new_tokens": 4}})).json()
        sent2 = (await last_received(sim))["input_ids"]
        assert sent2[:len(turn1)] != turn1  # turn 2 left turn 1's path inside its output
        # evict what was retrieved (turn 1's own tail); turn 2 was never retrieved and stays
        report = router.runtime.trajectories.tree.evict(budget_bytes=0, hard_budget_bytes=1 << 40)
        assert report.evicted_retrieved == 1 and report.evicted_unretrieved == 0

        again = await retrieve(c, t1)
        assert again["fresh_tokens"] == 0 and again["matched_chars"] == len(t1)  # covered by turn 2's prompt...
        assert again["tokens"] == sent2[:len(again["tokens"])] and again["tokens"] != turn1
        assert sum(again["loss_mask"]) < len(o1["output_ids"])  # ...with loss mask 0 where turn 1 generated
        assert again["exact"] is False and again["match"] == "inside_prompt"
        # turn 2's own prompt ends where the engine started generating: exact, but a prefix, not a trajectory
        prompt2 = await retrieve(c, p2)
        assert prompt2["exact"] is True and prompt2["match"] == "prefix" and prompt2["tokens"] == sent2
        whole2 = await retrieve(c, p2 + o2["text"])
        assert whole2["exact"] and whole2["match"] == "trajectory" and whole2["tokens"] == sent2 + o2["output_ids"]
        none = await retrieve(c, "never seen before")
        assert none["exact"] is False and none["match"] == "none"
        partial = await retrieve(c, p2 + "something else entirely")
        assert partial["exact"] is False and partial["match"] == "partial" and partial["fresh_tokens"] > 0


async def test_grpo_group_same_text_different_spellings_by_rid_and_batch(nursery, qwen):
    """Two samples whose visible texts are the same but whose tokens differ (one prompt spelled "hel"+"lo", the
    other canonically; each generation stopped at its first token, whose text the engine strips). Retrieving the
    text must not pick one silently: it says `ambiguous`; `rid` (the x-miles-router-rid header) picks each one
    exactly, and a batch naming the text twice hands out each spelling once."""
    router, (sim,) = await cache_router(nursery)
    text = chat([{"role": "user", "content": "Say hello to the world."}])
    cut = text.index("hello") + 3
    spellings = [qwen.encode(text), qwen.encode(text[:cut]) + qwen.encode(text[cut:])]
    assert spellings[0] != spellings[1]
    want, rids = [], []
    async with client(router) as c:
        for ids in spellings:
            first = await c.post("/generate", json={"input_ids": ids, "sampling_params": {
                "max_new_tokens": 1, "temperature": 0}})
            tok = first.json()["output_ids"][0]
            r = await c.post("/generate", json={"input_ids": ids, "return_logprob": True, "sampling_params": {
                "max_new_tokens": 8, "temperature": 0, "stop_token_ids": [tok]}})
            out = r.json()
            assert out["output_ids"] == [tok] and out["text"] == ""  # visible text: the prompt's, for both
            assert r.headers["x-miles-router-rid"] == out["meta_info"]["id"]
            want.append(ids + [tok])
            rids.append(out["meta_info"]["id"])

        amb = await retrieve(c, text)
        assert amb["exact"] is False and amb["match"] == "ambiguous" and amb["alternatives"] == 2
        assert amb["rid"] is None and amb["tokens"] in want
        for rid, toks in zip(rids, want):
            got = (await c.post("/retrieve_from_text", json={"text": text, "rid": rid})).json()
            assert got["exact"] is True and got["match"] == "trajectory" and got["rid"] == rid
            assert got["tokens"] == toks and got["alternatives"] == 2
            assert got["loss_mask"] == [0] * (len(toks) - 1) + [1]
        bad = await c.post("/retrieve_from_text", json={"text": text, "rid": "no-such-rid"})
        assert bad.status_code == 404 and "no-such-rid" in bad.json()["error"]

        batch = (await c.post("/retrieve_from_text", json={"texts": [text, "unrelated", text]})).json()["results"]
        assert [b["exact"] for b in batch] == [True, False, True]
        assert [batch[0]["tokens"], batch[2]["tokens"]] == want  # oldest spelling first, each once
        assert [batch[0]["rid"], batch[2]["rid"]] == rids
        named = (await c.post("/retrieve_from_text", json={"texts": [text, text], "rids": [rids[1], None]})).json()
        assert [b["tokens"] for b in named["results"]] == [want[1], want[0]]
        alone = (await c.post("/retrieve_from_text", json={"texts": [text]})).json()["results"][0]
        assert alone["match"] == "ambiguous" and alone["exact"] is False
        r = await c.post("/retrieve_from_text", json={"texts": [text], "rids": []})
        assert r.status_code == 400 and "rids" in r.json()["error"]


async def test_a_rid_that_cannot_be_a_header_value_is_answered_and_kept(nursery, qwen):
    """The client's rid comes back as SGLang's meta_info.id and in the x-miles-router-rid header. A rid
    with a control character (the fuzz pass found "0\\r0") or outer whitespace cannot be a header value:
    it was a 500 with an empty body (h11 refused the head). Now the header is left out, the reply is the
    worker's, and the trajectory is recorded and retrievable by that rid."""
    router, _ = await cache_router(nursery)
    p = chat([{"role": "user", "content": "odd rid"}])
    async with client(router) as c:
        for rid in ("0\r0", "a\nb", " padded ", "nul\x00"):
            r = await c.post("/generate", json={"text": p, "rid": rid, "sampling_params": {"max_new_tokens": 4}})
            assert r.status_code == 200 and r.json()["meta_info"]["id"] == rid
            assert "x-miles-router-rid" not in r.headers
            got = (await c.post("/retrieve_from_text", json={"text": p + r.json()["text"], "rid": rid})).json()
            assert got["exact"] and got["rid"] == rid
        r = await c.post("/generate", json={"text": p, "rid": "plain-1", "sampling_params": {"max_new_tokens": 4}})
        assert r.headers["x-miles-router-rid"] == "plain-1"
