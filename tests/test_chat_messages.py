"""decode_chat_request: reusing the last request's bytes decodes exactly what a whole decode does."""

from __future__ import annotations

import json
import sys

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.wire import DECODE_ERRORS
from router.wire.chat_messages import BadMessage, RequestMessages, decode_chat_request
from router.wire.openai import ChatMessageIn, chat_request_decoder


def whole(body: bytes):
    """The reference: chat_request_decoder on the whole body (fields, messages as bytes) or its error."""
    try:
        req = chat_request_decoder.decode(body)
    except DECODE_ERRORS as e:
        return ("error", type(e), str(e))
    return _fields(req)


def _fields(req):
    out = msgspec.structs.asdict(req)
    out["messages"] = [bytes(m) for m in req.messages]
    return out


def reused(body: bytes, shared):
    try:
        d = decode_chat_request(body, shared)
    except DECODE_ERRORS as e:
        return ("error", type(e), str(e)), None
    assert d.messages.raw is d.request.messages
    return _fields(d.request), d


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8) | st.sampled_from(
    ["", "]", ",", '"', "\\", "},{", "ü✓ 日本", '{"role":"user"}'])
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": _text | st.none()},
    optional={"tool_calls": st.lists(st.fixed_dictionaries(
        {"id": _text, "type": st.just("function"),
         "function": st.fixed_dictionaries({"name": _text, "arguments": _text})}), max_size=2),
        "tool_call_id": _text})
_extra = st.fixed_dictionaries({}, optional={"model": _text, "max_tokens": st.integers(0, 9), "stream": st.booleans(),
                                            "tools": st.lists(st.fixed_dictionaries({"type": st.just("function")}),
                                                              max_size=1),
                                            "metadata": st.dictionaries(_text, _text, max_size=2)})
_style = st.tuples(st.sampled_from([(",", ":"), (", ", ": ")]), st.sampled_from([None, 1]), st.booleans(),
                   st.integers(0, 3))


def render(messages, extra, style) -> bytes:
    """A body as some client spells it: key order (messages first, last or between), separators,
    indentation, ensure_ascii."""
    separators, indent, ascii_only, where = style
    items = list(extra.items())
    items.insert(min(where, len(items)), ("messages", messages))
    return json.dumps(dict(items), separators=separators, indent=indent, ensure_ascii=ascii_only).encode()


_edit = st.tuples(st.integers(0, 10**6), st.sampled_from(["insert", "delete", "replace"]),
                  st.sampled_from(list(b']},["{ \\x:0') + [0xFF, 0xC3]))


def mutate(body: bytes, edit) -> bytes:
    at, kind, byte = edit
    at %= len(body) + 1
    if kind == "insert":
        return body[:at] + bytes([byte]) + body[at:]
    if kind == "delete":
        return body[:at] + body[at + 1:]
    return body[:at] + bytes([byte]) + body[at + 1:]


@settings(max_examples=400, deadline=None)
@given(first=st.lists(_message, min_size=1, max_size=5), extra=_extra, style=_style,
       steps=st.lists(st.tuples(st.sampled_from(["append", "resend", "cut", "change_last", "change_extra",
                                                 "restyle", "new"]),
                                st.lists(_message, min_size=1, max_size=3), _extra, _style,
                                st.none() | _edit), min_size=1, max_size=4))
def test_reused_decode_equals_the_whole_decode(first, extra, style, steps):
    """For a chain of requests on one session (appends, resends, cuts, a changed last message or
    field, another spelling, a new conversation, each optionally with one byte inserted, deleted or
    replaced anywhere), every request decodes to exactly what chat_request_decoder makes of its
    whole body, errors included; the history is reused whenever the bytes allow it."""
    messages = list(first)
    body = render(messages, extra, style)
    got, decoded = reused(body, None)
    assert got == whole(body)
    shared = decoded.prefix if decoded else None
    clean = True  # `shared` is the last render's, unedited
    for kind, more, new_extra, new_style, edit in steps:
        if kind == "append":
            messages = messages + more
        elif kind == "cut":
            messages = messages[:max(len(messages) - len(more), 1)]
        elif kind == "change_last":
            messages = messages[:-1] + more[:1]
        elif kind == "change_extra":
            extra = new_extra
        elif kind == "restyle":
            style = new_style
        elif kind == "new":
            messages, extra, style = more, new_extra, new_style
        body = render(messages, extra, style)
        if edit is not None:
            body = mutate(body, edit)
        got, decoded = reused(body, shared)
        assert got == whole(body)
        if kind in ("append", "resend") and edit is None and clean and shared is not None:
            assert decoded.spliced  # the same spelling: only the messages from the last one on were parsed
        if decoded is not None:
            shared = decoded.prefix
        clean = decoded is not None and edit is None


def test_reused_decode_edge_cases():
    base = b'{"model":"m","messages":[{"role":"user","content":"a"} , {"role":"assistant","content":"b"}],"n":1}'
    d = decode_chat_request(base)
    assert not d.spliced and d.prefix is not None
    assert base[d.prefix.first:].startswith(b'{"role":"user"') and base[d.prefix.last:].startswith(b'{"role":"ass')
    # the next turn (same spelling) is spliced and keeps the history's message objects
    nxt = base[:-len(b'],"n":1}')] + b', {"role":"user","content":"c"}],"n":1}'
    e = decode_chat_request(nxt, d.prefix)
    assert e.spliced and e.request.messages[:2] == d.request.messages
    assert all(x is y for x, y in zip(e.request.messages, d.request.messages))
    assert [bytes(m) for m in e.request.messages] == [bytes(m) for m in chat_request_decoder.decode(nxt).messages]
    # every byte before the last message repeats, but the array ends there: a trailing comma is an error
    with pytest.raises(msgspec.DecodeError):
        decode_chat_request(base[:d.prefix.last] + b"]}", d.prefix)
    # a repeated "messages" key: the last one counts in both decodes
    dup = base[:-1] + b',"messages":[{"role":"user","content":"z"}]}'
    assert reused(dup, d.prefix)[0] == whole(dup)
    # one message: nothing to share with the next request
    assert decode_chat_request(b'{"messages":[{"role":"user"}]}').prefix is None


def test_request_messages_decode_on_demand_and_name_the_bad_one():
    d = decode_chat_request(b'{"messages":[{"role":"user","content":"a"},{"role":5},"x"]}')
    m = d.messages
    assert m[0] == ChatMessageIn(role="user", content="a")
    for i in (1, 2):
        with pytest.raises(BadMessage) as e:
            m[i]
        assert e.value.index == i and isinstance(e.value.error, msgspec.ValidationError)
    # the messages own their bytes: only the shared prefix (and the decoded document, which a request keeps
    # while it is handled) refer to the body, not each message
    body = b'{"messages":[{"role":"user","content":"a"},{"role":"user","content":"b"},{"role":"user"}]}'
    before = sys.getrefcount(body)
    kept = decode_chat_request(body)
    after = sys.getrefcount(body)
    assert after == before + 2 and kept.prefix.body is body and kept.document is body
    assert kept.fields_without_messages() == {"messages": msgspec.Raw(b"null")}
    assert RequestMessages.of([ChatMessageIn(role="user", content="a")])[0].content == "a"
