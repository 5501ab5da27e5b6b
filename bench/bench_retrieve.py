"""`/retrieve_from_text` as JSON vs safetensors: router CPU, bytes on the wire, client decode time.

    python bench/bench_retrieve.py                  # a 32k-token trajectory, R3 rows of 48 layers x top-8, 10 reps
    python bench/bench_retrieve.py --reps 3         # quicker
    python bench/bench_retrieve.py --tokens 8192 --layers 0     # no routed experts

The trajectory is made the way a rollout makes one: an in-process router (radix-cache-r3 pipeline, capture with
`routed_experts_layers`, store off) in front of an in-process simulated SGLang worker (builtin Qwen tokenizer,
`--experts` experts per layer) gets `/generate {"text": P}` with a prompt of random words and `ignore_eos`, so
prompt + output = `--tokens` tokens; the sim returns routed experts for the whole sequence and the router caches
them. Then the same text is retrieved in three forms: JSON (the default), safetensors (routed experts at the
narrowest width that holds the ids: uint8 for <= 256 experts) and safetensors with `"routed_experts_dtype":
"int32"` (SGLang's dtype).

- router CPU: `time.process_time` (the whole process: worker threads count, e.g. the JSON form's offloaded build)
  around the router's own `/retrieve_from_text` handler, called in-process with the request's bytes and headers,
  without the HTTP server. Median of `--reps`. `lookup` is the part both forms share (the cache walk and gather,
  timed alone); `reply` = handler - lookup is the form's own cost.
- bytes on the wire: one real HTTP request per form over loopback; the reply's status line, headers and body.
- client decode: bytes -> numpy arrays (tokens, loss mask, logprobs, routed experts) + metadata. JSON with
  msgspec and with the standard library's json, then np.asarray / base64 + np.frombuffer; safetensors with
  safetensors.numpy.load (and, as a separate line, widening narrow experts to int32).
Every form's arrays are checked equal to the JSON form's before anything is printed.
Targets (issue 12): binary router CPU >= 10x less than JSON, >= 3x fewer bytes on the wire.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import msgspec
import numpy as np
import safetensors.numpy
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from router.config import Config  # noqa: E402
from router.net import endpoints  # noqa: E402
from router.net.server import run_router  # noqa: E402
from router.sim import SimOptions, serve_sim_worker  # noqa: E402
from router.tokenizer import load_tokenizer  # noqa: E402
from router.wire import retrieve as retrieve_wire  # noqa: E402

WORDS = ("the of and to in is that for it as was with be by on not this are or from at which but have an they you "
         "were her she there been one all we their has would when if so no will can more other what time about up "
         "out some into only its could new them model token reward policy value gradient sample rollout train "
         "batch update learning function return number answer question problem step solve compute").split()

FORMS = {"json": {}, "safetensors": {"format": "safetensors"},
         "safetensors int32": {"format": "safetensors", "routed_experts_dtype": "int32"}}


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32768, help="prompt + output tokens of the trajectory")
    p.add_argument("--output", type=int, default=1024, help="generated tokens (the rest is prompt)")
    p.add_argument("--layers", type=int, default=48, help="MoE layers (0: no routed experts)")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=128, help="experts per layer (> 256: uint16 ids)")
    p.add_argument("--reps", type=int, default=10, help="timed calls per figure (the median; at least 3)")
    return p.parse_args()


def _prompt(tok, n: int, seed: int = 0) -> str:
    """Random words of about `n` tokens (trimmed to n by re-tokenizing)."""
    rng = np.random.default_rng(seed)
    text = " ".join(rng.choice(WORDS, size=n + 16))
    ids = tok.encode(text)
    while len(ids) > n:
        text = text[: int(len(text) * n / len(ids)) - 1].rstrip()
        ids = tok.encode(text)
    return text


def _config(pipeline: Path, sim_url: str) -> Config:
    return msgspec.convert({
        "server": {"port": 0, "max_body_bytes": 1 << 30},
        "workers": {"urls": [sim_url], "health_interval_s": 60.0},
        "tokenizer": {"path": "builtin:qwen"},
        "store": {"enabled": False},
        "cache": {"budget_bytes": 8 << 30, "hard_budget_bytes": 16 << 30},
        "routes": [{"path": "/generate", "pipeline": str(pipeline)}],
    }, Config)


async def _acpu(fn, reps: int) -> tuple[float, object]:
    """(median process CPU seconds of one `await fn()`, its last result)."""
    times, out = [], await fn()  # a warm-up call, not counted
    for _ in range(reps):
        gc.collect()
        t0 = time.process_time()
        out = await fn()
        times.append(time.process_time() - t0)
    return statistics.median(times), out


def _decode_json(body: bytes, loads) -> dict:
    d = loads(body)
    d["tokens"] = np.asarray(d["tokens"], np.int32)
    d["loss_mask"] = np.asarray(d["loss_mask"], np.uint8)
    d["rollout_logp"] = np.asarray(d["rollout_logp"], np.float32)
    if d["routed_experts"] is not None:
        d["routed_experts"] = np.frombuffer(base64.b64decode(d["routed_experts"]), "<i4").reshape(
            d["routed_experts_shape"])
    return d


def _decode_st(body: bytes, widen: bool = False) -> dict:
    t = safetensors.numpy.load(body)
    d = json.loads(t.pop(retrieve_wire.META_KEY).tobytes())
    d.update(t)
    if widen and "routed_experts" in d:
        d["routed_experts"] = d["routed_experts"].astype(np.int32)
    return d


def _median(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def _wire_bytes(r: httpx.Response) -> int:
    head = len(f"HTTP/1.1 {r.status_code} {r.reason_phrase}\r\n")
    head += sum(len(k) + len(v) + 4 for k, v in r.headers.raw) + 2
    return head + len(r.content)


async def _main(a) -> None:
    tok = load_tokenizer("builtin:qwen")
    r3 = a.layers > 0
    sim_opts = SimOptions(tokenizer="builtin:qwen", seed=1, num_layers=max(a.layers, 1), top_k=a.topk,
                          num_experts=a.experts, enable_routed_experts=r3, context_length=max(131072, 2 * a.tokens))
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Path(tmp) / "r3.toml"
        base = (ROOT / ("pipelines/radix-cache-r3.toml" if r3 else "pipelines/radix-cache.toml")).read_text()
        pipeline.write_text(base.replace("[options.capture]", f"[options.capture]\nrouted_experts_layers = {a.layers}")
                            if r3 else base)
        async with trio.open_nursery() as n:
            sim_url, _ = await n.start(partial(serve_sim_worker, sim_opts, "127.0.0.1", 0))
            router = await n.start(partial(run_router, _config(pipeline, sim_url), install_signals=False))
            prompt = _prompt(tok, a.tokens - a.output)
            async with httpx.AsyncClient(base_url=router.url, trust_env=False, timeout=300) as c:
                r = await c.post("/generate", json={"text": prompt, "sampling_params": {
                    "max_new_tokens": a.output, "ignore_eos": True, "temperature": 1.0}})
                r.raise_for_status()
                text = prompt + r.json()["text"]
                wire = {}
                for form, extra in FORMS.items():
                    wire[form] = await c.post("/retrieve_from_text", json={"text": text, **extra})
                    wire[form].raise_for_status()
            runtime = router.runtime
            handler = endpoints._retrieve_handler(runtime)
            cpu, replies = {}, {}
            lookup, _ = await _acpu(lambda: endpoints._lookup_all(runtime, [text], [None]), a.reps)
            for form, extra in FORMS.items():
                body = msgspec.json.encode({"text": text, **extra})
                scope = {"headers": [(b"content-type", b"application/json")]}
                cpu[form], reply = await _acpu(partial(handler, scope, body), a.reps)
                replies[form] = reply.body
            n.cancel_scope.cancel()

    want = _decode_json(replies["json"], msgspec.json.decode)
    assert want["exact"] and want["match"] == "trajectory", (want["match"], want["token_length"])
    for form in FORMS:
        assert wire[form].content == replies[form], form  # what went over the socket is what the handler built
        got = want if form == "json" else _decode_st(replies[form])
        for k in ("tokens", "loss_mask", "rollout_logp", "routed_experts"):
            w, g = want.get(k), got.get(k)
            assert (w is None) == (g is None) and (w is None or np.array_equal(w, g)), (form, k)
    T = int(want["token_length"])
    experts = f"{a.layers} layers x top-{a.topk} of {a.experts} experts" if r3 else "no routed experts"
    print(f"# /retrieve_from_text, one trajectory of {T} tokens ({T - a.output} prompt + {a.output} generated), "
          f"{experts}; median of {a.reps}")
    st = replies["safetensors"]
    dec = [  # (form, how, seconds)
        ("json", "msgspec", _median(lambda: _decode_json(replies["json"], msgspec.json.decode), a.reps)),
        ("json", "json (stdlib)", _median(lambda: _decode_json(replies["json"], json.loads), a.reps)),
        ("safetensors", "safetensors.numpy.load", _median(lambda: _decode_st(st), a.reps)),
        ("safetensors", "  + experts to int32", _median(lambda: _decode_st(st, True), a.reps)),
        ("safetensors int32", "safetensors.numpy.load",
         _median(lambda: _decode_st(replies["safetensors int32"]), a.reps)),
    ]
    dec_first = {}
    for form, _, t in dec:
        dec_first.setdefault(form, t)
    print(f"\n{'form':<18} {'router CPU ms':>13} {'lookup ms':>9} {'reply ms':>9} {'body bytes':>12} "
          f"{'wire bytes':>12} {'experts dtype':>13}")
    for form in FORMS:
        d = _decode_st(replies[form]) if form != "json" else None
        dtype = (str(d["routed_experts"].dtype) if d and "routed_experts" in d else
                 ("int32 (base64)" if want["routed_experts"] is not None else "-") if not d else "-")
        print(f"{form:<18} {cpu[form] * 1e3:>13.2f} {lookup * 1e3:>9.2f} {(cpu[form] - lookup) * 1e3:>9.2f} "
              f"{len(replies[form]):>12,} {_wire_bytes(wire[form]):>12,} {dtype:>13}")
    print(f"\n{'client decode':<18} {'ms':>9}  (bytes -> numpy arrays + metadata)")
    for form, how, t in dec:
        print(f"{form:<18} {t * 1e3:>9.2f}  {how}")
    print("\nratios (JSON / form), same run:")
    for form in ("safetensors", "safetensors int32"):
        cpu_x = cpu["json"] / cpu[form]
        reply = cpu[form] - lookup
        reply_x = f"{(cpu['json'] - lookup) / reply:5.1f}x" if reply > 0 else "  n/a"  # (noise at few reps)
        bytes_x = _wire_bytes(wire["json"]) / _wire_bytes(wire[form])
        dec_x = dec_first["json"] / dec_first[form]
        print(f"  {form:<18} router CPU {cpu_x:5.1f}x (reply part {reply_x})  wire bytes {bytes_x:4.2f}x  "
              f"client decode {dec_x:5.1f}x (msgspec)")
    if (a.tokens, a.layers, a.topk) != (32768, 48, 8):
        return  # the targets are defined for the default workload only
    cpu_x = cpu["json"] / cpu["safetensors"]
    bytes_x = _wire_bytes(wire["json"]) / _wire_bytes(wire["safetensors"])
    met = {True: "MET", False: "NOT MET"}
    print(f"\ntargets (issue 12, the safetensors form): router CPU >= 10x less: {cpu_x:.1f}x {met[cpu_x >= 10]}; "
          f">= 3x fewer bytes: {bytes_x:.2f}x {met[bytes_x >= 3]}")


def main() -> None:
    a = _args()
    a.reps = max(a.reps, 3)  # a median of fewer is one outlier away from nonsense
    trio.run(_main, a)


if __name__ == "__main__":
    main()
