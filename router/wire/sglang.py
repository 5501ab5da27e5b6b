"""The slices of SGLang's native /generate protocol the router reads (see shared/sglang_api.md).

Only the fields a stage needs are decoded; unknown fields are ignored on decode and the
original bytes are what gets forwarded, so nothing the router doesn't know is ever lost.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from router.wire import DECODE_ERRORS


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


class MetaInfo(msgspec.Struct):
    id: str | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    weight_version: str | None = None
    output_token_logprobs: list[tuple[float | None, int, Any]] | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    routed_experts: str | None = None


class GenerateOutput(msgspec.Struct):
    meta_info: MetaInfo
    text: str | None = None
    output_ids: list[int] | None = None


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
generate_output_decoder = msgspec.json.Decoder(GenerateOutput)


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
