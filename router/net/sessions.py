"""The session API's HTTP edge: /sessions, /sessions/{id}, its chat completions, samples and proxy.

| route | |
|---|---|
| `POST /sessions` | `{"session_id": "<32 hex>"}` (429 at `sessions.max_sessions`) |
| `GET /sessions/{id}` | miles' shape: the active line's records, token ids, mismatches, the tree (v2) |
| `DELETE /sessions/{id}` | 204; 404 for an id never created, 410 for one deleted or expired |
| `POST /sessions/{id}/v1/chat/completions` | the session pipeline (pipelines/session-chat.toml) |
| `POST /sessions/{id}/samples` | miles' safetensors samples (router/wire/samples.py) |
| any other `/sessions/{id}/{path}` | proxied to the session's worker as `/{path}`, not recorded |

Every worker call of a session is routed with the session id as its sticky key. With the durable store a
session a request names is read from the store when it is not in memory, and on a store other routers share,
brought up to date with the turns they committed (router/net/session_persist.py): 503 naming the store when it
cannot be read.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import msgspec
import numpy as np
import trio

from router.core.pipeline import Reply
from router.core.sessions.chat_reply import completion
from router.core.sessions.messages import message_dict
from router.core.sessions.mismatch import compare
from router.core.sessions.registry import Session, SessionError
from router.core.sessions.samples import Assembly, SampleError, collect, session_metadata
from router.core.sessions.tree import SessionTree, Turn
from router.core.store import StoreError
from router.net.replies import error_reply, error_reply_for, json_reply, send_reply
from router.net.routes import ANY_METHOD, Route
from router.wire import DECODE_ERRORS, decode_error_text
from router.wire.openai import BadTool, json_encoder, sglang_tools
from router.wire.samples import CONTENT_TYPE, encode_samples
from router.wire.sessions import samples_request_decoder

CHAT_PATH = ("v1", "chat", "completions")
# A samples reply with more tokens than this is encoded in a worker thread.
_OFFLOAD_TOKENS = 65_536


def routes(app, runtime) -> list[Route]:
    if runtime.sessions is None:
        return []
    handle = SessionRoutes(app, runtime).handle
    return [Route(ANY_METHOD, "/sessions", handle, "POST: a new session (miles' session server API)", streaming=True,
                  metrics_label="/sessions"),
            Route(ANY_METHOD, "/sessions/", handle, "/sessions/{id}[/v1/chat/completions | /samples | /{path}]",
                  streaming=True, prefix=True, metrics_label="/sessions")]


class SessionRoutes:
    def __init__(self, app, runtime) -> None:
        self.app = app
        self.rt = runtime
        self.registry = runtime.sessions

    async def handle(self, scope, receive, send, body: bytes) -> int:
        method = scope["method"]
        parts = scope["path"].split("/")[2:]  # after "/sessions"
        if parts in ([], [""]):
            reply = await self.create() if method == "POST" else _method_not_allowed(method, "/sessions", "POST")
            return await _send(send, reply)
        sid, rest = parts[0], parts[1:]
        persister = self.rt.session_persister
        try:  # reading a session is not using it: no idle refresh
            session = self.registry.get(sid) if persister is None else await persister.session(sid)
        except SessionError as e:
            return await _send(send, error_reply_for(e))
        except StoreError as e:
            return await _send(send, error_reply_for(e, store=persister.where))
        if not rest:
            if method == "GET":
                return await _send(send, json_reply(200, self.describe(session)))
            if method == "DELETE":
                self.registry.delete(sid)
                if self.rt.session_persister is not None:
                    try:
                        await self.rt.session_persister.deleted(sid)
                    except StoreError as e:
                        return await _send(send, error_reply_for(e, store=self.rt.session_persister.where))
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return 204
            return await _send(send, _method_not_allowed(method, "/sessions/{id}", "GET, DELETE"))
        if tuple(rest) == CHAT_PATH and method == "POST":
            return await self._run(scope, receive, send, body, session, self.rt.session_pipeline, None)
        if rest == ["samples"] and method == "POST":
            return await _send(send, await self.samples(session, body))
        # Anything else goes to the session's worker as /{path}, unrecorded.
        raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1").split("?", 1)[0]
        upstream = raw[raw.index("/", len("/sessions/")):]
        return await self._run(scope, receive, send, body, session, self.rt.session_proxy, upstream)

    async def _run(self, scope, receive, send, body, session: Session, pipe, upstream_path) -> int:
        session.inflight += 1
        session.last_used = time.monotonic()
        if self.rt.session_persister is not None:
            self.rt.session_persister.used(session)
        try:
            return await self.app.proxy(scope, receive, send, body, pipe, upstream_path=upstream_path,
                                         session=session, routing_key=session.id)
        finally:
            session.inflight -= 1
            session.last_used = time.monotonic()

    async def create(self) -> Reply:
        try:
            session = self.registry.create(time.monotonic())
        except SessionError as e:
            return error_reply_for(e)
        if self.rt.session_persister is not None:
            try:  # an id the client holds must survive a crash: committed before it is returned
                await self.rt.session_persister.created(session)
            except StoreError as e:
                self.registry.sessions.pop(session.id, None)
                return error_reply_for(e, store=self.rt.session_persister.where)
        return json_reply(200, {"session_id": session.id})

    # ---- miles' views of a session ------------------------------------------------------------------------

    def assembly(self) -> Assembly:
        ss = self.rt.config.sessions
        tok = self.rt.tokenizer
        return Assembly(variant=ss.variant, addition_r3=self.rt.session_r3_incremental,
                        decode=lambda ids: tok.decode(ids, skip_special_tokens=False), mismatch=self._mismatch,
                        debug_messages=self._debug_messages if ss.save_debug_trajectory_data else None)

    def describe(self, session: Session) -> dict:
        """`GET /sessions/{id}`: records of the active line (root .. the turn the last request attached to or
        committed), in miles' record shape, and the session's metadata."""
        tree = session.tree
        records = [self._record(tree, t) for t in tree.path(tree.active)]
        return {"session_id": session.id, "records": records,
                "metadata": session_metadata(tree, tree.active, self.rt.config.sessions.variant, self.assembly())}

    def _record(self, tree: SessionTree, t: Turn) -> dict[str, Any]:
        """The turn as miles records it: the chat request sent upstream (with `input_ids`) and the chat
        completion the client got, whose meta_info keeps the routed experts the worker returned."""
        rec = t.record
        request = msgspec.json.decode(rec.request)
        request["messages"] = self._request_messages(tree.path(t.id))
        request["input_ids"] = tree.path_tokens(t.parent).tolist() + t.prompt_ids.tolist()
        response = msgspec.json.decode(json_encoder.encode(self._completion(t)))
        rows = self._returned_rows(tree, t)
        if rows is not None:
            response["choices"][0]["meta_info"]["routed_experts"] = base64.b64encode(
                np.ascontiguousarray(rows, dtype="<i4").tobytes()).decode()
        return {"timestamp": rec.timestamp, "request_timestamp": rec.request_timestamp, "method": "POST",
                "path": "/v1/chat/completions", "request": request, "response": response,
                "status_code": rec.status_code}

    @staticmethod
    def _completion(t: Turn):
        rec = t.record
        message = rec.message
        if bytes(message) == b"null":  # a turn stored before records kept the reply message
            message = msgspec.Raw(json_encoder.encode(t.assistant))
        return completion(rid=t.response_id, created=rec.created, model=rec.model, message=message,
                          finish_reason=rec.finish_reason or t.finish_reason, matched_stop=rec.matched_stop,
                          meta_info=rec.meta_info, prompt_tokens=t.end - len(t.output_ids),
                          completion_tokens=len(t.output_ids), cached_tokens=rec.cached_tokens,
                          reasoning_tokens=rec.reasoning_tokens, weight_version=t.weight_version)

    def _returned_rows(self, tree: SessionTree, t: Turn) -> np.ndarray | None:
        """The routed-experts rows the worker returned for the turn: every position's with full R3 (the
        path's rows), the new ones with incremental R3."""
        if t.routed_experts is None:
            return None
        if self.rt.session_r3_incremental:
            return t.routed_experts
        parts = [p.routed_experts for p in tree.path(t.id)]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    @staticmethod
    def _reply_message(t: Turn) -> dict[str, Any]:
        message = t.record.message
        return msgspec.json.decode(message) if bytes(message) != b"null" else msgspec.to_builtins(t.assistant)

    def _request_messages(self, path: list[Turn]) -> list[dict[str, Any]]:
        """The messages of the request of the path's last turn: each earlier turn's new messages and reply,
        then its own new ones (as first stored: a session does not keep every request body)."""
        out: list[dict[str, Any]] = []
        for t in path:
            out.extend(msgspec.to_builtins(m) for m in t.messages)
            if t is not path[-1]:
                out.append(self._reply_message(t))
        return out

    def _debug_messages(self, path: list[Turn]) -> list[dict[str, Any]]:
        """miles' `metadata.messages`: the last turn's request messages, then the reply it got."""
        return self._request_messages(path) + [self._reply_message(path[-1])]

    def _mismatch(self, path: list[Turn]) -> list | None:
        """miles' `tito_session_mismatch` of a path: its stored tokens against a fresh render of its messages
        (the launch-default template kwargs, the last request's tools). None when the render fails."""
        tok = self.rt.tokenizer
        messages = []
        for t in path:
            messages.extend(message_dict(m) for m in t.messages)
            messages.append(message_dict(t.assistant))
        try:
            tools = sglang_tools(msgspec.json.decode(path[-1].record.request).get("tools"))
            text = tok.apply_chat_template(messages, False, tools=tools, **self.rt.config.sessions.chat_template_kwargs)
            expected = tok.encode(text)
        except (BadTool, Exception):  # the template raises anything; miles then omits the key
            return None
        actual = np.concatenate([np.concatenate([t.prompt_ids, t.output_ids]) for t in path]).tolist()
        chatml = tok.hf.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
        return compare(expected, actual, special=tok.special_ids,
                       decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
                       assistant_start="<|im_start|>assistant" if chatml else None,
                       trailing=set(tok.encode("\n")) if chatml else ())

    async def samples(self, session: Session, body: bytes) -> Reply:
        try:
            req = samples_request_decoder.decode(body) if body.strip() else samples_request_decoder.decode(b"{}")
        except DECODE_ERRORS as e:
            return error_reply(400, f"invalid samples body: {decode_error_text(e, body)}")
        variant = self.rt.config.sessions.variant
        try:  # v1 reads only max_seq_len, as miles' v1 server does
            got = collect(session.tree, session.tree.active, self.assembly(), max_seq_len=req.max_seq_len,
                          agent_metadata=req.metadata if variant == "v2" else None)
        except SampleError as e:
            return error_reply(e.status, f"sample assembly failed: {e.message}")
        args = (got.samples, got.session_metadata, got.empty_reason, variant)
        if sum(len(s.tokens) for s in got.samples) > _OFFLOAD_TOKENS:
            payload = await trio.to_thread.run_sync(encode_samples, *args)
        else:
            payload = encode_samples(*args)
        return Reply(200, payload, [(b"content-type", CONTENT_TYPE)])


def _method_not_allowed(method: str, route: str, allowed: str) -> Reply:
    reply = error_reply(405, f"{method} {route} is not supported (allowed: {allowed})")
    reply.headers.append((b"allow", allowed.encode()))
    return reply


async def _send(send, reply: Reply) -> int:
    await send_reply(send, reply)
    return reply.status
