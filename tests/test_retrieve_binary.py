"""`/retrieve_from_text`'s safetensors form (issue 12, item 4) against a real router and simulated workers, over
sockets: it is the JSON form's answer, array for array and field for field; how it is asked for; its errors; the
JSON default unchanged; and `miles-router store export --format retrieve` writing the same layout."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import trio

from harness import client, start_router, start_sim, store_cli
from router.config import load_config
from router.net import endpoints
from router.tokenizer import load_tokenizer
from router.wire import retrieve as retrieve_wire
from router.wire.sglang import narrow_experts

ROOT = Path(__file__).resolve().parent.parent
ARRAYS = ("tokens", "loss_mask", "rollout_logp", "routed_experts")
DTYPES = {"tokens": np.int32, "loss_mask": np.uint8, "rollout_logp": np.float32}
BINARY = {"accept": "application/octet-stream"}


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer("builtin:qwen")


def chat(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def r3_pipeline(tmp_path: Path, layers: int) -> Path:
    """radix-cache-r3 with the model's layer count, so rows are SGLang's [T-1, layers, top_k]."""
    p = tmp_path / "r3.toml"
    p.write_text((ROOT / "pipelines/radix-cache-r3.toml").read_text().replace(
        "[options.capture]", f"[options.capture]\nrouted_experts_layers = {layers}"))
    return p


async def cache_router(nursery, tmp_path, *, r3=True, layers=3, top_k=2, store=None, sim=None, **sim_kw):
    sim = sim or await start_sim(nursery, tokenizer="builtin:qwen", num_layers=layers, top_k=top_k, **sim_kw)
    pipeline = r3_pipeline(tmp_path, layers) if r3 else ROOT / "pipelines/radix-cache.toml"
    router = await start_router(nursery, workers={"urls": [sim.url]}, tokenizer={"path": "builtin:qwen"},
                                routes=[{"path": "/generate", "pipeline": str(pipeline)}],
                                **({"store": {"enabled": True, "path": str(store)}} if store else {}))
    return router, sim


async def generate(c, text: str, n: int = 12) -> dict:
    r = await c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": n}})
    assert r.status_code == 200, r.text
    return r.json()


def unpack(blob: bytes, batch: bool) -> list[dict]:
    """The blob by the README's layout (read with the safetensors library, not the router's decoder):
    per answer its metadata with its arrays (routed_experts None where the blob has none)."""
    tensors = safetensors.numpy.load(blob)
    meta = json.loads(tensors.pop(retrieve_wire.META_KEY).tobytes())
    metas = meta["results"] if batch else [meta]
    sfx = [f".{i}" for i in range(len(metas))] if batch else [""]
    names = {n + s for n in ARRAYS for s in sfx}
    assert set(tensors) <= names, sorted(set(tensors) - names)
    return [{**m, **{n: tensors.get(n + s) for n in ARRAYS}} for m, s in zip(metas, sfx)]


def assert_same_answer(js: dict, bin_: dict) -> None:
    """A safetensors answer says what the JSON answer says: the same fields and the same arrays."""
    assert {k: v for k, v in bin_.items() if k not in ARRAYS} == {k: v for k, v in js.items() if k not in ARRAYS}
    for name, dtype in DTYPES.items():
        assert bin_[name].dtype == dtype and bin_[name].shape == (js["token_length"],), name
    assert bin_["tokens"].tolist() == js["tokens"] and bin_["loss_mask"].tolist() == js["loss_mask"]
    # JSON carries the float32 logprobs widened to float64: narrowing them back is exact
    assert np.array_equal(bin_["rollout_logp"], np.asarray(js["rollout_logp"], np.float64).astype(np.float32))
    if js["routed_experts"] is None:
        assert bin_["routed_experts"] is None and js["routed_experts_shape"] is None
    else:
        want = np.frombuffer(base64.b64decode(js["routed_experts"]), "<i4").reshape(js["routed_experts_shape"])
        got = bin_["routed_experts"]
        assert got is not None and got.dtype.kind in "ui" and got.shape == want.shape
        assert np.array_equal(got.astype(np.int32), want)


async def retrieve_both(c, body: dict, headers: dict | None = None) -> tuple[dict, list[dict]]:
    """(the JSON answer, the safetensors answers asked by header and by field), each checked to be one form."""
    batch = "texts" in body
    r = await c.post("/retrieve_from_text", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    js = r.json()
    blobs = []
    for req, hdr in ((body, BINARY), ({**body, "format": "safetensors"}, None)):
        b = await c.post("/retrieve_from_text", json=req, headers=hdr)
        assert b.status_code == 200 and b.headers["content-type"] == "application/octet-stream", b.text
        blobs.append(b.content)
    assert blobs[0] == blobs[1]  # header or field: the same reply
    answers = unpack(blobs[0], batch)
    decoded = retrieve_wire.decode(blobs[0])  # the router's own decoder reads its layout the same way
    for x, y in zip(decoded["results"] if batch else [decoded], answers, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert (np.array_equal(x[k], y[k]) and x[k].dtype == y[k].dtype) if k in ARRAYS and y[k] is not None \
                else x[k] == y[k], k
    return js, answers


# ---------------------------------------------------------------------------------------------------- same answer
async def test_safetensors_and_json_are_the_same_answer_with_routed_experts(nursery, tmp_path, qwen):
    router, sim = await cache_router(nursery, tmp_path)
    p1 = chat("route me")
    async with client(router) as c:
        o1 = await generate(c, p1)
        t1 = p1 + o1["text"]
        p2 = t1 + "<|im_end|>\n" + chat("again")
        o2 = await generate(c, p2)
        t2 = p2 + o2["text"]
        texts = {"trajectory": t1, "trajectory 2": t2, "prefix": p2, "partial": t1 + " extra words",
                 "none": "never seen before"}
        answers = {}
        for kind, text in texts.items():
            js, (bin_,) = await retrieve_both(c, {"text": text})
            assert_same_answer(js, bin_)
            answers[kind] = js
        batch_js, batch_bin = await retrieve_both(c, {"texts": list(texts.values())})
    assert [a["match"] for a in answers.values()] == ["trajectory", "trajectory", "prefix", "partial", "none"]
    # R3 rows where the JSON form has them (whole sequence known), none for a fresh tail
    assert [a["routed_experts"] is not None for a in answers.values()] == [True, True, True, False, False]
    assert answers["partial"]["fresh_tokens"] > 0 and answers["none"]["fresh_tokens"] == answers["none"]["token_length"]
    # the engine's rows, as SGLang's shape [T-1, layers, top_k]; 64 experts: stored and sent as uint8
    assert answers["trajectory"]["routed_experts"] == o1["meta_info"]["routed_experts"]
    assert answers["trajectory"]["routed_experts_shape"] == [answers["trajectory"]["token_length"] - 1, 3, 2]
    # the batch: one answer per text, suffix .i, each the same as alone
    assert len(batch_bin) == len(batch_js["results"]) == len(texts)
    for js, bin_, alone in zip(batch_js["results"], batch_bin, answers.values()):
        assert_same_answer(js, bin_)
        assert js == alone
    assert batch_bin[0]["routed_experts"].dtype == np.uint8


async def test_safetensors_and_json_are_the_same_answer_without_routed_experts(nursery, tmp_path, qwen):
    router, _ = await cache_router(nursery, tmp_path, r3=False)
    p = chat("no experts here")
    async with client(router) as c:
        o = await generate(c, p)
        texts = [p + o["text"], p + o["text"] + " and more", "unrelated"]
        for text in texts:
            js, (bin_,) = await retrieve_both(c, {"text": text})
            assert_same_answer(js, bin_)
            assert bin_["routed_experts"] is None
        batch_js, batch_bin = await retrieve_both(c, {"texts": texts})
        blob = (await c.post("/retrieve_from_text", json={"texts": texts}, headers=BINARY)).content
    for js, bin_ in zip(batch_js["results"], batch_bin):
        assert_same_answer(js, bin_)
    assert sorted(safetensors.numpy.load(blob)) == sorted(
        [retrieve_wire.META_KEY] + [f"{n}.{i}" for i in range(3) for n in ("tokens", "loss_mask", "rollout_logp")])


async def test_same_text_spellings_and_rids_in_safetensors(nursery, tmp_path, qwen):
    """Two spellings of one text: ambiguous alone, each exactly by rid, handed out once each in a batch."""
    router, _ = await cache_router(nursery, tmp_path, r3=False)
    text = chat("Say hello to the world.")
    cut = text.index("hello") + 3
    rids = []
    async with client(router) as c:
        for ids in (qwen.encode(text), qwen.encode(text[:cut]) + qwen.encode(text[cut:])):
            tok = (await c.post("/generate", json={"input_ids": ids, "sampling_params": {
                "max_new_tokens": 1, "temperature": 0}})).json()["output_ids"][0]
            out = (await c.post("/generate", json={"input_ids": ids, "return_logprob": True, "sampling_params": {
                "max_new_tokens": 8, "temperature": 0, "stop_token_ids": [tok]}})).json()
            rids.append(out["meta_info"]["id"])
        js, (amb,) = await retrieve_both(c, {"text": text})
        assert_same_answer(js, amb)
        assert amb["match"] == "ambiguous" and amb["alternatives"] == 2 and amb["rid"] is None
        for rid in rids:
            js, (one,) = await retrieve_both(c, {"text": text, "rid": rid})
            assert_same_answer(js, one)
            assert one["rid"] == rid and one["exact"] is True
        js, both = await retrieve_both(c, {"texts": [text, text]})
        assert [b["rid"] for b in both] == rids
        for j, b in zip(js["results"], both):
            assert_same_answer(j, b)


async def test_routed_experts_width_and_int32_on_request(nursery, tmp_path, qwen):
    """More than 256 experts: uint16 ids; `"routed_experts_dtype": "int32"` gives SGLang's int32 bytes."""
    router, _ = await cache_router(nursery, tmp_path, layers=2, top_k=4, num_experts=300)
    p = chat("wide experts")
    async with client(router) as c:
        o = await generate(c, p, n=20)
        text = p + o["text"]
        js, (narrow,) = await retrieve_both(c, {"text": text})
        r = await c.post("/retrieve_from_text", json={"text": text, "routed_experts_dtype": "int32"}, headers=BINARY)
        (wide,) = unpack(r.content, False)
        # the int32 request changes nothing in the JSON form
        r_js = await c.post("/retrieve_from_text", json={"text": text, "routed_experts_dtype": "int32"})
    assert_same_answer(js, narrow)
    assert_same_answer(js, wide)
    ids = np.frombuffer(base64.b64decode(o["meta_info"]["routed_experts"]), "<i4")
    assert ids.max() >= 256 and narrow["routed_experts"].dtype == np.uint16
    assert wide["routed_experts"].dtype == np.int32 and wide["routed_experts"].tobytes() == ids.tobytes()
    assert r_js.json() == js


async def test_return_logp_false_gives_zeros_in_both_forms(nursery, tmp_path, qwen):
    router, _ = await cache_router(nursery, tmp_path, r3=False)
    p = chat("zeros please")
    async with client(router) as c:
        o = await generate(c, p)
        js, (bin_,) = await retrieve_both(c, {"text": p + o["text"], "return_logp": False})
    assert_same_answer(js, bin_)
    assert not bin_["rollout_logp"].any() and bin_["rollout_logp"].dtype == np.float32
    assert bin_["loss_mask"].any()


async def test_a_large_reply_built_in_a_worker_thread_is_the_same_blob(nursery, tmp_path, qwen, monkeypatch):
    router, _ = await cache_router(nursery, tmp_path)
    built_in_threads = []
    run_sync = trio.to_thread.run_sync

    async def counting(fn, *args, **kw):
        if "_retrieve_binary" in getattr(fn, "__qualname__", ""):
            built_in_threads.append(fn)
        return await run_sync(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    p = chat("thread me")
    async with client(router) as c:
        o = await generate(c, p)
        bodies = [{"text": p + o["text"]}, {"texts": [p + o["text"], "other"]}]
        on_loop = [(await c.post("/retrieve_from_text", json=b, headers=BINARY)).content for b in bodies]
        assert built_in_threads == []  # small: built on the loop
        monkeypatch.setattr(endpoints, "_OFFLOAD_BINARY_BYTES", 0)
        threaded = []
        for b in bodies:
            with trio.fail_after(10):
                threaded.append((await c.post("/retrieve_from_text", json=b, headers=BINARY)).content)
    assert len(built_in_threads) == 2 and threaded == on_loop
    assert unpack(on_loop[0], False)[0]["routed_experts"] is not None


async def test_from_the_store_after_a_restart(nursery, tmp_path, qwen):
    """Rows read back from the durable store (narrow on disk) answer the same in both forms as before."""
    store = tmp_path / "store.db"
    sim = await start_sim(nursery, tokenizer="builtin:qwen", num_layers=3, top_k=2)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as n1:
            router, _ = await cache_router(n1, tmp_path, store=store, sim=sim)
            async with client(router) as c:
                p = chat("remember me")
                o = await generate(c, p)
                text = p + o["text"]
                before, _ = await retrieve_both(c, {"text": text})
            scope.cancel()
    async with trio.open_nursery() as n2:
        router, _ = await cache_router(n2, tmp_path, store=store, sim=sim)
        async with client(router) as c:
            assert router.runtime.trajectories.tree.stats()["trajectories"] == 0  # answered from disk, not from memory
            blob = (await c.post("/retrieve_from_text", json={"text": text}, headers=BINARY)).content
            after, _ = await retrieve_both(c, {"text": text})
        n2.cancel_scope.cancel()
    assert after == before and before["exact"] and before["routed_experts"] is not None
    (bin_,) = unpack(blob, False)
    assert_same_answer(before, bin_)


# ------------------------------------------------------------------------------------------------- how it is asked
async def test_accept_header_and_format_field(nursery, tmp_path, qwen):
    router, _ = await cache_router(nursery, tmp_path, r3=False)
    p = chat("negotiate")
    async with client(router) as c:
        text = p + (await generate(c, p))["text"]

        async def kind(headers=None, **fields):
            r = await c.post("/retrieve_from_text", json={"text": text, **fields}, headers=headers)
            assert r.status_code == 200, r.text
            return r.headers["content-type"]

        js, st = "application/json", "application/octet-stream"
        assert await kind() == js
        assert await kind({"accept": "*/*"}) == js
        assert await kind({"accept": "application/json"}) == js
        assert await kind({"accept": "application/octet-stream"}) == st
        assert await kind({"accept": "Application/Octet-Stream; q=0.9"}) == st
        assert await kind({"accept": "application/json;q=0.5, application/octet-stream"}) == st
        assert await kind({"accept": "application/octet-stream;q=0.5, application/json"}) == js
        assert await kind({"accept": "application/octet-stream;q=0"}) == js
        assert await kind({"accept": "application/octet-stream, application/json"}) == st  # equal q: the first
        assert await kind({"accept": "application/json, application/octet-stream"}) == js
        # the body's field wins over the header, both ways
        assert await kind({"accept": "application/octet-stream"}, format="json") == js
        assert await kind({"accept": "application/json"}, format="safetensors") == st
        assert await kind(format=None) == js
        # unknown fields stay ignored in the binary form too
        assert await kind(format="safetensors", formats=["x"], extra={"a": 1}) == st


async def test_errors_stay_json_and_name_the_field(nursery, tmp_path, qwen):
    router, _ = await cache_router(nursery, tmp_path, r3=False)
    async with client(router) as c:
        async def error(body, status=400, headers=BINARY):
            r = await c.post("/retrieve_from_text", json=body, headers=headers)
            assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
            return r.json()["error"]

        assert await error({"text": "x", "format": "xml"}, headers=None) == (
            "invalid /retrieve_from_text body: invalid value 'xml' at $.format (allowed: \"json\", \"safetensors\")")
        assert await error({"text": "x", "format": "SAFETENSORS"}) == (
            "invalid /retrieve_from_text body: invalid value 'SAFETENSORS' at $.format "
            "(allowed: \"json\", \"safetensors\")")
        assert await error({"text": "x", "format": 1}) == (
            "invalid /retrieve_from_text body: expected a string or null, got an integer at $.format "
            "(allowed: \"json\", \"safetensors\")")
        assert await error({"text": "x", "routed_experts_dtype": "uint8"}) == (
            "invalid /retrieve_from_text body: invalid value 'uint8' at $.routed_experts_dtype "
            "(allowed: \"narrow\", \"int32\")")
        # errors that are not about the format are the same as for JSON, as JSON
        assert await error({"texts": ["a"], "rid": "r"}) == (
            '"rid" goes with "text"; use "rids" (one per text) with "texts"')
        assert await error({"text": "x", "rid": "no-such-rid", "format": "safetensors"}, status=404) == (
            "no cached trajectory with rid 'no-such-rid' has this text")
        assert await error({"text": "x", "return_logp": "yes", "format": "safetensors"}) == (
            "invalid /retrieve_from_text body: expected a boolean, got a string at $.return_logp")


async def test_json_default_is_unchanged(nursery, tmp_path, qwen):
    """Without asking for the binary form the reply is the JSON it always was: these keys in this order,
    compact, the same bytes whatever else the request says about formats."""
    router, _ = await cache_router(nursery, tmp_path)
    p = chat("plain json")
    async with client(router) as c:
        o = await generate(c, p)
        text = p + o["text"]
        replies = []
        for body, headers in (({"text": text}, None), ({"text": text, "format": "json"}, None),
                              ({"text": text}, {"accept": "*/*"}), ({"text": text}, {"accept": "application/json"}),
                              ({"text": text, "format": "json", "routed_experts_dtype": "int32"}, BINARY)):
            r = await c.post("/retrieve_from_text", json=body, headers=headers)
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            replies.append(r.content)
    assert len(set(replies)) == 1
    prompt_ids = qwen.encode(p)
    out = o["output_ids"]
    lps = [t[0] for t in o["meta_info"]["output_token_logprobs"]]
    T = len(prompt_ids) + len(out)
    want = {"response": text, "tokens": prompt_ids + out, "loss_mask": [0] * len(prompt_ids) + [1] * len(out),
            "rollout_logp": [0.0] * len(prompt_ids) + [float(np.float32(x)) for x in lps],
            "token_length": T, "loss_mask_length": T, "exact": True, "match": "trajectory",
            "matched_chars": len(text), "text_chars": len(text), "fresh_tokens": 0, "weight_version": "default",
            "weight_versions": ["default"], "routed_experts": o["meta_info"]["routed_experts"],
            "routed_experts_shape": [T - 1, 3, 2], "rid": o["meta_info"]["id"], "alternatives": 1}
    assert replies[0] == json.dumps(want, separators=(",", ":"), ensure_ascii=False).encode()


# ------------------------------------------------------------------------------------------------------- export
async def test_store_export_retrieve_layout_is_the_retrieve_answer(nursery, tmp_path, qwen):
    """`store export --format retrieve` writes, per stored trajectory, what a safetensors batch retrieve of its
    text answers (the arrays and the retrieve fields), plus what the store knows of the generation."""
    cfg_path = tmp_path / "router.toml"
    cfg_path.write_text(f"""
[tokenizer]
path = "builtin:qwen"
[server]
port = 0
[store]
path = "trajectories.db"
[[routes]]
path = "/generate"
pipeline = "{r3_pipeline(tmp_path, 3)}"
""")
    cfg = load_config(cfg_path)
    cfg.workers.health_interval_s = 0.1
    sim = await start_sim(nursery, tokenizer="builtin:qwen", num_layers=3, top_k=2)
    cfg.workers.urls = [sim.url]
    texts, outs = [], []
    async with trio.open_nursery() as n:
        router = await start_router(n, cfg)
        async with client(router) as c:
            for i in range(3):
                p = chat(f"question {i}: count to {i + 2}")
                o = await generate(c, p, n=8 + 3 * i)
                texts.append(p + o["text"])
                outs.append(o)
            # a second turn: its record carries the first turn's generated tokens in its loss mask
            p = texts[0] + "<|im_end|>\n" + chat("and then?")
            o = await generate(c, p)
            texts.append(p + o["text"])
            outs.append(o)
            r = await c.post("/retrieve_from_text", json={"texts": texts}, headers=BINARY)
            retrieved = {a["rid"]: a for a in unpack(r.content, True)}
        n.cancel_scope.cancel()

    out_file = tmp_path / "export.safetensors"
    r = store_cli("export", "--config", str(cfg_path), "--out", str(out_file), "--all", "--format", "retrieve")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exported"] == 4 and json.loads(r.stdout)["format"] == "retrieve"
    exported = unpack(out_file.read_bytes(), True)
    assert sorted(e["rid"] for e in exported) == sorted(retrieved) == sorted(o["meta_info"]["id"] for o in outs)
    by_rid = {o["meta_info"]["id"]: o for o in outs}
    for e in exported:
        want = retrieved[e["rid"]]
        for name in ARRAYS:
            assert e[name].dtype == want[name].dtype and np.array_equal(e[name], want[name]), name
        for key in ("token_length", "loss_mask_length", "exact", "match", "fresh_tokens", "weight_version",
                    "weight_versions", "routed_experts_shape", "rid", "alternatives"):
            assert e[key] == want[key], key
        assert e["exact"] is True and e["match"] == "trajectory"
        o = by_rid[e["rid"]]
        assert e["finish"] == o["meta_info"]["finish_reason"]["type"]
        assert e["prompt_len"] == e["token_length"] - len(o["output_ids"]) and e["worker"] == sim.url
        assert e["response"] == qwen.text_bytes(e["tokens"]).decode("utf-8", "replace")
    assert any(0 < e["loss_mask"].argmax() and 0 in e["loss_mask"][e["loss_mask"].argmax():] for e in exported)

    # an empty export (nothing unretrieved: everything was just retrieved) still has its metadata
    r = store_cli("export", "--config", str(cfg_path), "--out", str(out_file), "--format", "retrieve")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exported"] == 0
    assert unpack(out_file.read_bytes(), True) == []


def test_routed_experts_narrowing_keeps_every_id():
    """Whatever integer width the cache or the store holds the rows in, the blob's width holds every id."""
    cases = [(np.array([0, 255], np.int32), np.uint8), (np.array([0, 256], np.int32), np.uint16),
             (np.array([65535], np.int32), np.uint16), (np.array([65536], np.int32), np.int32),
             (np.array([-1, 3], np.int32), np.int32), (np.array([7, 300], np.uint16), np.uint16),
             (np.array([9], np.uint8), np.uint8), (np.array([-2], np.int16), np.int32),
             (np.array([1, 2], ">i4"), np.uint8), (np.array([40000], np.int64), np.uint16),
             (np.zeros((0, 2, 2), np.int32), np.uint8)]
    for ids, dtype in cases:
        got = narrow_experts(ids)
        assert got.dtype == dtype and got.shape == ids.shape and got.tolist() == ids.tolist(), (ids, got)
        wide = retrieve_wire.experts_tensor(ids, "int32")
        assert wide.dtype == np.dtype("<i4") and wide.tolist() == ids.tolist()
