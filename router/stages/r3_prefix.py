"""r3_prefix: ask the worker only for the routed-expert rows the cache does not have yet (incremental R3).

Reads `scratch["prompt"]` (from tokenize) and the trajectory cache: the longest run of leading prompt positions
whose routed-expert rows are cached, every one recorded under the pool's current weight version. When there are
such rows (s of them), sets `routed_experts_start_len = s` on the request the worker receives and writes
`scratch["r3_prefix"]` = (s, rows, version), which capture stitches in front of the worker's rows [s, T-1), so
R3 traffic per turn is proportional to the new tokens, not to the history. A request that names
`routed_experts_start_len` itself, or does not ask for routed experts, is left alone.

The field is SGLang's; the client's /generate reply then carries only the new rows, as SGLang answers it, and
`/retrieve_from_text` the stitched whole. A worker that ignores the field (returns every row) is detected by the
row count in capture and its rows are used as they are. Not in the default pipelines: add it after `tokenize`
and `set_fields` where the workers support the field (pipelines/radix-cache-r3-incremental.toml).
"""

from __future__ import annotations

import msgspec

from router.wire import DECODE_ERRORS
from router.core.pipeline import Exchange, Stage


class Options(msgspec.Struct, forbid_unknown_fields=True):
    # Fewer cached rows than this: ask for every row (the saving would not be worth a stitch).
    min_rows: int = 1


class _R3Fields(msgspec.Struct):
    return_routed_experts: bool = False
    routed_experts_start_len: int | None = None


_r3_fields = msgspec.json.Decoder(_R3Fields)


class R3Prefix(Stage):
    name = "r3_prefix"
    phase = "request"
    requires = frozenset({"prompt"})
    provides = frozenset({"r3_prefix", "upstream_body"})
    Options = Options
    uses_tree = True

    async def on_request(self, ex: Exchange) -> None:
        prompt = ex.scratch.get("prompt")
        if prompt is None:
            return None
        body = ex.body_for_upstream
        try:
            fields = _r3_fields.decode(body)
        except DECODE_ERRORS:
            return None  # tokenize already answered a body it could not read
        if not fields.return_routed_experts or fields.routed_experts_start_len is not None:
            return None
        version = self.services.workers.current_version()
        rows = self.services.trajectories.tree.routed_experts_prefix(prompt.tokens, version=version)
        if rows is None or rows.shape[0] < max(self.options.min_rows, 1):
            return None
        start = int(rows.shape[0])
        head = body.rstrip()
        if not head.endswith(b"}"):
            return None
        # Append the field to the JSON object as bytes: the body was just encoded by an earlier stage.
        ex.upstream_body = head[:-1] + b',"routed_experts_start_len":%d}' % start
        ex.scratch["r3_prefix"] = (start, rows, version)
        return None
