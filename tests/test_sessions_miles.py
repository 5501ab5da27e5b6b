"""The session API as miles' session server serves it (issue 18), end to end over sockets: several roots (a
subagent) yield several samples, a role the chat template cannot render is refused, `GET /sessions/{id}` speaks
miles' schema and its response ids are the ones the agent got, the launch options, incremental-R3 gaps, the
instance id, the v1 variant. Samples are read with tests/miles_wire.py (the contract's decoder)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import miles_wire
from harness import client, start_router, start_sim
from test_sessions_e2e import TOOLS, new_session, pipeline_file, samples_of, sdk, sim_stats

CHAT = "/sessions/{}/v1/chat/completions"


async def router_with(nursery, tmp_path, *, r3=True, start_len=False, n_workers=1, sim=None, **sessions):
    sims = [await start_sim(nursery, tokenizer="builtin:qwen", **(sim or {})) for _ in range(n_workers)]
    pipe = tmp_path / "pipe.toml"
    if r3:
        pipe = pipeline_file(tmp_path, start_len)
    else:
        pipe.write_text('stages = ["session_request", "chat_template", "session_generate", "forward", '
                        '"chat_parse", "session_reply"]\n')
    router = await start_router(nursery, workers={"urls": [s.url for s in sims]}, tokenizer={"path": "builtin:qwen"},
                                sessions={"pipeline": str(pipe), **sessions})
    return router, sims


async def chat(c, sid, messages, **kw):
    r = await c.post(CHAT.format(sid), json={"messages": messages, "max_tokens": 300, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def echo(reply: dict) -> dict:
    """The assistant message as an agent sends it back."""
    return {k: v for k, v in reply["choices"][0]["message"].items() if v is not None}


async def test_a_subagent_conversation_is_its_own_sample(nursery, tmp_path):
    """An agent that opens a second conversation in its session (a new first message): two roots, two samples,
    nothing of either line lost."""
    router, (sim,) = await router_with(nursery, tmp_path)
    async with client(router) as c:
        sid = await new_session(c)
        main = [{"role": "system", "content": "You are the planner."}, {"role": "user", "content": "plan it"}]
        r1 = await chat(c, sid, main)
        main += [echo(r1), {"role": "user", "content": "next step"}]
        r2 = await chat(c, sid, main)
        sub = [{"role": "system", "content": "You are a subagent."}, {"role": "user", "content": "look it up"}]
        r3 = await chat(c, sid, sub)
        inputs = [b["input_ids"] for b in (await sim_stats(sim))["last_bodies"][-3:]]
        got, reply = await samples_of(c, sid)
        assert reply.empty_reason is None and len(got) == 2
        by_leaf = {s["metadata"]["leaf"]["node_id"]: s for s in got}
        assert set(by_leaf) == {1, 2}
        main_s, sub_s = by_leaf[1], by_leaf[2]
        outs = [[t[1] for t in r["choices"][0]["meta_info"]["output_token_logprobs"]] for r in (r1, r2, r3)]
        assert main_s["tokens"].tolist() == inputs[1] + outs[1]
        assert sub_s["tokens"].tolist() == inputs[2] + outs[2]
        assert main_s["metadata"]["leaf"] == {"node_id": 1, "parent": 0, "path_node_ids": [0, 1],
                                              "response_id": r2["id"]}
        assert sub_s["metadata"]["leaf"] == {"node_id": 2, "parent": None, "path_node_ids": [2],
                                             "response_id": r3["id"]}
        assert int(main_s["loss_mask"].sum()) == len(outs[0]) + len(outs[1])  # both lines trained in full
        assert int(sub_s["loss_mask"].sum()) == len(outs[2])
        assert [s["metadata"]["leaf"]["node_id"] for s in got] == [1, 2]  # longer path first (miles' picker)


@pytest.mark.parametrize("first", [True, False])
async def test_a_role_the_template_cannot_render_is_refused(nursery, tmp_path, first):
    """Qwen3's template renders nothing for `developer`: the request is a 400 naming the role and the template
    (the model would never have seen it); nothing is recorded and the session keeps working."""
    router, (sim,) = await router_with(nursery, tmp_path, r3=False)
    async with client(router) as c:
        sid = await new_session(c)
        msgs = [{"role": "user", "content": "hi"}]
        if not first:
            msgs += [echo(await chat(c, sid, msgs))]
        sent = (await sim_stats(sim))["generate_requests"]
        bad = msgs + [{"role": "developer", "content": "be terse"}, {"role": "user", "content": "go"}]
        r = await c.post(CHAT.format(sid), json={"messages": bad})
        i = len(msgs)
        assert r.status_code == 400 and r.json()["error"] == (
            f"messages[{i}].role 'developer' is not rendered by the builtin Qwen3 chat template: "
            f"the model would never see this message")
        assert (await sim_stats(sim))["generate_requests"] == sent  # the worker was not asked
        assert len((await c.get(f"/sessions/{sid}")).json()["metadata"]["tree"]["nodes"]) == (0 if first else 1)
        # the roles the template renders: system (first or not), user, assistant, tool
        ok = msgs + [{"role": "system", "content": "be terse"}, {"role": "user", "content": "go"}]
        await chat(c, sid, ok)


async def test_get_session_is_miles_schema_and_ids_join(nursery, tmp_path):
    """`GET /sessions/{id}`: nodes `{id, parent (null for a root), seq, truncated, committed_at, completion_span,
    num_tokens, response_id}` with the chat id the agent received; leaves `{node_id, path_node_ids}`; records of
    the active line hold the chat request (with input_ids) and the chat completion with its meta_info."""
    router, (sim,) = await router_with(nursery, tmp_path)
    async with client(router) as c:
        sid = await new_session(c)
        oc = sdk(router, sid)
        msgs = [{"role": "user", "content": "weather?"}]
        a = await oc.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=300, temperature=0.7)
        msgs2 = msgs + [a.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "and now?"}]
        b = await oc.chat.completions.create(model="m", messages=msgs2, tools=TOOLS, max_tokens=300, seed=1)
        retry = await oc.chat.completions.create(model="m", messages=msgs2, tools=TOOLS, max_tokens=300, seed=2)
        view = (await c.get(f"/sessions/{sid}")).json()
        nodes, leaves = view["metadata"]["tree"]["nodes"], view["metadata"]["tree"]["leaves"]
        assert [list(n) for n in nodes] == [["id", "parent", "seq", "truncated", "committed_at", "completion_span",
                                             "num_tokens", "response_id"]] * 3
        assert [(n["id"], n["parent"], n["seq"]) for n in nodes] == [(0, None, 0), (1, 0, 1), (2, 0, 2)]
        assert [n["response_id"] for n in nodes] == [a.id, b.id, retry.id]  # the agent's join key
        assert leaves == [{"node_id": 1, "path_node_ids": [0, 1]}, {"node_id": 2, "path_node_ids": [0, 2]}]
        bodies = (await sim_stats(sim))["last_bodies"][-3:]
        for n, body in zip(nodes, bodies):
            start = len(body["input_ids"])
            assert n["completion_span"][0] == start and n["num_tokens"] == n["completion_span"][1]
        # the active line: root .. the retry (the last commit)
        assert view["metadata"]["accumulated_token_ids"][:len(bodies[2]["input_ids"])] == bodies[2]["input_ids"]
        recs = view["records"]
        assert [r["response"]["id"] for r in recs] == [a.id, retry.id]
        for r, body in zip(recs, (bodies[0], bodies[2])):
            assert list(r) == ["timestamp", "request_timestamp", "method", "path", "request", "response",
                               "status_code"]
            req = r["request"]
            assert req["input_ids"] == body["input_ids"] and req["tools"] == TOOLS and req["model"] == "m"
            assert req["logprobs"] is True and req["return_meta_info"] is True and req["no_stop_trim"] is False
            assert req["return_routed_experts"] is True and "stream" not in req
            meta = r["response"]["choices"][0]["meta_info"]
            assert meta["id"] == r["response"]["id"] and "routed_experts" in meta  # the record keeps them
        assert recs[1]["request"]["messages"][-1] == {"role": "user", "content": "and now?"}
        assert recs[1]["request"]["seed"] == 2
        # the agent's reply lacked them
        assert "routed_experts" not in retry.choices[0].model_extra["meta_info"]
        health = (await c.get("/health")).json()
        assert len(health["session_server_instance_id"]) == 32 and int(health["session_server_instance_id"], 16) >= 0


async def test_launch_default_template_kwargs_and_the_request_wins(nursery, tmp_path):
    """`[sessions] chat_template_kwargs` (miles' --apply-chat-template-kwargs) shape the prompt; a request's own
    value for a key wins; the record shows the effective kwargs."""
    router, (sim,) = await router_with(nursery, tmp_path, r3=False,
                                       chat_template_kwargs={"enable_thinking": False, "clear_thinking": False})
    async with client(router) as c:
        tok = router.runtime.tokenizer
        msgs = [{"role": "user", "content": "2+2?"}]
        sid = await new_session(c)
        await chat(c, sid, msgs)
        ids = (await sim_stats(sim))["last_bodies"][-1]["input_ids"]
        assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        rec = (await c.get(f"/sessions/{sid}")).json()["records"][0]["request"]
        assert rec["chat_template_kwargs"] == {"enable_thinking": False, "clear_thinking": False}
        sid = await new_session(c)
        await chat(c, sid, msgs, chat_template_kwargs={"enable_thinking": True})
        ids = (await sim_stats(sim))["last_bodies"][-1]["input_ids"]
        assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
        rec = (await c.get(f"/sessions/{sid}")).json()["records"][0]["request"]
        assert rec["chat_template_kwargs"] == {"enable_thinking": True, "clear_thinking": False}


async def test_lora_path_reaches_the_worker(nursery, tmp_path):
    router, (sim,) = await router_with(nursery, tmp_path, r3=False, lora_path="miles_lora")
    async with client(router) as c:
        sid = await new_session(c)
        await chat(c, sid, [{"role": "user", "content": "hi"}], lora_path="agent-choice")
        assert (await sim_stats(sim))["last_bodies"][-1]["lora_path"] == "miles_lora"  # as miles: the launch wins
        assert (await c.get(f"/sessions/{sid}")).json()["records"][0]["request"]["lora_path"] == "miles_lora"
    router2, (sim2,) = await router_with(nursery, tmp_path, r3=False)
    async with client(router2) as c:
        sid = await new_session(c)
        await chat(c, sid, [{"role": "user", "content": "hi"}])
        assert "lora_path" not in (await sim_stats(sim2))["last_bodies"][-1]
        await chat(c, sid, [{"role": "user", "content": "hello"}], lora_path="adapter-7")
        assert (await sim_stats(sim2))["last_bodies"][-1]["lora_path"] == "adapter-7"


@pytest.mark.parametrize("matcher,attaches", [("lenient", True), ("loose_tool_call", True), ("strict", False),
                                              ("role_content_only", True),
                                              ("test_sessions_miles:ignore_tools_matcher", True)])
async def test_message_matcher_choice(nursery, tmp_path, matcher, attaches):
    """An agent that re-spells its tool call's arguments: `strict` sees another history (a new root), the others
    match it to the stored turn (a child); a dotted-path matcher is called with the messages as objects."""
    router, _ = await router_with(nursery, tmp_path, r3=False, message_matcher=matcher)
    async with client(router) as c:
        sid = await new_session(c)
        msgs = [{"role": "user", "content": "use a tool"}]
        for seed in range(12):  # until the simulated model calls a tool
            reply = await chat(c, sid, msgs, tools=TOOLS, seed=seed, temperature=1.0)
            if reply["choices"][0]["message"]["tool_calls"]:
                break
        m = echo(reply)
        assert m.get("tool_calls"), "no tool call in 12 attempts"
        for tc in m["tool_calls"]:
            tc["function"]["arguments"] = json.dumps(json.loads(tc["function"]["arguments"]), indent=2)
        follow = msgs + [m] + [{"role": "tool", "tool_call_id": tc["id"], "content": "42"} for tc in m["tool_calls"]]
        await chat(c, sid, follow, tools=TOOLS)
        last = (await c.get(f"/sessions/{sid}")).json()["metadata"]["tree"]["nodes"][-1]
        assert (last["parent"] == len((await c.get(f"/sessions/{sid}")).json()["metadata"]["tree"]["nodes"]) - 2) \
            is attaches


def ignore_tools_matcher(stored: dict, new: dict) -> bool:
    """A custom matcher, as miles' --session-message-matcher takes: the role and content decide."""
    assert isinstance(stored, dict) and isinstance(new, dict)
    return stored["role"] == new["role"] and (stored.get("content") or "") == (new.get("content") or "")


async def test_a_bad_matcher_is_a_config_error_and_a_raising_one_a_500(nursery, tmp_path):
    from router.config import ConfigError, load_config

    cfg = tmp_path / "r.toml"
    cfg.write_text('[sessions]\nmessage_matcher = "no_such_module:fn"\n')
    with pytest.raises(ConfigError, match=r"r.toml: sessions.message_matcher: cannot load matcher"):
        load_config(cfg)
    router, _ = await router_with(nursery, tmp_path, r3=False, message_matcher="test_sessions_miles:raising_matcher")
    async with client(router) as c:
        sid = await new_session(c)
        msgs = [{"role": "user", "content": "hi"}]
        msgs += [echo(await chat(c, sid, msgs)), {"role": "user", "content": "again"}]
        msgs[1]["content"] += " "  # bytes differ: the matcher is asked
        r = await c.post(CHAT.format(sid), json={"messages": msgs})
        assert r.status_code == 500 and "session message matcher 'test_sessions_miles:raising_matcher' raised " \
            "RuntimeError: nope" in r.json()["error"]


def raising_matcher(stored: dict, new: dict) -> bool:
    raise RuntimeError("nope")


async def test_debug_trajectory_data_puts_the_messages_in_the_sample(nursery, tmp_path):
    router, _ = await router_with(nursery, tmp_path, r3=False, save_debug_trajectory_data=True)
    async with client(router) as c:
        sid = await new_session(c)
        msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
        r1 = await chat(c, sid, msgs)
        msgs2 = msgs + [echo(r1), {"role": "user", "content": "more"}]
        r2 = await chat(c, sid, msgs2)
        (s,), _ = await samples_of(c, sid)
        messages = s["metadata"]["messages"]
        assert messages[:2] == msgs and messages[3:5] == [{"role": "user", "content": "more"},
                                                           r2["choices"][0]["message"]]
        assert messages[2] == r1["choices"][0]["message"]
        assert [x["turn"] for x in s["metadata"]["lifecycle"]] == [1, 2]


async def test_incremental_r3_gap_lets_the_turn_succeed_and_samples_answer_422(nursery, tmp_path):
    """With incremental R3 a worker that stops honouring `routed_experts_start_len` sends every row: the turn
    still succeeds (as in miles), and the samples name the misfit patch with 422."""
    router, (sim,) = await router_with(nursery, tmp_path, start_len=True)
    async with client(router) as c:
        sid = await new_session(c)
        msgs = [{"role": "user", "content": "count"}]
        msgs += [echo(await chat(c, sid, msgs)), {"role": "user", "content": "more"}]
        (s,), _ = await samples_of(c, sid)
        assert s["rollout_routed_experts"] is not None
        sim.worker.options.honour_routed_experts_start_len = False
        r = await c.post(CHAT.format(sid), json={"messages": msgs, "max_tokens": 300})
        assert r.status_code == 200 and "routed_experts" not in r.json()["choices"][0]["meta_info"]
        r = await c.post(f"/sessions/{sid}/samples", json={})
        assert r.status_code == 422 and r.json()["error"].startswith(
            "sample assembly failed: additional R3: record 1 carries ")


async def test_v1_variant_answers_one_sample_of_the_active_line(nursery, tmp_path):
    """`[sessions] variant = "v1"`: miles' linear server's samples: one sample (the active line), no `reward`, no
    agent metadata, no tree."""
    router, _ = await router_with(nursery, tmp_path, r3=False, variant="v1")
    async with client(router) as c:
        sid = await new_session(c)
        await chat(c, sid, [{"role": "user", "content": "a"}])
        await chat(c, sid, [{"role": "user", "content": "b"}])  # a second root
        r = await c.post(f"/sessions/{sid}/samples", json={"max_seq_len": None, "metadata": {"reward": 1.0}})
        got = miles_wire.decode(r.content, "v1")
        (s,) = got.samples
        meta = json.loads(got.meta_text)
        assert "reward" not in meta["samples"][0] and "tree" not in got.session_metadata
        assert list(s["metadata"]) == ["lifecycle"] and "agent" not in got.session_metadata
        view = (await c.get(f"/sessions/{sid}")).json()
        assert "tree" not in view["metadata"] and len(view["records"]) == 1
        assert s["tokens"].tolist() == view["metadata"]["accumulated_token_ids"]
        assert np.asarray(s["loss_mask"]).sum() == s["response_length"]
