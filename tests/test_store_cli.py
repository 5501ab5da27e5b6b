"""`miles-router store stats|export|vacuum --config FILE` on a store a real router wrote."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import trio
from safetensors.numpy import load_file

import miles_wire
from harness import client, start_router, start_sim, store_cli
from router.config import load_config
from router.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


async def test_stats_export_vacuum(nursery, tmp_path, store_at):
    if store_at.kind == "sqlite":
        store_at.where = "trajectories.db"  # relative: next to the config file
    pipeline = tmp_path / "r3.toml"
    pipeline.write_text((ROOT / "pipelines/radix-cache-r3.toml").read_text() + "routed_experts_layers = 3\n")
    cfg_path = tmp_path / "router.toml"
    cfg_path.write_text(f"""
[tokenizer]
path = "builtin:tiny"
[server]
port = 0
[store]
{store_at.toml()}
max_bytes = 1
[[routes]]
path = "/generate"
pipeline = "{pipeline}"
""")
    cfg = load_config(cfg_path)
    cfg.workers.health_interval_s = 0.1
    cfg.cache.cleanup_interval_s = 3600  # no retention pass while the router runs: the CLI applies it below
    sim = await start_sim(nursery, seed=2, num_layers=3, top_k=2)
    cfg.workers.urls = [sim.url]
    replies = []
    async with trio.open_nursery() as n:
        router = await start_router(n, cfg)
        async with client(router) as c:
            for i in range(6):
                text = f"<{i}> tell me about {i * 13}"
                r = await c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": 10 + i},
                                                    "return_logprob": True})
                replies.append((text, r.json()))
            for text, out in replies[:2]:  # retrieved: not exported by default
                assert (await c.post("/retrieve_from_text", json={"text": text + out["text"]})).json()["exact"]
            sid = (await c.post("/sessions")).json()["session_id"]  # one session with one turn, in the same store
            r = await c.post(f"/sessions/{sid}/v1/chat/completions",
                             json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
            assert r.status_code == 200, r.text
        n.cancel_scope.cancel()

    r = store_cli("stats", "--config", str(cfg_path))
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["rows"] == 6 and stats["unretrieved"] == 4 and stats["writable"] is True
    shown = str(tmp_path / "trajectories.db") if store_at.kind == "sqlite" else store_at.shown
    assert stats["tokens"] > 0 and stats["path"] == shown
    assert stats["sessions"] == 1 and stats["session_turns"] == 1
    assert stats["file_bytes"] >= stats["payload_bytes"] > 0

    out_file = tmp_path / "export.safetensors"
    r = store_cli("export", "--config", str(cfg_path), "--out", str(out_file))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exported"] == 4
    tensors = load_file(str(out_file))
    meta = json.loads(tensors["_samples_meta"].tobytes())
    assert meta["empty_reason"] is None and len(meta["samples"]) == 4
    assert len(miles_wire.decode(out_file.read_bytes()).samples) == 4  # what miles' decoder accepts
    tiny = load_tokenizer("builtin:tiny")
    for i, (text, out) in enumerate(replies[2:]):
        O = out["output_ids"]
        P = tiny.encode(text)
        assert tensors[f"tokens.{i}"].dtype == np.int64 and tensors[f"tokens.{i}"].tolist() == P + O
        assert tensors[f"loss_mask.{i}"].dtype == np.uint8 and tensors[f"loss_mask.{i}"].tolist() == [1] * len(O)
        lp = tensors[f"rollout_log_probs.{i}"]
        assert lp.dtype == np.float64
        assert np.array_equal(lp.astype(np.float32),
                              np.asarray([t[0] for t in out["meta_info"]["output_token_logprobs"]], np.float32))
        experts = tensors[f"rollout_routed_experts.{i}"]
        assert experts.dtype == np.int32 and experts.shape == (len(P) + len(O) - 1, 3, 2)
        assert experts.tobytes() == base64.b64decode(out["meta_info"]["routed_experts"])
        s = meta["samples"][i]
        assert s["response_length"] == len(O) and s["metadata"]["prompt_tokens"] == len(P)
        assert s["status"] == {"stop": "completed", "length": "truncated"}[out["meta_info"]["finish_reason"]["type"]]
        assert s["nulls"] == ["rollout_indexer_topk"] and s["prefix_cache_info"]["total_prompt_tokens"] == len(P)
        assert s["response"] == tiny.text_bytes(np.asarray(O, np.int32)).decode("utf-8", "replace")

    r = store_cli("export", "--config", str(cfg_path), "--out", str(out_file), "--all")
    assert json.loads(r.stdout)["exported"] == 6

    # vacuum applies retention (max_bytes = 1: everything goes, retrieved first, the rest counted) and VACUUMs
    r = store_cli("vacuum", "--config", str(cfg_path))
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["deleted"] == 6 and v["deleted_unretrieved"] == 4
    assert json.loads(store_cli("stats", "--config", str(cfg_path)).stdout)["rows"] == 0

    if store_at.kind != "sqlite":
        return
    missing = tmp_path / "other.toml"
    missing.write_text(cfg_path.read_text().replace("trajectories.db", "nothing-here.db"))
    r = store_cli("stats", "--config", str(missing))
    assert r.returncode == 2 and r.stderr.strip() == f"miles-router: trajectory store {tmp_path / 'nothing-here.db'}: does not exist"
