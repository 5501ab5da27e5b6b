"""/generate requests as the router reads them: decode the request once, describe its prompt.

Shared by the /generate stages (router/stages/) and the routing policies (router/core/routing.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router.wire import DECODE_ERRORS, decode_error_text
from router.core.pipeline import Exchange, StageError
from router.wire.sglang import GenerateRequest, generate_request_decoder, input_ids_decoder

_INT32 = np.iinfo(np.int32)


def generate_request(ex: Exchange) -> GenerateRequest:
    """The request's routing fields as the worker would get them (earlier stages' rewrites
    included), decoded once per request; the body itself is untouched."""
    req = ex.parsed_request
    if req is None:
        try:
            req = generate_request_decoder.decode(ex.body_for_upstream)
        except DECODE_ERRORS as e:
            raise StageError(400, f"invalid /generate body: {decode_error_text(e, ex.body_for_upstream)}") from None
        ex.parsed_request = req
    return req


def single_input_ids(req: GenerateRequest) -> np.ndarray | None:
    """`input_ids` of a single-prompt request as int32, or None (absent or batch form)."""
    if not req.has_input_ids:
        return None
    try:
        ids = input_ids_decoder.decode(req.input_ids)
    except DECODE_ERRORS:
        return None  # batch form (list of lists): passed through, not cached
    # via int64 and an explicit check: numpy < 2 wraps an out-of-range int32 instead of raising
    try:
        wide = np.asarray(ids, dtype=np.int64)
    except OverflowError:
        wide = None
    if wide is None or (wide.size and (wide.min() < _INT32.min or wide.max() > _INT32.max)):
        raise StageError(400, "input_ids: token id out of int32 range")
    return wide.astype(np.int32)


@dataclass(slots=True)
class Prompt:
    """One prompt as the worker will see it."""

    tokens: np.ndarray  # int32 ids sent to the worker
    text: bytes | None  # the client's prompt text (UTF-8), None for input_ids requests
    cached_tokens: int = 0  # leading tokens taken from the trajectory cache
    matched_bytes: int = 0  # bytes of `text` those tokens cover
