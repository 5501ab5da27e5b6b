"""The durable store's format for agent sessions: one msgpack blob per turn, arrays as raw bytes.

A session is a header (when it was created) plus its turns (router/core/sessions/tree.py `Turn`), each written
once, when it is committed. Messages and the turn's record keep their JSON spelling (they came from and go to
JSON clients); token ids are int32, logprobs float64 (as the samples carry them), routed experts at the
narrowest width that holds them (as for trajectories, router/wire/store.py).
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from router.wire.openai import ChatMessageIn
from router.wire.sessions import turn_record_decoder
from router.wire.store import experts_of, put_experts

FORMAT_VERSION = 1


class StoredTurn(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    format: int
    id: int
    parent: int
    request_seq: int
    seq: int
    messages: bytes  # JSON list of ChatMessageIn, as the client sent them
    assistant: bytes  # JSON ChatMessageIn
    prompt_ids: bytes  # int32 LE
    output_ids: bytes  # int32 LE
    output_logprobs: bytes  # float64 LE
    end: int
    finish_reason: str
    weight_version: str | None
    response_id: str
    created_at: float
    record: bytes  # JSON of the turn's record (what GET /sessions/{id} shows)
    experts: bytes | None = None
    experts_shape: tuple[int, ...] | None = None
    experts_dtype: str | None = None
    r3_start: int = 0  # (added after format 1's first rows: older rows decode with the defaults)
    r3_error: str | None = None


class SessionHeader(msgspec.Struct, forbid_unknown_fields=True):
    format: int
    created_wall: float  # unix time of POST /sessions


_encoder = msgspec.msgpack.Encoder()
_turn_decoder = msgspec.msgpack.Decoder(StoredTurn)
_header_decoder = msgspec.msgpack.Decoder(SessionHeader)
_json = msgspec.json.Encoder()
_messages_decoder = msgspec.json.Decoder(list[ChatMessageIn])
_message_decoder = msgspec.json.Decoder(ChatMessageIn)


def encode_header(created_wall: float) -> bytes:
    return _encoder.encode(SessionHeader(FORMAT_VERSION, created_wall))


def decode_header(blob: bytes | None) -> SessionHeader | None:
    return None if blob is None else _header_decoder.decode(blob)


def encode_turn(turn: Any) -> bytes:
    """A `Turn` (router/core/sessions/tree.py) as a blob."""
    rec = StoredTurn(
        FORMAT_VERSION, turn.id, turn.parent, turn.request_seq, turn.seq, _json.encode(turn.messages),
        _json.encode(turn.assistant), np.ascontiguousarray(turn.prompt_ids, dtype="<i4").tobytes(),
        np.ascontiguousarray(turn.output_ids, dtype="<i4").tobytes(),
        np.ascontiguousarray(turn.output_logprobs, dtype="<f8").tobytes(), turn.end, turn.finish_reason,
        turn.weight_version, turn.response_id, turn.created_at, _json.encode(turn.record),
        r3_start=turn.r3_start, r3_error=turn.r3_error)
    put_experts(rec, turn.routed_experts)
    return _encoder.encode(rec)


def decode_turn(blob: bytes) -> dict:
    """The keyword arguments of a `Turn`."""
    rec = _turn_decoder.decode(blob)
    if rec.format != FORMAT_VERSION:
        raise ValueError(f"stored session turn format {rec.format}, this router reads {FORMAT_VERSION}")
    return dict(id=rec.id, parent=rec.parent, request_seq=rec.request_seq, seq=rec.seq,
                messages=_messages_decoder.decode(rec.messages), assistant=_message_decoder.decode(rec.assistant),
                prompt_ids=np.frombuffer(rec.prompt_ids, dtype="<i4").astype(np.int32),
                output_ids=np.frombuffer(rec.output_ids, dtype="<i4").astype(np.int32),
                output_logprobs=np.frombuffer(rec.output_logprobs, dtype="<f8").astype(np.float64),
                routed_experts=experts_of(rec), end=rec.end, finish_reason=rec.finish_reason,
                weight_version=rec.weight_version, response_id=rec.response_id, created_at=rec.created_at,
                record=turn_record_decoder.decode(rec.record), r3_start=rec.r3_start, r3_error=rec.r3_error)
