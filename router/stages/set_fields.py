"""set_fields: set top-level JSON fields on the request the worker receives.

Reads `ex.body_for_upstream` (a JSON object); writes `ex.upstream_body` with each key of the
`fields` option set (other fields kept). Used by radix-cache-r3.toml to ask every request for
`return_routed_experts`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from router.wire import DECODE_ERRORS, decode_error_text
from router.core.pipeline import Exchange, Stage, StageError


class Options(msgspec.Struct, forbid_unknown_fields=True):
    fields: dict[str, Any] = msgspec.field(default_factory=dict)


class SetFields(Stage):
    name = "set_fields"
    phase = "request"
    provides = frozenset({"upstream_body"})
    Options = Options

    async def on_request(self, ex: Exchange) -> None:
        try:
            body = msgspec.json.decode(ex.body_for_upstream)
        except DECODE_ERRORS as e:
            raise StageError(400, f"request body is not JSON: {decode_error_text(e, ex.body_for_upstream)}") from None
        if not isinstance(body, dict):
            raise StageError(400, "request body must be a JSON object")
        body.update(self.options.fields)
        ex.upstream_body = msgspec.json.encode(body)
        return None
