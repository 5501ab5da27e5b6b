"""Routing decisions, pure: which workers a request may use (pause, version policy), which one it goes to
(least in-flight, prefix affinity, sticky keys with rendezvous placement), what a reply teaches the prefix
index, and which weight versions are current.

No I/O, no clock, no counters: the worker supervisor (router/net/workers.py) takes the chosen worker, passes
`now`, and counts and logs what these functions return (a route reason says why a worker was chosen).
The pieces each decision uses live beside this file: the spill rule and the prefix index
(router/core/selection.py), routing keys and rendezvous hashing (router/core/sticky.py), eligibility
(router/core/eligibility.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import numpy as np

from router.core.eligibility import ANY, VERSION_POLICY_HEADER, Eligibility, is_generation, parse_version_policy
from router.core.generate import generate_request, single_input_ids
from router.core.headers import header_value
from router.core.pipeline import StageError
from router.core.selection import PrefixIndex, SpillRule, StickyTable, choose, select_by_prefix
from router.core.sticky import KeyInflight, preferred, routing_key
from router.core.workers import Worker, WorkerPool
from router.wire import DECODE_ERRORS
from router.wire.affinity import ids_decoder, openai_prompt_decoder, present, raw_list_decoder, str_decoder, strs_decoder
from router.wire.api import rid_decoder
from router.wire.sglang import ReplySummary

# Renders an OpenAI chat request's messages (and tools) to the prompt text the engine will see, or raises.
ChatRenderer = Callable[[list, Any], str]


class WeightVersions:
    """Weight versions in the order the router first saw them; the newest `keep` are current, older ones stale
    (the cache evicts stale trajectories first)."""

    def __init__(self, keep: int) -> None:
        self.seen: dict[str, int] = {}
        self.keep = keep

    def note(self, version: str | None) -> None:
        if version is not None and version not in self.seen:
            self.seen[version] = len(self.seen)

    def is_stale(self, version: str | None) -> bool:
        if version is None or version not in self.seen:
            return False
        return self.seen[version] < len(self.seen) - self.keep

    def stale(self) -> frozenset:
        return frozenset(v for v in self.seen if self.is_stale(v))

    def newest(self, versions: Iterable[str | None]) -> str | None:
        """The newest (by first sighting) of `versions`, noting each; None if none is known."""
        known = [v for v in versions if v is not None]
        for v in known:
            self.note(v)
        return max(known, key=self.seen.__getitem__) if known else None


class Router:
    """The routing policies over one worker pool. `select` answers (worker, route reason); the caller takes the
    worker (`WorkerPool.acquire`) and, for a sticky pick, counts the key in flight (`key_inflight`)."""

    def __init__(self, pool: WorkerPool, routing: Any, versions: WeightVersions, policies: Iterable[str]) -> None:
        g = self.settings = routing  # router.config.RoutingConfig
        self.pool, self.versions = pool, versions
        self.spill = SpillRule(g.balance_abs_threshold, g.balance_rel_threshold, g.balance_tokens_per_request)
        self.prefix_index = PrefixIndex(block_tokens=g.prefix_block_tokens, capacity_blocks=g.prefix_capacity_blocks,
                                        owners_per_block=g.prefix_owners_per_block)
        self.sticky = StickyTable(idle_s=g.sticky_idle_s)  # the worker that served each key last (route reasons)
        self.key_inflight = KeyInflight()
        self.key_headers = [h.lower().encode("latin-1") for h in (g.routing_key_headers or [g.sticky_header])]
        self.request_id_headers = [h.lower().encode("latin-1") for h in g.request_id_headers]
        self.version_policy = parse_version_policy(g.version_policy)
        # The index costs ~200 B per 16-token block: only keep one when a route routes by it.
        self.uses_prefix_affinity = "prefix_affinity" in (g.default_policy, *policies)
        self.render_chat: ChatRenderer | None = None  # set once the tokenizer is loaded

    # ---- weight versions -------------------------------------------------------------------
    def current_version(self) -> str | None:
        """The newest version (by first sighting) among healthy workers; None if none is known."""
        return self.versions.newest(w.weight_version for w in self.pool.healthy())

    def version_hold(self, worker: Worker) -> str | None:
        """Why a recovered worker stays out (routing.weight_version_gate): it serves other weights than the pool."""
        current = self.current_version()
        if current is None or worker.weight_version == current:
            return None
        return (f"weight version {worker.weight_version!r} differs from the pool's current {current!r}; "
                f"kept out to avoid off-policy samples")

    # ---- which workers a request may use ---------------------------------------------------------
    def eligibility(self, ex) -> Eligibility:
        """Which workers may serve `ex` (router/core/eligibility.py): not paused for a generation request, and
        the version policy (the x-smg-version-policy header, else routing.version_policy). 400 for a bad header.
        Decided once per request (kept on the Exchange)."""
        got = ex.eligibility
        if got is None:
            policy = self.version_policy
            raw = header_value(ex.headers, VERSION_POLICY_HEADER)
            if raw is not None:
                try:
                    policy = parse_version_policy(raw.decode("latin-1"))
                except ValueError as e:
                    raise StageError(400, f"x-smg-version-policy: {e}") from None
            newest = None
            if policy is not ANY:
                current = self.current_version()
                newest = None if current is None else self.versions.seen[current]
            got = ex.eligibility = Eligibility(
                is_generation(ex.method, ex.path), self.settings.hold_when_paused, policy, self.versions.seen, newest)
        return got

    # ---- which worker ------------------------------------------------------------------------
    def select(self, ex, exclude=(), *, now: float) -> tuple[Worker | None, str]:
        """The worker for `ex` by its route's policy, among the workers the pool admits now (the caller narrows
        them with `pool.only(eligibility.admits)`). Route reasons: `retry` (a retry goes to the least loaded of
        the rest), `least_inflight`, prefix affinity's and sticky's own (see their methods)."""
        policy = (ex.route.policy if ex.route is not None else None) or self.settings.default_policy
        if exclude:
            return self.pool.pick(exclude), "retry"
        if policy == "prefix_affinity":
            return self._select_by_prefix(ex)
        if policy == "sticky":
            return self._select_sticky(ex, now)
        return self.pool.pick(), "least_inflight"

    def _select_by_prefix(self, ex) -> tuple[Worker | None, str]:
        seq = prompt_prefix(ex, self.render_chat)
        if seq is None or len(seq) == 0:
            # Said out loud (route reason `affinity_unreadable`): a route meant to keep prompts together that
            # silently doesn't is a bug.
            return self.pool.pick(), "affinity_unreadable"
        w, reason = select_by_prefix(self.pool, self.prefix_index, seq, self.spill)
        if w is not None:
            ex.affinity_seq = seq
        return w, reason

    def routing_key(self, ex) -> str | None:
        """The request's sticky key (router/core/sticky.py): the router's own (a session id), the routing-key
        headers in order, the body field, then the request id's lineage (body `rid`, request-id headers)."""
        g = self.settings

        def body_field():
            if not g.sticky_body_field:
                return None
            try:
                val = msgspec.json.decode(ex.body).get(g.sticky_body_field)
            except (*DECODE_ERRORS, AttributeError):
                return None  # a body without a usable key simply routes by load
            return None if val is None else str(val)

        def rids():
            if not g.sticky_lineage:
                return
            try:
                rid = rid_decoder.decode(ex.body_for_upstream).rid
            except DECODE_ERRORS:
                rid = None
            if isinstance(rid, str):
                yield rid
            for name in self.request_id_headers:
                yield _header_text(ex.headers, name)

        found = routing_key(ex.routing_key, (_header_text(ex.headers, n) for n in self.key_headers),
                            body_field(), rids())
        return None if found is None else found[0]

    def _select_sticky(self, ex, now: float) -> tuple[Worker | None, str]:
        """The key's rendezvous worker among the usable ones (the same from every router), under the key's
        in-flight cap, with the bounded-load spill. Route reasons: `sticky` (the worker that served the key
        last), `sticky_new` (a key new to this router, or one whose worker changed), `sticky_cap`, `spill`."""
        key = self.routing_key(ex)
        if key is None:
            return self.pool.pick(), "least_inflight"
        pool = self.pool
        urls = [w.url for w in pool.active if pool.admits(w)]
        url, moved = preferred(key, urls, lambda u: self.key_inflight.count(key, u), self.settings.sticky_inflight_cap)
        w, reason = choose(pool, None if url is None else pool.get(url), self.spill, "sticky")
        if w is None:
            return None, "none"
        ex.sticky_pick = key
        if reason != "sticky":
            return w, reason  # a spill is one request only
        if moved:
            return w, "sticky_cap"
        last = self.sticky.get(key, now)
        self.sticky.put(key, w.url, now)
        return w, "sticky" if last == w.url else "sticky_new"

    # ---- what the prefix index learns ----------------------------------------------------------
    def record_served(self, tokens, worker_url: str) -> None:
        """A worker now holds these tokens in its KV cache (prompt + generated)."""
        if self.uses_prefix_affinity:
            self.prefix_index.record(tokens, worker_url)

    def learn_reply(self, ex, out: ReplySummary) -> None:
        """The generated part of a reply prefix affinity routed: the conversation's next turn then finds the
        worker that holds its whole history."""
        seq = ex.affinity_seq
        if seq is None:
            return
        if isinstance(seq, bytes):
            if out.text:
                self.prefix_index.record(seq + out.text.encode("utf-8", "surrogatepass"), ex.worker.url)
        elif out.output_ids:
            self.prefix_index.record(np.concatenate([seq, np.asarray(out.output_ids, np.int32)]), ex.worker.url)


def prompt_prefix(ex, render_chat: ChatRenderer | None):
    """Token ids (or text bytes) identifying the request's prompt, or None when it can't be read.

    `/generate`: `input_ids`, else `text`. `/v1/completions`: `prompt` (text or token ids).
    `/v1/chat/completions`: `tools` + `messages`, rendered through the chat template when the
    router has a tokenizer, else as the client's own JSON bytes of each message in order (both
    grow by appending as a conversation goes on, so a next turn finds its history)."""
    prompt = ex.scratch.get("prompt")
    if prompt is not None:
        return prompt.tokens
    if ex.path.endswith(("/v1/completions", "/v1/chat/completions")):
        return openai_prompt_prefix(ex.body_for_upstream, render_chat)
    try:
        req = generate_request(ex)
        ids = single_input_ids(req)
    except Exception:  # whatever the body is, it routes by load (the worker answers it)
        return None
    if ids is not None:
        return ids
    if isinstance(req.text, str):
        return req.text.encode("utf-8", "surrogatepass")
    return None


def openai_prompt_prefix(body: bytes, render_chat: ChatRenderer | None):
    try:
        f = openai_prompt_decoder.decode(body)
        if present(f.prompt):
            raw = bytes(f.prompt)
            if raw.startswith(b'"'):
                return str_decoder.decode(raw).encode("utf-8", "surrogatepass")
            try:
                return np.asarray(ids_decoder.decode(raw), dtype=np.int32)
            except (*DECODE_ERRORS, OverflowError):
                texts = strs_decoder.decode(raw)  # a batch of one prompt routes by it
                return texts[0].encode("utf-8", "surrogatepass") if len(texts) == 1 else None
        if not present(f.messages):
            return None
        if render_chat is not None:
            try:
                messages = msgspec.json.decode(bytes(f.messages))
                tools = msgspec.json.decode(bytes(f.tools)) if present(f.tools) else None
                return render_chat(messages, tools).encode("utf-8", "surrogatepass")
            except Exception:  # a template that can't render these messages: route by their bytes
                pass
        parts = [bytes(f.tools) if present(f.tools) else b"", b"\n"]
        parts += [bytes(m) + b"\n" for m in raw_list_decoder.decode(f.messages)]
        return b"".join(parts)
    except (*DECODE_ERRORS, UnicodeEncodeError):
        return None


def _header_text(headers, name: bytes) -> str | None:
    v = header_value(headers, name)
    return None if v is None else v.decode("latin-1")
