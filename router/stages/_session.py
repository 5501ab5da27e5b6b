"""What the session stages hand each other through `ex.scratch`, and the worker-reply decode they share."""

from __future__ import annotations

import binascii
import math
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from router.wire import DECODE_ERRORS, decode_error_text
from router.core.pipeline import Exchange
from router.wire.openai import ChatMessageIn, ChatRequest

TURN = "session_turn"  # scratch key of the PendingTurn


@dataclass(slots=True)
class PendingTurn:
    """One chat request on its way through the session pipeline."""

    session: Any  # router.core.sessions.registry.Session
    request: ChatRequest
    parent: int  # attach point: the turn this one extends, -1 for a new root
    new_messages: list[ChatMessageIn]  # the request's messages after the attach point's path
    new_raws: list[msgspec.Raw]  # the same as the client's JSON (owning its bytes), for the match index
    request_seq: int
    requested_at: float
    prompt_ids: np.ndarray | None = None  # tokens the new messages add (set by the template stage)
    input_len: int = 0  # tokens the worker receives
    # The record's request (router/wire/sessions.py TurnRecord.request): the client's fields, then the
    # ones the session sets; set by session_request, completed by session_generate.
    request_fields: dict[str, msgspec.Raw] = field(default_factory=dict)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # the launch defaults + the request's
    r3_start: int = 0  # first position whose routed-experts row the worker returns
    want_r3: bool = False
    r3_incremental: bool = False  # the worker was asked for the new rows only (routed_experts_start_len)
    r3_shape: tuple[int, int] = (0, 0)  # (layers, top_k)
    output: Any = None  # WorkerOutput (set by the output stage)
    assistant: Any = None  # AssistantOutput: content, reasoning_content, tool_calls
    extra: dict[str, Any] = field(default_factory=dict)


class FinishReason(msgspec.Struct):
    type: str = "stop"
    matched: Any = None


class _Reply(msgspec.Struct):
    meta_info: dict[str, msgspec.Raw]
    text: str | None = None
    output_ids: list[int] | None = None


_reply_decoder = msgspec.json.Decoder(_Reply)
_logprobs_decoder = msgspec.json.Decoder(list[tuple[float | None, int, msgspec.Raw]])
_finish_decoder = msgspec.json.Decoder(FinishReason | None)
_str_decoder = msgspec.json.Decoder(str | None)
_int_decoder = msgspec.json.Decoder(int | None)
_float_decoder = msgspec.json.Decoder(float | None)
# meta_info keys the client copy loses (miles strips both: they stay with the turn)
CLIENT_STRIPPED_META = ("routed_experts", "indexer_topk")


class BadWorkerReply(Exception):
    """The worker's 200 reply lacks what a session turn needs: 502."""


@dataclass(slots=True)
class WorkerOutput:
    text: str
    output_ids: np.ndarray  # int32, stop token included
    logprobs: np.ndarray  # float64
    finish_type: str  # SGLang: stop / length / abort
    weight_version: str | None
    response_id: str
    routed_experts: np.ndarray | None  # int32 [rows, layers, top_k], the first `skip_rows` returned rows left out
    routed_experts_error: str | None  # the payload could not be read (the turn still succeeds; /samples: 422)
    client_meta: bytes  # meta_info JSON minus routed_experts and indexer_topk
    matched_stop: Any = None
    cached_tokens: int | None = None
    prompt_tokens: int = 0
    reasoning_tokens: int = 0
    e2e_latency: float | None = None


def decode_rows(raw: msgspec.Raw, shape: tuple[int, int], skip_rows: int) -> np.ndarray:
    """SGLang's base64 int32 routed experts -> int32 [rows, layers, top_k], without the first
    `skip_rows` rows. Only the kept rows are decoded: base64 is cut at a row boundary that is also a
    4-character group boundary, so a turn costs its new rows, not the whole history's."""
    text = memoryview(raw)  # tens of MB at long contexts: never copied whole
    if len(text) < 2 or text[0] != 0x22 or text[-1] != 0x22:
        raise BadWorkerReply("worker reply's routed_experts is not a base64 string")
    text = text[1:-1]
    row_bytes = shape[0] * shape[1] * 4
    if len(text) % 4:
        raise BadWorkerReply(f"worker reply's routed_experts is not base64 ({len(text)} characters)")
    pad = (len(text) > 0 and text[-1] == 0x3D) + (len(text) > 1 and text[-2] == 0x3D)
    total = len(text) // 4 * 3 - pad
    if total % row_bytes:
        raise BadWorkerReply(f"worker reply's routed_experts has {total} bytes, not whole rows of layers x top_k "
                             f"= {shape[0]} x {shape[1]} int32")
    # rows per 4-char-aligned block: lcm(row_bytes, 3) bytes
    block_rows = 3 // math.gcd(row_bytes, 3)
    skip = min(skip_rows, total // row_bytes) // block_rows * block_rows
    start = skip * row_bytes // 3 * 4
    try:
        # strict_mode is ~10x slower; a character outside the alphabet is skipped and caught by the length
        data = binascii.a2b_base64(text[start:])
    except (binascii.Error, ValueError) as e:
        raise BadWorkerReply(f"worker reply's routed_experts is not base64: {e}") from None
    if len(data) != total - skip * row_bytes:
        raise BadWorkerReply("worker reply's routed_experts is not base64 (characters outside the alphabet)")
    rows = np.frombuffer(data, dtype="<i4").astype(np.int32, copy=False).reshape(-1, shape[0], shape[1])
    return rows[skip_rows - skip:] if skip_rows > skip else rows


def decode_worker_output(body: bytes, r3_shape: tuple[int, int], skip_rows: int = 0) -> WorkerOutput:
    try:
        reply = _reply_decoder.decode(body)
    except DECODE_ERRORS as e:
        raise BadWorkerReply(f"worker reply is not an SGLang /generate output: {decode_error_text(e, body)}") from None
    meta = reply.meta_info
    if reply.output_ids is None or reply.text is None:
        raise BadWorkerReply("worker reply has no output_ids/text")
    raw_lps = meta.get("output_token_logprobs")
    if raw_lps is None:
        raise BadWorkerReply("worker reply has no meta_info.output_token_logprobs (return_logprob was sent)")
    try:
        triples = _logprobs_decoder.decode(raw_lps)
        finish = _finish_decoder.decode(meta["finish_reason"]) if "finish_reason" in meta else None
        version = _str_decoder.decode(meta["weight_version"]) if "weight_version" in meta else None
        rid = _str_decoder.decode(meta["id"]) if "id" in meta else None
        completion = _int_decoder.decode(meta["completion_tokens"]) if "completion_tokens" in meta else None
        cached = _int_decoder.decode(meta["cached_tokens"]) if "cached_tokens" in meta else None
        prompt_tokens = _int_decoder.decode(meta["prompt_tokens"]) if "prompt_tokens" in meta else None
        reasoning = _int_decoder.decode(meta["reasoning_tokens"]) if "reasoning_tokens" in meta else None
        latency = _float_decoder.decode(meta["e2e_latency"]) if "e2e_latency" in meta else None
        experts_raw = meta.get("routed_experts")
    except DECODE_ERRORS as e:
        raise BadWorkerReply(f"worker reply meta_info is malformed: {decode_error_text(e)}") from None
    ids = np.asarray(reply.output_ids, dtype=np.int32)
    if len(triples) != len(ids) or (completion is not None and completion != len(ids)):
        raise BadWorkerReply(f"worker reply has {len(triples)} output logprobs for {len(ids)} output ids "
                             f"(completion_tokens={completion})")
    if any(t[1] != i for t, i in zip(triples, reply.output_ids)):
        raise BadWorkerReply("worker reply's output_token_logprobs ids differ from output_ids")
    if finish is None:
        raise BadWorkerReply("worker reply has no meta_info.finish_reason")
    lps = np.array([t[0] if t[0] is not None else 0.0 for t in triples], dtype=np.float64)
    experts, experts_error = None, None
    if experts_raw is not None and r3_shape[0] > 0 and not (len(experts_raw) == 4 and bytes(experts_raw) == b"null"):
        try:  # like miles, a bad payload fails the samples (422), not the agent's turn
            experts = decode_rows(experts_raw, r3_shape, skip_rows)
        except BadWorkerReply as e:
            experts_error = str(e)
    client_meta = msgspec.json.encode({k: v for k, v in meta.items() if k not in CLIENT_STRIPPED_META})
    return WorkerOutput(reply.text, ids, lps, finish.type, version, rid or "", experts, experts_error, client_meta,
                        matched_stop=finish.matched, cached_tokens=cached, prompt_tokens=prompt_tokens or 0,
                        reasoning_tokens=reasoning or 0, e2e_latency=latency)


def pending(ex: Exchange) -> PendingTurn:
    return ex.scratch[TURN]
