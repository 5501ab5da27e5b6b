"""Bodies of the router's own endpoints (worker admin, trajectory retrieval, errors)."""

from __future__ import annotations

from typing import Any, Literal, get_args

import msgspec

# The retrieve request's `format` and `routed_experts_dtype` (the binary form: router/wire/retrieve.py)
Format = Literal["json", "safetensors"]
ExpertsDtype = Literal["narrow", "int32"]
FORMATS = get_args(Format)
EXPERTS_DTYPES = get_args(ExpertsDtype)


# Router-owned request bodies ignore fields they do not know (clients such as miles' send extras,
# and a newer client must not be refused by an older router); only the fields below are checked.

class WorkerUrlBody(msgspec.Struct):
    url: str | None = None
    worker_url: str | None = None
    labels: Any = None  # a table of label strings (router/core/labels.py checks it)


class RidField(msgspec.Struct):
    """A generation body's `rid` alone (sticky routing reads its lineage); the rest is skipped."""

    rid: Any = None


rid_decoder = msgspec.json.Decoder(RidField)


class RetrieveRequest(msgspec.Struct):
    text: str | None = None
    texts: list[str] | None = None
    # miles' radix-tree client sends it; false -> rollout_logp is all zeros (as miles' router did)
    return_logp: bool = True
    # The request id SGLang echoed in meta_info.id (and the router in the x-miles-router-rid header of the
    # /generate reply): selects one trajectory when several token spellings share the text. `rids` goes with
    # `texts`, one entry (or null) per text.
    rid: str | None = None
    rids: list[str | None] | None = None
    # The reply's form: "json" (the default; also when absent, unless the Accept header prefers
    # application/octet-stream) or "safetensors" (router/wire/retrieve.py). The body field wins over the header.
    format: Format | None = None
    # The safetensors form's routed experts: "narrow" (the narrowest width holding the ids) or SGLang's "int32".
    routed_experts_dtype: ExpertsDtype = "narrow"


class Trajectory(msgspec.Struct, omit_defaults=False):
    """What /retrieve_from_text answers per text: miles-compatible keys plus exactness details."""

    response: str
    tokens: list[int]
    loss_mask: list[int]
    rollout_logp: list[float]
    token_length: int
    loss_mask_length: int
    exact: bool
    # "trajectory" | "prefix" | "ambiguous" | "inside_prompt" | "partial" | "none" (router/net/endpoints.py)
    match: str
    matched_chars: int
    text_chars: int
    fresh_tokens: int
    weight_version: str | None
    weight_versions: list[str]
    routed_experts: str | None = None
    routed_experts_shape: list[int] | None = None
    rid: str | None = None  # the answered trajectory's request id (exact answers only)
    alternatives: int = 0  # distinct stored token spellings of the whole text (more than 1: see `rid`)


class RetrieveBatch(msgspec.Struct):
    results: list[Trajectory]


json_encoder = msgspec.json.Encoder()
worker_url_decoder = msgspec.json.Decoder(WorkerUrlBody)
retrieve_request_decoder = msgspec.json.Decoder(RetrieveRequest)


def error_body(message: str, **extra) -> bytes:
    return json_encoder.encode({"error": message, **extra})
