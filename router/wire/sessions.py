"""Bodies of the session API's own endpoints (router/net/sessions.py)."""

from __future__ import annotations

from typing import Any

import msgspec


class SamplesRequest(msgspec.Struct):  # unknown fields ignored, like every router-owned body
    max_seq_len: int | None = None
    metadata: dict[str, Any] | None = None  # agent metadata, e.g. {"reward": 1.0}; server keys win


samples_request_decoder = msgspec.json.Decoder(SamplesRequest)
