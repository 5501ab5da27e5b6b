"""What the session stages hand each other through `ex.scratch`, and the worker-reply decode they share.

The scratch keys (declared by each stage): `session_turn` (a PendingTurn: session_request), `session_prompt`
(the tokens the turn's new messages add: chat_template), `worker_output` and `assistant` (the worker's reply
and the message read off it: chat_parse), `committed_turn` (the Turn as stored, or None when the session was
closed meanwhile: session_reply)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from router.core.errors import BadGateway
from router.wire.openai import ChatMessageIn, ChatRequest
from router.wire.sglang import BadOutput, decode_generate_outputs, routed_experts_rows

TURN = "session_turn"  # scratch key of the PendingTurn
PROMPT = "session_prompt"
OUTPUT = "worker_output"
ASSISTANT = "assistant"
COMMITTED = "committed_turn"


@dataclass(slots=True)
class PendingTurn:
    """One chat request on its way through the session pipeline."""

    session: Any  # router.core.sessions.registry.Session
    request: ChatRequest
    parent: int  # attach point: the turn this one extends, -1 for a new root
    # the session's tree `parent` is an id of (a store shared by several routers may replace the session's tree
    # while the worker runs: the path's tokens are read here, the commit finds the parent again by response id)
    tree: Any
    new_messages: list[ChatMessageIn]  # the request's messages after the attach point's path
    new_raws: list[msgspec.Raw]  # the same as the client's JSON (owning its bytes), for the match index
    request_seq: int
    requested_at: float
    input_len: int = 0  # tokens the worker receives (set by the template stage)
    # The record's request (router/wire/sessions.py TurnRecord.request): the client's fields, then the
    # ones the session sets; set by session_request, completed by session_generate.
    request_fields: dict[str, msgspec.Raw] = field(default_factory=dict)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # the launch defaults + the request's
    r3_start: int = 0  # first position whose routed-experts row the worker returns
    want_r3: bool = False
    r3_incremental: bool = False  # the worker was asked for the new rows only (routed_experts_start_len)
    r3_shape: tuple[int, int] = (0, 0)  # (layers, top_k)


# meta_info keys the client copy loses (miles strips both: they stay with the turn)
CLIENT_STRIPPED_META = ("routed_experts", "indexer_topk")


class BadWorkerReply(BadGateway):
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


def decode_worker_output(body: bytes, r3_shape: tuple[int, int], skip_rows: int = 0) -> WorkerOutput:
    """The worker's /generate reply as a session turn reads it (router/wire/sglang.py decodes it): BadWorkerReply
    when it lacks what a turn needs. Routed experts are decoded from row `skip_rows` on (the turn's new rows)."""
    try:
        outputs = decode_generate_outputs(body)
    except BadOutput as e:
        raise BadWorkerReply(str(e)) from None
    if len(outputs) != 1:
        raise BadWorkerReply(f"worker reply holds {len(outputs)} outputs, a session turn asks for one")
    out = outputs[0]
    if out.output_ids is None or out.text is None:
        raise BadWorkerReply("worker reply has no output_ids/text")
    if out.logprobs is None:
        raise BadWorkerReply("worker reply has no meta_info.output_token_logprobs (return_logprob was sent)")
    if out.completion_tokens is not None and out.completion_tokens != len(out.output_ids):
        raise BadWorkerReply(f"worker reply has {len(out.logprobs)} output logprobs for {len(out.output_ids)} "
                             f"output ids (completion_tokens={out.completion_tokens})")
    if out.finish is None:
        raise BadWorkerReply("worker reply has no meta_info.finish_reason")
    experts, experts_error = None, None
    if out.routed_experts is not None and r3_shape[0] > 0:
        try:  # like miles, a bad payload fails the samples (422), not the agent's turn
            experts = routed_experts_rows(out.routed_experts, r3_shape, skip_rows)
        except BadOutput as e:
            experts_error = str(e)
    return WorkerOutput(out.text, out.output_ids, out.logprobs, out.finish.type, out.weight_version, out.rid or "",
                        experts, experts_error, out.meta_without(CLIENT_STRIPPED_META),
                        matched_stop=out.finish.matched, cached_tokens=out.cached_tokens,
                        prompt_tokens=out.prompt_tokens or 0, reasoning_tokens=out.reasoning_tokens or 0,
                        e2e_latency=out.e2e_latency)
