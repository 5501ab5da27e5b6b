"""The slices of SGLang's native /generate protocol the router reads (see shared/sglang_api.md).

Only the fields a stage needs are decoded; unknown fields are ignored on decode and the
original bytes are what gets forwarded, so nothing the router doesn't know is ever lost.
"""

from __future__ import annotations

import binascii
import math
from dataclasses import dataclass

import msgspec
import numpy as np

from router.wire.errors import DECODE_ERRORS, decode_error_text


class GenerateRequest(msgspec.Struct):
    """The request fields routing and the trajectory cache care about."""

    text: str | list[str] | None = None
    # list[int] for one prompt, list[list[int]] for a batch: kept raw until someone needs it
    # (msgspec.Raw can't sit in a union; an empty Raw means the key was absent).
    input_ids: msgspec.Raw = msgspec.Raw()
    stream: bool = False
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = None
    return_routed_experts: bool = False
    sampling_params: msgspec.Raw = msgspec.Raw()

    @property
    def has_input_ids(self) -> bool:
        return len(self.input_ids) > 0 and bytes(self.input_ids) != b"null"


class FinishReason(msgspec.Struct):
    type: str
    matched: int | str | list[int] | None = None
    message: str | None = None
    status_code: int | None = None


class BadOutput(ValueError):
    """A reply that is not (or not a consistent) SGLang /generate output; the message says what is wrong."""


class _RawOutput(msgspec.Struct):
    meta_info: dict[str, msgspec.Raw]
    text: str | None = None
    output_ids: list[int] | None = None


_raw_output_decoder = msgspec.json.Decoder(_RawOutput)
_raw_outputs_decoder = msgspec.json.Decoder(list[_RawOutput])
_logprobs_decoder = msgspec.json.Decoder(list[tuple[float | None, int, msgspec.Raw]])
_finish_decoder = msgspec.json.Decoder(FinishReason | None)
_str_decoder = msgspec.json.Decoder(str | None)
_int_decoder = msgspec.json.Decoder(int | None)
_float_decoder = msgspec.json.Decoder(float | None)


@dataclass(slots=True)
class GenerateOutput:
    """One output of a /generate reply, as every part of the router reads it (the radix cache's `capture` and
    the session stages). Only what is present is set; each reader checks what it needs.

    A `null` logprob (SGLang sends one only where it computed none) is NaN, never 0.0: 0.0 would claim the
    token had probability 1. `meta` keeps every meta_info field as the worker's JSON, for replies that pass
    meta_info on (minus what `meta_without` leaves out)."""

    meta: dict[str, msgspec.Raw]
    text: str | None
    output_ids: np.ndarray | None  # int32, stop token included (from `output_ids`, else the logprob triples)
    logprobs: np.ndarray | None  # float64, one per output id; None without `output_token_logprobs`
    finish: FinishReason | None  # None: a stream cut short (no final chunk)
    rid: str | None
    weight_version: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    e2e_latency: float | None
    routed_experts: msgspec.Raw | None  # the base64 JSON string (decode with `routed_experts_rows`), or None

    def meta_without(self, keys: tuple[str, ...]) -> bytes:
        return msgspec.json.encode({k: v for k, v in self.meta.items() if k not in keys})


def _field(meta: dict[str, msgspec.Raw], key: str, decoder):
    raw = meta.get(key)
    return None if raw is None else decoder.decode(raw)


def _output(raw: _RawOutput, body: bytes) -> GenerateOutput:
    meta = raw.meta_info
    try:
        triples = _field(meta, "output_token_logprobs", _logprobs_decoder)
        out = GenerateOutput(
            meta=meta, text=raw.text, output_ids=None, logprobs=None,
            finish=_field(meta, "finish_reason", _finish_decoder), rid=_field(meta, "id", _str_decoder),
            weight_version=_field(meta, "weight_version", _str_decoder),
            prompt_tokens=_field(meta, "prompt_tokens", _int_decoder),
            completion_tokens=_field(meta, "completion_tokens", _int_decoder),
            cached_tokens=_field(meta, "cached_tokens", _int_decoder),
            reasoning_tokens=_field(meta, "reasoning_tokens", _int_decoder),
            e2e_latency=_field(meta, "e2e_latency", _float_decoder), routed_experts=None)
    except DECODE_ERRORS as e:
        raise BadOutput(f"worker reply meta_info is malformed: {decode_error_text(e)}") from None
    experts = meta.get("routed_experts")
    if experts is not None and bytes(experts) != b"null":
        out.routed_experts = experts
    if raw.output_ids is not None:
        out.output_ids = np.asarray(raw.output_ids, dtype=np.int32)
    elif triples is not None:
        out.output_ids = np.asarray([t[1] for t in triples], dtype=np.int32)
    if triples is not None:
        if len(triples) != len(out.output_ids):
            raise BadOutput(f"worker reply has {len(triples)} output logprobs for {len(out.output_ids)} output ids")
        if raw.output_ids is not None and any(t[1] != i for t, i in zip(triples, raw.output_ids)):
            raise BadOutput("worker reply's output_token_logprobs ids differ from output_ids")
        out.logprobs = np.array([math.nan if t[0] is None else t[0] for t in triples], dtype=np.float64)
    return out


def decode_generate_outputs(body: bytes) -> list[GenerateOutput]:
    """The outputs of a /generate reply: one object, or an array for `n > 1` / a batch. BadOutput if `body` is
    not one, or its ids and logprobs disagree."""
    try:
        raws = _raw_outputs_decoder.decode(body) if body.lstrip()[:1] == b"[" else [_raw_output_decoder.decode(body)]
    except DECODE_ERRORS as e:
        raise BadOutput(f"worker reply is not an SGLang /generate output: {decode_error_text(e, body)}") from None
    return [_output(r, body) for r in raws]


def routed_experts_rows(raw: msgspec.Raw, row_shape: tuple[int, ...] | None = None, skip_rows: int = 0) -> np.ndarray:
    """SGLang's base64 int32 routed experts (the JSON string `raw`) as int32 rows: `[rows, *row_shape]`, without
    the first `skip_rows` rows; with no `row_shape`, a flat array of every value. Only the kept rows are
    decoded: base64 is cut at a row boundary that is also a 4-character group boundary, so a session turn
    costs its new rows, not the whole history's. BadOutput if it is not base64 of whole rows."""
    text = memoryview(raw)  # tens of MB at long contexts: never copied whole
    if len(text) < 2 or text[0] != 0x22 or text[-1] != 0x22:
        raise BadOutput("worker reply's routed_experts is not a base64 string")
    text = text[1:-1]
    if len(text) % 4:
        raise BadOutput(f"worker reply's routed_experts is not base64 ({len(text)} characters)")
    pad = (len(text) > 0 and text[-1] == 0x3D) + (len(text) > 1 and text[-2] == 0x3D)
    total = len(text) // 4 * 3 - pad
    row_bytes = 4 * math.prod(row_shape) if row_shape else 4
    if total % row_bytes:
        what = " x ".join(map(str, row_shape)) if row_shape else "1"
        raise BadOutput(f"worker reply's routed_experts has {total} bytes, not whole rows of {what} int32")
    block_rows = 3 // math.gcd(row_bytes, 3)  # rows per 4-character-aligned block: lcm(row_bytes, 3) bytes
    skip = min(skip_rows, total // row_bytes) // block_rows * block_rows if row_shape else 0
    start = skip * row_bytes // 3 * 4
    try:
        # strict_mode is ~10x slower; a character outside the alphabet is skipped and caught by the length
        data = binascii.a2b_base64(text[start:])
    except (binascii.Error, ValueError) as e:
        raise BadOutput(f"worker reply's routed_experts is not base64: {e}") from None
    if len(data) != total - skip * row_bytes:
        raise BadOutput("worker reply's routed_experts is not base64 (characters outside the alphabet)")
    values = np.frombuffer(data, dtype="<i4").astype(np.int32, copy=False)
    if not row_shape:
        return values
    rows = values.reshape(-1, *row_shape)
    return rows[skip_rows - skip:] if skip_rows > skip else rows


class ReplyFinish(msgspec.Struct):
    type: str = ""


class ReplyMeta(msgspec.Struct):
    finish_reason: ReplyFinish | None = None
    weight_version: str | None = None


class ReplySummary(msgspec.Struct):
    """What the router reads off a /generate reply it forwards untouched: the abort check, the
    worker's weight version, and the generated part for prefix affinity. Logprobs and routed
    experts are skipped by the decoder, not built."""

    meta_info: ReplyMeta | None = None
    text: str | None = None
    output_ids: list[int] | None = None

    @property
    def aborted(self) -> bool:
        meta = self.meta_info
        return meta is not None and meta.finish_reason is not None and meta.finish_reason.type == "abort"


_reply_summary_decoder = msgspec.json.Decoder(ReplySummary)
_reply_summaries_decoder = msgspec.json.Decoder(list[ReplySummary])


def reply_summaries(body: bytes) -> list[ReplySummary] | None:
    """One summary per output of a /generate reply (an n>1 or batch reply is an array), or None if
    `body` is not one."""
    try:
        if body.lstrip()[:1] == b"[":
            return _reply_summaries_decoder.decode(body)
        return [_reply_summary_decoder.decode(body)]
    except DECODE_ERRORS:
        return None


generate_request_decoder = msgspec.json.Decoder(GenerateRequest)
input_ids_decoder = msgspec.json.Decoder(list[int])


def expert_dtype(max_id: int) -> type:
    """The narrowest dtype that holds expert ids 0..max_id (the cache's width, and the stored one)."""
    return np.uint8 if max_id <= 0xFF else np.uint16 if max_id <= 0xFFFF else np.int32


def narrow_experts(experts: np.ndarray) -> np.ndarray:
    """Routed expert ids at the narrowest unsigned width that holds them (uint8, uint16, else int32), C order."""
    a = np.asarray(experts)
    if a.dtype in (np.uint8, np.uint16):  # already narrowed by whoever holds them (cache, store)
        return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    if a.size == 0:
        return np.ascontiguousarray(a, dtype="|u1")
    if a.dtype in (np.int32, np.uint32):
        # One pass instead of min() and max(): seen unsigned, a negative id is >= 2**31 and keeps int32.
        hi = int(a.view(a.dtype.str.replace("i", "u")).max())
    else:
        lo, hi = int(a.min()), int(a.max())
        hi = hi if lo >= 0 else 1 << 31
    return np.ascontiguousarray(a, dtype=np.dtype(expert_dtype(hi)).newbyteorder("<"))
