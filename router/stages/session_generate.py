"""session_generate: turn a session chat turn into a native SGLang /generate call.

Reads `scratch["session_turn"]` and `scratch["session_prompt"]`. Writes `ex.upstream_body`: `input_ids` =
the stored tokens of the path (verbatim) + this turn's prompt tokens, the request's sampling
parameters, forced `return_logprob`, `lora_path` (`[sessions] lora_path`, else the request's) and, when
capturing R3, `return_routed_experts` (and `routed_experts_start_len` for incremental R3); sets the
forwarded path to `/generate` and the session id as the sticky routing key, so a conversation
stays on one worker's KV cache. Works on stock SGLang. Completes the turn's record request with the
fields miles' session server sets on the chat request it sends upstream.
"""

from __future__ import annotations

from typing import Any

import msgspec

from router.core.pipeline import Exchange, Stage, StageError
from router.stages._session import PROMPT, TURN

_encoder = msgspec.json.Encoder()
_TRUE, _FALSE = msgspec.Raw(b"true"), msgspec.Raw(b"false")


class Options(msgspec.Struct, forbid_unknown_fields=True):
    routed_experts: bool = False  # ask for R3 rows and keep them per turn
    routed_experts_layers: int = 0  # the served model's MoE layers and top_k (needed with routed_experts)
    routed_experts_topk: int = 0
    # Send `routed_experts_start_len` so the worker returns only the new rows (SGLang with
    # PR #24851, and the simulator). Off: stock SGLang returns every row and the router keeps the new ones.
    routed_experts_start_len: bool = False
    # max_new_tokens when the request gives neither max_tokens nor max_completion_tokens (None: the worker's default).
    default_max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.routed_experts and (self.routed_experts_layers < 1 or self.routed_experts_topk < 1):
            raise ValueError("routed_experts = true needs routed_experts_layers and routed_experts_topk >= 1")


class SessionGenerate(Stage):
    name = "session_generate"
    phase = "request"
    requires = frozenset({TURN, PROMPT})
    provides = frozenset({"upstream_body"})
    Options = Options

    async def on_request(self, ex: Exchange) -> None:
        turn = ex.scratch[TURN]
        req = turn.request
        sp: dict[str, Any] = {}
        max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_new is None:
            max_new = self.options.default_max_new_tokens
        if max_new is not None:
            if max_new < 0:
                raise StageError(400, f"max_tokens must be >= 0, got {max_new}")
            sp["max_new_tokens"] = max_new
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "ignore_eos", "skip_special_tokens"):
            value = getattr(req, name)
            if value is not None:
                sp[name] = value
        if req.stop is not None:
            sp["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
        if req.seed is not None:
            sp["sampling_seed"] = req.seed
        fields: dict[str, Any] = {"sampling_params": sp, "return_logprob": True}
        # the record's request: the chat request miles' session server would send upstream
        record = turn.request_fields
        record["logprobs"] = _TRUE
        record["return_meta_info"] = _TRUE
        opts = self.options
        if opts.routed_experts:
            turn.want_r3 = True
            turn.r3_shape = (opts.routed_experts_layers, opts.routed_experts_topk)
            fields["return_routed_experts"] = True
            record["return_routed_experts"] = _TRUE
            if opts.routed_experts_start_len:
                turn.r3_incremental = True
                turn.r3_start = max(turn.tree.path_length(turn.parent) - 1, 0)
                fields["routed_experts_start_len"] = turn.r3_start
        record["no_stop_trim"] = _FALSE
        lora = self.services.config.sessions.lora_path
        if lora is not None:
            fields["lora_path"] = lora
            record["lora_path"] = msgspec.Raw(_encoder.encode(lora))
        elif "lora_path" in record:
            fields["lora_path"] = msgspec.json.decode(record["lora_path"])
        if turn.chat_template_kwargs:
            record["chat_template_kwargs"] = msgspec.Raw(_encoder.encode(turn.chat_template_kwargs))
        else:
            record.pop("chat_template_kwargs", None)
        if turn.r3_incremental:  # after input_ids, which GET fills in at their place
            record.setdefault("input_ids", msgspec.Raw(b"null"))
            record["routed_experts_start_len"] = msgspec.Raw(str(turn.r3_start).encode())
        rest = _encoder.encode(fields)
        # input_ids: the stored turns' ids verbatim (encoded once per turn, when first extended), then the new ones.
        ex.upstream_body = turn.tree.join_path_ids(turn.parent, b'{"input_ids":[',
                                                           _encoder.encode(ex.scratch[PROMPT].tolist())[1:-1],
                                                           b"]," + rest[1:])
        ex.path, ex.query = "/generate", b""
        ex.routing_key = turn.session.id
        return None
