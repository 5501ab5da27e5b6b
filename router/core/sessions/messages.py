"""Message-level matching of a request's history against the stored one.

Two messages match when the keys a chat template reads agree: role, content, reasoning_content
and tool_calls (function name + arguments). `None`, `""` and `[]` are the same thing. Tool-call
arguments are compared as JSON objects (type-tagged: `1` is not `1.0`, key order and spacing do
not matter), so an agent that re-serializes arguments still matches. Tool-call ids and the
wire-only `index` are ignored.
"""

from __future__ import annotations

from typing import Any

import msgspec

from router.wire.openai import ChatMessageIn, ToolCallIn

_canonical_encoder = msgspec.json.Encoder(order="sorted")


def content_text(content: str | list | None) -> str:
    """A message's content as the text a template renders ("" for None/""/[])."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text or "" for p in content if p.type == "text")


def arguments_key(arguments: str | dict[str, Any] | None) -> bytes:
    """Canonical JSON of tool-call arguments; a string that is not JSON compares as itself."""
    if arguments is None or arguments == "":
        return b"{}"
    if isinstance(arguments, str):
        try:
            value = msgspec.json.decode(arguments)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return b"\x00" + arguments.encode("utf-8", "surrogatepass")
    else:
        value = arguments
    return _canonical_encoder.encode(value)


def _calls_match(a: list[ToolCallIn] | None, b: list[ToolCallIn] | None) -> bool:
    a = a or ()
    b = b or ()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.function.name != y.function.name:
            return False
        xa, ya = x.function.arguments, y.function.arguments
        if xa != ya and arguments_key(xa) != arguments_key(ya):
            return False
    return True


def messages_match(a: ChatMessageIn, b: ChatMessageIn) -> bool:
    return (
        a.role == b.role
        and content_text(a.content) == content_text(b.content)
        and (a.reasoning_content or "") == (b.reasoning_content or "")
        and _calls_match(a.tool_calls, b.tool_calls)
    )


def message_dict(m: ChatMessageIn) -> dict[str, Any]:
    """A message as a chat template reads it: content as text, arguments as an object."""
    out: dict[str, Any] = {"role": m.role, "content": content_text(m.content)}
    if m.reasoning_content:
        out["reasoning_content"] = m.reasoning_content
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            args = c.function.arguments
            if isinstance(args, str):
                try:
                    args = msgspec.json.decode(args) if args else {}
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                    pass  # the template gets the string as the client sent it
            call = {"type": "function", "function": {"name": c.function.name, "arguments": args}}
            if c.id is not None:
                call["id"] = c.id
            calls.append(call)
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out
