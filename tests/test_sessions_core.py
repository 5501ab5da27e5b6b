"""Sessions, pure logic and the session stages in-process: message matching, the turn tree, sample
assembly, and a property test over random conversations (multi-byte text, tool calls, stop/length
finishes, retries) driven through the real stages against an in-process worker model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.core.pipeline import Exchange, StageError
from router.core.sessions.messages import messages_match
from router.core.sessions.registry import SessionGone, SessionNotFound, SessionRegistry, SessionLimit
from router.config import Config
from router.core.sessions.samples import Assembly, SampleError, collect
from router.core.sessions.tree import SessionTree, TurnLimit
from router.stages.chat_parse import ChatParse
from router.stages.chat_template import ChatTemplate
from router.stages.session_generate import Options as GenerateOptions
from router.stages.session_generate import SessionGenerate
from router.stages.session_reply import SessionReply
from router.stages.session_request import Options as RequestOptions
from router.stages.session_request import SessionRequest
from router.tokenizer import load_tokenizer
from router.wire.chat_messages import RequestMessages
from router.wire.openai import ChatMessageIn, ContentPart, FunctionCallIn, ToolCallIn, json_encoder, sglang_tools
from router.wire.sessions import TurnRecord


def msg(role, content=None, calls=None, reasoning=None):
    tc = [ToolCallIn(FunctionCallIn(n, a)) for n, a in calls] if calls else None
    return ChatMessageIn(role=role, content=content, tool_calls=tc, reasoning_content=reasoning)


# ---- message matching ---------------------------------------------------------------------------

def test_empty_forms_match_and_ids_are_ignored():
    assert messages_match(msg("assistant", None), msg("assistant", ""))
    assert messages_match(msg("assistant", ""), ChatMessageIn(role="assistant", content=[]))
    assert messages_match(msg("assistant", "x", calls=[]), msg("assistant", "x"))
    a = ChatMessageIn(role="assistant", tool_calls=[ToolCallIn(FunctionCallIn("f", "{}"), id="call_1")])
    b = ChatMessageIn(role="assistant", tool_calls=[ToolCallIn(FunctionCallIn("f", "{}"), id="other")])
    assert messages_match(a, b)
    assert messages_match(msg("user", "ab"), ChatMessageIn(role="user", content=[ContentPart(text="a"),
                                                                                   ContentPart(text="b")]))


def test_differences_do_not_match():
    assert not messages_match(msg("user", "a"), msg("assistant", "a"))
    assert not messages_match(msg("user", "a"), msg("user", "b"))
    assert not messages_match(msg("assistant", "a", reasoning="r"), msg("assistant", "a"))
    assert not messages_match(msg("assistant", calls=[("f", '{"a": 1}')]), msg("assistant", calls=[("g", '{"a": 1}')]))
    # type-tagged: 1 is not 1.0, nor true
    assert not messages_match(msg("assistant", calls=[("f", '{"a": 1}')]), msg("assistant", calls=[("f", '{"a": 1.0}')]))
    assert not messages_match(msg("assistant", calls=[("f", '{"a": 1}')]), msg("assistant", calls=[("f", '{"a": true}')]))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5), st.randoms())
def test_reserialized_arguments_match(args, rnd):
    items = list(args.items())
    rnd.shuffle(items)
    spelled = json.dumps(dict(items), indent=rnd.choice([None, 2]), ensure_ascii=rnd.random() < 0.5,
                         separators=rnd.choice([(",", ":"), (", ", ": ")]))
    assert messages_match(msg("assistant", calls=[("f", json.dumps(args))]), msg("assistant", calls=[("f", spelled)]))
    assert messages_match(msg("assistant", calls=[("f", json.dumps(args))]),
                          ChatMessageIn(role="assistant", tool_calls=[ToolCallIn(FunctionCallIn("f", args))]))


# ---- tree -------------------------------------------------------------------------------------------

def commit(tree, parent, new, reply, out_len=3, finish="stop", request_seq=None, rows=False):
    prompt = np.arange(2, dtype=np.int32) + 100 * (len(tree) + 1)
    out = np.arange(out_len, dtype=np.int32) + 1000 * (len(tree) + 1)
    start = tree.path_length(parent)
    end = start + len(prompt) + out_len
    experts = None
    if rows:
        experts = np.full((end - 1 - max(start - 1, 0), 1, 2), len(tree), np.int32)
    return tree.commit(parent, request_seq=request_seq if request_seq is not None else tree.next_request_seq(),
                       messages=new, assistant=reply, prompt_ids=prompt, output_ids=out,
                       output_logprobs=np.full(out_len, -0.5), routed_experts=experts,
                       r3_start=max(start - 1, 0), finish_reason=finish,
                       record=TurnRecord(request_timestamp=1.0, timestamp=2.0, meta_info=msgspec.Raw(b"{}")))


def attach(tree, messages):
    """`tree.attach_point` for a request of these messages, sent in their canonical JSON spelling."""
    return tree.attach_point(RequestMessages.of(messages))


def test_attach_point_is_the_deepest_matching_turn():
    tree = SessionTree()
    u1, a1, t1, a2 = msg("user", "q"), msg("assistant", "A1"), msg("tool", "r"), msg("assistant", "A2")
    assert attach(tree, [u1]) == (-1, 0)
    r = commit(tree, -1, [u1], a1)
    assert attach(tree, [u1, a1, t1]) == (r.id, 2)
    c = commit(tree, r.id, [t1], a2)
    assert attach(tree, [u1, a1, t1, a2, msg("user", "next")]) == (c.id, 4)
    # divergence inside the child's appended messages: attaches to the parent
    assert attach(tree, [u1, a1, msg("tool", "other")]) == (r.id, 2)
    # divergence in the root: a new root
    assert attach(tree, [msg("user", "other")]) == (-1, 0)
    # a resend of turn 2's request (without its reply) attaches at turn 1: a retry
    assert attach(tree, [u1, a1, t1]) == (r.id, 2)
    # a second child of `c` (a branch of its own): repeating its messages after a divergence inside
    # `c` does not reach it
    t2, a3 = msg("user", "second"), msg("assistant", "A3")
    commit(tree, c.id, [msg("user", "first")], msg("assistant", "F"))
    second = commit(tree, c.id, [t2], a3)
    assert attach(tree, [u1, a1, t1, a2, t2, a3, msg("user", "n")]) == (second.id, 6)
    assert attach(tree, [u1, a1, t1, msg("assistant", "other"), t2, a3, msg("user", "n")]) == (r.id, 2)


def test_ties_go_to_the_latest_turn_and_limit_is_loud():
    tree = SessionTree(max_turns=3)
    u, a = msg("user", "q"), msg("assistant", "A")
    first = commit(tree, -1, [u], a)
    second = commit(tree, -1, [u], a)
    assert attach(tree, [u, a, msg("user", "x")]) == (second.id, 2)
    assert first.id != second.id
    commit(tree, -1, [u], msg("assistant", "B"))
    with pytest.raises(TurnLimit, match="max_turns_per_session"):
        commit(tree, -1, [u], a)


def reference_attach_point(tree, messages):
    """The specification, walked naively: the deepest turn whose whole path of messages matches a
    prefix of `messages` message by message (lenient match), ties to the latest commit."""
    best, best_len, best_seq = -1, 0, -1
    for t in tree.turns:
        path = [m for p in tree.path(t.id) for m in (*p.messages, p.assistant)]
        if len(path) > len(messages) or not all(messages_match(a, b) for a, b in zip(path, messages)):
            continue
        if len(path) > best_len or (len(path) == best_len and t.seq > best_seq):
            best, best_len, best_seq = t.id, len(path), t.seq
    return best, best_len


# Few distinct texts so paths share prefixes and requests match; each message has spellings that
# differ strictly but match leniently (None/""/[] content, re-serialized arguments, another call id).
_TEXTS = ["a", "b", "ü✓", ""]


def _spelling(role, text, calls, variant):
    if role == "assistant" and calls:
        args = json.dumps({"q": text, "n": 1}, indent=variant % 2 or None)
        return ChatMessageIn(role=role, content=text or (None if variant % 2 else ""),
                             tool_calls=[ToolCallIn(FunctionCallIn("f", args), id=f"call_{variant}")])
    if not text:
        return ChatMessageIn(role=role, content=[None, "", []][variant % 3])
    if variant % 2:
        return ChatMessageIn(role=role, content=[ContentPart(text=text[:1]), ContentPart(text=text[1:])],
                             tool_call_id=f"id{variant}")
    return ChatMessageIn(role=role, content=text)


_message_specs = st.tuples(st.sampled_from(["user", "tool", "assistant"]), st.sampled_from(_TEXTS), st.booleans())


@settings(max_examples=200, deadline=None)
@given(commits=st.lists(st.tuples(st.integers(0, 40), st.lists(_message_specs, max_size=2), _message_specs,
                                  st.integers(0, 5)), min_size=1, max_size=12),
       requests=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3), st.integers(0, 5),
                                   st.lists(_message_specs, max_size=2), st.none() | st.integers(0, 30)),
                         min_size=1, max_size=12))
def test_attach_point_equals_the_naive_walk(commits, requests):
    """Segments (flat message lists, C-level ==, the client's spelling learned on a lenient match)
    pick the same turn as walking every turn's whole path with the lenient match, for random trees
    (retries, branches mid-line, several roots) and random requests (repeated paths in other
    spellings, cut or diverging at any point), also when asked twice."""
    tree = SessionTree()
    paths = {-1: []}  # turn id -> its path's message specs
    for pick, new, reply, variant in commits:
        parent = -1 if pick % 4 == 0 else (pick % (len(tree) + 1)) - 1
        spec = paths[parent] + list(new) + [("assistant", reply[1], reply[2])]
        t = commit(tree, parent, [_spelling(*m, variant) for m in new],
                   _spelling("assistant", reply[1], reply[2], variant))
        paths[t.id] = spec
    for pick, cut, variant, extra, diverge_at in requests:
        base = paths[(pick % (len(tree) + 1)) - 1]
        spec = base[:max(len(base) - cut, 0)] if cut % 2 else list(base)
        if diverge_at is not None and spec:  # one message differs, anywhere; the rest still repeats the path
            spec[diverge_at % len(spec)] = ("user", "divergent", False)
        spec = spec + list(extra)
        if not spec:
            continue
        messages = [_spelling(*m, variant + i) for i, m in enumerate(spec)]
        want = reference_attach_point(tree, messages)
        assert attach(tree, messages) == want
        assert attach(tree, messages) == want  # the learned spellings change nothing


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 4), st.integers(0, 3)), min_size=1, max_size=15))
def test_join_path_ids_is_the_path_tokens(plan):
    """The cached per-segment JSON of token ids, joined, is exactly the path's tokens: on every
    branch, with empty outputs, and whatever order turns are first extended in."""
    tree = SessionTree()
    for pick, out_len, first_use in plan:
        parent = -1 if pick % 5 == 0 else (pick % (len(tree) + 1)) - 1
        t = commit(tree, parent, [msg("user", "q")], msg("assistant", "A"), out_len=out_len)
        use = (first_use * 7 + pick) % len(tree)
        for tid in (use, t.id, parent):
            want = tree.path_tokens(tid).tolist() + [7, 8]
            assert json.loads(tree.join_path_ids(tid, b"[", b"7,8", b"]")) == want
            assert json.loads(tree.join_path_ids(tid, b"[", b"", b"]")) == want[:-2]


def _profiled_calls(fn, *args) -> int:
    """Python and builtin calls made while running fn(*args)."""
    import sys

    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    # a collection during the count would run finalizers of earlier tests' objects and count their calls
    import gc

    gc.collect()
    gc.disable()
    sys.setprofile(count)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls


def test_a_turn_does_no_python_work_per_earlier_turn(monkeypatch):
    """Matching a request and writing its input_ids cost the same number of Python steps after 4
    turns as after 60 (the history's bytes are compared and copied by C calls only, no message
    before the appended one is decoded), and a message the agent re-spells is matched leniently
    once, not again on every later request."""
    lenient = []

    def counting(stored_raw, stored, new_raw, new):
        lenient.append(1)
        return messages_match(stored, new)

    def conversation(turns):
        tree = SessionTree(matcher=counting)
        sent = [msg("user", "q")]
        parent = -1
        lenient_per_request = []
        for i in range(turns):
            lenient.clear()
            parent, covered = attach(tree, sent)
            lenient_per_request.append(len(lenient))
            t = commit(tree, parent, sent[covered:], msg("assistant", f"A{i}", reasoning=None))
            # the agent echoes the reply in its own spelling ([] content parts for "A{i}" split in two)
            sent = sent + [ChatMessageIn(role="assistant", content=[ContentPart(text="A"), ContentPart(text=str(i))]),
                           msg("tool", f"r{i}")]
            parent = t.id
        return tree, sent, parent, lenient_per_request

    short, long_ = conversation(4), conversation(60)
    assert short[3][1:] == [1] * 3 and long_[3][1:] == [1] * 59  # only the newest echo, each time
    costs = []
    for tree, sent, parent, _ in (short, long_):
        assert attach(tree, sent) == (parent, len(sent) - 1)
        tree.join_path_ids(parent, b"[", b"1", b"]")  # each turn's ids encoded once, here
        # the request as a client sends it: JSON only, nothing decoded yet
        request = RequestMessages([msgspec.Raw(json_encoder.encode(m)) for m in sent])
        costs.append((_profiled_calls(tree.attach_point, request),
                      _profiled_calls(tree.join_path_ids, parent, b"[", b"1", b"]")))
    assert costs[0] == costs[1], costs


# ---- samples ----------------------------------------------------------------------------------------

ASM = Assembly(decode=lambda ids: "".join(f"<{int(i)}>" for i in ids))


def samples(tree, **kw):
    got = collect(tree, tree.active, ASM, **kw)
    return got.samples, got.empty_reason


def test_a_retry_supersedes_its_earlier_siblings():
    """miles' drop_retries: a leaf with a later sibling (a larger id under the same parent) is dropped; roots
    never are, so two concurrent first requests are two samples."""
    tree = SessionTree()
    u, a = msg("user", "q"), msg("assistant", "A")
    root = commit(tree, -1, [u], a)
    b1 = commit(tree, root.id, [msg("user", "u2")], msg("assistant", "B1"))
    b2 = commit(tree, root.id, [msg("user", "u2")], msg("assistant", "B2"))
    got, reason = samples(tree)
    assert reason is None and [s.metadata["leaf"]["node_id"] for s in got] == [b2.id]
    assert got[0].loss_mask.sum() == len(root.output_ids) + len(b2.output_ids)
    assert b1.id < b2.id
    other_root = commit(tree, -1, [msg("user", "subagent")], msg("assistant", "S"))
    got, _ = samples(tree)
    assert [s.metadata["leaf"]["node_id"] for s in got] == [b2.id, other_root.id]  # longer paths first


def test_shared_completion_trained_once_and_abandoned_line_kept():
    tree = SessionTree()
    u, a = msg("user", "q"), msg("assistant", "A")
    root = commit(tree, -1, [u], a)
    deep = commit(tree, root.id, [msg("user", "x")], msg("assistant", "X"))
    deeper = commit(tree, deep.id, [msg("user", "y")], msg("assistant", "Y"))
    # divergence one level up: the old line's leaf has no later sibling, so both lines are kept
    other = commit(tree, root.id, [msg("user", "z")], msg("assistant", "Z"))
    got, _ = samples(tree)
    # `deep` was retried by `other` (a later sibling), but `deep` is not a leaf: the line stays
    assert [s.metadata["leaf"]["node_id"] for s in got] == [deeper.id, other.id]
    first, second = got
    assert first.loss_mask[:3].tolist() == [1, 1, 1]  # the response starts with root's completion
    assert second.loss_mask[:3].tolist() == [0, 0, 0]  # trained once: in the kept leaf with the smallest id
    assert second.rollout_log_probs[:3].tolist() == [-0.5] * 3
    assert first.tokens[:root.end].tolist() == second.tokens[:root.end].tolist()
    assert len(first.loss_mask) == first.response_length == len(first.tokens) - len(root.prompt_ids)


def test_truncation_is_at_turn_level_and_rows_follow():
    tree = SessionTree()
    root = commit(tree, -1, [msg("user", "q")], msg("assistant", "A"), rows=True)  # 5 tokens
    child = commit(tree, root.id, [msg("user", "x")], msg("assistant", "X"), rows=True)  # 10
    (full,), _ = samples(tree)
    assert len(full.tokens) == 10 and full.rollout_routed_experts.shape == (9, 1, 2) and full.status == "completed"
    assert full.rollout_routed_experts[:, 0, 0].tolist() == [0] * 4 + [1] * 5
    (cut,), _ = samples(tree, max_seq_len=7)
    assert len(cut.tokens) == 5 and cut.status == "completed"  # nothing of turn 2's output fits: turn 1 as it was
    (cut,), _ = samples(tree, max_seq_len=9)
    assert len(cut.tokens) == 9 and cut.status == "truncated" and cut.rollout_routed_experts.shape == (8, 1, 2)
    assert cut.loss_mask.tolist() == [1, 1, 1, 0, 0, 1, 1]
    assert cut.weight_versions == []
    got, reason = samples(tree, max_seq_len=2)
    assert got == [] and reason == "all_truncated"
    assert samples(SessionTree()) == ([], "no_records")
    assert child.start == root.end
    tree.turns[0].routed_experts = tree.turns[0].routed_experts[:-1]
    with pytest.raises(SampleError, match="turn 0: 3 routed-experts rows"):
        samples(tree)


def test_length_leaf_is_truncated_and_ends_the_merge():
    tree = SessionTree()
    root = commit(tree, -1, [msg("user", "q")], msg("assistant", "A"), finish="abort")
    commit(tree, root.id, [msg("user", "x")], msg("assistant", "X"), finish="length")
    (s,), _ = samples(tree)
    assert s.status == "aborted" and len(s.tokens) == root.end  # the merge stops after a turn not completed


# ---- registry -----------------------------------------------------------------------------------------

def test_registry_ids_410_404_idle_and_limits():
    reg = SessionRegistry(max_sessions=2, idle_timeout_s=10)
    a = reg.create(0.0)
    assert len(a.id) == 32 and int(a.id, 16) >= 0
    b = reg.create(0.0)
    with pytest.raises(SessionLimit, match="sessions.max_sessions"):
        reg.create(0.0)
    reg.delete(a.id)
    assert a.closed
    with pytest.raises(SessionGone):
        reg.get(a.id)
    with pytest.raises(SessionNotFound):
        reg.get("0" * 32)
    with pytest.raises(SessionNotFound):
        reg.get(a.id[:16] + "0" * 16)
    b.inflight = 1
    assert reg.expire_idle(100.0) == []  # a session with a turn in flight never expires
    b.inflight = 0
    assert reg.expire_idle(100.0) == [b.id]
    with pytest.raises(SessionGone):
        reg.get(b.id)


# ---- the stages, in-process, against a worker model ------------------------------------------------------

@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer("builtin:qwen")


class WorkerModel:
    """Answers /generate bodies like SGLang: given output text, finish and R3 rows per (position, token)."""

    LAYERS, TOPK = 3, 2

    def __init__(self, tok):
        self.tok = tok
        self.calls = []  # (input_ids, output_ids)
        self.logprobs = []  # per call, the output's logprobs

    @classmethod
    def rows(cls, seq, start=0):
        seq = np.asarray(seq, np.int64)
        pos = np.arange(len(seq) - 1, dtype=np.int64)
        base = (pos * 7 + seq[:-1] * 13) % 64
        out = np.stack([base + 1000 * l + k for l in range(cls.LAYERS) for k in range(cls.TOPK)], axis=1)
        return out.reshape(-1, cls.LAYERS, cls.TOPK).astype(np.int32)[start:]

    def reply(self, body: bytes, text: str, length: int | None) -> bytes:
        req = msgspec.json.decode(body)
        ids = req["input_ids"]
        out = self.tok.encode(text) + [self.tok.eos_token_id]
        finish = {"type": "stop", "matched": self.tok.eos_token_id}
        if length is not None and length < len(out):
            out, finish = out[:length], {"type": "length", "length": length}
        lps = [-(i % 7) / 3 - 0.01 for i in range(len(out))]
        self.calls.append((list(ids), list(out)))
        self.logprobs.append(lps)
        seq = ids + out
        import base64
        meta = {"id": f"r{len(self.calls)}", "finish_reason": finish, "prompt_tokens": len(ids),
                "weight_version": "w1", "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, out)],
                "completion_tokens": len(out),
                "routed_experts": base64.b64encode(self.rows(seq, req.get("routed_experts_start_len", 0)).tobytes()).decode()}
        shown = self.tok.decode(out[:-1] if finish["type"] == "stop" else out, skip_special_tokens=False)
        return msgspec.json.encode({"text": shown, "output_ids": out, "meta_info": meta})


class Pipeline:
    def __init__(self, tok, start_len: bool):
        self.reg = SessionRegistry()
        self.services = SimpleNamespace(tokenizer=tok, sessions=self.reg, config=Config())
        gen = GenerateOptions(routed_experts=True, routed_experts_layers=WorkerModel.LAYERS,
                              routed_experts_topk=WorkerModel.TOPK, routed_experts_start_len=start_len)
        self.request_stages = [SessionRequest(RequestOptions(), self.services), ChatTemplate(None, self.services),
                               SessionGenerate(gen, self.services)]
        self.response_stages = [ChatParse(None, self.services), SessionReply(None, self.services)]
        self.worker = WorkerModel(tok)

    async def chat(self, session, body: dict, text: str, length: int | None = None):
        ex = Exchange("POST", "/sessions/x/v1/chat/completions", b"", [], msgspec.json.encode(body))
        ex.session = session
        for s in self.request_stages:
            await s.on_request(ex)
        ex.status, ex.response_body = 200, self.worker.reply(ex.upstream_body, text, length)
        ex.client_headers = []
        for s in self.response_stages:
            await s.on_response(ex)
        return ex


async def test_chat_template_kwargs_and_tools_shape_the_render_and_the_shared_prompt(qwen):
    """Turn 1 renders with the request's `tools` (as SGLang's chat endpoint hands them to the template) and
    `chat_template_kwargs`; identical first requests share one tokenized prompt, and requests differing only
    in those do not."""
    p = Pipeline(qwen, start_len=False)
    msgs = [{"role": "user", "content": "hi ✓"}]
    bodies = [{"messages": msgs}, {"messages": msgs, "chat_template_kwargs": {"enable_thinking": False}},
              {"messages": msgs, "tools": [{"type": "function", "function": {"name": "calc"}}]},
              {"messages": msgs}]
    received = []
    for body in bodies:
        await p.chat(p.reg.create(0.0), body, "ok")
        received.append(p.worker.calls[-1][0])
    for body, ids in zip(bodies, received):
        want = qwen.encode(qwen.apply_chat_template(msgs, True, tools=sglang_tools(body.get("tools")),
                                                    **body.get("chat_template_kwargs", {})))
        assert ids == want
    assert '{"type": "function", "function": {"description": null, "name": "calc", "parameters": null, ' \
           '"strict": false}}' in qwen.decode(received[2])
    assert received[0] == received[3] and len({tuple(r) for r in received}) == 3
    assert (p.reg.prompts.misses, p.reg.prompts.hits) == (3, 1)
    # a later turn renders its appended messages with the same kwargs (the closed think block)
    session = p.reg.create(0.0)
    kwargs = {"enable_thinking": False}
    ex = await p.chat(session, {"messages": msgs, "chat_template_kwargs": kwargs}, "A")
    m = msgspec.json.decode(ex.response_body)["choices"][0]["message"]
    follow = msgs + [{"role": "assistant", "content": m["content"]}, {"role": "user", "content": "more"}]
    await p.chat(session, {"messages": follow, "chat_template_kwargs": kwargs}, "B")
    ids = p.worker.calls[-1][0]
    assert qwen.decode(ids, skip_special_tokens=False).endswith(
        "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


texts = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<>\x00"), max_size=12)
tool_calls = st.lists(st.tuples(st.sampled_from(["search", "read_file", "calc"]),
                                st.dictionaries(st.sampled_from(["q", "path", "n", "ü"]), texts | st.integers(), max_size=2)),
                      max_size=2)
# Per turn: reply text, thinking, tool calls, a length cut (max_new_tokens 3) or not, retries,
# and how many replies the agent goes back before it (0: continue from the latest; k >= 2: resend
# the conversation as it was after the k-th latest reply with another follow-up, a divergence: at 2
# the latest turn gets a later sibling, a retry; at 3 the abandoned line's leaf stays a sample and
# the turns both lines share must be trained once).
turn_plans = st.lists(st.tuples(texts, st.booleans(), tool_calls, st.sampled_from([None, None, None, 3]),
                                st.integers(0, 3), st.sampled_from([0, 0, 2, 3, 3])), min_size=1, max_size=7)


def assistant_text(content, think, calls):
    out = f"<think>\nhmm {content}\n</think>\n\n" if think else ""
    out += content
    for name, args in calls:
        out += "\n<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n</tool_call>"
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=turn_plans, start_len=st.booleans(), reserialize=st.booleans())
async def test_random_conversations_give_exact_samples(qwen, plan, start_len, reserialize):
    """Every sample's tokens are exactly what the worker received plus what it produced for the
    leaf's turn; the loss mask is 1 exactly on produced tokens, each completion trained in exactly
    one sample (the first kept one that holds it), logprobs are the worker's there and 0 elsewhere,
    R3 rows equal a full-sequence reference; the samples are the leaves no later request retried.
    The expectations come from the test's own record of the calls, not from the tree."""
    p = Pipeline(qwen, start_len)
    session = p.reg.create(0.0)
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in ("search", "read_file", "calc")]
    messages = [{"role": "system", "content": "You are ü-helpful 🙂"}, {"role": "user", "content": "start ✓"}]
    parent_of = []  # call index -> the call whose reply its request extends (None: a first turn)
    call_of_turn = {}  # tree turn id -> call index
    points = []  # (messages up to and including a reply, that reply's call) of continued turns
    extends = None  # the call whose reply `messages` currently ends with (then a follow-up)
    for step, (content, think, calls, length, retries, back) in enumerate(plan):
        if back and len(points) >= back:  # diverge: an earlier point, another follow-up
            upto, extends = points[-back]
            messages = upto + [{"role": "user", "content": f"instead, step {step} ✓"}]
        for attempt in range(retries % 2 + 1):  # a retry re-sends the same messages
            ex = await p.chat(session, {"messages": messages, "tools": tools, "max_tokens": 10_000},
                              assistant_text(content + "x" * attempt, think, calls), length)
            reply = msgspec.json.decode(ex.response_body)
            parent_of.append(extends)
            call_of_turn[session.tree.turns[-1].id] = len(parent_of) - 1
        this_call = len(parent_of) - 1
        m = reply["choices"][0]["message"]
        if reply["choices"][0]["finish_reason"] == "length":
            # a length turn cannot be extended: 409
            with pytest.raises(StageError) as e:
                await p.chat(session, {"messages": messages + [m, {"role": "user", "content": "more"}]}, "x")
            assert e.value.status == 409
            break
        echoed = {k: v for k, v in m.items() if v is not None}
        if reserialize and m.get("tool_calls"):
            for c in echoed["tool_calls"]:
                c["function"]["arguments"] = json.dumps(json.loads(c["function"]["arguments"]), indent=1)
                c.pop("index", None)
        messages = messages + [echoed]
        points.append((messages, this_call))
        extends = this_call
        if m.get("tool_calls"):
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": f"result ✓ {i}"}
                         for i, c in enumerate(m["tool_calls"])]
        else:
            messages.append({"role": "user", "content": content[::-1] + " ok"})
    # the oracle: leaves are calls nothing extended; a leaf with a later sibling was retried
    children = {}
    for call, parent in enumerate(parent_of):
        children.setdefault(parent, []).append(call)
    kept = [c for c in range(len(parent_of)) if c not in children
            and (parent_of[c] is None or not any(sib > c for sib in children[parent_of[c]]))]

    def path(call):
        return [] if call is None else path(parent_of[call]) + [call]

    owner = {}
    for leaf in kept:
        for call in path(leaf):
            owner.setdefault(call, leaf)
    got = collect(session.tree, session.tree.active, Assembly(addition_r3=start_len))
    assert got.empty_reason is None
    kept.sort(key=lambda c: (len(path(c)), c), reverse=True)  # miles' picker order
    assert [call_of_turn[s.metadata["leaf"]["node_id"]] for s in got.samples] == kept
    for s in got.samples:
        leaf = call_of_turn[s.metadata["leaf"]["node_id"]]
        ids, out = p.worker.calls[leaf]
        assert s.tokens.tolist() == ids + out
        mask = np.zeros(len(ids) + len(out), np.uint8)
        produced = np.zeros(len(ids) + len(out), bool)
        logps = np.zeros(len(ids) + len(out))
        for call in path(leaf):
            call_in, call_out = p.worker.calls[call]
            span = slice(len(call_in), len(call_in) + len(call_out))
            assert (ids + out)[span] == call_out  # every turn's output sits where the worker produced it
            produced[span] = True
            mask[span] = owner[call] == leaf
            logps[span] = p.worker.logprobs[call]
        first = len(p.worker.calls[path(leaf)[0]][0])  # the response: everything after the first prompt
        assert s.response_length == len(ids) + len(out) - first
        assert s.loss_mask.tolist() == mask[first:].tolist() and not s.loss_mask[~produced[first:]].any()
        assert s.rollout_log_probs.tolist() == logps[first:].tolist()
        assert np.array_equal(s.rollout_routed_experts, WorkerModel.rows(s.tokens))
    # no two calls re-rendered the history: each call's input extends a stored path verbatim
    assert p.reg.prompts.misses == 1


@given(layers=st.integers(1, 5), topk=st.integers(1, 4), rows=st.integers(0, 20), data=st.data())
def test_routed_experts_tail_decode_equals_full_decode(layers, topk, rows, data):
    import base64

    from router.wire.sglang import BadOutput, routed_experts_rows

    skip = data.draw(st.integers(0, rows))
    arr = np.arange(rows * layers * topk, dtype=np.int32).reshape(rows, layers, topk) * 7 - 3
    raw = msgspec.Raw(b'"' + base64.b64encode(arr.tobytes()) + b'"')
    got = routed_experts_rows(raw, (layers, topk), skip)
    assert got.dtype == np.int32 and got.tobytes() == arr[skip:].tobytes()
    assert routed_experts_rows(raw).tobytes() == arr.tobytes()  # no row shape: every value, flat
    with pytest.raises(BadOutput):
        routed_experts_rows(msgspec.Raw(b'"' + base64.b64encode(arr.tobytes() + b"\x01") + b'"'), (layers, topk), 0)
    with pytest.raises(BadOutput):
        routed_experts_rows(msgspec.Raw(b'"####"'), (layers, topk), 0)
