"""Agent sessions over the durable store: what is written when, and the restore at startup.

- `POST /sessions`: the session's row is committed before its id is returned, so an id a client holds
  survives a crash.
- each committed turn: one row (router/wire/session_store.py), committed before the reply ends
  (`persist_session` stage; `store.sync`).
- `DELETE /sessions/{id}` and idle expiry: the session's rows go. Tombstones need no rows: the registry
  recognizes the ids it issued by a keyed hash, and the key is kept in the store, so a deleted id is 410
  (not 404) after a restart too.
- startup: the key, then every stored session with its turns, rebuilt into the registry (sessions are live
  state with an idle timeout, so this is bounded by what agents are using, not by the store's history).
"""

from __future__ import annotations

import logging
import os
import time

from router.core.sessions.registry import Session, SessionRegistry
from router.core.sessions.tree import Turn
from router.wire import session_store as wire

log = logging.getLogger("miles_router")
KEY = "session_key"
INSTANCE = "session_instance_id"


class SessionPersister:
    def __init__(self, store, registry: SessionRegistry, *, wait: bool) -> None:
        self.store = store
        self.registry = registry
        self.wait = wait
        self.where = str(getattr(store, "path", store.name))

    def restore(self) -> int:
        """Before serving: adopt the stored key and sessions. Returns how many sessions came back."""
        key = self.store.meta_get(KEY)
        if key is None:
            key = os.urandom(32).hex()
            self.store.meta_set_now(KEY, key)
        self.registry.use_secret(bytes.fromhex(key))
        instance = self.store.meta_get(INSTANCE)
        if instance is None:
            instance = self.registry.instance_id
            self.store.meta_set_now(INSTANCE, instance)
        self.registry.instance_id = instance
        now = time.monotonic()
        n = 0
        for sid, _created, _header, blobs in self.store.load_sessions():
            session = self.registry.new_session(sid, now)
            session.tree.restore([Turn(**wire.decode_turn(b)) for b in blobs])
            self.registry.adopt(session)
            n += 1
        return n

    async def created(self, session: Session) -> None:
        await self.store.put_session(session.id, time.time(), wire.encode_header(time.time()), [], wait=True)

    async def turn_committed(self, session: Session, turn: Turn) -> None:
        await self.store.put_session(session.id, time.time(), None, [(turn.id, wire.encode_turn(turn))],
                                     wait=self.wait)

    async def deleted(self, sid: str, *, wait: bool = True) -> None:
        await self.store.delete_session(sid, wait=wait)
