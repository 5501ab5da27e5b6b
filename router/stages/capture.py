"""capture: read what the engine produced for this prompt into trajectory records.

Reads `scratch["prompt"]` and the worker's reply: `ex.response_body` (one JSON object, or an
array for `n > 1`) or, for streams, `ex.final_event` (the last cumulative chunk). Takes the
generated ids from `output_ids` (stop token included), their logprobs from
`meta_info.output_token_logprobs`, `weight_version`, `finish_reason.type` and, when present,
`meta_info.routed_experts` (stitched after the cached rows r3_prefix asked the worker to skip, when
`scratch["r3_prefix"]` is set). Writes `scratch["trajectory"]`: a list of TrajectoryInput, one per
sample, and (non-stream replies) the `x-miles-router-rid` reply header: the samples' `meta_info.id`s,
comma-separated, left out when one of them cannot be a header value (a control character, or
whitespace at either end: the body's `meta_info.id` still says it). Non-200 replies, error frames and
incomplete streams record nothing. The reply bytes are never touched.
"""

from __future__ import annotations

import re

import msgspec
import numpy as np

from router.core.pipeline import Exchange, Stage, StageError
from router.core.radix import TrajectoryInput
from router.core.generate import Prompt
from router.wire.sglang import BadOutput, decode_generate_outputs, routed_experts_rows

# An HTTP field value (RFC 9110, as h11 checks it): visible bytes, inner spaces and tabs.
_HEADER_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\x20\t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")


class Options(msgspec.Struct, forbid_unknown_fields=True):
    routed_experts: bool = True  # keep routed_experts rows when the worker returns them
    require_routed_experts: bool = False  # report a reply without them as a stage error
    # Layers and top_k of the served model, to report routed_experts as [rows, layers, top_k]
    # (without them rows are kept as [rows, layers*top_k]; the bytes are the same either way).
    routed_experts_layers: int = 0


class Capture(Stage):
    name = "capture"
    phase = "response"
    requires = frozenset({"prompt", "response"})
    optional = frozenset({"r3_prefix"})
    provides = frozenset({"trajectory"})
    Options = Options
    uses_tokenizer = True

    async def on_response(self, ex: Exchange) -> None:
        prompt: Prompt | None = ex.scratch.get("prompt")
        if prompt is None or ex.status != 200:
            return
        payload = ex.final_event if ex.final_event is not None else ex.response_body
        if not payload:
            return
        try:
            outputs = decode_generate_outputs(payload)
        except BadOutput as e:
            if b'"error"' in payload[:64]:
                return  # an SGLang error frame: nothing was generated
            raise StageError(502, str(e)) from None
        prompt_text = prompt.text if prompt.text is not None else self.services.tokenizer.text_bytes(prompt.tokens)
        records = []
        for i, out in enumerate(outputs):
            if out.finish is None:
                continue  # stream cut short: no final chunk
            ids = out.output_ids
            if ids is None:
                raise StageError(502, "worker reply has neither output_ids nor output_token_logprobs")
            if ids.size == 0:
                continue
            # No logprobs requested: the trajectory is kept, with NaN marking "unknown" (as for a null logprob).
            logps = (out.logprobs if out.logprobs is not None else np.full(ids.size, np.nan)).astype(np.float32)
            experts = self._experts(out.routed_experts, prompt.tokens.size + ids.size, ex, out.weight_version)
            self.services.workers.observe_version(ex.worker, out.weight_version)
            records.append(TrajectoryInput(
                rid=out.rid or f"{i}",
                prompt_ids=prompt.tokens,
                output_ids=ids,
                output_logprobs=logps,
                visible_text=prompt_text + (out.text or "").encode("utf-8", "surrogatepass"),
                weight_version=out.weight_version,
                worker=ex.worker.url if ex.worker is not None else None,
                finish=out.finish.type,
                routed_experts=experts,
                tokenized_from=prompt.cached_tokens if prompt.text is not None else None,
            ))
        ex.scratch["trajectory"] = records
        client_headers = ex.client_headers  # present while the reply's head is held back
        if client_headers is not None and records:
            # the key /retrieve_from_text takes as `rid` when several samples' texts are the same
            rids = ",".join(r.rid for r in records).encode()
            if _HEADER_VALUE.fullmatch(rids):  # a client's rid may hold "\r": no 500 for that
                client_headers.append((b"x-miles-router-rid", rids))

    def _experts(self, b64: msgspec.Raw | None, total_tokens: int, ex: Exchange,
                 version: str | None) -> np.ndarray | None:
        if b64 is None:
            if self.options.require_routed_experts:
                raise StageError(502, "worker reply has no meta_info.routed_experts "
                                      "(is it running with --enable-return-routed-experts?)")
            return None
        self.services.metrics.routed_experts_bytes.inc(len(b64) - 2)
        if not self.options.routed_experts:
            return None
        try:
            flat = routed_experts_rows(b64)
        except BadOutput as e:
            raise StageError(502, str(e)) from None
        rows = total_tokens - 1
        prefix = ex.scratch.get("r3_prefix")
        if prefix is not None:
            start, cached, cached_version = prefix
            width = cached[0].size
            if rows > 0 and flat.size == (rows - start) * width and flat.size != rows * width:
                # The worker sent rows [start, T-1): put the cached rows in front, unless its weights changed
                # since they were recorded (then the prefix rows are left unknown, never mixed in).
                if version == cached_version:
                    head = cached.reshape(start, width).astype(np.int32)
                else:
                    head = np.full((start, width), -1, np.int32)
                flat = np.concatenate([head, flat.reshape(-1, width)]).ravel()
            # else: every row came back (a worker that ignores routed_experts_start_len): used as they are
        if rows <= 0 or flat.size % rows:
            raise StageError(502, f"routed_experts holds {flat.size} int32 values, not a multiple of "
                                  f"{rows} rows (prompt+completion-1)")
        width = flat.size // rows
        if prefix is not None:
            return flat.reshape(rows, *prefix[1].shape[1:])
        layers = self.options.routed_experts_layers
        if layers and width % layers == 0:
            return flat.reshape(rows, layers, width // layers)
        return flat.reshape(rows, width, 1)
