"""Bodies of the session API's own endpoints (router/net/sessions.py)."""

from __future__ import annotations

from typing import Any

import msgspec


class SamplesRequest(msgspec.Struct):  # unknown fields ignored, like every router-owned body
    max_seq_len: int | None = None
    metadata: dict[str, Any] | None = None  # agent metadata, e.g. {"reward": 1.0}; server keys win


samples_request_decoder = msgspec.json.Decoder(SamplesRequest)


class TurnRecord(msgspec.Struct, kw_only=True):
    """What a turn keeps of its exchange, besides its tokens (router/core/sessions/tree.py `Turn`): enough
    to answer `GET /sessions/{id}` in miles' record shape and to assemble miles' samples. Stored as JSON
    with the turn (router/wire/session_store.py); fields added later have defaults, so older rows read."""

    request_timestamp: float  # when the request arrived (unix time)
    timestamp: float  # when the turn was committed
    meta_info: msgspec.Raw  # the worker's meta_info minus routed_experts / indexer_topk
    # The chat request as sent upstream minus its bulky parts: the client's fields in their order ("messages"
    # a null placeholder; `stream`/`stream_options` removed), then the fields the session sets (logprobs,
    # return_meta_info, ..., chat_template_kwargs). GET adds the messages, input_ids and the R3 start back.
    request: msgspec.Raw = msgspec.Raw(b"{}")
    message: msgspec.Raw = msgspec.Raw(b"null")  # choices[0].message exactly as the client got it
    finish_reason: str = ""  # choices[0].finish_reason as the client got it
    matched_stop: Any = None
    created: int = 0
    model: str = "default"
    cached_tokens: int = 0  # meta_info.cached_tokens (prefix_cache_info)
    prompt_tokens: int = 0  # meta_info.prompt_tokens
    reasoning_tokens: int = 0
    e2e_latency: float | None = None  # meta_info.e2e_latency (the lifecycle segment's start)
    status_code: int = 200


turn_record_decoder = msgspec.json.Decoder(TurnRecord)
