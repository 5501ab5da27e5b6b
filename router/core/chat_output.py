"""Parse a chat model's generated text into an OpenAI assistant message (pure, no I/O).

The formats are Qwen3's (router/wire/qwen3.py, what the builtin chat template renders back):

- Reasoning: ``<think>\\n{reasoning}\\n</think>\\n\\n{rest}``. A reply that starts inside thinking
  (the prompt already opened ``<think>``, as Qwen3 thinking models' templates do) has a
  ``</think>`` and no ``<think>`` before it: everything before it is reasoning. A ``<think>`` that
  is never closed (the generation hit its length limit while thinking) makes the rest reasoning.
- Tool calls (Hermes style): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  blocks, any number, after the content. A block whose body is not a JSON object with a string
  ``name`` and an object ``arguments`` (or a string holding one) stays in the content as written,
  as does an unterminated block; parsing never raises. ``arguments`` is the exact text the model
  wrote for the object (not re-serialized), so the trainer's tokens and the agent's view agree.
- Content: the text outside reasoning and parsed blocks. The template's separators are removed:
  the ``"\\n"`` before each parsed block and ``"\\n"`` runs at both ends (content and reasoning
  keep any other whitespace). Empty content or reasoning is ``None`` (as SGLang answers).

Tool-call ids are derived from a caller-given seed and the call's index (`tool_call_id`), so a
replayed or retried turn gets the same ids.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal

import msgspec

from router.wire.openai import AssistantMessage, FunctionCall, ToolCall
from router.wire.qwen3 import THINK_CLOSE, THINK_OPEN, TOOL_CALL_CLOSE, TOOL_CALL_OPEN

__all__ = ["AssistantOutput", "finish_reason", "parse_assistant_output", "tool_call_id"]

CALL_OPEN, CALL_CLOSE = TOOL_CALL_OPEN, TOOL_CALL_CLOSE
# A block's body never holds another opening tag: an unterminated block does not swallow the next.
_CALL_BLOCK = re.compile(
    re.escape(CALL_OPEN) + r"((?:(?!" + re.escape(CALL_OPEN) + r").)*?)" + re.escape(CALL_CLOSE), re.DOTALL
)
_json = json.JSONDecoder()
_WS = " \t\n\r"


class AssistantOutput(msgspec.Struct, kw_only=True):
    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall]

    def to_message(self) -> AssistantMessage:
        """The OpenAI `choices[i].message` (``tool_calls`` null when there are none)."""
        return AssistantMessage(
            content=self.content, reasoning_content=self.reasoning_content, tool_calls=self.tool_calls or None
        )


def tool_call_id(seed: str, index: int) -> str:
    """``call_`` + 24 hex digits, a function of (seed, index) only."""
    digest = hashlib.blake2b(f"{seed}\x00{index}".encode(), digest_size=12).hexdigest()
    return f"call_{digest}"


def finish_reason(engine_finish: str, has_tool_calls: bool) -> Literal["stop", "length", "tool_calls"]:
    """The OpenAI finish_reason for an engine finish type (SGLang's ``finish_reason.type``).

    A stop with tool calls is ``tool_calls``; a length finish stays ``length`` even if blocks
    were parsed before the cut. Anything but "stop"/"length" (e.g. "abort") is a ValueError:
    it is not a finished chat turn.
    """
    if engine_finish == "stop":
        return "tool_calls" if has_tool_calls else "stop"
    if engine_finish == "length":
        return "length"
    raise ValueError(f"engine finish_reason {engine_finish!r} is not a finished chat turn (stop or length)")


def _none_if_empty(text: str) -> str | None:
    text = text.strip("\n")
    return text or None


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, the rest of the text)."""
    close = text.find(THINK_CLOSE)
    open_ = text.find(THINK_OPEN)
    starts_thinking = open_ != -1 and text[:open_].strip(_WS) == ""
    if starts_thinking and (close == -1 or open_ < close):
        body_start = open_ + len(THINK_OPEN)
        if close == -1:  # never closed: cut off while thinking
            return _none_if_empty(text[body_start:]), ""
        return _none_if_empty(text[body_start:close]), text[close + len(THINK_CLOSE) :]
    if close != -1 and open_ == -1:  # the prompt opened <think>: the reply starts inside it
        return _none_if_empty(text[:close]), text[close + len(THINK_CLOSE) :]
    return None, text


def _object_members(body: str) -> dict[str, tuple[object, int, int]] | None:
    """Top-level members of the JSON object `body` as key -> (value, start, end of its text),
    or None if `body` is not exactly one JSON object."""
    i = len(body) - len(body.lstrip(_WS))
    if not body.startswith("{", i):
        return None
    members: dict[str, tuple[object, int, int]] = {}
    i += 1
    try:
        while True:
            while i < len(body) and body[i] in _WS:
                i += 1
            if body.startswith("}", i) and not members:
                i += 1
                break
            key, i = _json.raw_decode(body, i)
            if not isinstance(key, str):
                return None
            while i < len(body) and body[i] in _WS:
                i += 1
            if not body.startswith(":", i):
                return None
            i += 1
            while i < len(body) and body[i] in _WS:
                i += 1
            start = i
            value, i = _json.raw_decode(body, i)
            members[key] = (value, start, i)
            while i < len(body) and body[i] in _WS:
                i += 1
            if body.startswith(",", i):
                i += 1
                continue
            if body.startswith("}", i):
                i += 1
                break
            return None
    except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
        return None
    return members if body[i:].strip(_WS) == "" else None


def _parse_call(body: str) -> FunctionCall | None:
    members = _object_members(body)
    if members is None or not isinstance(members.get("name", (None,))[0], str):
        return None
    name = members["name"][0]
    if "arguments" not in members:
        return FunctionCall(name=name, arguments="{}")
    value, start, end = members["arguments"]
    if isinstance(value, dict):
        return FunctionCall(name=name, arguments=body[start:end])
    if isinstance(value, str):  # some models write the arguments as a JSON string holding the object
        try:
            if isinstance(json.loads(value), dict):
                return FunctionCall(name=name, arguments=value)
        except (ValueError, RecursionError):
            pass
    return None


def parse_assistant_output(text: str, *, tools_enabled: bool = True, id_seed: str = "") -> AssistantOutput:
    """Split generated `text` (stop token already stripped) into content, reasoning and tool calls.

    `tools_enabled=False` (the request had no tools) leaves ``<tool_call>`` blocks in the content.
    Tool-call ids are `tool_call_id(id_seed, index)`: pass a seed unique to the turn (e.g. the
    session id and the turn's position) to get ids that are stable across replays.
    """
    reasoning, rest = split_reasoning(text)
    calls: list[ToolCall] = []
    if tools_enabled and CALL_OPEN in rest:
        kept: list[str] = []
        pos = 0
        for block in _CALL_BLOCK.finditer(rest):
            function = _parse_call(block.group(1))
            if function is None:
                continue  # malformed: stays in the content as written
            before = rest[pos : block.start()]
            kept.append(before[:-1] if before.endswith("\n") else before)  # the template's separator
            calls.append(ToolCall(id=tool_call_id(id_seed, len(calls)), index=len(calls), function=function))
            pos = block.end()
        kept.append(rest[pos:])
        rest = "".join(kept)
    return AssistantOutput(content=_none_if_empty(rest), reasoning_content=reasoning, tool_calls=calls)
