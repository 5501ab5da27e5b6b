"""Session chat turns: router CPU per turn vs history length, with and without routed experts (R3).

    python bench/bench_sessions.py              # histories of 1k, 8k, 32k tokens; R3 off / 48x8 full / 48x8 start_len
    python bench/bench_sessions.py --quick      # fewer repetitions
    python bench/bench_sessions.py --sizes 1000 8000 --reps 50
    python bench/bench_sessions.py --r3 off --calls   # also: Python calls per turn at each history length
    python bench/bench_sessions.py --r3 off --whole   # every request decoded whole (no reuse of the last one)
    python bench/bench_sessions.py --compare-ref HEAD~1 # also the router as of a commit, same run (A/B)

What one "turn" is: the whole router-side work of `POST /sessions/{id}/v1/chat/completions` minus
the HTTP server and the upstream socket: the session pipeline's stages exactly as the router runs
them (session_request -> chat_template -> session_generate -> [worker] -> chat_parse ->
session_reply), on the client's full request bytes and a worker reply of 100 generated tokens
prepared up front (SGLang-shaped, `output_token_logprobs`, and `routed_experts` base64 when R3 is
on). The agent appends one tool result (~40 tokens) to a history of N tokens built by real turns
(~500 tokens each). Before each repetition the session's history is replayed into a fresh tree
through the same stages (untimed; same session id, so the replies and tool-call ids are the same),
so a repetition never sees siblings left by earlier ones. Then the turn runs twice on that tree:
"cold" is the first run (what an agent's turn meets on a busy router: its parent's ids not yet
encoded, the session's data and the request's bytes out of cache), "hot" the second, identical one
(a sibling of the first) with the data in cache: the CPU work itself. One thread:
`time.process_time` around each turn; turns/s = 1 / mean.

The split is timed inside the same run (the stages' own calls, wrapped), so it shares the turn's
cache state. "wire" is the work no implementation can skip: reading the client's request
(`decode_chat_request`: the history's bytes compared with the session's last request, memcmp, and
msgspec over the rest; with `--whole`, msgspec over the whole body, as for a client whose bytes
before its last message change every turn), copying the stored `input_ids` JSON into the worker's
body (`SessionTree.join_path_ids`, minus encoding the parent turn's ids, which a turn does once),
reading the worker's reply (one msgspec pass over its bytes, which with R3 and no
`routed_experts_start_len` hold the whole sequence's rows, tens of MB at 32k), and freeing those
when the exchange ends (the turn's time includes it; it would otherwise land in a later turn).
"match" is `SessionTree.attach_point`: a fixed number of Python steps plus one C-level `==` of the
request's message bytes with the stored ones (message-level matching has to look at every message
the client sent; a message the request shares with the last one compares by identity). "rest" =
turn - wire - match. Of the routed experts the router base64-decodes only the rows of the turn's
new positions. `--calls` also counts the Python calls of a turn (cProfile): the same at every
history length means no Python work per earlier turn or message.
Targets (issue 10): rest does not grow with N; a turn at 32k <= 2x a turn at 1k (R3 off);
<= 3 ms per turn at 8k (R3 off).

`--compare-ref GITREF` measures every point twice in the same run, in fresh processes that alternate: once with
this checkout's router, once with the router as of GITREF (a temporary git worktree), and prints the ratio.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import msgspec
import numpy as np

REPO = Path(__file__).resolve().parent.parent
# `--root DIR` (used by --compare-ref): import the router from another checkout
_root = sys.argv[sys.argv.index("--root") + 1] if "--root" in sys.argv else str(REPO)
sys.path.insert(0, _root)

from router.config import Config  # noqa: E402
from router.core.pipeline import Exchange  # noqa: E402
from router.core.sessions.registry import Session, SessionRegistry  # noqa: E402
from router.stages.chat_parse import ChatParse  # noqa: E402
from router.stages.chat_template import ChatTemplate  # noqa: E402
from router.stages.session_generate import Options as GenerateOptions  # noqa: E402
from router.stages.session_generate import SessionGenerate  # noqa: E402
from router.stages.session_reply import SessionReply  # noqa: E402
from router.stages.session_request import Options as RequestOptions  # noqa: E402
from router.stages.session_request import SessionRequest  # noqa: E402
from router.tokenizer import load_tokenizer  # noqa: E402

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
        svc = SimpleNamespace(tokenizer=tok, sessions=self.reg, config=Config())
        gen = GenerateOptions(routed_experts=r3 != "off", routed_experts_layers=LAYERS if r3 != "off" else 0,
                              routed_experts_topk=TOPK if r3 != "off" else 0,
                              routed_experts_start_len=r3 == "start_len")
        self.req = [SessionRequest(RequestOptions(), svc), ChatTemplate(None, svc), SessionGenerate(gen, svc)]
        self.resp = [ChatParse(None, svc), SessionReply(None, svc)]
        self.new_session()
        self.rng = np.random.default_rng(0)

    def new_session(self) -> None:
        """A fresh session under a fixed id (tool-call ids derive from it: a replay gets the same ones)."""
        self.reg.sessions.clear()
        self.session = Session("b" * 32, 0.0, 10**9)
        self.reg.sessions[self.session.id] = self.session

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
        if hasattr(Exchange, "session"):  # (an older router, for --compare-ref, kept it in scratch)
            ex.session = self.session
        else:
            ex.scratch["session"] = self.session
        for s in self.req:
            _run(s.on_request(ex))
        return ex

    def run_responses(self, ex: Exchange, reply: bytes) -> bytes:
        ex.status, ex.response_body = 200, reply
        if hasattr(Exchange, "client_headers"):
            ex.client_headers = []
        else:
            ex.scratch["client_headers"] = []
        for s in self.resp:
            _run(s.on_response(ex))
        return ex.response_body

    def turn(self, messages: list, reply_text: str) -> tuple[dict, bytes, bytes]:
        """A history turn: the worker returns no routed experts (only the measured turn's reply has them).
        Returns (the assistant message, the request body, the worker reply) for replays."""
        body = msgspec.json.encode({"model": "m", "messages": messages, "tools": TOOLS, "max_tokens": 4096})
        ex = self.run_requests(body)
        reply = self.worker_reply(ex.upstream_body, reply_text, rows=False)
        out = self.run_responses(ex, reply)
        return msgspec.json.decode(out)["choices"][0]["message"], body, reply

    def replay(self, transcript: list[tuple[bytes, bytes]]) -> None:
        self.new_session()
        for body, reply in transcript:
            self.run_responses(self.run_requests(body), reply)


def _run(coro):
    """Drive a stage coroutine that never blocks (all inputs are in memory) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("stage awaited something")


def build_history(b: Bench, target_tokens: int) -> tuple[list, list[tuple[bytes, bytes]]]:
    """(the conversation's messages, ending with an assistant turn; the (body, reply) of each turn)."""
    messages = [{"role": "system", "content": "You are a coding agent. " + words(60, 1)},
                {"role": "user", "content": "Summarize the repository. " + words(40, 2)}]
    transcript = []
    i = 0
    while b.session.tree.path_length(len(b.session.tree.turns) - 1) < target_tokens:
        call = {"name": "read_file", "arguments": {"path": f"src/file_{i}.py"}}
        text = words(380, i) + "\n<tool_call>\n" + json.dumps(call) + "\n</tool_call>"
        msg, body, reply = b.turn(messages, text)
        transcript.append((body, reply))
        messages.append({k: v for k, v in msg.items() if v is not None})
        messages.append({"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": words(60, i + 3)})
        i += 1
    messages.pop()  # the measured turn appends the last tool result again
    return messages, transcript


class SplitTimer:
    """Times the wire and matching calls the stages make, by wrapping them (CPU seconds per kind)."""

    def __init__(self) -> None:
        self.spent = {"wire": 0.0, "match": 0.0, "encode": 0.0}
        import router.stages._session as session_mod
        import router.stages.session_request as request_mod
        from router.core.sessions.tree import SessionTree

        request_mod.decode_chat_request = self._wrap(request_mod.decode_chat_request, "wire")
        session_mod._reply_decoder = self._timed(session_mod._reply_decoder, "decode", "wire")
        SessionTree.join_path_ids = self._wrap(SessionTree.join_path_ids, "wire")
        SessionTree._encode_ids = self._wrap(SessionTree._encode_ids, "encode")  # inside join: not wire
        SessionTree.attach_point = self._wrap(SessionTree.attach_point, "match")

    def reset(self) -> None:
        for k in self.spent:
            self.spent[k] = 0.0

    def split(self) -> tuple[float, float]:
        return self.spent["wire"] - self.spent["encode"], self.spent["match"]

    def _wrap(self, fn, kind: str):
        spent = self.spent

        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[kind] += time.process_time() - t0

        return timed

    def _timed(self, obj, method: str, kind: str):
        return SimpleNamespace(**{method: self._wrap(getattr(obj, method), kind)})


def measure(tok, size: int, r3: str, reps: int, timer: SplitTimer, whole: bool = False) -> dict:
    b = Bench(tok, r3)
    messages, transcript = build_history(b, size)
    final = messages + [{"role": "tool", "tool_call_id": "call_x", "content": words(30, 99)}]
    body = msgspec.json.encode({"model": "m", "messages": final, "tools": TOOLS, "max_tokens": 4096})
    b.replay(transcript)
    ex = b.run_requests(body)
    reply = b.worker_reply(ex.upstream_body, words(90, 5))  # ~100 generated tokens
    n_in = len(msgspec.json.decode(ex.upstream_body)["input_ids"])
    del ex
    runs = {"cold": {"turn": [], "wire": [], "match": []}, "hot": {"turn": [], "wire": [], "match": []}}
    for _ in range(reps):
        b.replay(transcript)
        tree = b.session.tree
        parent = len(tree.turns) - 1
        for run in ("cold", "hot"):
            if whole:
                b.session.shared_prefix = None  # as if a byte before the last message had changed
            timer.reset()
            t0 = time.process_time()
            ex = b.run_requests(body)
            b.run_responses(ex, reply)
            t1 = time.process_time()
            del ex  # the exchange ends: its decoded request and bodies are freed (wire too)
            t2 = time.process_time()
            runs[run]["turn"].append(t2 - t0)
            wire, match = timer.split()
            runs[run]["wire"].append(wire + t2 - t1)
            runs[run]["match"].append(match)
        assert tree.turns[-1].parent == tree.turns[-2].parent == parent
    out = {"size": tree.path_length(parent), "r3": r3, "body_kb": len(body) / 1024, "reply_kb": len(reply) / 1024,
           "input_ids": n_in}
    for run, r in runs.items():
        turn, wire, match = (statistics.median(r[k]) * 1e3 for k in ("turn", "wire", "match"))
        out[run] = {"turn_ms": turn, "wire_ms": wire, "match_ms": match,
                    "rest_ms": statistics.median(t - w - m for t, w, m in zip(r["turn"], r["wire"], r["match"])) * 1e3,
                    "turns_per_s": 1.0 / statistics.mean(r["turn"])}
    return out


def count_calls(tok, size: int) -> int:
    """Python calls (cProfile) of one cold turn at `size` tokens of history."""
    import cProfile
    import pstats

    b = Bench(tok, "off")
    messages, transcript = build_history(b, size)
    body = msgspec.json.encode({"model": "m", "messages": messages + [{"role": "tool", "tool_call_id": "call_x",
                                                                      "content": words(30, 99)}],
                                "tools": TOOLS, "max_tokens": 4096})
    b.replay(transcript)
    reply = b.worker_reply(b.run_requests(body).upstream_body, words(90, 5))
    b.replay(transcript)
    prof = cProfile.Profile()
    prof.enable()
    b.run_responses(b.run_requests(body), reply)
    prof.disable()
    return pstats.Stats(prof).total_calls


def compare(args, reps: int) -> None:
    """Every point measured by this checkout and by GITREF's router, alternating fresh processes."""
    import atexit
    import os
    import subprocess
    import tempfile

    tmp = tempfile.mkdtemp(prefix="bench_sessions_")
    ref_root = os.path.join(tmp, "ref")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", ref_root, args.compare_ref],
                   check=True, capture_output=True)
    atexit.register(subprocess.run, ["git", "-C", str(REPO), "worktree", "remove", "--force", ref_root],
                    capture_output=True)
    sides = [("this checkout", str(REPO)), (f"@{args.compare_ref}", ref_root)]
    print(f"# bench_sessions --compare-ref {args.compare_ref}: median process CPU per turn (ms), {reps} turns per "
          f"point, each point in fresh processes alternating between the two routers")
    print(f"{'history':>8} {'R3':>9} {'run':>4} {'this ms':>8} {'ref ms':>8} {'this/ref':>9}")
    for r3 in args.r3:
        for size in args.sizes:
            got = {}
            for i, (label, root) in enumerate(sides if (size + len(r3)) % 2 == 0 else sides[::-1]):
                cmd = [sys.executable, __file__, "--root", root, "--point", r3, str(size), "--reps", str(reps)]
                if args.whole:
                    cmd.append("--whole")
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                got[label] = json.loads(out.strip().splitlines()[-1])
            a, b = got[sides[0][0]], got[sides[1][0]]
            for run in ("cold", "hot"):
                x, y = a[run]["turn_ms"], b[run]["turn_ms"]
                print(f"{a['size']:>8} {r3:>9} {run:>4} {x:>8.3f} {y:>8.3f} {x / y:>8.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare-ref", metavar="GITREF", help="also measure the router as of GITREF, same run")
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--point", nargs=2, metavar=("R3", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000, 32000])
    ap.add_argument("--r3", nargs="+", default=["off", "full", "start_len"], choices=["off", "full", "start_len"])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calls", action="store_true", help="also count the Python calls of a turn per history length")
    ap.add_argument("--whole", action="store_true",
                    help="decode every request whole, not reusing the session's last request's bytes")
    args = ap.parse_args()
    reps = 10 if args.quick else args.reps
    if args.compare_ref:
        compare(args, reps)
        return
    tok = load_tokenizer("builtin:qwen")
    # the router process's own settings (router/cli.py): startup objects frozen out of every collection, the
    # young generation collected every 20,000 allocations (measured: the figures barely move either way)
    from router.cli import tune_process

    tune_process()
    if args.point:
        print(json.dumps(measure(tok, int(args.point[1]), args.point[0], reps, SplitTimer(), args.whole)))
        return
    if args.calls:
        print("# Python calls per turn (cProfile): " +
              ", ".join(f"{size} tokens: {count_calls(tok, size)}" for size in args.sizes))
    timer = SplitTimer()
    print(f"# bench_sessions: tokenizer builtin:qwen, R3 rows {LAYERS}x{TOPK} int32, {reps} turns per point, "
          f"median process CPU per turn, requests {'decoded whole' if args.whole else 'reusing the last one'}")
    print(f"{'history':>8} {'R3':>9} {'input_ids':>9} {'body KiB':>9} {'reply KiB':>10} {'run':>4} {'turn ms':>8} "
          f"{'wire ms':>8} {'match ms':>8} {'rest ms':>8} {'turns/s':>8}")
    results = []
    for r3 in args.r3:
        for size in args.sizes:
            r = measure(tok, size, r3, reps, timer, args.whole)
            results.append(r)
            for run in ("cold", "hot"):
                x = r[run]
                print(f"{r['size']:>8} {r3:>9} {r['input_ids']:>9} {r['body_kb']:>9.1f} {r['reply_kb']:>10.1f} "
                      f"{run:>4} {x['turn_ms']:>8.3f} {x['wire_ms']:>8.3f} {x['match_ms']:>8.3f} {x['rest_ms']:>8.3f} "
                      f"{x['turns_per_s']:>8.0f}", flush=True)
    off = {r["size"]: r for r in results if r["r3"] == "off"}
    if len(off) >= 2:
        small, large = off[min(off)], off[max(off)]
        print()
        for run in ("cold", "hot"):
            s, g = small[run], large[run]
            print(f"R3 off, {run}: turn at {large['size']} / turn at {small['size']} = "
                  f"{g['turn_ms'] / s['turn_ms']:.2f}x (target <= 2x); "
                  f"rest {s['rest_ms']:.3f} -> {g['rest_ms']:.3f} ms")
        for r in off.values():
            if 6000 <= r["size"] <= 10000:
                print(f"R3 off at {r['size']}: {r['cold']['turn_ms']:.3f} ms cold, {r['hot']['turn_ms']:.3f} ms hot "
                      f"per turn (target <= 3 ms)")

if __name__ == "__main__":
    main()
