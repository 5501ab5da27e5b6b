"""Session chat turns: router CPU per turn vs history length, with and without routed experts (R3).

    python bench/bench_sessions.py              # histories of 1k, 8k, 32k tokens; R3 off / 48x8 full / 48x8 start_len
    python bench/bench_sessions.py --quick      # fewer repetitions
    python bench/bench_sessions.py --sizes 1000 8000 --reps 50

What one "turn" is: the whole router-side work of `POST /sessions/{id}/v1/chat/completions` minus
the HTTP server and the upstream socket: the session pipeline's stages exactly as the router runs
them (session_request -> chat_template -> session_generate -> [worker] -> chat_parse ->
session_reply), on the client's full request bytes and a worker reply of 100 generated tokens
prepared up front (SGLang-shaped, `output_token_logprobs`, and `routed_experts` base64 when R3 is
on). The agent appends one tool result (~40 tokens) to a history of N tokens built by real turns.
Each measured turn attaches to the same parent (siblings), so N stays fixed. One thread, one core:
`time.process_time` around each turn; turns/s = 1 / mean.

"wire" is the work no implementation can skip, timed alone on the same inputs: decoding the
client's message list (msgspec, the request Struct), writing `input_ids` for the worker (the
router joins per-turn JSON pieces encoded once per turn), and reading the worker's reply (one
msgspec pass over its bytes, which with R3 and no `routed_experts_start_len` hold the whole
sequence's rows, tens of MB at 32k). "rest" = turn - wire. Of the routed experts the router
base64-decodes only the rows of the turn's new positions.
Targets (issue 10): rest does not grow with N; a turn at 32k <= 2x a turn at 1k (R3 off);
<= 3 ms per turn at 8k (R3 off).
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from router.core.pipeline import Exchange  # noqa: E402
from router.core.sessions.registry import SessionRegistry  # noqa: E402
from router.stages.chat_parse import ChatParse  # noqa: E402
from router.stages.chat_template import ChatTemplate  # noqa: E402
from router.stages.session_generate import Options as GenerateOptions  # noqa: E402
from router.stages.session_generate import SessionGenerate  # noqa: E402
from router.stages.session_reply import SessionReply  # noqa: E402
from router.stages.session_request import Options as RequestOptions  # noqa: E402
from router.stages.session_request import SessionRequest  # noqa: E402
from router.tokenizer import load_tokenizer  # noqa: E402
from router.wire.openai import chat_request_decoder  # noqa: E402

LAYERS, TOPK = 48, 8
WORDS = ("the model reads a file then calls a tool and checks the result before it answers with a short summary of "
         "what it found in the repository including tests benchmarks and docs").split()
TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "read a file",
                                          "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]


def words(n: int, salt: int) -> str:
    return " ".join(WORDS[(i * 7 + salt) % len(WORDS)] for i in range(n))


class Bench:
    def __init__(self, tok, r3: str) -> None:
        self.tok = tok
        self.r3 = r3  # "off" | "full" | "start_len"
        self.reg = SessionRegistry()
        svc = SimpleNamespace(tokenizer=tok, sessions=self.reg)
        gen = GenerateOptions(routed_experts=r3 != "off", routed_experts_layers=LAYERS if r3 != "off" else 0,
                              routed_experts_topk=TOPK if r3 != "off" else 0,
                              routed_experts_start_len=r3 == "start_len")
        self.req = [SessionRequest(RequestOptions(), svc), ChatTemplate(None, svc), SessionGenerate(gen, svc)]
        self.resp = [ChatParse(None, svc), SessionReply(None, svc)]
        self.session = self.reg.create(0.0)
        self.rng = np.random.default_rng(0)

    def worker_reply(self, upstream: bytes, text: str, rows: bool = True) -> bytes:
        """An SGLang-shaped /generate reply: `text` + <|im_end|>, logprobs, routed experts if asked."""
        req = msgspec.json.decode(upstream)
        n_in = len(req["input_ids"])
        out = self.tok.encode(text) + [self.tok.eos_token_id]
        meta = {"id": "r", "finish_reason": {"type": "stop", "matched": self.tok.eos_token_id},
                "prompt_tokens": n_in, "weight_version": "w",
                "output_token_logprobs": [[-0.25, t, None] for t in out], "completion_tokens": len(out)}
        if req.get("return_routed_experts") and rows:
            rows = n_in + len(out) - 1 - req.get("routed_experts_start_len", 0)
            meta["routed_experts"] = base64.b64encode(
                self.rng.integers(0, 128, (rows, LAYERS, TOPK), dtype=np.int32).tobytes()).decode()
        return msgspec.json.encode({"text": self.tok.decode(out[:-1], skip_special_tokens=False),
                                    "output_ids": out, "meta_info": meta})

    def run_requests(self, body: bytes) -> Exchange:
        ex = Exchange("POST", "/sessions/x/v1/chat/completions", b"", [], body)
        ex.scratch["session"] = self.session
        for s in self.req:
            _run(s.on_request(ex))
        return ex

    def run_responses(self, ex: Exchange, reply: bytes) -> bytes:
        ex.status, ex.response_body = 200, reply
        ex.scratch["client_headers"] = []
        for s in self.resp:
            _run(s.on_response(ex))
        return ex.response_body

    def turn(self, messages: list, reply_text: str) -> dict:
        """A history turn: the worker returns no routed experts (only the measured turn's reply has them)."""
        body = msgspec.json.encode({"model": "m", "messages": messages, "tools": TOOLS, "max_tokens": 4096})
        ex = self.run_requests(body)
        reply = self.worker_reply(ex.upstream_body, reply_text, rows=False)
        out = self.run_responses(ex, reply)
        return msgspec.json.decode(out)["choices"][0]["message"]


def _run(coro):
    """Drive a stage coroutine that never blocks (all inputs are in memory) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("stage awaited something")


def build_history(b: Bench, target_tokens: int) -> list:
    messages = [{"role": "system", "content": "You are a coding agent. " + words(60, 1)},
                {"role": "user", "content": "Summarize the repository. " + words(40, 2)}]
    i = 0
    while b.session.tree.path_length(len(b.session.tree.turns) - 1) < target_tokens:
        call = {"name": "read_file", "arguments": {"path": f"src/file_{i}.py"}}
        text = words(380, i) + "\n<tool_call>\n" + json.dumps(call) + "\n</tool_call>"
        msg = b.turn(messages, text)
        messages.append({k: v for k, v in msg.items() if v is not None})
        messages.append({"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": words(60, i + 3)})
        i += 1
    messages.pop()  # the measured turn appends the last tool result again
    return messages


def measure(tok, size: int, r3: str, reps: int) -> dict:
    b = Bench(tok, r3)
    messages = build_history(b, size)
    final = messages + [{"role": "tool", "tool_call_id": "call_x", "content": words(30, 99)}]
    parent_len = b.session.tree.path_length(len(b.session.tree.turns) - 1)
    body = msgspec.json.encode({"model": "m", "messages": final, "tools": TOOLS, "max_tokens": 4096})
    ex = b.run_requests(body)
    reply = b.worker_reply(ex.upstream_body, words(90, 5))  # ~100 generated tokens
    n_in = len(msgspec.json.decode(ex.upstream_body)["input_ids"])
    b.session.tree.check_room = lambda: None  # reps siblings may exceed the default turn cap
    b.session.tree.max_turns = 10**9
    turn_s, wire_s = [], []
    tree = b.session.tree
    parent = len(tree.turns) - 1
    reply_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
    gc.collect()
    for _ in range(reps):
        t0 = time.process_time()
        ex = b.run_requests(body)
        b.run_responses(ex, reply)
        t1 = time.process_time()
        chat_request_decoder.decode(body)
        b",".join(tree.path_ids_json(parent))
        reply_decoder.decode(reply)
        t2 = time.process_time()
        turn_s.append(t1 - t0)
        wire_s.append(t2 - t1)
    turn = statistics.median(turn_s) * 1e3
    wire = statistics.median(wire_s) * 1e3
    return {"size": parent_len, "r3": r3, "turn_ms": turn, "wire_ms": wire, "rest_ms": turn - wire,
            "turns_per_s": 1.0 / statistics.mean(turn_s), "body_kb": len(body) / 1024,
            "reply_kb": len(reply) / 1024, "input_ids": n_in}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000, 32000])
    ap.add_argument("--r3", nargs="+", default=["off", "full", "start_len"], choices=["off", "full", "start_len"])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = 10 if args.quick else args.reps
    tok = load_tokenizer("builtin:qwen")
    print(f"# bench_sessions: tokenizer builtin:qwen, R3 rows {LAYERS}x{TOPK} int32, {reps} turns per point, "
          f"median process CPU per turn")
    print(f"{'history':>8} {'R3':>9} {'input_ids':>9} {'body KiB':>9} {'reply KiB':>10} {'turn ms':>8} "
          f"{'wire ms':>8} {'rest ms':>8} {'turns/s':>8}")
    results = []
    for r3 in args.r3:
        for size in args.sizes:
            r = measure(tok, size, r3, reps)
            results.append(r)
            print(f"{r['size']:>8} {r3:>9} {r['input_ids']:>9} {r['body_kb']:>9.1f} {r['reply_kb']:>10.1f} "
                  f"{r['turn_ms']:>8.3f} {r['wire_ms']:>8.3f} {r['rest_ms']:>8.3f} {r['turns_per_s']:>8.0f}",
                  flush=True)
    off = {r["size"]: r for r in results if r["r3"] == "off"}
    if len(off) >= 2:
        small, large = off[min(off)], off[max(off)]
        print(f"\nR3 off: turn at {large['size']} / turn at {small['size']} = "
              f"{large['turn_ms'] / small['turn_ms']:.2f}x (target <= 2x); rest {small['rest_ms']:.3f} -> "
              f"{large['rest_ms']:.3f} ms")
        mid = [r for r in off.values() if 6000 <= r["size"] <= 10000]
        for r in mid:
            print(f"R3 off at {r['size']}: {r['turn_ms']:.3f} ms per turn (target <= 3 ms)")


if __name__ == "__main__":
    main()
