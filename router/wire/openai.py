"""OpenAI chat-completions shapes the router writes (and reads back from clients).

Only the assistant-message pieces live here so far: a parsed tool call and the reply message.
Field order follows OpenAI's own JSON; `None` fields are written as ``null`` like OpenAI/SGLang do.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class FunctionCall(msgspec.Struct):
    """`tool_calls[i].function`: the tool's name and its arguments as a JSON text."""

    name: str
    arguments: str  # a JSON object's text, exactly as the model wrote it


class ToolCall(msgspec.Struct, kw_only=True):
    """One `tool_calls[i]` of an assistant message; `index` is its position in the message
    (OpenAI puts it on streamed deltas; clients that rebuild messages drop it)."""

    id: str
    index: int
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(msgspec.Struct, kw_only=True):
    """`choices[i].message` of a chat.completion (and the `delta` of a one-chunk stream)."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
