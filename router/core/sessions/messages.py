"""Message-level matching of a request's history against the stored one, and the message a template reads.

A matcher decides whether a message the client re-sent is the stored one (then the stored tokens are
reused). It is called only when the two messages' JSON bytes differ, with both as JSON (`stored_raw`,
`new_raw`) and decoded (`ChatMessageIn`). `sessions.message_matcher` picks one:

- `lenient` (the default): role, content, reasoning_content and tool_calls (function name and
  arguments) agree; `None`, `""` and `[]` are the same thing; tool-call arguments compare as JSON
  objects (type-tagged: `1` is not `1.0`, key order and spacing do not matter), so an agent that
  re-serializes them still matches; tool-call ids and the wire-only `index` are ignored.
- miles' `--session-message-matcher` selectors, with miles' rules: `strict` (role, content,
  reasoning_content, tool_calls equal, with `None`/`""`/`[]` one value and `tool_calls[*].index`
  ignored), `loose_tool_call` (`strict`, or the same with tool-call arguments compared as JSON
  objects; ids, types, names and order still compared), `role_content_only`.
- `package.module:function` (or `package.module.function`): a synchronous `fn(stored, replayed) -> bool`
  over the two messages as JSON objects (dicts), as miles calls a dotted-path matcher. A raise or a
  result that is not a bool is a `MatcherError` (500).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from router.core.errors import RouterError
from router.wire.openai import ChatMessageIn, ToolCallIn

_canonical_encoder = msgspec.json.Encoder(order="sorted")

# (stored_raw, stored, new_raw, new) -> equal
Matcher = Callable[[msgspec.Raw, ChatMessageIn, msgspec.Raw, ChatMessageIn], bool]


class MatcherError(RouterError):
    """The configured message matcher raised or returned a non-bool: the request fails with 500."""


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
    """The `lenient` rule."""
    return (
        a.role == b.role
        and content_text(a.content) == content_text(b.content)
        and (a.reasoning_content or "") == (b.reasoning_content or "")
        and _calls_match(a.tool_calls, b.tool_calls)
    )


def _lenient(stored_raw, stored: ChatMessageIn, new_raw, new: ChatMessageIn) -> bool:
    return messages_match(stored, new)


# ---- miles' matchers, over the messages as JSON objects -------------------------------------------------------

_TEMPLATE_KEYS = ("role", "content", "reasoning_content", "tool_calls")
_INVALID = object()


def _norm(value: Any) -> Any:
    return None if value is None or value == "" or value == [] else value


def _norm_calls(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    return [{k: v for k, v in c.items() if k != "index"} if isinstance(c, dict) else c for c in value]


def strict_match(stored: dict, new: dict) -> bool:
    for key in _TEMPLATE_KEYS:
        a, b = _norm(stored.get(key)), _norm(new.get(key))
        if key == "tool_calls":
            a, b = _norm_calls(a), _norm_calls(b)
        if a != b:
            return False
    return True


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _finite_number(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation as e:
        raise ValueError(text) from e
    if not value.is_finite():
        raise ValueError(text)
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(text)


def _tagged(value: Any, allow_decimal: bool) -> tuple:
    """A JSON value as a type-tagged, key-sorted tuple: numbers compare by value, true is not 1."""
    t = type(value)
    if value is None:
        return ("null",)
    if t is bool:
        return ("boolean", value)
    if t is str:
        return ("string", value)
    if t is int:
        return ("number", Decimal(value))
    if t is float:
        if not math.isfinite(value):
            raise ValueError("non-finite number")
        return ("number", Decimal(str(value)))
    if t is Decimal and allow_decimal and value.is_finite():
        return ("number", value)
    if t is list:
        return ("array", tuple(_tagged(v, allow_decimal) for v in value))
    if t is dict and all(type(k) is str for k in value):
        return ("object", tuple(sorted((k, _tagged(v, allow_decimal)) for k, v in value.items())))
    raise ValueError(f"{t.__name__} is not JSON")


def _json_object(value: Any) -> Any:
    if value is None or value == "":
        return ("object", ())
    parsed = value
    if type(value) is str:
        try:
            parsed = json.loads(value, object_pairs_hook=_no_duplicate_keys, parse_int=Decimal,
                                parse_float=_finite_number, parse_constant=_no_constant)
        except (OverflowError, RecursionError, TypeError, ValueError):
            return _INVALID
    if type(parsed) is not dict:
        return _INVALID
    try:
        return _tagged(parsed, type(value) is str)
    except (RecursionError, TypeError, ValueError):
        return _INVALID


def _same(a: Any, b: Any) -> bool:
    """Type-sensitive structural equality."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _arguments_equal(a: Any, b: Any) -> bool:
    x, y = _json_object(a), _json_object(b)
    if x is _INVALID or y is _INVALID:
        return _same(a, b)
    return x == y


def _call_equal(a: Any, b: Any) -> bool:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return _same(a, b)
    a = {k: v for k, v in a.items() if k != "index"}
    b = {k: v for k, v in b.items() if k != "index"}
    if a.keys() != b.keys():
        return False
    for key in a:
        if key != "function":
            if a[key] != b[key]:
                return False
            continue
        fa, fb = a[key], b[key]
        if not isinstance(fa, dict) or not isinstance(fb, dict):
            if not _same(fa, fb):
                return False
            continue
        if fa.keys() != fb.keys():
            return False
        for k in fa:
            if not (_arguments_equal(fa[k], fb[k]) if k == "arguments" else fa[k] == fb[k]):
                return False
    return True


def loose_tool_call_match(stored: dict, new: dict) -> bool:
    try:
        if strict_match(stored, new):
            return True
    except RecursionError:
        pass
    if any(_norm(stored.get(k)) != _norm(new.get(k)) for k in ("role", "content", "reasoning_content")):
        return False
    a, b = _norm(stored.get("tool_calls")), _norm(new.get("tool_calls"))
    if not isinstance(a, list) or not isinstance(b, list):
        return _same(a, b)
    return len(a) == len(b) and all(_call_equal(x, y) for x, y in zip(a, b))


def role_content_only_match(stored: dict, new: dict) -> bool:
    return all(_norm(stored.get(k)) == _norm(new.get(k)) for k in ("role", "content"))


def _over_dicts(fn: Callable[[dict, dict], Any], name: str) -> Matcher:
    def match(stored_raw, stored, new_raw, new) -> bool:
        try:
            result = fn(msgspec.json.decode(stored_raw), msgspec.json.decode(new_raw))
        except Exception as e:
            raise MatcherError(f"session message matcher {name!r} raised {type(e).__name__}: {e}") from None
        if type(result) is not bool:
            raise MatcherError(f"session message matcher {name!r} must return a bool, got {type(result).__name__}")
        return result
    return match


BUILTIN_MATCHERS: dict[str, Matcher] = {
    "lenient": _lenient,
    "strict": _over_dicts(strict_match, "strict"),
    "loose_tool_call": _over_dicts(loose_tool_call_match, "loose_tool_call"),
    "role_content_only": _over_dicts(role_content_only_match, "role_content_only"),
}


def resolve_matcher(selector: str) -> Matcher:
    """A built-in name or `pkg.module:function` / `pkg.module.function`; ValueError naming the problem."""
    if selector in BUILTIN_MATCHERS:
        return BUILTIN_MATCHERS[selector]
    names = ", ".join(BUILTIN_MATCHERS)
    module, sep, attr = selector.partition(":") if ":" in selector else selector.rpartition(".")
    if not module or not attr:
        raise ValueError(f"unknown matcher {selector!r} (built-ins: {names}; or 'package.module:function')")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load matcher {selector!r}: {e}") from None
    if not callable(fn) or getattr(fn, "__code__", None) is not None and fn.__code__.co_flags & 0x80:
        raise ValueError(f"matcher {selector!r} must be a synchronous function")
    return _over_dicts(fn, selector)


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
