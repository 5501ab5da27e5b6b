"""The chat completion a session turn answers with, shaped as SGLang's (which miles' session server passes on).

Non-stream: `{"id", "object": "chat.completion", "created", "model", "choices": [{"index", "message",
"logprobs": null, "finish_reason", "matched_stop", "meta_info"}], "usage": {"prompt_tokens",
"completion_tokens", "total_tokens", "prompt_tokens_details": {"cached_tokens"}, "reasoning_tokens"},
"metadata": {"weight_version"}}`; `id` is the worker's request id (`meta_info.id`), as SGLang's is.
`stream: true` is miles' one-chunk stream: `data: <chunk>\n\ndata: [DONE]\n\n`, the chunk holding the whole
message as its delta, the finish reason and the usage. The same function answers the client and rebuilds
a turn's record for `GET /sessions/{id}`, so the two never disagree.
"""

from __future__ import annotations

from typing import Any

import msgspec

from router.wire.openai import (ChatCompletion, ChatCompletionChunk, ChoiceOut, ChunkChoice, PromptTokensDetails,
                                ReplyMetadata, Usage, json_encoder)

SSE_DONE = b"data: [DONE]\n\n"


def completion(*, rid: str, created: int, model: str, message: msgspec.Raw, finish_reason: str, matched_stop: Any,
               meta_info: msgspec.Raw, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None,
               reasoning_tokens: int, weight_version: str | None) -> ChatCompletion:
    usage = Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens,
                  PromptTokensDetails(cached_tokens) if cached_tokens is not None else None, reasoning_tokens)
    return ChatCompletion(rid, "chat.completion", created, model,
                          [ChoiceOut(0, message, None, finish_reason, matched_stop, meta_info)], usage,
                          ReplyMetadata(weight_version))


def stream_body(c: ChatCompletion) -> bytes:
    """miles' fake stream: one chunk with the whole message as its delta (and the usage), then [DONE]."""
    choice = c.choices[0]
    message = msgspec.json.decode(choice.message)
    delta: dict[str, Any] = {"role": message.get("role", "assistant"), "content": message.get("content")}
    if message.get("reasoning_content") is not None:
        delta["reasoning_content"] = message["reasoning_content"]
    if message.get("tool_calls"):
        delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(message["tool_calls"])]
    chunk = ChatCompletionChunk(c.id, "chat.completion.chunk", c.created, c.model,
                                [ChunkChoice(0, msgspec.Raw(json_encoder.encode(delta)), choice.finish_reason)],
                                c.usage)
    return b"data: " + json_encoder.encode(chunk) + b"\n\n" + SSE_DONE
