"""session_reply: record the turn in the session tree and answer as OpenAI chat completions.

Reads `scratch["session_turn"]` with its parsed output. Commits the turn (prompt tokens, output
ids incl. the stop token, logprobs, this turn's new routed-experts rows, finish reason, record)
as a child of its attach point, tells the registry the session changed (a durable store writes
it there, before the reply ends), then replaces the worker's reply with a `chat.completion`
(or, for `stream: true`, `chat.completion.chunk` SSE events and `data: [DONE]`). The reply's
`choices[0].meta_info` is the worker's minus `routed_experts`. A session deleted while the turn
was in flight gets its reply, but the turn is not recorded. Non-200 worker replies pass through.
"""

from __future__ import annotations

import time
import uuid

import msgspec
import numpy as np

from router.core.pipeline import Exchange, Stage
from router.core.sessions.tree import TurnLimit
from router.stages._session import TURN
from router.wire.api import error_body
from router.wire.session_store import TurnRecord
from router.core.chat_output import finish_reason
from router.wire.openai import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatMessageIn, ChoiceOut,
                                ChunkChoice, DeltaOut, FunctionCallIn, ToolCallIn, Usage, json_encoder)


def _route_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in ex.scratch.get("client_headers", ()) if k.startswith(b"x-miles-router-")]


def fail(ex: Exchange, status: int, message: str) -> None:
    """Answer the client with a router error instead of the worker's reply (from a response stage)."""
    ex.status = status
    ex.response_body = error_body(message)
    ex.scratch["client_headers"] = [(b"content-type", b"application/json")] + _route_headers(ex)
    ex.scratch.pop(TURN, None)


class SessionReply(Stage):
    name = "session_reply"
    phase = "response"
    requires = frozenset({TURN, "assistant"})

    async def on_response(self, ex: Exchange) -> None:
        turn = ex.scratch.get(TURN)
        if turn is None or turn.output is None or ex.status != 200:
            return
        out, parsed = turn.output, turn.assistant
        calls = parsed.tool_calls
        # "abort" is not a finished chat turn; it is reported (and recorded) as what it is.
        finish = "abort" if out.finish_type == "abort" else finish_reason(out.finish_type, bool(calls))
        message = AssistantMessage(content=parsed.content, reasoning_content=parsed.reasoning_content,
                                   tool_calls=calls or None)
        session = turn.session
        if not session.closed:
            try:
                self._commit(turn, message, finish)
            except TurnLimit as e:
                fail(ex, 409, str(e))
                return
            except ValueError as e:
                fail(ex, 502, str(e))
                return
            self.services.sessions.changed(session)
        usage = Usage(prompt_tokens=turn.input_len, completion_tokens=len(out.output_ids),
                      total_tokens=turn.input_len + len(out.output_ids))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = turn.request.model or "default"
        headers = _route_headers(ex)
        if turn.request.stream:
            delta = DeltaOut(role="assistant", content=message.content,
                             reasoning_content=message.reasoning_content, tool_calls=message.tool_calls)
            events = [ChatCompletionChunk(rid, created, model, [ChunkChoice(0, delta, finish)])]
            opts = turn.request.stream_options
            if opts is not None and opts.include_usage:
                events.append(ChatCompletionChunk(rid, created, model, [], usage=usage))
            body = b"".join(b"data: " + json_encoder.encode(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
            headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")] + headers
        else:
            reply = ChatCompletion(rid, created, model, [ChoiceOut(0, message, finish, meta_info=msgspec.Raw(out.client_meta))],
                                   usage)
            body = json_encoder.encode(reply)
            headers = [(b"content-type", b"application/json")] + headers
        ex.response_body = body
        ex.scratch["client_headers"] = headers + [(b"content-length", str(len(body)).encode())]

    @staticmethod
    def _commit(turn, message: AssistantMessage, finish: str) -> None:
        out = turn.output
        tree = turn.session.tree
        experts = None
        if out.routed_experts is not None:
            row_start = max(tree.path_length(turn.parent) - 1, 0)
            end = turn.input_len + len(out.output_ids)
            if len(out.routed_experts) != end - 1 - row_start:
                raise ValueError(f"worker returned {len(out.routed_experts) + row_start - turn.r3_start} "
                                 f"routed-experts rows, expected {end - 1 - turn.r3_start} "
                                 f"(positions {turn.r3_start}..{end - 1})")
            experts = np.ascontiguousarray(out.routed_experts)
        stored = ChatMessageIn(role="assistant", content=message.content, reasoning_content=message.reasoning_content,
                               tool_calls=[ToolCallIn(FunctionCallIn(c.function.name, c.function.arguments), id=c.id)
                                           for c in message.tool_calls] if message.tool_calls else None)
        now = time.time()
        record = TurnRecord(turn.requested_at, now, msgspec.Raw(turn.upstream_fields), msgspec.Raw(out.client_meta),
                            out.text)
        tree.commit(turn.parent, turn.new_raws, request_seq=turn.request_seq, messages=turn.new_messages,
                    assistant=stored, prompt_ids=turn.prompt_ids, output_ids=out.output_ids,
                    output_logprobs=out.logprobs, routed_experts=experts, finish_reason=finish,
                    weight_version=out.weight_version, response_id=out.response_id, created_at=now, record=record)
