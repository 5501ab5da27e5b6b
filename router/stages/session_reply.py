"""session_reply: record the turn in the session tree and answer as SGLang's chat completion.

Reads `scratch["session_turn"]`, `scratch["session_prompt"]`, `scratch["worker_output"]` and
`scratch["assistant"]`. Commits the turn (prompt tokens, output ids incl. the stop token, logprobs,
this turn's routed-experts rows, finish reason, record) as a child of its attach point and writes it
to `scratch["committed_turn"]` (None when the session was closed meanwhile; `persist_session` stores it), then
replaces the worker's reply with a `chat.completion` in
SGLang's shape (router/core/sessions/chat_reply.py: `id` is the worker's request id, which is also
the turn's `response_id`), or for `stream: true` with miles' one-chunk stream. `choices[0].meta_info`
is the worker's minus `routed_experts` and `indexer_topk`, which stay with the turn. Routed experts
that cannot be read, or that do not cover the turn's positions, do not fail the turn (as in miles):
they are recorded as such and the samples answer 422. A session deleted while the turn was in flight
gets its reply, but the turn is not recorded. Non-200 worker replies pass through. If the session's tree was
re-read from a store other routers share while the worker ran, the attach point is found again there by its
response id (409, retryable, if it is no longer stored).
"""

from __future__ import annotations

import time
import uuid

import msgspec
import numpy as np

from router.core.chat_output import finish_reason
from router.core.pipeline import Exchange, Stage
from router.core.sessions.chat_reply import completion, stream_body
from router.core.sessions.tree import TurnLimit
from router.stages._session import ASSISTANT, COMMITTED, OUTPUT, PROMPT, TURN
from router.wire.api import error_body
from router.wire.openai import AssistantMessage, ChatMessageIn, FunctionCallIn, ToolCallIn, json_encoder
from router.wire.sessions import TurnRecord


class ParentGone(Exception):
    """The turn a request extends left the session while the worker ran (its write failed, or lost to another
    router's and is being stored again): 409, the request may be retried."""


def _route_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in ex.client_headers or () if k.startswith(b"x-miles-router-")]


def fail(ex: Exchange, status: int, message: str) -> None:
    """Answer the client with a router error instead of the worker's reply (from a response stage)."""
    ex.status = status
    ex.response_body = error_body(message)
    ex.client_headers = [(b"content-type", b"application/json")] + _route_headers(ex)
    ex.scratch.pop(OUTPUT, None)  # nothing to record


class SessionReply(Stage):
    name = "session_reply"
    phase = "response"
    requires = frozenset({TURN, PROMPT, OUTPUT, ASSISTANT})
    provides = frozenset({COMMITTED})

    async def on_response(self, ex: Exchange) -> None:
        turn, out = ex.scratch[TURN], ex.scratch.get(OUTPUT)
        if out is None or ex.status != 200:
            return
        parsed = ex.scratch[ASSISTANT]
        calls = parsed.tool_calls
        # "abort" is not a finished chat turn; it is reported (and recorded) as what it is.
        finish = "abort" if out.finish_type == "abort" else finish_reason(out.finish_type, bool(calls))
        # SGLang answers "" (never null) for a reply that is only tool calls; miles requires it.
        message = msgspec.Raw(json_encoder.encode(AssistantMessage(
            content=parsed.content or "", reasoning_content=parsed.reasoning_content, tool_calls=calls or None)))
        rid = out.response_id or uuid.uuid4().hex
        # the engine's own stamp, else the serving worker's version as the router knows it
        version = out.weight_version or (ex.worker.weight_version if ex.worker is not None else None)
        record = TurnRecord(request_timestamp=turn.requested_at, timestamp=time.time(),
                            meta_info=msgspec.Raw(out.client_meta),
                            request=msgspec.Raw(json_encoder.encode(turn.request_fields)), message=message,
                            finish_reason=finish, matched_stop=out.matched_stop, created=int(time.time()),
                            model=turn.request.model or "default", cached_tokens=out.cached_tokens or 0,
                            prompt_tokens=out.prompt_tokens, reasoning_tokens=out.reasoning_tokens,
                            e2e_latency=out.e2e_latency)
        session = turn.session
        ex.scratch[COMMITTED] = None
        if not session.closed:
            try:
                ex.scratch[COMMITTED] = self._commit(turn, ex.scratch[PROMPT], out, parsed, finish, rid, record,
                                                     version)
            except (TurnLimit, ParentGone) as e:
                fail(ex, 409, str(e))
                return
        reply = completion(rid=rid, created=record.created, model=record.model, message=message,
                           finish_reason=finish, matched_stop=out.matched_stop, meta_info=record.meta_info,
                           prompt_tokens=turn.input_len, completion_tokens=len(out.output_ids),
                           cached_tokens=out.cached_tokens, reasoning_tokens=out.reasoning_tokens,
                           weight_version=version)
        headers = _route_headers(ex)
        if turn.request.stream:
            body = stream_body(reply)
            headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                       (b"x-accel-buffering", b"no")] + headers
        else:
            body = json_encoder.encode(reply)
            headers = [(b"content-type", b"application/json")] + headers
        ex.response_body = body
        ex.client_headers = headers + [(b"content-length", str(len(body)).encode())]

    @staticmethod
    def _commit(turn, prompt_ids, out, parsed, finish: str, rid: str, record: TurnRecord, version: str | None):
        tree, parent = turn.session.tree, turn.parent
        if tree is not turn.tree and parent >= 0:
            # the session's tree was re-read meanwhile (a store shared with other routers): the same parent turn,
            # found by its response id, may have another id there
            parent = tree.find_response(turn.tree.turns[parent].response_id, len(tree.turns))
            if parent < 0:
                raise ParentGone(f"the turn this request extends (response {turn.tree.turns[turn.parent].response_id})"
                                 f" is not stored in session {turn.session.id}: retry the request")
        experts, r3_start, r3_error = None, turn.r3_start, out.routed_experts_error
        if out.routed_experts is not None:
            end = turn.input_len + len(out.output_ids)
            if turn.r3_incremental:
                experts = np.ascontiguousarray(out.routed_experts)  # what the worker sent; /samples checks it
            else:
                r3_start = max(tree.path_length(parent) - 1, 0)
                if len(out.routed_experts) == end - 1 - r3_start:
                    experts = np.ascontiguousarray(out.routed_experts)
                else:
                    r3_error = (f"the worker returned {len(out.routed_experts) + r3_start} routed-experts rows "
                                f"for {end} tokens (expected {end - 1})")
        stored = ChatMessageIn(role="assistant", content=parsed.content, reasoning_content=parsed.reasoning_content,
                               tool_calls=[ToolCallIn(FunctionCallIn(c.function.name, c.function.arguments), id=c.id)
                                           for c in parsed.tool_calls] if parsed.tool_calls else None)
        return tree.commit(parent, turn.new_raws, request_seq=turn.request_seq, messages=turn.new_messages,
                           assistant=stored, assistant_raw=record.message, prompt_ids=prompt_ids,
                           output_ids=out.output_ids, output_logprobs=out.logprobs, routed_experts=experts,
                           r3_start=r3_start, r3_error=r3_error, finish_reason=finish, weight_version=version,
                           response_id=rid, created_at=record.timestamp, record=record)
