"""Bodies of the router's own endpoints (worker admin, trajectory retrieval, errors)."""

from __future__ import annotations

import msgspec


class WorkerUrlBody(msgspec.Struct):
    url: str | None = None
    worker_url: str | None = None


class RetrieveRequest(msgspec.Struct, forbid_unknown_fields=True):
    text: str | None = None
    texts: list[str] | None = None


class Trajectory(msgspec.Struct, omit_defaults=False):
    """What /retrieve_from_text answers per text: miles-compatible keys plus exactness details."""

    response: str
    tokens: list[int]
    loss_mask: list[int]
    rollout_logp: list[float]
    token_length: int
    loss_mask_length: int
    exact: bool
    match: str  # "trajectory" | "prefix" | "inside_prompt" | "partial" | "none" (router/net/endpoints.py)
    matched_chars: int
    text_chars: int
    fresh_tokens: int
    weight_version: str | None
    weight_versions: list[str]
    routed_experts: str | None = None
    routed_experts_shape: list[int] | None = None


class RetrieveBatch(msgspec.Struct):
    results: list[Trajectory]


json_encoder = msgspec.json.Encoder()
worker_url_decoder = msgspec.json.Decoder(WorkerUrlBody)
retrieve_request_decoder = msgspec.json.Decoder(RetrieveRequest)


def error_body(message: str, **extra) -> bytes:
    return json_encoder.encode({"error": message, **extra})
