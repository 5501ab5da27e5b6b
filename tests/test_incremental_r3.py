"""Incremental R3 end to end (issue 12): the r3_prefix stage asks the worker only for the routed-expert rows the
cache lacks, capture stitches them onto the cached rows, and what /retrieve_from_text returns is byte for byte what
the plain radix-cache-r3 pipeline (every row from the worker, every turn) returns for the same conversation."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from harness import client, start_router, start_sim

ROOT = Path(__file__).resolve().parent.parent
LAYERS, TOP_K = 3, 2


async def r3_router(nursery, pipeline: str, **sim_kw):
    sim = await start_sim(nursery, tokenizer="builtin:qwen", seed=7, num_layers=LAYERS, top_k=TOP_K, **sim_kw)
    router = await start_router(nursery, workers={"urls": [sim.url]}, tokenizer={"path": "builtin:qwen"},
                                routes=[{"path": "/generate", "pipeline": str(ROOT / "pipelines" / pipeline)}])
    return router, sim


def user_turn(i: int) -> str:
    return f"<|im_start|>user\nturn {i}: tell me about the number {i * 7}<|im_end|>\n<|im_start|>assistant\n"


async def conversation(router, sim, turns: int, between=None) -> list[dict]:
    """Run `turns` chat turns; per turn: the reply, what the worker was sent, what retrieval answers."""
    out, text = [], "<|im_start|>system\nYou are terse.<|im_end|>\n"
    async with client(router) as c, client(sim.url) as s:
        for i in range(turns):
            if between is not None:
                await between(i, c, s)
            text += user_turn(i)
            reply = (await c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": 9}})).json()
            sent = (await s.get("/_sim/stats")).json()["last_bodies"][-1]
            text += reply["text"]
            got = (await c.post("/retrieve_from_text", json={"text": text})).json()
            assert got["exact"], got
            out.append({"reply": reply, "sent": sent, "got": got})
            text += "<|im_end|>\n"
    return out


def rows_of(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), "<i4").reshape(-1, LAYERS, TOP_K)


async def test_incremental_r3_equals_full_r3_byte_for_byte_across_ten_turns(nursery):
    full = await conversation(*await r3_router(nursery, "radix-cache-r3.toml"), 10)
    inc = await conversation(*await r3_router(nursery, "radix-cache-r3-incremental.toml"), 10)
    assert "routed_experts_start_len" not in inc[0]["sent"]  # nothing cached yet: every row
    for i, (f, n) in enumerate(zip(full, inc)):
        assert n["got"]["tokens"] == f["got"]["tokens"]  # same deterministic worker, same conversation
        # the cache's answer: identical bytes, every row of the whole conversation
        assert n["got"]["routed_experts"] == f["got"]["routed_experts"]
        assert rows_of(n["got"]["routed_experts"]).shape[0] == len(n["got"]["tokens"]) - 1
        if i:
            start = n["sent"]["routed_experts_start_len"]
            # the turn before recorded rows for all its tokens but its last one (never fed to the model)
            assert start == len(inc[i - 1]["got"]["tokens"]) - 1
            # on the wire only the new rows came back: [start, T-1)
            new = rows_of(n["reply"]["meta_info"]["routed_experts"])
            assert new.shape[0] == len(n["got"]["tokens"]) - 1 - start
            assert new.tobytes() == rows_of(f["reply"]["meta_info"]["routed_experts"])[start:].tobytes()
    traffic_full = sum(len(f["reply"]["meta_info"]["routed_experts"]) for f in full)
    traffic_inc = sum(len(n["reply"]["meta_info"]["routed_experts"]) for n in inc)
    assert traffic_inc * 3 < traffic_full  # R3 bytes per turn follow the new tokens, not the history


async def test_after_a_weight_version_change_full_rows_are_asked_for_again(nursery):
    router, sim = await r3_router(nursery, "radix-cache-r3-incremental.toml")

    async def update_weights(i, c, s):
        if i == 3:
            r = await s.post("/update_weight_version", json={"new_version": "v2", "abort_all_requests": False})
            assert r.status_code == 200
            # any reply from the worker tells the router its new version
            r = await c.post("/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 1}})
            assert r.json()["meta_info"]["weight_version"] == "v2"

    turns = await conversation(router, sim, 6, between=update_weights)
    assert [("routed_experts_start_len" in t["sent"]) for t in turns] == [False, True, True, False, True, True]
    ref = await conversation(*await r3_router(nursery, "radix-cache-r3.toml"), 6)
    assert [t["got"]["routed_experts"] for t in turns] == [t["got"]["routed_experts"] for t in ref]


async def test_a_worker_that_ignores_start_len_still_gives_exact_rows(nursery):
    """Some SGLang builds ignore routed_experts_start_len and return every row: the row count shows it, and
    those rows are used as they are, never stitched twice."""
    inc = await conversation(*await r3_router(nursery, "radix-cache-r3-incremental.toml",
                                              honour_routed_experts_start_len=False), 4)
    full = await conversation(*await r3_router(nursery, "radix-cache-r3.toml"), 4)
    assert inc[2]["sent"]["routed_experts_start_len"] > 0
    assert [t["got"]["routed_experts"] for t in inc] == [t["got"]["routed_experts"] for t in full]


async def test_a_client_that_sets_start_len_itself_is_left_alone(nursery):
    router, sim = await r3_router(nursery, "radix-cache-r3-incremental.toml")
    async with client(router) as c, client(sim.url) as s:
        text = user_turn(0)
        o = (await c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": 5}})).json()
        text += o["text"] + "<|im_end|>\n" + user_turn(1)
        r = await c.post("/generate", json={"text": text, "routed_experts_start_len": 0,
                                            "sampling_params": {"max_new_tokens": 5}})
        assert r.status_code == 200
        assert (await s.get("/_sim/stats")).json()["last_bodies"][-1]["routed_experts_start_len"] == 0
        got = (await c.post("/retrieve_from_text", json={"text": text + r.json()["text"]})).json()
    assert got["exact"] and rows_of(got["routed_experts"]).shape[0] == len(got["tokens"]) - 1


@pytest.mark.parametrize("num_experts", [256, 1000])
async def test_wide_expert_ids_come_back_exactly(nursery, num_experts):
    """The cache keeps routed experts at the width their ids need (uint8 up to 256 experts, uint16 past it);
    what the trainer gets is still SGLang's int32 rows, byte for byte what the worker sent."""
    router, sim = await r3_router(nursery, "radix-cache-r3.toml", num_experts=num_experts)
    turns = await conversation(router, sim, 3)
    top = 0
    for t in turns:
        assert t["got"]["routed_experts"] == t["reply"]["meta_info"]["routed_experts"]
        top = max(top, int(rows_of(t["got"]["routed_experts"]).max()))
    assert (top > 255) == (num_experts > 256)
    want = "uint8" if num_experts <= 256 else "uint16"
    assert str(router.runtime.trajectories.tree.routed_experts_dtype) == want
