"""OpenAI chat-completions shapes the router writes (and reads back from clients).

Requests are decoded leniently (unknown fields ignored: agent frameworks send many), but the
fields the router acts on are typed, so a wrong type is a 400 naming the field.
Field order follows OpenAI's own JSON; `None` fields are written as ``null`` like OpenAI/SGLang do.
"""

from __future__ import annotations

from typing import Any, Literal

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


# ---- requests (the session API decodes these) ----------------------------------------------------------------------------------


class ContentPart(msgspec.Struct):
    type: str = "text"
    text: str | None = None


class FunctionCallIn(msgspec.Struct):
    name: str = ""
    # OpenAI sends a JSON string; some harnesses send the object itself.
    arguments: str | dict[str, Any] | None = None


class ToolCallIn(msgspec.Struct):
    function: FunctionCallIn
    id: str | None = None
    type: str = "function"
    # `index` (wire-only, from stream deltas) is not decoded: it never takes part in matching.


class ChatMessageIn(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatRequest(msgspec.Struct):
    """The fields of a chat.completions request the router acts on. `messages` stay JSON as sent
    (router/wire/chat_messages.py decodes one on demand): a session turn decodes only the messages
    it appends and those whose bytes differ from the stored history's."""

    messages: list[msgspec.Raw]
    model: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    chat_template_kwargs: dict[str, Any] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None


chat_request_decoder = msgspec.json.Decoder(ChatRequest)


class BadTool(ValueError):
    """`tools[index]` is not a function tool SGLang would accept."""


def sglang_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """`tools` as SGLang's chat endpoint hands them to the chat template (miles renders them the same way):
    each one validated as SGLang's `Tool` model and dumped, `{"type", "function": {"description", "name",
    "parameters", "strict"}}` (a bare function is wrapped; other keys are dropped). BadTool names a tool
    that is not one."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise BadTool(f"tools[{i}] is not an object")
        if "function" not in tool:
            tool = {"type": "function", "function": tool}
        kind, fn = tool.get("type", "function"), tool["function"]
        if not isinstance(kind, str) or not isinstance(fn, dict):
            raise BadTool(f"tools[{i}] must be {{\"type\": str, \"function\": {{...}}}}")
        name, description, strict = fn.get("name"), fn.get("description"), fn.get("strict", False)
        if not isinstance(name, str):
            raise BadTool(f"tools[{i}].function.name must be a string")
        if description is not None and not isinstance(description, str):
            raise BadTool(f"tools[{i}].function.description must be a string")
        if not isinstance(strict, bool):
            raise BadTool(f"tools[{i}].function.strict must be a boolean")
        out.append({"type": kind, "function": {"description": description, "name": name,
                                               "parameters": fn.get("parameters"), "strict": strict}})
    return out


# ---- replies: SGLang's chat.completion shape (what miles' session server passes through) ----------------


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    reasoning_tokens: int = 0


class ChoiceOut(msgspec.Struct):
    index: int
    message: msgspec.Raw  # an AssistantMessage, as stored with the turn
    logprobs: None
    finish_reason: str
    matched_stop: Any
    meta_info: msgspec.Raw  # the worker's, minus routed_experts and indexer_topk


class ReplyMetadata(msgspec.Struct):
    weight_version: str | None


class ChatCompletion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChoiceOut]
    usage: Usage
    metadata: ReplyMetadata


class ChunkChoice(msgspec.Struct):
    index: int
    delta: msgspec.Raw
    finish_reason: str | None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


json_encoder = msgspec.json.Encoder()
