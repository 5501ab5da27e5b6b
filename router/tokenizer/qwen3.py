"""`QWEN3_CHAT_TEMPLATE` (router/wire/qwen3.py) rendered in plain Python: 10-30x faster than the
sandboxed Jinja render, for the builtin tokenizers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from router.wire.qwen3 import (EMPTY_THINK, GENERATION_PROMPT, IM_END, IM_START, THINK_CLOSE, THINK_OPEN, TOOL_CALL_CLOSE,
                               TOOL_CALL_OPEN, TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN, TOOLS_POSTAMBLE, TOOLS_PREAMBLE)


class _Unusual(Exception):
    """A message shape the fast renderer leaves to the Jinja template (whose output is the spec)."""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = [p.get("text") for p in content if p.get("type") == "text"]
        if all(isinstance(t, str) for t in parts):
            return "".join(parts)
    raise _Unusual


def _tool_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # transformers' `tojson` filter


def render_qwen3(
    messages: Sequence[dict], add_generation_prompt: bool, tools: Sequence[dict] | None, enable_thinking: Any = None,
    clear_thinking: Any = None,
) -> str | None:
    """`QWEN3_CHAT_TEMPLATE` in plain Python (10-30x faster than the sandboxed Jinja render), or
    None for message shapes it does not handle (non-dict messages, non-text content parts, tool
    calls that aren't dicts with a string name and str/dict arguments): the caller renders those
    with the template. tests/test_chat_template.py checks the two agree on random conversations."""
    try:
        if not all(isinstance(m, dict) for m in messages):
            raise _Unusual
        out: list[str] = []
        first = messages[0] if messages else {}
        if tools:
            out.append(IM_START + "system\n")
            if first.get("role") == "system":
                out.append(_text_of(first.get("content")) + "\n\n")
            out.append(TOOLS_PREAMBLE)
            out.extend("\n" + _tool_json(tool) for tool in tools)
            out.append(TOOLS_POSTAMBLE)
        elif first.get("role") == "system":
            out.append(IM_START + "system\n" + _text_of(first.get("content")) + IM_END + "\n")
        last_query = len(messages) - 1
        for i in range(len(messages) - 1, -1, -1):
            m, c = messages[i], messages[i].get("content")
            if m.get("role") == "user" and isinstance(c, str):
                if not (c.startswith(TOOL_RESPONSE_OPEN) and c.endswith(TOOL_RESPONSE_CLOSE)):
                    last_query = i
                    break
        n = len(messages)
        for i, m in enumerate(messages):
            role = m.get("role")
            content = _text_of(m.get("content"))
            if role == "user" or (role == "system" and i > 0):
                out.append(f"{IM_START}{role}\n{content}{IM_END}\n")
            elif role == "assistant":
                reasoning = m.get("reasoning_content")
                if not isinstance(reasoning, str):
                    reasoning = ""
                    if THINK_CLOSE in content:
                        reasoning = content.split(THINK_CLOSE)[0].rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
                        content = content.split(THINK_CLOSE)[-1].lstrip("\n")
                if clear_thinking is False or (i > last_query and (i == n - 1 or reasoning)):
                    out.append(f"{GENERATION_PROMPT}{THINK_OPEN}\n{reasoning.strip(chr(10))}\n{THINK_CLOSE}\n\n")
                    out.append(content.lstrip("\n"))
                else:
                    out.append(GENERATION_PROMPT + content)
                calls = m.get("tool_calls") or []
                if not isinstance(calls, list):
                    raise _Unusual
                for j, call in enumerate(calls):
                    if not isinstance(call, dict):
                        raise _Unusual
                    fn = call.get("function") or call
                    name, arguments = (fn.get("name"), fn.get("arguments")) if isinstance(fn, dict) else (None, None)
                    if not isinstance(name, str) or not isinstance(arguments, (str, dict)):
                        raise _Unusual
                    if content or j:
                        out.append("\n")
                    args = arguments if isinstance(arguments, str) else _tool_json(arguments)
                    out.append(f'{TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": {args}}}\n{TOOL_CALL_CLOSE}')
                out.append(IM_END + "\n")
            elif role == "tool":
                if i == 0 or messages[i - 1].get("role") != "tool":
                    out.append(IM_START + "user")
                out.append(f"\n{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}")
                if i == n - 1 or messages[i + 1].get("role") != "tool":
                    out.append(IM_END + "\n")
        if add_generation_prompt:
            out.append(GENERATION_PROMPT)
            if enable_thinking is False:
                out.append(EMPTY_THINK)
        return "".join(out)
    except (_Unusual, TypeError, ValueError):  # ValueError: tools json.dumps can't write
        return None
