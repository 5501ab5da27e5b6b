"""miles' own session server's golden replies (shared/miles_samples/golden/, made by miles main's server code)
replayed against the router, over sockets.

Each case is replayed as the agent ran it: its chat requests in order (tool-call ids the agent echoes are the
ones this router gave it), to a worker scripted from miles' upstream replies. The worker answers only when the
prompt it receives is, token for token, the `input_ids` miles' server sent upstream. Then `/samples` (decoded by
tests/miles_wire.py, written from the contract) and `GET /sessions/{id}` are compared with miles' field by field;
what may differ is what the contract says may: timestamps, ids, and the tool-call ids inside echoed messages.
The encoder is also fed miles' encoder input directly and must give miles' bytes.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

import miles_wire
from harness import client, start_router
from router.tokenizer import load_tokenizer
from router.wire.samples import encode_samples

GOLDEN = Path(__file__).resolve().parent / "data" / "miles_golden"
CASES = sorted(p.stem for p in GOLDEN.glob("v*.json"))


def load(case: str) -> dict:
    return json.loads((GOLDEN / f"{case}.json").read_text())


class ScriptedWorker:
    """An SGLang worker whose /generate answers are miles' scripted upstream replies, keyed by the exact prompt
    (several replies to one prompt are given in order)."""

    def __init__(self, turns: list[dict]) -> None:
        tok = load_tokenizer("builtin:qwen")
        self.replies: dict[tuple[int, ...], list[dict]] = {}
        for t in turns:
            choice = t["upstream_reply"]["choices"][0]
            meta = choice["meta_info"]
            ids = [p[1] for p in meta["output_token_logprobs"]]
            reply = {"text": tok.decode(ids, skip_special_tokens=True), "output_ids": ids, "meta_info": meta}
            self.replies.setdefault(tuple(t["upstream_request"]["input_ids"]), []).append(reply)
        self.received: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        status, out = 200, {}
        if scope["path"] == "/generate":
            req = json.loads(body)
            self.received.append(req)
            queue = self.replies.get(tuple(req["input_ids"]))
            if queue:
                out = queue.pop(0)
            else:
                status, out = 500, {"error": "no scripted reply: the prompt differs from miles' input_ids"}
        elif scope["path"] == "/model_info":
            out = {"model_path": "golden-model"}
        data = json.dumps(out).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


async def start_scripted(nursery, worker: ScriptedWorker) -> str:
    cfg = HypercornConfig()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = cfg.errorlog = None
    binds = await nursery.start(lambda task_status: serve(worker, cfg, shutdown_trigger=trio.sleep_forever,
                                                          task_status=task_status))
    return binds[0]


def router_sections(launch: dict, tmp_path: Path) -> dict:
    stages = '["session_request", "chat_template", "session_generate", "forward", "chat_parse", "session_reply"]'
    text = f"stages = {stages}\n"
    if launch["use_rollout_routing_replay"]:
        text += ("[options.session_generate]\nrouted_experts = true\n"
                 f"routed_experts_layers = {launch['num_layers']}\nrouted_experts_topk = 2\n"
                 f"routed_experts_start_len = {str(launch['pause_generation_mode'] == 'in_place').lower()}\n")
    pipe = tmp_path / "pipeline.toml"
    pipe.write_text(text)
    return {"tokenizer": {"path": "builtin:qwen"},
            "sessions": {"pipeline": str(pipe), "variant": "v1" if launch["use_session_server"] is True else "v2",
                         "chat_template_kwargs": launch["apply_chat_template_kwargs"],
                         "message_matcher": launch["session_message_matcher"],
                         "save_debug_trajectory_data": launch["save_debug_trajectory_data"] is not None}}


def with_ids(obj, ids: dict[str, str]):
    """`obj` with every tool-call id (and tool_call_id) renamed by `ids`."""
    obj = copy.deepcopy(obj)

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("id", "tool_call_id") and isinstance(v, str) and v in ids:
                    x[k] = ids[v]
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(obj)
    return obj


def reply_of(sse: str) -> dict:
    events = sse.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and len(events) == 3, sse
    return json.loads(events[0].removeprefix("data: "))


def assert_reply(ours: dict, theirs: dict, ids: dict[str, str]) -> None:
    """Equal but for `created` and `model` (the request named none: SGLang answers with its served name)."""
    theirs = with_ids(theirs, ids)
    for key in ("created", "model"):
        assert isinstance(ours.pop(key), type(theirs.pop(key)))
    assert ours == theirs


def assert_lifecycle(ours, theirs) -> None:
    if not isinstance(theirs, (dict, list)):  # an agent's value that replaced the server's
        assert ours == theirs
        return
    ours, theirs = (ours, theirs) if isinstance(theirs, list) else ([ours], [theirs])
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert list(a) == list(b)  # same keys in the same order
        assert a["turn"] == b["turn"]
        assert a["t0"] == pytest.approx(a["t1"] - (b["t1"] - b["t0"]))  # t0 = t1 - the engine's e2e_latency
        assert a["req_ts"] <= a["t1"]
        if i:
            assert a["prev_t1"] == ours[i - 1]["t1"]


def assert_tree(ours: dict, theirs: dict) -> None:
    assert ours["leaves"] == theirs["leaves"]
    assert [{k: v for k, v in n.items() if k != "committed_at"} for n in ours["nodes"]] == \
        [{k: v for k, v in n.items() if k != "committed_at"} for n in theirs["nodes"]]
    assert [list(n) for n in ours["nodes"]] == [list(n) for n in theirs["nodes"]]


def assert_session_metadata(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        if key == "tree":
            assert_tree(ours[key], value)
        else:
            assert ours[key] == value, key


@pytest.mark.parametrize("case", CASES)
async def test_golden_case_replays_exactly(nursery, tmp_path, case):
    g = load(case)
    variant = "v1" if g["launch"]["use_session_server"] is True else "v2"
    worker = ScriptedWorker(g["turns"])
    url = await start_scripted(nursery, worker)
    router = await start_router(nursery, workers={"urls": [url]}, **router_sections(g["launch"], tmp_path))
    ids: dict[str, str] = {}  # miles' tool-call ids -> the ones this router gave the agent
    async with client(router) as c:
        sid = (await c.post("/sessions", json={})).json()["session_id"]
        for i, turn in enumerate(g["turns"]):
            r = await c.post(f"/sessions/{sid}/v1/chat/completions", json=with_ids(turn["client_request"], ids))
            assert r.status_code == turn["client_reply_status"] == 200, r.text
            assert worker.received[-1]["input_ids"] == turn["upstream_request"]["input_ids"]
            if "client_reply_sse" in turn:
                assert r.headers["content-type"].startswith("text/event-stream")
                assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
                ours, theirs = reply_of(r.text), reply_of(turn["client_reply_sse"])
                calls_ours = ours["choices"][0]["delta"].get("tool_calls") or []
                calls_theirs = theirs["choices"][0]["delta"].get("tool_calls") or []
            else:
                ours, theirs = r.json(), turn["client_reply"]
                calls_ours = ours["choices"][0]["message"]["tool_calls"] or []
                calls_theirs = theirs["choices"][0]["message"]["tool_calls"] or []
            ids.update({t["id"]: o["id"] for t, o in zip(calls_theirs, calls_ours)})
            assert_reply(ours, theirs, ids)

        r = await c.post(f"/sessions/{sid}/samples", json=g["samples_request"])
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        got = miles_wire.decode(r.content, variant)
        want = g["wire"]["_samples_meta"]
        assert got.empty_reason == want["empty_reason"]
        assert_session_metadata(got.session_metadata, want["session_metadata"])
        tensors = {t["name"]: t for t in g["wire"]["tensors"]}
        assert len(got.samples) == len(want["samples"])
        for i, (ours, theirs) in enumerate(zip(got.samples, want["samples"])):
            for key in ("response", "response_length", "status", "weight_versions", "prefix_cache_info", "nulls"):
                assert (ours[key] if key != "nulls" else [k for k in miles_wire.TENSORS if ours[k] is None
                                                          and k != "tokens"]) == theirs[key], (i, key)
            if variant == "v2":
                assert ours["reward"] == theirs["reward"]
            for name in miles_wire.TENSORS:
                if ours[name] is None:
                    continue
                t = tensors[f"{name}.{i}"]
                assert list(ours[name].shape) == t["shape"], name
                assert hashlib.sha256(np.ascontiguousarray(ours[name]).tobytes()).hexdigest() == t["sha256"], name
            meta_ours, meta_theirs = ours["metadata"], theirs["metadata"]
            assert list(meta_ours) == list(meta_theirs)
            for key, value in meta_theirs.items():
                if key == "lifecycle":
                    assert_lifecycle(meta_ours[key], value)
                elif key == "messages":
                    assert meta_ours[key] == with_ids(value, ids)
                else:
                    assert meta_ours[key] == value, key

        r = await c.get(f"/sessions/{sid}")
        assert r.status_code == 200
        view, golden = r.json(), g["get_session"]
        assert view["session_id"] == sid and list(view) == list(golden)
        assert_session_metadata(view["metadata"], golden["metadata"])
        assert len(view["records"]) == len(golden["records"])
        for ours, theirs in zip(view["records"], golden["records"]):
            assert list(ours) == list(theirs)
            assert ours["method"] == "POST" and ours["path"] == "/v1/chat/completions" and ours["status_code"] == 200
            assert ours["request_timestamp"] <= ours["timestamp"]
            assert ours["request"] == with_ids(theirs["request"], ids)
            assert list(ours["request"]) == list(theirs["request"])
            assert_reply(ours["response"], theirs["response"], ids)


@pytest.mark.parametrize("case", CASES)
def test_encoder_writes_miles_bytes(case):
    """miles' encoder input through the router's encoder: the same bytes as miles' (§2.2)."""
    g = load(case)
    enc = g["encoder_input"]
    variant = "v2" if enc["fields"] == "COMPUTED_FIELDS_V2" else "v1"
    samples = []
    for s in enc["samples"]:
        s = dict(s)
        for name, dtype in (("tokens", np.int64), ("loss_mask", np.uint8), ("rollout_log_probs", np.float64)):
            s[name] = np.asarray(s[name], dtype)
        for name in ("rollout_routed_experts", "rollout_indexer_topk"):
            if s.get(name) is not None:  # {dtype, shape, sha256, values}
                s[name] = np.asarray(s[name]["values"], np.int32).reshape(s[name]["shape"])
        s.setdefault("reward", None)
        samples.append(SimpleNamespace(**s))
    payload = encode_samples(samples, enc["session_metadata"], enc["empty_reason"], variant)
    assert hashlib.sha256(payload).hexdigest() == g["wire"]["sha256"]
    assert miles_wire.decode(payload, variant).meta_text == g["wire"]["_samples_meta_text"]


def test_the_golden_cases_are_here():
    assert {"v1_single_turn", "v2_two_roots", "v2_reward_branches", "v1_r3"} <= set(CASES)
    assert msgspec.json.decode((GOLDEN / "index.json").read_bytes())
