"""The live sessions: ids, lookup (404 / 410), deletion, idle expiry, limits, shared prompts.

Session ids are 32 hex digits: 16 random digits and a keyed hash of them. An id that carries a
valid hash but is not live was issued here and is gone (deleted or expired): 410, for as long as
the key lives, with no per-id memory at all. Any other unknown id was never created: 404.

The prompt cache shares turn-1 tokens between sessions that start with the same messages (a GRPO
group of n sessions): rendered and tokenized once, one read-only array referenced by every tree.

Durability is not this module's: the `persist_session` stage writes each committed turn to the store before its
reply ends (router/net/session_persist.py).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import numpy as np

from router.core.errors import BadRequest, Gone, NotFound, TooManyRequests
from router.core.sessions.messages import BUILTIN_MATCHERS, Matcher
from router.core.sessions.tree import SessionTree


class SessionError(BadRequest):
    """A session request that cannot be served."""


class SessionNotFound(SessionError, NotFound):
    status = 404


class SessionGone(SessionError, Gone):
    status = 410


class SessionLimit(SessionError, TooManyRequests):
    status = 429


class Session:
    __slots__ = ("id", "tree", "created_at", "last_used", "closed", "inflight", "shared_prefix", "store_state")

    def __init__(self, sid: str, now: float, max_turns: int, matcher: Matcher = BUILTIN_MATCHERS["lenient"]) -> None:
        self.id = sid
        self.tree = SessionTree(max_turns=max_turns, matcher=matcher)
        self.created_at = now
        self.last_used = now
        self.closed = False  # deleted or expired: in-flight turns finish but are not recorded
        self.inflight = 0
        # The last request's body, so the next one's history is compared, not parsed
        # (router/wire/chat_messages.py); it costs one body per session.
        self.shared_prefix = None
        self.store_state = None  # what the durable store's layer keeps for it (router/net/session_persist.py)


class PromptCache:
    """LRU of turn-1 prompt tokens keyed by the exact request bytes that determine them."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> np.ndarray | None:
        ids = self._items.get(key)
        if ids is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return ids

    def put(self, key: bytes, ids: np.ndarray) -> np.ndarray:
        ids.setflags(write=False)
        self._items[key] = ids
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return ids


class SessionRegistry:
    def __init__(self, *, max_sessions: int = 100_000, max_turns: int = 1024, idle_timeout_s: float = 3600.0,
                 secret: bytes | None = None, prompt_cache_entries: int = 4096,
                 matcher: Matcher = BUILTIN_MATCHERS["lenient"]) -> None:
        self.max_sessions = max_sessions
        self.matcher = matcher
        self.max_turns = max_turns
        self.idle_timeout_s = idle_timeout_s
        self._key = secret or os.urandom(32)
        # miles' `session_server_instance_id` (GET /health): names the sessions this router serves. Random per
        # start, or kept in the durable store, where sessions outlive the process (router/net/session_persist.py).
        self.instance_id = os.urandom(16).hex()
        self.sessions: dict[str, Session] = {}
        self.prompts = PromptCache(prompt_cache_entries)
        self.created_total = 0
        self.deleted_total = 0
        self.expired_total = 0
        self.history_reused_total = 0  # requests whose history was compared as bytes, not parsed

    def _mac(self, head: str) -> str:
        return hashlib.blake2b(head.encode(), key=self._key, digest_size=8).hexdigest()

    def issued_here(self, sid: str) -> bool:
        return len(sid) == 32 and self._mac(sid[:16]) == sid[16:]

    def create(self, now: float) -> Session:
        if len(self.sessions) >= self.max_sessions:
            raise SessionLimit(f"too many live sessions: sessions.max_sessions ({self.max_sessions}) reached; "
                               f"delete finished sessions")
        head = os.urandom(8).hex()
        session = self.new_session(head + self._mac(head), now)
        self.sessions[session.id] = session
        self.created_total += 1
        return session

    def new_session(self, sid: str, now: float) -> Session:
        """A Session object with this registry's limits and matcher (not registered)."""
        return Session(sid, now, self.max_turns, self.matcher)

    def new_tree(self) -> SessionTree:
        """An empty tree with this registry's limits and matcher."""
        return SessionTree(max_turns=self.max_turns, matcher=self.matcher)

    def missing(self, sid: str) -> SessionError:
        """What a request for a session that is not live gets: 410 for an id issued here, else 404."""
        if self.issued_here(sid):
            return SessionGone(f"session reclaimed: session_id={sid} was deleted or expired")
        return SessionNotFound(f"session not found: session_id={sid}")

    def get(self, sid: str, now: float | None = None) -> Session:
        session = self.sessions.get(sid)
        if session is None:
            raise self.missing(sid)
        if now is not None:
            session.last_used = now
        return session

    def delete(self, sid: str) -> Session:
        session = self.get(sid)
        del self.sessions[sid]
        session.closed = True
        self.deleted_total += 1
        return session

    def expire_idle(self, now: float) -> list[str]:
        """Drop sessions idle for longer than `idle_timeout_s` (never one with a turn in flight)."""
        cutoff = now - self.idle_timeout_s
        gone = [s.id for s in self.sessions.values() if s.last_used < cutoff and s.inflight == 0]
        for sid in gone:
            self.sessions.pop(sid).closed = True
        self.expired_total += len(gone)
        return gone

    # ---- durable store hooks (router/net/session_persist.py) -----------------------------------
    # With a store, memory is a cache: a session is read back when a request names it, leaves memory when it is
    # not used here for `idle_timeout_s` (`uncache_idle`), and is gone only once the store says so (`gone`).
    def use_secret(self, secret: bytes) -> None:
        """Use the store's key: ids issued before a restart (or by another router) stay recognizable (410 once
        gone, not 404)."""
        self._key = secret

    def adopt(self, session: Session) -> None:
        """A session read back from the store."""
        self.sessions[session.id] = session

    def uncache_idle(self, now: float) -> list[str]:
        """Drop from memory the sessions not used here for `idle_timeout_s` (never one with a turn in flight); the
        store keeps them."""
        cutoff = now - self.idle_timeout_s
        idle = [s.id for s in self.sessions.values() if s.last_used < cutoff and s.inflight == 0]
        for sid in idle:
            del self.sessions[sid]
        return idle

    def gone(self, sid: str, *, expired: bool = False) -> None:
        """The store no longer has this session (deleted or expired, maybe by another router): it is closed here
        too (an in-flight turn finishes unrecorded)."""
        session = self.sessions.pop(sid, None)
        if session is not None:
            session.closed = True
        if expired:
            self.expired_total += 1
