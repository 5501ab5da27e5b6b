"""The session API's HTTP edge: /sessions, /sessions/{id}, its chat completions, samples and proxy.

| route | |
|---|---|
| `POST /sessions` | `{"session_id": "<32 hex>"}` (429 at `sessions.max_sessions`) |
| `GET /sessions/{id}` | records of the latest line, token ids, the tree |
| `DELETE /sessions/{id}` | 204; 404 for an id never created, 410 for one deleted or expired |
| `POST /sessions/{id}/v1/chat/completions` | the session pipeline (pipelines/session-chat.toml) |
| `POST /sessions/{id}/samples` | miles' safetensors samples (router/wire/samples.py) |
| any other `/sessions/{id}/{path}` | proxied to the session's worker as `/{path}`, not recorded |

Every worker call of a session is routed with the session id as its sticky key.
"""

from __future__ import annotations

import time

import msgspec
import trio

from router.wire import DECODE_ERRORS, decode_error_text
from router.core.pipeline import Reply
from router.core.sessions.registry import Session, SessionError
from router.core.store import StoreError
from router.core.sessions.samples import SampleError, assemble, sample_meta
from router.net.app import error_reply, json_reply, send_reply
from router.wire.samples import CONTENT_TYPE, encode_samples
from router.wire.sessions import SamplesRequest, samples_request_decoder

CHAT_PATH = ("v1", "chat", "completions")
# A samples reply with more tokens than this is encoded in a worker thread.
_OFFLOAD_TOKENS = 65_536


def install(app, runtime) -> None:
    if runtime.sessions is not None:
        app.prefix_routes.append(("/sessions", SessionRoutes(app, runtime).handle))


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
        try:
            session = self.registry.get(sid)  # reading a session is not using it: no idle refresh
        except SessionError as e:
            return await _send(send, error_reply(e.status, e.message))
        if not rest:
            if method == "GET":
                return await _send(send, json_reply(200, self.describe(session)))
            if method == "DELETE":
                self.registry.delete(sid)
                if self.rt.session_persister is not None:
                    try:
                        await self.rt.session_persister.deleted(sid)
                    except StoreError as e:
                        return await _send(send, error_reply(503, str(e), store=self.rt.session_persister.where))
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
        try:
            return await self.app._proxy(scope, receive, send, body, pipe, upstream_path=upstream_path,
                                         scratch={"session": session, "routing_key": session.id})
        finally:
            session.inflight -= 1
            session.last_used = time.monotonic()

    async def create(self) -> Reply:
        try:
            session = self.registry.create(time.monotonic())
        except SessionError as e:
            return error_reply(e.status, e.message)
        if self.rt.session_persister is not None:
            try:  # an id the client holds must survive a crash: committed before it is returned
                await self.rt.session_persister.created(session)
            except StoreError as e:
                self.registry.sessions.pop(session.id, None)
                return error_reply(503, str(e), store=self.rt.session_persister.where)
        return json_reply(200, {"session_id": session.id})

    def describe(self, session: Session) -> dict:
        tree = session.tree
        leaf = tree.latest_leaf()
        records = []
        if leaf is not None:
            start = 0
            for t in tree.path(leaf.id):
                prompt_end = start + len(t.prompt_ids)
                request = msgspec.json.decode(t.record.upstream_fields)
                request = {"input_ids": tree.path_tokens(t.parent).tolist() + t.prompt_ids.tolist(), **request}
                records.append({
                    "timestamp": t.record.timestamp, "request_timestamp": t.record.request_timestamp,
                    "method": "POST", "path": "/v1/chat/completions", "request": request,
                    "response": {"text": t.record.text, "output_ids": t.output_ids.tolist(),
                                 "meta_info": t.record.meta_info},
                    "status_code": t.record.status_code})
                start = prompt_end + len(t.output_ids)
        nodes = [{"node_id": t.id, "parent": t.parent, "seq": t.seq, "finish_reason": t.finish_reason,
                  "prompt_tokens": len(t.prompt_ids), "output_tokens": len(t.output_ids), "end": t.end,
                  "messages": len(t.messages), "response_id": t.response_id} for t in tree.turns]
        return {"session_id": session.id, "records": records,
                "metadata": {"accumulated_token_ids": tree.path_tokens(leaf.id).tolist() if leaf else [],
                             "max_trim_tokens": 0,
                             "tree": {"nodes": nodes, "leaves": [t.id for t in tree.leaves()]}}}

    async def samples(self, session: Session, body: bytes) -> Reply:
        req = SamplesRequest()
        if body.strip():
            try:
                req = samples_request_decoder.decode(body)
            except DECODE_ERRORS as e:
                return error_reply(400, f"invalid samples body: {decode_error_text(e, body)}")
        if req.max_seq_len is not None and req.max_seq_len < 1:
            return error_reply(400, f"max_seq_len must be >= 1 or null, got {req.max_seq_len}")
        try:
            samples, empty_reason = assemble(session.tree, req.max_seq_len)
        except SampleError as e:
            return error_reply(422, f"sample assembly failed: {e}")
        tok = self.rt.tokenizer
        metas = [sample_meta(s, lambda ids: tok.decode(ids, skip_special_tokens=False), req.metadata) for s in samples]
        session_metadata = {"session_id": session.id, "turns": len(session.tree),
                            "samples": len(samples)}
        args = (samples, metas, session_metadata, empty_reason)
        if sum(len(s.tokens) for s in samples) > _OFFLOAD_TOKENS:
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
