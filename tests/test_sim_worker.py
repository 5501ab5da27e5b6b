"""Tests for the simulated SGLang worker (router.sim) over real loopback HTTP."""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
import trio

from router.sim import SimOptions, SimWorker, serve_sim_worker
from router.tokenizer import load_tokenizer

StartSim = Callable[..., Awaitable[tuple[httpx.AsyncClient, SimWorker]]]

META_KEYS_6_1 = [
    "id", "finish_reason", "prompt_tokens", "weight_version", "num_retractions",
    "input_token_logprobs", "output_token_logprobs", "output_token_logprobs_length",
    "reasoning_tokens", "completion_tokens", "cached_tokens", "cached_tokens_details",
    "routed_experts", "dp_rank", "e2e_latency", "response_sent_to_client_ts",
]  # fmt: skip
ABORTED = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}


@pytest.fixture
async def start_sim(nursery: trio.Nursery) -> AsyncIterator[StartSim]:
    """Start a worker (tiny tokenizer unless told otherwise) and a client bound to it."""
    clients: list[httpx.AsyncClient] = []

    async def start(**options: Any) -> tuple[httpx.AsyncClient, SimWorker]:
        url, worker = await nursery.start(serve_sim_worker, SimOptions(**{"tokenizer": "builtin:tiny", **options}))
        client = httpx.AsyncClient(base_url=url, trust_env=False, timeout=10)
        clients.append(client)
        return client, worker

    yield start
    for client in clients:
        await client.aclose()


async def generate(client: httpx.AsyncClient, **body: Any) -> Any:
    # compact JSON bytes of our own making (httpx's json= spacing differs between releases)
    r = await client.post("/generate", content=msgspec.json.encode(body), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()


def decode_experts(meta: dict[str, Any], layers: int = 2, top_k: int = 2) -> np.ndarray:
    return np.frombuffer(base64.b64decode(meta["routed_experts"]), "<i4").reshape(-1, layers, top_k)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


# --- shapes ---------------------------------------------------------------------------------


async def test_qwen_reply_matches_fixture_shape(start_sim: StartSim) -> None:
    client, _ = await start_sim(tokenizer="builtin:qwen")
    r = await client.post(
        "/generate",
        json={
            "input_ids": [151644, 872, 13],
            "sampling_params": {"max_new_tokens": 512, "temperature": 1.0},
            "return_logprob": True,
            "return_routed_experts": True,
        },
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = json.loads(r.content)
    assert list(out) == ["text", "output_ids", "meta_info"]
    meta = out["meta_info"]
    assert list(meta) == META_KEYS_6_1
    assert meta["finish_reason"] == {"type": "stop", "matched": 151645}
    assert out["output_ids"][-1] == 151645 and 151645 not in out["output_ids"][:-1]
    assert "<|im_end|>" not in out["text"]
    qwen = load_tokenizer("builtin:qwen")
    assert out["text"] == qwen.decode(out["output_ids"])
    assert meta["prompt_tokens"] == 3 and meta["weight_version"] == "default" and meta["num_retractions"] == 0
    assert meta["input_token_logprobs"] == [] and meta["dp_rank"] is None and meta["cached_tokens_details"] is None
    n = len(out["output_ids"])
    assert meta["completion_tokens"] == meta["output_token_logprobs_length"] == n
    for (lp, token, text), expected in zip(meta["output_token_logprobs"], out["output_ids"]):
        assert token == expected and text is None
        assert lp < 0 and float(np.float32(lp)) == lp
    assert decode_experts(meta).shape == (3 + n - 1, 2, 2)
    assert len(meta["id"]) == 32 and meta["e2e_latency"] >= 0


async def test_eos_in_output_ids_but_not_text(start_sim: StartSim) -> None:
    client, worker = await start_sim()
    tok = worker.tokenizer
    for seed in range(5):
        out = await generate(client, text=f"prompt {seed}", sampling_params={"max_new_tokens": 4096})
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": tok.eos_token_id}
        assert out["output_ids"][-1] == tok.eos_token_id
        assert out["text"] == tok.decode(out["output_ids"][:-1])
        no_skip = await generate(
            client,
            text=f"prompt {seed}",
            sampling_params={"max_new_tokens": 4096, "skip_special_tokens": False, "no_stop_trim": True},
        )
        assert no_skip["text"].endswith("<|im_end|>")


async def test_tokenization_is_valid_but_noncanonical(start_sim: StartSim) -> None:
    client, worker = await start_sim()
    tok = worker.tokenizer
    noncanonical = 0
    for seed in range(6):
        out = await generate(client, input_ids=[5, 6, seed + 7], sampling_params={"max_new_tokens": 4096})
        ids = out["output_ids"][:-1]
        assert tok.text_bytes(ids) == out["text"].encode()  # valid: the ids spell the text exactly
        noncanonical += tok.encode(tok.decode(ids)) != ids
    assert noncanonical >= 1


async def test_length_stop_strings_and_stop_token_ids(start_sim: StartSim) -> None:
    client, worker = await start_sim(tokenizer="builtin:qwen")
    base = await generate(client, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4096})
    ids, text = base["output_ids"], base["text"]

    short = await generate(client, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 5})
    assert short["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert short["output_ids"] == ids[:5]  # a shorter budget gives a prefix of the same completion

    long = await generate(client, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 300, "ignore_eos": True})
    assert long["meta_info"]["finish_reason"] == {"type": "length", "length": 300}
    assert len(long["output_ids"]) == 300 and worker.tokenizer.eos_token_id not in long["output_ids"]

    word = text.split()[len(text.split()) // 2]
    cut = text.index(word)
    stopped = await generate(client, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4096, "stop": word})
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": word}
    assert stopped["text"] == text[:cut]
    kept = stopped["output_ids"]
    assert kept == ids[: len(kept)] and word in worker.tokenizer.decode(kept)
    untrimmed = await generate(
        client, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4096, "stop": [word], "no_stop_trim": True}
    )
    assert untrimmed["text"].startswith(text[:cut] + word)

    at_least = await generate(
        client, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4096, "min_new_tokens": len(ids) + 5}
    )
    assert len(at_least["output_ids"]) >= len(ids) + 6 and at_least["output_ids"][: len(ids) - 1] == ids[:-1]

    target = ids[3]
    by_id = await generate(
        client, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4096, "stop_token_ids": [target]}
    )
    assert by_id["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}
    assert by_id["output_ids"] == ids[: ids.index(target) + 1]


async def test_logprob_options(start_sim: StartSim) -> None:
    client, _ = await start_sim()
    out = await generate(
        client,
        input_ids=[3, 4, 5, 6],
        sampling_params={"max_new_tokens": 6},
        return_logprob=True,
        logprob_start_len=1,
        top_logprobs_num=3,
        return_text_in_logprobs=True,
    )
    meta = out["meta_info"]
    assert [e[1] for e in meta["input_token_logprobs"]] == [4, 5, 6]
    assert meta["input_token_logprobs"][0][0] is None
    assert all(isinstance(e[2], str) for e in meta["output_token_logprobs"])
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == 3
    assert len(meta["output_top_logprobs"]) == 6
    for top, chosen in zip(meta["output_top_logprobs"], meta["output_token_logprobs"]):
        assert len(top) == 3 and top[0][:2] == chosen[:2]
        assert [e[0] for e in top] == sorted((e[0] for e in top), reverse=True)
    keys = list(meta)
    assert (
        keys.index("output_token_logprobs_length") < keys.index("input_top_logprobs") < keys.index("reasoning_tokens")
    )

    ids_lp = await generate(
        client, input_ids=[3, 4], sampling_params={"max_new_tokens": 2}, return_logprob=True, token_ids_logprob=[5, 7]
    )
    assert [[e[1] for e in pos] for pos in ids_lp["meta_info"]["output_token_ids_logprobs"]] == [[5, 7], [5, 7]]

    r = await client.post("/generate", json={"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5})
    assert r.status_code == 400 and "logprob_start_len" in r.json()["error"]["message"]
    r = await client.post(
        "/generate", json={"input_ids": [1, 2], "return_routed_experts": True, "routed_experts_start_len": 3}
    )
    assert r.status_code == 400 and "routed_experts_start_len" in r.json()["error"]["message"]


async def test_request_errors(start_sim: StartSim) -> None:
    client, _ = await start_sim()
    r = await client.post("/generate", json={"sampling_params": {}})
    assert r.status_code == 400 and "message" in r.json()["error"]
    r = await client.post("/generate", json={"input_ids": []})
    assert r.status_code == 400 and r.json() == {"error": {"message": "input_ids cannot be empty."}}
    r = await client.post("/generate", json={"text": "x", "sampling_params": {"bogus": 1}})
    assert r.status_code == 500
    r = await client.post("/generate", json={"text": "x", "sampling_params": {"temperature": -1}})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = await client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["object"] == "error" and r.json()["code"] == 400
    r = await client.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 2}, "whatever": 1})
    assert r.status_code == 200  # unknown top-level keys are ignored
    both = await generate(client, text="ignored text", input_ids=[9, 9, 9], sampling_params={"max_new_tokens": 1})
    assert both["meta_info"]["prompt_tokens"] == 3  # input_ids win

    async with client.stream("POST", "/generate", json={"input_ids": [], "stream": True}) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line]
    assert lines == ['data: {"error":{"message":"input_ids cannot be empty."}}', "data: [DONE]"]

    r = await client.get("/nope")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = await client.get("/generate")
    assert r.status_code == 405


async def test_duplicate_live_rid_is_rejected(start_sim: StartSim) -> None:
    client, worker = await start_sim(token_latency_s=0.01)
    body = {"rid": "dup", "input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10, "ignore_eos": True}}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(client.post, "/generate", json=body))
        await wait_until(lambda: "dup" in worker._live)
        r = await client.post("/generate", json=body)
        assert r.status_code == 400 and "Duplicate request ID" in r.json()["error"]["message"]
    assert (await generate(client, **body))["meta_info"]["id"] == "dup"  # fine once the first finished


# --- routed experts -------------------------------------------------------------------------


async def test_routed_experts(start_sim: StartSim) -> None:
    client, _ = await start_sim(num_layers=3, top_k=4, num_experts=16)
    prompt = list(range(10, 30))
    out = await generate(client, input_ids=prompt, sampling_params={"max_new_tokens": 12}, return_routed_experts=True)
    experts = decode_experts(out["meta_info"], 3, 4)
    seq = prompt + out["output_ids"]
    assert experts.shape == (len(seq) - 1, 3, 4)
    assert experts.min() >= 0 and experts.max() < 16
    assert all(len(set(row)) == 4 for row in experts.reshape(-1, 4).tolist())  # top-k experts are distinct

    # rows depend only on (position, token): a continuation reproduces the shared rows
    later = await generate(
        client,
        input_ids=seq,
        sampling_params={"max_new_tokens": 3},
        return_routed_experts=True,
        routed_experts_start_len=5,
    )
    later_experts = decode_experts(later["meta_info"], 3, 4)
    assert later_experts.shape == (len(seq) + 3 - 1 - 5, 3, 4)
    assert np.array_equal(later_experts[: len(seq) - 1 - 5], experts[5:])

    big = await generate(
        client, input_ids=list(range(5000)), sampling_params={"max_new_tokens": 1}, return_routed_experts=True
    )
    assert decode_experts(big["meta_info"], 3, 4).shape == (5000, 3, 4)


async def test_routed_experts_absent_when_disabled(start_sim: StartSim) -> None:
    client, _ = await start_sim(enable_routed_experts=False)
    out = await generate(client, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 3}, return_routed_experts=True)
    assert "routed_experts" not in out["meta_info"]


# --- streaming ------------------------------------------------------------------------------


async def test_stream_is_incremental_and_final_chunk_matches_json(start_sim: StartSim) -> None:
    client, _ = await start_sim(token_latency_s=0.03)
    body = {
        "input_ids": [1, 2, 3],
        "sampling_params": {"max_new_tokens": 8, "ignore_eos": True},
        "return_logprob": True,
        "return_routed_experts": True,
        "rid": "s1",
    }
    started = trio.current_time()
    chunks, arrival = [], []
    async with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line:
                chunks.append(line)
                arrival.append(trio.current_time() - started)
    assert chunks[-1] == "data: [DONE]"
    outs = [json.loads(c.removeprefix("data: ")) for c in chunks[:-1]]
    assert len(outs) == 8
    assert arrival[0] < arrival[-2] - 0.1  # the first token arrived well before the last
    for k, out in enumerate(outs[:-1], start=1):
        assert len(out["output_ids"]) == k and out["meta_info"]["finish_reason"] is None
        assert "routed_experts" not in out["meta_info"] and "e2e_latency" not in out["meta_info"]
        assert out["output_ids"] == outs[-1]["output_ids"][:k]
    assert "response_sent_to_client_ts" in outs[0]["meta_info"]
    assert "response_sent_to_client_ts" not in outs[-1]["meta_info"]

    final = outs[-1]
    whole = await generate(client, **body)
    assert final["text"] == whole["text"] and final["output_ids"] == whole["output_ids"]
    fm, wm = final["meta_info"], whole["meta_info"]
    for key in ("finish_reason", "output_token_logprobs", "routed_experts", "completion_tokens", "id"):
        assert fm[key] == wm[key]
    assert [k for k in wm if k != "response_sent_to_client_ts"] == list(fm)


async def test_batch_stream_chunks_carry_index(start_sim: StartSim) -> None:
    client, _ = await start_sim()
    body = {"input_ids": [[1, 2], [3, 4]], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}, "stream": True}
    async with client.stream("POST", "/generate", json=body) as r:
        lines = [line async for line in r.aiter_lines() if line]
    outs = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]" and sorted({o["index"] for o in outs}) == [0, 1]
    assert [list(o)[-1] for o in outs] == ["index"] * len(outs)


# --- aborts and pauses ----------------------------------------------------------------------


async def test_abort_all_aborts_running_request(start_sim: StartSim) -> None:
    client, worker = await start_sim(token_latency_s=0.02)
    results: list[Any] = []

    async def run() -> None:
        results.append(
            await generate(
                client,
                rid="r7",
                input_ids=[1, 2, 3],
                return_logprob=True,
                sampling_params={"max_new_tokens": 200, "ignore_eos": True},
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await wait_until(lambda: "r7" in worker._live and worker._live["r7"].running)
        await trio.sleep(0.1)
        r = await client.post("/abort_request", json={"abort_all": True})
        assert r.status_code == 200 and r.content == b""
    out = results[0]
    meta = out["meta_info"]
    assert meta["finish_reason"] == ABORTED
    assert 0 < meta["completion_tokens"] < 200
    assert len(out["output_ids"]) == meta["completion_tokens"] == len(meta["output_token_logprobs"])
    assert "prompt_tokens" in meta and "cached_tokens" in meta


async def test_abort_by_rid_prefix(start_sim: StartSim) -> None:
    client, worker = await start_sim(token_latency_s=0.02)
    body = {"rid": "job", "text": ["a", "b"], "sampling_params": {"max_new_tokens": 100, "ignore_eos": True}}
    results: list[Any] = []

    async def run() -> None:
        results.append(await generate(client, **body))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await wait_until(lambda: {"job_0", "job_1"} <= set(worker._live))
        await client.post("/abort_request", json={"rid": "job_x"})  # unknown rid: ignored
        await client.post("/abort_request", json={"rid": "job_1"})
        # job_1 ends, job_0 runs on (had job_x aborted either, the set would never be this)
        await wait_until(lambda: set(worker._live) == {"job_0"})
        await client.post("/abort_request", json={"rid": "job_0"})
    assert [o["meta_info"]["finish_reason"]["type"] for o in results[0]] == ["abort", "abort"]


async def test_pause_blocks_and_continue_resumes(start_sim: StartSim) -> None:
    client, worker = await start_sim(token_latency_s=0.01)
    r = await client.post("/pause_generation", json={"mode": "retract"})
    assert r.json() == {"message": "Generation paused successfully.", "status": "ok"}
    results: list[Any] = []

    async def run() -> None:
        results.append(
            await generate(client, input_ids=[1, 2], sampling_params={"max_new_tokens": 5, "ignore_eos": True})
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await wait_until(lambda: len(worker._live) == 1)
        await trio.sleep(0.1)
        assert results == []  # blocked while paused
        assert (await client.get("/get_load")).json()[0]["num_waiting_reqs"] == 1
        r = await client.post("/continue_generation", json={})
        assert r.json() == {"message": "Generation continued successfully.", "status": "ok"}
    assert results[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 5}


async def test_retract_pause_counts_retractions(start_sim: StartSim) -> None:
    client, worker = await start_sim(token_latency_s=0.01)
    results: list[Any] = []

    async def run() -> None:
        results.append(
            await generate(
                client, rid="rr", input_ids=[1, 2], sampling_params={"max_new_tokens": 30, "ignore_eos": True}
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await wait_until(lambda: "rr" in worker._live and worker._live["rr"].running)
        await client.post("/pause_generation", json={"mode": "retract"})
        await trio.sleep(0.1)
        assert results == []
        await client.post("/continue_generation", json={})
    meta = results[0]["meta_info"]
    assert meta["num_retractions"] == 1 and meta["completion_tokens"] == 30


async def test_pause_abort_mode_and_waiting_queue_abort(start_sim: StartSim) -> None:
    client, worker = await start_sim(token_latency_s=0.02)
    body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 100, "ignore_eos": True}, "return_logprob": True}
    results: list[Any] = []

    async def run(rid: str) -> None:
        results.append(await generate(client, rid=rid, **body))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "running")
        await wait_until(lambda: "running" in worker._live and worker._live["running"].running)
        r = await client.post("/pause_generation", json={"mode": "abort"})
        assert r.status_code == 200 and not worker._live  # returns once the aborted request is gone
        nursery.start_soon(run, "queued")
        await wait_until(lambda: "queued" in worker._live)
        await client.post("/abort_request", json={"abort_all": True})
    running, queued = results
    assert running["meta_info"]["finish_reason"] == ABORTED
    assert queued == {
        "text": "",
        "output_ids": [],
        "meta_info": {
            "id": "queued",
            "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
            "weight_version": "default",
            "e2e_latency": queued["meta_info"]["e2e_latency"],
            "input_token_logprobs": [],
            "output_token_logprobs": [],
            "output_token_logprobs_length": 0,
            "completion_tokens": 0,
            "response_sent_to_client_ts": queued["meta_info"]["response_sent_to_client_ts"],
        },
    }
    await client.post("/continue_generation", json={})


async def test_update_weight_version_aborts_and_sets_version(start_sim: StartSim) -> None:
    client, worker = await start_sim(token_latency_s=0.02)
    results: list[Any] = []

    async def run() -> None:
        results.append(
            await generate(client, rid="w", input_ids=[1], sampling_params={"max_new_tokens": 100, "ignore_eos": True})
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await wait_until(lambda: "w" in worker._live and worker._live["w"].running)
        r = await client.post("/update_weight_version", json={"new_version": "3"})
        assert r.json() == {"success": True, "message": "Weight version updated to 3", "new_version": "3"}
    assert results[0]["meta_info"]["finish_reason"]["type"] == "abort"
    assert (await client.get("/model_info")).json()["weight_version"] == "3"
    out = await generate(client, input_ids=[1], sampling_params={"max_new_tokens": 1})
    assert out["meta_info"]["weight_version"] == "3"


# --- faults ---------------------------------------------------------------------------------


async def test_health_and_generate_status_faults(start_sim: StartSim) -> None:
    client, worker = await start_sim()
    r = await client.get("/health")
    assert r.status_code == 200 and r.content == b""
    r = await client.post("/_sim/faults", json={"health_status": 503, "generate_status": 503})
    assert r.json()["health_status"] == 503
    assert (await client.get("/health_generate")).status_code == 503
    r = await client.post("/generate", json={"text": "x"})
    assert r.status_code == 503 and r.json() == {
        "object": "error",
        "message": "Simulated fault: status 503",
        "type": "503",
        "param": None,
        "code": 503,
    }
    assert (await client.post("/_sim/faults", json={"bogus": 1})).status_code == 400
    worker.set_faults(health_status=200, generate_status=None)
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/_sim/faults")).json()["generate_status"] is None


async def test_hang_until_cleared_and_delay(start_sim: StartSim) -> None:
    client, _ = await start_sim(faults={"hang": True})
    results: list[Any] = []

    async def run() -> None:
        results.append(await generate(client, input_ids=[1], sampling_params={"max_new_tokens": 2}))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.sleep(0.2)
        assert results == []
        await client.post("/_sim/faults", json={"hang": False, "delay_s": 0.1})
    assert results[0]["meta_info"]["completion_tokens"] == 2
    started = trio.current_time()
    await generate(client, input_ids=[1], sampling_params={"max_new_tokens": 2})
    assert trio.current_time() - started >= 0.1


async def test_hang_ends_when_client_disconnects(start_sim: StartSim) -> None:
    client, worker = await start_sim(faults={"hang": True})
    with trio.move_on_after(0.2):
        await client.post("/generate", json={"input_ids": [1]})
    await wait_until(lambda: worker.stats.in_flight == 0 and not worker._live)


async def test_stream_disconnect_frees_the_request(start_sim: StartSim) -> None:
    client, worker = await start_sim(token_latency_s=0.01)
    body = {
        "rid": "gone",
        "input_ids": [1],
        "stream": True,
        "sampling_params": {"max_new_tokens": 500, "ignore_eos": True},
    }
    async with client.stream("POST", "/generate", json=body) as r:
        async for line in r.aiter_lines():
            if line:
                break
    await wait_until(lambda: "gone" not in worker._live and worker.stats.in_flight == 0)


async def test_drop_after_bytes(start_sim: StartSim) -> None:
    client, worker = await start_sim()
    worker.set_faults(drop_after_bytes=20)
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 5}})
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", "/generate", json={"input_ids": [1, 2], "stream": True}) as r:
            async for data in r.aiter_raw():
                received += data
    assert len(received) == 20 and received.startswith(b"data: {")


async def test_echo_fault_and_echo_endpoint(start_sim: StartSim) -> None:
    client, _ = await start_sim(name="w7", faults={"echo": True})
    raw = b'{"text": "x",  "weird":[1.0e0, "\\u00e9"]}'
    r = await client.put("/generate?a=1&b=%20", content=raw, headers={"content-type": "application/x-custom"})
    assert r.content == raw and r.headers["content-type"] == "application/x-custom"
    assert r.headers["x-sim-query"] == "a=1&b=%20" and r.headers["x-sim-worker"] == "w7"
    r = await client.post("/_sim/echo?q=1", content=b"\x00\xffbody", headers={"x-trace": "t1"})
    echo = r.json()
    assert echo["method"] == "POST" and echo["path"] == "/_sim/echo" and echo["query"] == "q=1"
    assert ["x-trace", "t1"] in echo["headers"]
    assert base64.b64decode(echo["body_b64"]) == b"\x00\xffbody"


# --- batch, n, cache, determinism -----------------------------------------------------------


async def test_batch_and_n(start_sim: StartSim) -> None:
    client, _ = await start_sim()
    outs = await generate(client, text=["one", "two", "three"], rid="b", sampling_params={"max_new_tokens": 4})
    assert isinstance(outs, list) and [o["meta_info"]["id"] for o in outs] == ["b_0", "b_1", "b_2"]
    samples = await generate(client, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 16, "n": 3})
    assert len(samples) == 3 and len({o["meta_info"]["id"] for o in samples}) == 3
    assert len({tuple(o["output_ids"]) for o in samples}) > 1  # independent samples differ
    greedy = await generate(
        client, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 16, "n": 2, "temperature": 0}
    )
    assert greedy[0]["output_ids"] == greedy[1]["output_ids"]
    both = await generate(client, input_ids=[[1, 2], [3, 4]], sampling_params={"max_new_tokens": 4, "n": 2})
    assert len(both) == 4 and [o["meta_info"]["prompt_tokens"] for o in both] == [2, 2, 2, 2]
    seeded = [
        (await generate(client, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 16, "sampling_seed": s}))[
            "output_ids"
        ]
        for s in (1, 1, 2)
    ]
    assert seeded[0] == seeded[1] != seeded[2]


async def test_cached_tokens_grow_and_flush(start_sim: StartSim) -> None:
    client, _ = await start_sim()
    prompt = list(range(100, 140))
    first = await generate(client, input_ids=prompt, sampling_params={"max_new_tokens": 40, "ignore_eos": True})
    assert first["meta_info"]["cached_tokens"] == 0
    again = await generate(client, input_ids=prompt, sampling_params={"max_new_tokens": 1})
    assert again["meta_info"]["cached_tokens"] == 32  # whole 16-token blocks of prompt[:-1]
    assert again["meta_info"]["cached_tokens_details"] == {"device": 32, "host": 0}
    turn2 = prompt + first["output_ids"] + [7, 8, 9]
    follow = await generate(client, input_ids=turn2, sampling_params={"max_new_tokens": 1})
    assert follow["meta_info"]["cached_tokens"] == 80
    r = await client.get("/flush_cache")
    assert r.status_code == 200 and r.text.startswith("Cache flushed.")
    after = await generate(client, input_ids=prompt, sampling_params={"max_new_tokens": 1})
    assert after["meta_info"]["cached_tokens"] == 0


async def test_flush_cache_refused_while_busy(start_sim: StartSim) -> None:
    client, worker = await start_sim(token_latency_s=0.02)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(
                generate, client, input_ids=[1], sampling_params={"max_new_tokens": 10, "ignore_eos": True}
            )
        )
        await wait_until(lambda: bool(worker._live))
        assert (await client.post("/flush_cache")).status_code == 400


async def test_prefill_latency_counts_uncached_tokens(start_sim: StartSim) -> None:
    client, _ = await start_sim(prefill_latency_s_per_token=0.001)
    prompt = list(range(200, 360))
    started = trio.current_time()
    await generate(client, input_ids=prompt, sampling_params={"max_new_tokens": 1})
    cold = trio.current_time() - started
    started = trio.current_time()
    warm = await generate(client, input_ids=prompt, sampling_params={"max_new_tokens": 1})
    assert warm["meta_info"]["cached_tokens"] == 144
    assert cold >= 0.16 and trio.current_time() - started < cold - 0.1


async def test_same_seed_workers_agree(start_sim: StartSim) -> None:
    a, _ = await start_sim(seed=7)
    b, _ = await start_sim(seed=7)
    c, _ = await start_sim(seed=8)
    body = {
        "input_ids": [4, 5, 6],
        "sampling_params": {"max_new_tokens": 64},
        "return_logprob": True,
        "return_routed_experts": True,
    }
    ra, rb, rc = [await generate(client, **body) for client in (a, b, c)]
    for key in ("output_token_logprobs", "routed_experts", "finish_reason"):
        assert ra["meta_info"][key] == rb["meta_info"][key]
    assert ra["output_ids"] == rb["output_ids"] and ra["text"] == rb["text"]
    assert ra["output_ids"] != rc["output_ids"]


# --- other endpoints and stats --------------------------------------------------------------


async def test_info_endpoints(start_sim: StartSim) -> None:
    client, worker = await start_sim(model_path="sim/tiny")
    info = (await client.get("/get_model_info")).json()
    assert list(info) == [
        "model_path",
        "tokenizer_path",
        "is_generation",
        "preferred_sampling_params",
        "weight_version",
        "has_image_understanding",
        "has_audio_understanding",
        "model_type",
        "architectures",
    ]
    assert load_tokenizer(info["tokenizer_path"]).encode("Hello") == worker.tokenizer.encode("Hello")
    server = (await client.get("/server_info")).json()
    assert server["version"] == "0.5.12" and server["status"] == "ready" and server["tp_size"] == 1
    models = (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "sim/tiny" and models["data"][0]["owned_by"] == "sglang"
    assert (await client.get("/get_weight_version")).status_code == 404
    load = (await client.get("/get_load")).json()
    assert load[0]["num_reqs"] == 0 and load[0]["dp_rank"] == 0
    assert (await client.post("/release_memory_occupation", json={})).json() is None


async def test_stats_record_bodies_and_peak_in_flight(start_sim: StartSim) -> None:
    client, worker = await start_sim(token_latency_s=0.01)
    # 30 tokens at 10 ms: the four overlap however slowly a loaded host delivers them
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 30, "ignore_eos": True}}
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(functools.partial(generate, client, **body))
    await generate(client, text="Hello world", sampling_params={"max_new_tokens": 1})
    stats = (await client.get("/_sim/stats")).json()
    assert stats["generate_requests"] == 5 and stats["peak_in_flight"] == 4 and stats["in_flight"] == 0
    assert stats["last_bodies"][0] == body
    assert stats["last_input_ids"][-1] == worker.tokenizer.encode("Hello world")
    assert worker.stats.last_bodies[-1] == b'{"text":"Hello world","sampling_params":{"max_new_tokens":1}}'
    await client.post("/_sim/stats/reset")
    assert worker.stats.generate_requests == 0
