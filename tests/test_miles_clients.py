"""miles' own clients, with their exact bodies, against the router over sockets (issue 9).

The bodies are those miles sends (miles/rollout/generate_utils/generate_endpoint_utils.py and the
radix-tree client `postprocess_sample_with_radix_tree`, miles/router/middleware_hub at 19abe8000^):
httpx `post(url, json=payload)`."""

from __future__ import annotations

from pathlib import Path

from harness import client, start_router, start_sim
from router.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
RADIX = str(ROOT / "pipelines/radix-cache.toml")


async def start_stack(nursery):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]},
                                routes=[{"path": "/generate", "pipeline": RADIX}])
    return sim, router


def miles_generate_payload(input_ids: list[int]) -> dict:
    """compute_request_payload(): what miles posts to /generate."""
    return {
        "input_ids": input_ids,
        "sampling_params": {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 12,
                            "stop": None, "stop_token_ids": None, "skip_special_tokens": False,
                            "no_stop_trim": True, "spaces_between_special_tokens": False},
        "return_logprob": True,
        "return_routed_experts": False,
        "return_indexer_topk": False,
    }


async def test_miles_radix_client_retrieves_its_trajectory(nursery):
    sim, router = await start_stack(nursery)
    tok = load_tokenizer("builtin:tiny")
    prompt = "Solve: what is two plus two? Answer:"
    input_ids = tok.encode(prompt)
    async with client(router) as c:
        r = await c.post("/generate", json=miles_generate_payload(input_ids))
        assert r.status_code == 200, r.text
        out = r.json()
        pairs = out["meta_info"]["output_token_logprobs"]
        out_ids, out_logps = [p[1] for p in pairs], [p[0] for p in pairs]

        # postprocess_sample_with_radix_tree(): {"text": sample.prompt + output["text"], "return_logp": True}
        r = await c.post("/retrieve_from_text", json={"text": prompt + out["text"], "return_logp": True})
        assert r.status_code == 200, r.text  # was 400 "unknown field 'return_logp'"
        got = r.json()
        assert got["tokens"] == input_ids + out_ids
        assert got["token_length"] == got["loss_mask_length"] == len(got["rollout_logp"]) == len(got["tokens"])
        # the slicing miles does: the last response_length entries are the generated tokens
        n = len(out_ids)
        assert got["loss_mask"] == [0] * len(input_ids) + [1] * n
        assert got["rollout_logp"][-n:] == out_logps and any(lp != 0.0 for lp in out_logps)
        assert got["exact"] is True and got["match"] == "trajectory"

        # return_logp false: the same answer with zero logprobs, as miles' router gave
        r = await c.post("/retrieve_from_text", json={"text": prompt + out["text"], "return_logp": False})
        assert r.status_code == 200, r.text
        zeros = r.json()
        assert zeros["rollout_logp"] == [0.0] * len(got["tokens"])
        assert {k: v for k, v in zeros.items() if k != "rollout_logp"} == {
            k: v for k, v in got.items() if k != "rollout_logp"}

        # the batch form takes it too
        r = await c.post("/retrieve_from_text", json={"texts": [prompt + out["text"], prompt], "return_logp": False})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert results[0]["tokens"] == got["tokens"] and all(lp == 0.0 for res in results for lp in res["rollout_logp"])


async def test_router_owned_bodies_ignore_unknown_fields(nursery):
    sim, router = await start_stack(nursery)
    extra = {"session_id": "s-1", "future_option": {"nested": [1, 2, {"x": None}]}, "rid": None}
    async with client(router) as c:
        r = await c.post("/retrieve_from_text", json={"text": "hello there", **extra})
        assert r.status_code == 200, r.text
        assert r.json()["response"] == "hello there"
        r = await c.post("/retrieve_from_text", json={"texts": ["a", "b"], "return_logp": True, **extra})
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        r = await c.post("/remove_worker", json={"url": sim.url, **extra})
        assert r.status_code == 200, r.text
        r = await c.post("/add_worker", json={"worker_url": sim.url, "worker_type": "regular", **extra})
        assert r.status_code == 200, r.text
        assert (await c.get("/list_workers")).json()["urls"] == [sim.url]
        # known fields are still checked: a wrong type is a 400 in the router's words
        r = await c.post("/retrieve_from_text", json={"text": "x", "return_logp": "yes"})
        assert r.status_code == 400
        assert r.json()["error"] == ("invalid /retrieve_from_text body: expected a boolean, got a string "
                                     "at $.return_logp")


async def test_session_samples_body_ignores_unknown_fields(nursery, tmp_path):
    from test_sessions_e2e import new_session, session_router

    router, _ = await session_router(nursery, tmp_path)
    async with client(router) as c:
        sid = await new_session(c)
        r = await c.post(f"/sessions/{sid}/samples", json={"max_seq_len": 64, "trainer_hint": {"x": [1]}})
        assert r.status_code == 200, r.text
        r = await c.post(f"/sessions/{sid}/samples", json={"max_seq_len": "64"})
        assert r.status_code == 400
        assert r.json()["error"] == "invalid samples body: expected an integer or null, got a string at $.max_seq_len"
