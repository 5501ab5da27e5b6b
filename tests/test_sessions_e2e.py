"""Agent sessions end to end: the real `openai` SDK against the router and simulated workers over
loopback, Qwen's real vocabulary and chat template. Each sample is checked token for token against
what the worker received and produced (tokens, loss mask, logprobs, routed-experts bytes)."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest
import trio

from harness import client, start_router, start_sim
import miles_wire

TOOLS = [
    {"type": "function", "function": {"name": "search", "description": "search the web",
                                      "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "read_file", "description": "read a file",
                                      "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}},
]


def pipeline_file(tmp_path, start_len: bool = False, r3: bool = True) -> str:
    path = tmp_path / "session-chat.toml"
    text = ('stages = ["session_request", "chat_template", "session_generate", "forward", "chat_parse", '
            '"session_reply"]\n')
    if r3:
        text += ("[options.session_generate]\nrouted_experts = true\nrouted_experts_layers = 2\n"
                 f"routed_experts_topk = 2\nrouted_experts_start_len = {str(start_len).lower()}\n")
    path.write_text(text)
    return str(path)


async def session_router(nursery, tmp_path, n_workers=1, start_len=False, sessions=None, **sim_kw):
    sim_kw.setdefault("tokenizer", "builtin:qwen")
    sims = [await start_sim(nursery, **sim_kw) for _ in range(n_workers)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims]}, tokenizer={"path": "builtin:qwen"},
                                sessions={"pipeline": pipeline_file(tmp_path, start_len), **(sessions or {})})
    return router, sims


async def new_session(c) -> str:
    r = await c.post("/sessions")
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    assert len(sid) == 32 and int(sid, 16) >= 0
    return sid


def sdk(router, sid) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{router.url}/sessions/{sid}/v1", api_key="unused", max_retries=0,
                              http_client=httpx.AsyncClient(trust_env=False, timeout=30))


async def sim_stats(sim) -> dict:
    async with client(sim.url) as c:
        return (await c.get("/_sim/stats")).json()


async def samples_of(c, sid, **body):
    """(samples as dicts of their fields, the decoded reply), by the contract's decoder."""
    r = await c.post(f"/sessions/{sid}/samples", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    got = miles_wire.decode(r.content)
    return got.samples, got


async def complete(oc, messages, stream, **kw):
    """One chat turn through the SDK; returns (assistant message dict, finish_reason, meta_info)."""
    if not stream:
        rep = await oc.chat.completions.create(model="sim", messages=messages, tools=TOOLS, **kw)
        ch = rep.choices[0]
        return ch.message.model_dump(exclude_none=True), ch.finish_reason, ch.model_extra["meta_info"]
    got = await oc.chat.completions.create(model="sim", messages=messages, tools=TOOLS, stream=True,
                                           stream_options={"include_usage": True}, **kw)
    content, reasoning, calls, finish, usage = "", "", {}, None, None
    async for chunk in got:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            d = ch.delta
            content += d.content or ""
            reasoning += (d.model_extra or {}).get("reasoning_content") or ""
            for tc in d.tool_calls or ():
                slot = calls.setdefault(tc.index, {"id": tc.id, "type": "function",
                                                   "function": {"name": "", "arguments": ""}})
                slot["function"]["name"] += tc.function.name or ""
                slot["function"]["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    assert usage is not None and usage.completion_tokens > 0
    msg = {"role": "assistant", "content": content or None}
    if reasoning:
        msg["reasoning_content"] = reasoning
    if calls:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    return msg, finish, None


async def agent_loop(oc, turns: int, stream: bool, first_user="Find the README and summarize it. 🙂 naïve 日本語"):
    """A tool-calling agent: tool results for tool calls, a user follow-up otherwise."""
    messages = [{"role": "system", "content": "You are a careful agent."}, {"role": "user", "content": first_user}]
    finishes = []
    for i in range(turns):
        msg, finish, _ = await complete(oc, messages, stream, max_tokens=400)
        finishes.append(finish)
        messages.append(msg)
        if finish == "length":
            break
        if msg.get("tool_calls"):
            for tc in msg["tool_calls"]:
                messages.append({"role": "tool", "tool_call_id": tc["id"],
                                 "content": json.dumps({"result": f"ok {i} ✓", "args": json.loads(tc["function"]["arguments"])})})
        else:
            messages.append({"role": "user", "content": f"Continue, step {i} — ünïcode"})
    return messages, finishes


def assert_exact(sample, received_ids, produced_ids, first_prompt_len, produced_spans):
    """Tokens are what the worker last received + produced; the loss mask covers the response (everything after
    the first prompt) and is 1 exactly on the produced spans."""
    tokens = sample["tokens"]
    assert tokens.dtype == np.int64 and sample["loss_mask"].dtype == np.uint8
    assert sample["rollout_log_probs"].dtype == np.float64
    assert tokens.tolist() == received_ids + produced_ids
    assert sample["response_length"] == len(tokens) - first_prompt_len
    mask = np.zeros(len(tokens), np.uint8)
    for start, end in produced_spans:
        mask[start:end] = 1
    for (start, end), (s2, e2) in zip(produced_spans, produced_spans[1:]):
        assert end <= s2
    assert sample["loss_mask"].tolist() == mask[first_prompt_len:].tolist()


async def oracle_rows(c, sid, tokens) -> bytes:
    """Routed experts of a full-sequence prefill over `tokens`, via the unrecorded session proxy."""
    r = await c.post(f"/sessions/{sid}/generate", json={"input_ids": [int(t) for t in tokens],
                                                        "sampling_params": {"max_new_tokens": 0},
                                                        "return_routed_experts": True})
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["meta_info"]["routed_experts"])


@pytest.mark.parametrize("stream,start_len", [(False, False), (True, True)])
async def test_five_turn_tool_conversation_sample_is_exact(nursery, tmp_path, stream, start_len):
    router, (sim,) = await session_router(nursery, tmp_path, start_len=start_len)
    async with client(router) as c:
        sid = await new_session(c)
        oc = sdk(router, sid)
        messages, finishes = await agent_loop(oc, 5, stream)
        assert len(finishes) == 5 and "length" not in finishes and "tool_calls" in finishes, finishes
        stats = await sim_stats(sim)
        bodies = stats["last_bodies"][-5:]
        body_version = (await c.get("/workers")).json()["workers"][0]["weight_version"]
        turns_meta = [await _turn_output(c, sid, i) for i in range(5)]
        # every turn's input extends the previous turn's input + output verbatim (never re-rendered)
        for prev, body, prev_out in zip(bodies, bodies[1:], turns_meta):
            assert body["input_ids"][:len(prev["input_ids"]) + len(prev_out[0])] == prev["input_ids"] + prev_out[0]
            assert body["return_logprob"] is True and body["return_routed_experts"] is True
        (sample,), reply = await samples_of(c, sid)
        last_in = bodies[-1]["input_ids"]
        first = len(bodies[0]["input_ids"])
        spans = []
        for body, (out_ids, out_lps) in zip(bodies, turns_meta):
            start = len(body["input_ids"])
            spans.append((start, start + len(out_ids)))
        want_lps = np.zeros(len(last_in) + len(turns_meta[-1][0]), np.float64)
        for (start, end), (_, out_lps) in zip(spans, turns_meta):
            want_lps[start:end] = out_lps
        assert_exact(sample, last_in, turns_meta[-1][0], first, spans)
        assert sample["rollout_log_probs"].tolist() == want_lps[first:].tolist()
        experts = sample["rollout_routed_experts"]
        assert experts.dtype == np.int32 and experts.shape == (len(sample["tokens"]) - 1, 2, 2)
        assert experts.tobytes() == await oracle_rows(c, sid, sample["tokens"])
        assert sample["status"] == "completed" and sample["rollout_indexer_topk"] is None
        assert reply.empty_reason is None and sample["weight_versions"] == [body_version] * 5
        # the session's own view agrees
        got = (await c.get(f"/sessions/{sid}")).json()
        assert got["metadata"]["accumulated_token_ids"] == sample["tokens"].tolist()
        assert [r["request"]["input_ids"] for r in got["records"]] == [b["input_ids"] for b in bodies]
        # records keep what the worker returned of the routed experts; the agent's replies never had them
        for r, body in zip(got["records"], bodies):
            rows = base64.b64decode(r["response"]["choices"][0]["meta_info"]["routed_experts"])
            start = body.get("routed_experts_start_len", 0)
            assert rows == experts[start:len(body["input_ids"]) + len(r["response"]["choices"][0]["meta_info"]
                                                                    ["output_token_logprobs"]) - 1].tobytes()
        # the proxied oracle call was not recorded
        assert len(got["records"]) == 5
        # the SDK re-sends the history byte for byte: turns 2..5 parsed only what they appended
        metrics = (await c.get("/metrics")).text
        assert "miles_router_sessions_history_reused_total 4.0" in metrics


async def _turn_output(c, sid, i):
    got = (await c.get(f"/sessions/{sid}")).json()
    pairs = got["records"][i]["response"]["choices"][0]["meta_info"]["output_token_logprobs"]
    return [t[1] for t in pairs], [t[0] for t in pairs]


async def test_tool_calls_are_parsed_and_replies_strip_routed_experts(nursery, tmp_path):
    router, _ = await session_router(nursery, tmp_path)
    async with client(router) as c:
        sid = await new_session(c)
        oc = sdk(router, sid)
        messages, finishes = await agent_loop(oc, 6, stream=False)
        calls = [m for m in messages if m["role"] == "assistant" and m.get("tool_calls")]
        assert calls, "the simulated chat model made no tool call in 6 turns"
        for m in calls:
            for i, tc in enumerate(m["tool_calls"]):
                assert tc["id"].startswith("call_") and tc["type"] == "function"
                assert isinstance(json.loads(tc["function"]["arguments"]), dict)
        assert "tool_calls" in finishes
        r = await c.post(f"/sessions/{sid}/v1/chat/completions",
                         json={"messages": messages[:2], "tools": TOOLS, "max_tokens": 400})
        meta = r.json()["choices"][0]["meta_info"]
        assert "routed_experts" not in meta and meta["output_token_logprobs"]


async def test_reserialized_arguments_replay_still_matches(nursery, tmp_path):
    router, (sim,) = await session_router(nursery, tmp_path)
    async with client(router) as c:
        sid = await new_session(c)
        oc = sdk(router, sid)
        msgs = [{"role": "user", "content": "use a tool"}]
        for attempt in range(8):  # until the model calls a tool
            m, finish, _ = await complete(oc, msgs, False, max_tokens=400, seed=attempt, temperature=1.0)
            if m.get("tool_calls"):
                break
        assert m.get("tool_calls"), "no tool call in 8 attempts"
        for tc in m["tool_calls"]:
            args = json.loads(tc["function"]["arguments"])
            tc["function"]["arguments"] = json.dumps(dict(reversed(list(args.items()))), indent=2, ensure_ascii=True)
            tc.pop("index", None)
        msgs2 = msgs + [m] + [{"role": "tool", "tool_call_id": tc["id"], "content": "42"} for tc in m["tool_calls"]]
        before = len((await c.get(f"/sessions/{sid}")).json()["metadata"]["tree"]["nodes"])
        await complete(oc, msgs2, False, max_tokens=400)
        tree = (await c.get(f"/sessions/{sid}")).json()["metadata"]["tree"]
        assert tree["nodes"][-1]["parent"] == before - 1  # attached to the stored tool-call turn
        stored = (await c.get(f"/sessions/{sid}")).json()["records"]
        last_in = (await sim_stats(sim))["last_bodies"][-1]["input_ids"]
        prev = stored[-2]
        prev_out = [t[1] for t in prev["response"]["choices"][0]["meta_info"]["output_token_logprobs"]]
        assert last_in[:len(prev["request"]["input_ids"]) + len(prev_out)] == \
            prev["request"]["input_ids"] + prev_out  # the stored spelling won


async def test_a_bad_message_anywhere_in_a_known_history_is_a_400_naming_it(nursery, tmp_path):
    """The router parses only what a request does not share with the session's last one, yet a
    message it would otherwise skip is still checked when its bytes change: a wrong type, or
    invalid UTF-8 (named by its offset in the client's body); the session keeps working."""
    router, _ = await session_router(nursery, tmp_path)
    async with client(router) as c:
        sid = await new_session(c)
        url = f"/sessions/{sid}/v1/chat/completions"
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        r = await c.post(url, json={"messages": msgs, "max_tokens": 30})
        assert r.status_code == 200, r.text
        msgs = msgs + [r.json()["choices"][0]["message"], {"role": "user", "content": "more"}]
        body = json.dumps({"messages": msgs, "max_tokens": 30}).encode()
        assert (await c.post(url, content=body)).status_code == 200
        bad_type = body.replace(b'"content": "be brief"', b'"content": 7')
        r = await c.post(url, content=bad_type)
        assert r.status_code == 400 and r.json()["error"] == (
            "invalid chat completions body: expected a string, an array or null, got an integer "
            "at $.messages[0].content")
        at = body.index(b"be brief")
        bad_utf8 = body[:at] + bytes([0xFF]) + body[at:]  # a raw 0xff byte in message 0's content
        r = await c.post(url, content=bad_utf8)
        assert r.status_code == 400 and r.json()["error"] == (
            f"invalid chat completions body: invalid UTF-8 in a JSON string at byte {at}")
        r = await c.post(url, content=body)  # the same valid request again: a sibling of the second turn
        assert r.status_code == 200, r.text
        nodes = (await c.get(f"/sessions/{sid}")).json()["metadata"]["tree"]["nodes"]
        assert [n["parent"] for n in nodes] == [None, 0, 0]


async def test_grpo_group_shares_one_tokenized_prompt(nursery, tmp_path):
    router, (sim,) = await session_router(nursery, tmp_path)
    prompts = router.runtime.sessions.prompts
    async with client(router) as c:
        sids = [await new_session(c) for _ in range(8)]
        results = {}

        async def rollout(sid, seed):
            oc = sdk(router, sid)
            msgs = [{"role": "user", "content": "Solve 2+2 and explain. ✓"}]
            msg, finish, meta = await complete(oc, msgs, False, max_tokens=400, seed=seed, temperature=1.0)
            results[sid] = meta

        async with trio.open_nursery() as n:
            for i, sid in enumerate(sids):
                n.start_soon(rollout, sid, i)
        assert prompts.misses == 1 and prompts.hits == 7
        first = router.runtime.sessions.get(sids[0]).tree.turns[0].prompt_ids
        received = [b["input_ids"] for b in (await sim_stats(sim))["last_bodies"]]
        assert len(received) == 8 and all(ids == first.tolist() for ids in received)
        for sid in sids:
            turn = router.runtime.sessions.get(sid).tree.turns[0]
            assert turn.prompt_ids is first  # one array shared by the group
            (sample,), _ = await samples_of(c, sid)
            out = [t[1] for t in results[sid]["output_token_logprobs"]]
            assert sample["tokens"].tolist() == received[0] + out
            assert sample["loss_mask"].tolist() == [1] * len(out)  # the response only
            assert sample["rollout_log_probs"].tolist() == [t[0] for t in results[sid]["output_token_logprobs"]]
        assert len({tuple(r["output_token_logprobs"][0][:2]) for r in results.values()}) > 1  # distinct samples


async def test_retry_branches_and_only_the_retry_is_trained(nursery, tmp_path):
    router, (sim,) = await session_router(nursery, tmp_path)
    async with client(router) as c:
        sid = await new_session(c)
        oc = sdk(router, sid)
        msgs = [{"role": "user", "content": "hello"}]
        m1, _, meta1 = await complete(oc, msgs, False, max_tokens=400)
        msgs2 = msgs + [m1, {"role": "user", "content": "again"}]
        _, _, first_try = await complete(oc, msgs2, False, max_tokens=400, temperature=1.0, seed=1)
        _, _, retry = await complete(oc, msgs2, False, max_tokens=400, temperature=1.0, seed=2)
        tree = (await c.get(f"/sessions/{sid}")).json()["metadata"]["tree"]
        assert [n["parent"] for n in tree["nodes"]] == [None, 0, 0]  # the retry is a sibling: nothing destroyed
        (sample,), _ = await samples_of(c, sid)
        assert sample["metadata"]["leaf"]["node_id"] == 2
        received = (await sim_stats(sim))["last_bodies"][-1]["input_ids"]
        out = [t[1] for t in retry["output_token_logprobs"]]
        assert sample["tokens"].tolist() == received + out
        assert int(sample["loss_mask"].sum()) == len(meta1["output_token_logprobs"]) + len(out)


async def test_concurrent_requests_on_one_session_become_siblings(nursery, tmp_path):
    router, (sim,) = await session_router(nursery, tmp_path, token_latency_s=0.002)
    async with client(router) as c:
        sid = await new_session(c)
        oc = sdk(router, sid)
        msgs = [{"role": "user", "content": "in parallel"}]
        metas = []

        async def one(seed):
            metas.append((await complete(oc, msgs, False, max_tokens=400, seed=seed, temperature=1.0))[2])

        async with trio.open_nursery() as n:
            n.start_soon(one, 1)
            n.start_soon(one, 2)
        assert (await sim_stats(sim))["peak_in_flight"] == 2
        tree = (await c.get(f"/sessions/{sid}")).json()["metadata"]["tree"]
        assert [n["parent"] for n in tree["nodes"]] == [None, None]
        samples, _ = await samples_of(c, sid)
        assert len(samples) == 2  # two roots: each is its own sample
        got = sorted(s["tokens"].tolist()[-3:] for s in samples)
        want = sorted([t[1] for t in m["output_token_logprobs"]][-3:] for m in metas)
        assert got == want


async def test_delete_during_an_inflight_turn(nursery, tmp_path):
    router, (sim,) = await session_router(nursery, tmp_path, token_latency_s=0.01)
    async with client(router) as c:
        sid = await new_session(c)
        session = router.runtime.sessions.get(sid)
        result = {}

        async def chat():
            r = await c.post(f"/sessions/{sid}/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "slow"}], "max_tokens": 400})
            result["chat"] = r

        async with trio.open_nursery() as n:
            n.start_soon(chat)
            with trio.fail_after(10):
                while (await sim_stats(sim))["in_flight"] == 0:
                    await trio.sleep(0.005)
            d = await c.delete(f"/sessions/{sid}")
            assert d.status_code == 204 and d.content == b""
        assert result["chat"].status_code == 200 and result["chat"].json()["choices"][0]["message"]
        assert len(session.tree) == 0  # the reply came, the turn was not recorded
        for r in (await c.get(f"/sessions/{sid}"), await c.post(f"/sessions/{sid}/samples", json={}),
                  await c.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": []}),
                  await c.delete(f"/sessions/{sid}")):
            assert r.status_code == 410 and r.json()["error"] == \
                f"session reclaimed: session_id={sid} was deleted or expired"


async def test_lifecycle_statuses(nursery, tmp_path):
    router, (sim,) = await session_router(nursery, tmp_path, context_length=64)
    async with client(router) as c:
        never = "0123456789abcdef" * 2
        for r in (await c.get(f"/sessions/{never}"), await c.delete(f"/sessions/{never}"),
                  await c.post(f"/sessions/{never}/v1/chat/completions", json={"messages": []})):
            assert r.status_code == 404 and r.json() == {"error": f"session not found: session_id={never}"}
        sid = await new_session(c)
        # empty session: 200 with an empty_reason
        samples, reply = await samples_of(c, sid)
        assert samples == [] and reply.empty_reason == "no_records"
        url = f"/sessions/{sid}/v1/chat/completions"
        bad = [(b"{not json", 400, "invalid chat completions body"),
               (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), 400,
                "'robot' is not rendered by the builtin Qwen3 chat template"),
               (json.dumps({"messages": [{"role": "user", "content": 5}]}), 400, "invalid chat completions body"),
               (json.dumps({"messages": []}), 400, "messages must not be empty"),
               (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}), 400, "n must be 1")]
        for body, status, text in bad:
            r = await c.post(url, content=body)
            assert r.status_code == status and text in r.json()["error"], r.text
        # the worker's own 4xx (context too long) passes through and is not recorded
        r = await c.post(url, json={"messages": [{"role": "user", "content": "word " * 100}]})
        sent = (await sim_stats(sim))["last_bodies"][-1]
        async with client(sim.url) as direct:
            worker = await direct.post("/generate", json=sent)
        assert 400 <= worker.status_code < 500
        assert (r.status_code, r.content) == (worker.status_code, worker.content)
        assert (await c.get(f"/sessions/{sid}")).json()["metadata"]["tree"]["nodes"] == []
        # a length turn cannot be extended
        msgs = [{"role": "user", "content": "hi"}]
        r = await c.post(url, json={"messages": msgs, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        reply = r.json()["choices"][0]["message"]
        r = await c.post(url, json={"messages": msgs + [reply, {"role": "user", "content": "go on"}]})
        assert r.status_code == 409 and "ended by 'length'" in r.json()["error"]
        samples, reply = await samples_of(c, sid, max_seq_len=4)
        assert reply.empty_reason == "all_truncated"
        (sample,), _ = await samples_of(c, sid, metadata={"reward": 0.5, "leaf": "agent-cannot-override"})
        assert sample["status"] == "truncated" and sample["reward"] == 0.5
        assert sample["metadata"]["leaf"]["node_id"] == 0 and sample["metadata"]["reward"] == 0.5
        r = await c.post(f"/sessions/{sid}/samples", json={"max_seq_len": "x"})
        assert r.status_code == 400
        # other paths go to the worker, unrecorded
        r = await c.get(f"/sessions/{sid}/model_info")
        assert r.status_code == 200 and "model_path" in r.json()
        assert r.headers["x-miles-router-route-reason"] in ("sticky", "sticky_new")
        d = await c.delete(f"/sessions/{sid}")
        assert d.status_code == 204
        assert (await c.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": msgs})).status_code == 410
        assert (await c.put("/sessions")).status_code == 405


async def test_a_session_stays_on_one_worker_and_proxied_paths_follow_it(nursery, tmp_path):
    """Two workers, six sessions: every call of a session (chat turns, a retry, proxied paths) is
    routed by the session id to one worker; the proxied calls are not recorded."""
    router, sims = await session_router(nursery, tmp_path, n_workers=2)
    async with client(router) as c:
        sids = [await new_session(c) for _ in range(6)]
        for sid in sids:
            url = f"/sessions/{sid}/v1/chat/completions"
            msgs = [{"role": "user", "content": f"hello {sid[:4]}"}]
            r = await c.post(url, json={"messages": msgs, "max_tokens": 400})
            assert r.status_code == 200, r.text
            workers = [r.headers["x-miles-router-worker"]]
            reasons = [r.headers["x-miles-router-route-reason"]]
            msgs += [r.json()["choices"][0]["message"], {"role": "user", "content": "more"}]
            for _ in range(2):  # a next turn, then a retry of it
                r = await c.post(url, json={"messages": msgs, "max_tokens": 400})
                assert r.status_code == 200, r.text
                workers.append(r.headers["x-miles-router-worker"])
                reasons.append(r.headers["x-miles-router-route-reason"])
            for path in ("model_info", "get_server_info"):
                r = await c.get(f"/sessions/{sid}/{path}")
                assert r.status_code == 200, r.text
                workers.append(r.headers["x-miles-router-worker"])
                reasons.append(r.headers["x-miles-router-route-reason"])
            assert len(set(workers)) == 1 and workers[0] in {s.url for s in sims}, workers
            assert reasons[0] == "sticky_new" and set(reasons[1:]) == {"sticky"}, reasons
            nodes = (await c.get(f"/sessions/{sid}")).json()["metadata"]["tree"]["nodes"]
            assert [n["parent"] for n in nodes] == [None, 0, 0]  # 3 turns; the proxied calls left no node
        served = [(await sim_stats(s))["requests"] for s in sims]
        assert sum(served) >= 6 * 5


async def test_stream_is_one_chunk_then_done(nursery, tmp_path):
    """`stream: true` is miles' stream: one chat.completion.chunk holding the whole message as its delta, the
    finish reason and the usage (whatever stream_options say), then `data: [DONE]`; recorded like any turn."""
    router, _ = await session_router(nursery, tmp_path)
    async with client(router) as c:
        sid = await new_session(c)
        for opts in ({"include_usage": True}, {"include_usage": False}, None):
            body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "max_tokens": 400,
                    "stream": True, "seed": len(str(opts))}
            if opts is not None:
                body["stream_options"] = opts
            r = await c.post(f"/sessions/{sid}/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
            events = r.content.split(b"\n\n")
            assert events[-2:] == [b"data: [DONE]", b""] and len(events) == 3
            chunk = json.loads(events[0].removeprefix(b"data: "))
            assert list(chunk) == ["id", "object", "created", "model", "choices", "usage"]
            assert chunk["object"] == "chat.completion.chunk"
            (choice,) = chunk["choices"]
            assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "tool_calls", "length")
            delta = choice["delta"]
            assert delta["role"] == "assistant" and "content" in delta and "meta_info" not in choice
            assert all(tc["index"] == i for i, tc in enumerate(delta.get("tool_calls") or ()))
            turn = router.runtime.sessions.get(sid).tree.turns[-1]
            assert chunk["id"] == turn.response_id
            assert chunk["usage"]["completion_tokens"] == len(turn.output_ids)
            assert chunk["usage"]["prompt_tokens"] == len(turn.prompt_ids)


async def test_bad_worker_reply_is_502(nursery, tmp_path):
    router, (sim,) = await session_router(nursery, tmp_path)
    sim.worker.set_faults(echo=True)  # answers with the request body: not a /generate output
    async with client(router) as c:
        sid = await new_session(c)
        r = await c.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 502 and "not an SGLang /generate output" in r.json()["error"]
        assert (await c.get(f"/sessions/{sid}")).json()["metadata"]["tree"]["nodes"] == []
        sim.worker.set_faults(echo=False)
        r = await c.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200


async def test_broken_session_gives_422_and_the_router_stays_healthy(nursery, tmp_path):
    router, _ = await session_router(nursery, tmp_path)
    async with client(router) as c:
        sid = await new_session(c)
        msgs = [{"role": "user", "content": "x"}]
        assert (await c.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": msgs})).status_code == 200
        samples, reply = await samples_of(c, sid, max_seq_len=0)  # as miles: nothing fits
        assert samples == [] and reply.empty_reason == "all_truncated"
        turn = router.runtime.sessions.get(sid).tree.turns[0]
        turn.routed_experts = turn.routed_experts[:-1]  # an internal inconsistency: one row missing
        r = await c.post(f"/sessions/{sid}/samples", json={})
        assert r.status_code == 422 and r.json()["error"].startswith("sample assembly failed: turn 0:")
        assert (await c.get("/health")).status_code == 200
        metrics = (await c.get("/metrics")).text
        assert "miles_router_sessions_live 1.0" in metrics and "miles_router_sessions_turns 1.0" in metrics
        assert "miles_router_sessions_created_total 1.0" in metrics


async def test_idle_expiry_and_limits(nursery, tmp_path):
    router, _ = await session_router(nursery, tmp_path, sessions={"idle_timeout_s": 0.3, "max_sessions": 2,
                                                                   "max_turns_per_session": 1})
    async with client(router) as c:
        a, b = await new_session(c), await new_session(c)
        r = await c.post("/sessions")
        assert r.status_code == 429 and "sessions.max_sessions (2)" in r.json()["error"]
        msgs = [{"role": "user", "content": "x"}]
        assert (await c.post(f"/sessions/{a}/v1/chat/completions", json={"messages": msgs})).status_code == 200
        r = await c.post(f"/sessions/{a}/v1/chat/completions", json={"messages": msgs})
        assert r.status_code == 409 and "sessions.max_turns_per_session" in r.json()["error"]
        with trio.fail_after(10):
            for sid in (b, a):  # b idles from its creation, a from its last chat
                while (await c.get(f"/sessions/{sid}")).status_code != 410:
                    await trio.sleep(0.1)
        assert (await c.post("/sessions")).status_code == 200


async def test_readme_demo_agent_runs(nursery, tmp_path, capsys):
    from router.demo import run

    router, _ = await session_router(nursery, tmp_path)
    assert await trio.to_thread.run_sync(run, router.url, 3) == 0
    out = capsys.readouterr().out
    assert "turn 3:" in out or "finish=length" in out
    assert "rollout_routed_experts (" in out and "tokens (" in out and "status=" in out
