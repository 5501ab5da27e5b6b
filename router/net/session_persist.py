"""Agent sessions over the durable store: what is written when, sessions read on demand, and a fleet's shared view.

- `POST /sessions`: the session's row is committed before its id is returned, so an id a client holds survives
  a crash, and any router sharing the store finds it.
- each committed turn: one row (router/wire/session_store.py) keyed by (session, turn id), committed before the
  reply ends (`persist_session` stage). With `store.sync = "off"` on a store only this router writes, in the
  background instead. The session's last use (wall clock) is stored with it, and when a request starts (at most
  every `idle_timeout_s / 8`), so idle expiry counts uses on every router.
- `DELETE /sessions/{id}` and idle expiry: the session's rows go. Tombstones need no rows: the registry
  recognizes the ids it issued by a keyed hash, and the key is kept in the store, so a deleted id is 410 (not
  404) after a restart and on every router sharing the store. Expiry deletes what the store says is idle (every
  router's uses counted); memory only drops what this router did not use for the timeout.
- startup reads the key and nothing else: a session is read from the store (one indexed query) when a request
  first names it, and stays in memory while used here (memory is a cache over the store).

A store other routers write too (`store.shared`: PostgreSQL):
- before a request uses a session held in memory, the turns other routers committed since are read (turns
  after the last one known, one indexed query) and appended, so every router serves every turn;
- a turn id is written once. Two routers extending one session at once both succeed: the one whose write
  comes second stores its turn under the next free id, a sibling of the other's (the tree a single router
  builds from two concurrent requests). Memory then mirrors the store: turns are kept in store order, a turn
  whose write failed leaves memory (its client got 503), and a turn's reply waits for its write whatever
  `store.sync` says, so the race is decided before the client sees the turn.
Per session, writes and re-reads take turns (a lock held for the round trip, not for the generation).
"""

from __future__ import annotations

import logging
import os
import time

import trio

from router.core.errors import Conflict
from router.core.sessions.registry import Session, SessionRegistry
from router.core.sessions.tree import SessionTree, Turn
from router.core.store import StoreError, StoreWriteError
from router.wire import session_store as wire

log = logging.getLogger("miles_router")
KEY = "session_key"
INSTANCE = "session_instance_id"
# a turn that keeps losing its id to other routers' writes of the same session: a 409 the client retries
MAX_WRITE_ATTEMPTS = 16


class SessionBusy(Conflict):
    """Other routers kept extending the session faster than this turn could be stored (409, retryable)."""


class StoreState:
    """What this layer keeps per session (`Session.store_state`)."""

    __slots__ = ("lock", "stored", "touched")

    def __init__(self, stored: int, touched: float = 0.0) -> None:
        self.lock = trio.Lock()  # writes and re-reads of this session take turns
        self.stored = stored  # the first `stored` turns of the session's tree are in the store, under those ids
        self.touched = touched  # wall clock of the last use this router stored


class SessionPersister:
    def __init__(self, store, registry: SessionRegistry, *, wait: bool) -> None:
        self.store = store
        self.registry = registry
        self.shared = bool(store.shared)
        # a shared store: a turn's write is always waited for (the race with other routers must be decided)
        self.wait = wait or self.shared
        self.where = str(getattr(store, "path", store.name))
        self.touch_every_s = min(registry.idle_timeout_s / 8, 60.0)
        self._loading: dict[str, trio.Event] = {}

    def restore(self) -> None:
        """Before serving: adopt the store's key and instance id (the first router to start stored them)."""
        self.registry.use_secret(bytes.fromhex(self.store.meta_setdefault(KEY, os.urandom(32).hex())))
        self.registry.instance_id = self.store.meta_setdefault(INSTANCE, self.registry.instance_id)

    # ---- finding a session ----------------------------------------------------------------------------
    async def session(self, sid: str) -> Session:
        """The session a request names, up to date: from memory (on a shared store, with the turns other routers
        committed since appended), else read from the store. Raises the registry's 404 / 410, or StoreError."""
        session = self.registry.sessions.get(sid)
        if session is None:
            return await self._load(sid)
        if self.shared:
            with trio.CancelScope(shield=True):  # the tree must not be left half re-read
                async with session.store_state.lock:
                    caught_up = await self._catch_up(session)
            if not caught_up:
                raise self.registry.missing(sid)
        return session

    async def _load(self, sid: str) -> Session:
        if not self.registry.issued_here(sid):
            raise self.registry.missing(sid)  # 404: never issued, nothing to ask the store
        while (loading := self._loading.get(sid)) is not None:  # another request is reading it: use that
            await loading.wait()
            session = self.registry.sessions.get(sid)
            if session is not None:
                return session
        self._loading[sid] = done = trio.Event()
        try:
            blobs = await self.store.session_turns(sid)
            if blobs is None:
                raise self.registry.missing(sid)  # 410: issued, and gone from the store
            session = self.registry.new_session(sid, time.monotonic())
            session.tree.restore(_turns(blobs))
            session.store_state = StoreState(len(blobs))
            self.registry.adopt(session)
            return session
        finally:
            del self._loading[sid]
            done.set()

    async def _catch_up(self, session: Session) -> bool:
        """(The session's lock held.) Append the turns the store holds past those known here; False when the
        session is gone from the store (it is then closed here too)."""
        st = session.store_state
        blobs = await self.store.session_turns(session.id, st.stored - 1)
        if blobs is None:
            self.registry.gone(session.id)
            return False
        if blobs:
            turns = _turns(blobs)
            if len(session.tree.turns) == st.stored:
                session.tree.restore(turns)
            else:  # turns of this router not stored yet hold those ids: they leave memory, their writes follow these
                session.tree = self._tree(session.tree.turns[:st.stored] + turns)
            st.stored += len(turns)
        return True

    def _tree(self, turns: list[Turn]) -> SessionTree:
        tree = self.registry.new_tree()
        tree.restore(turns)
        return tree

    # ---- writes -------------------------------------------------------------------------------------
    async def created(self, session: Session) -> None:
        now = time.time()
        session.store_state = StoreState(0, now)
        await self.store.put_session(session.id, now, wire.encode_header(now), [], wait=True)

    def used(self, session: Session) -> None:
        """A request uses the session: store when, once per `touch_every_s` (in the background)."""
        st, now = session.store_state, time.time()
        if now - st.touched >= self.touch_every_s:
            st.touched = now
            self.store.touch_session(session.id, now)

    async def turn_committed(self, session: Session, turn: Turn) -> None:
        """Store a turn session_reply just committed to the session's tree (synchronously before this call). Raises
        StoreWriteError (the turn then leaves memory, which mirrors the store) or SessionBusy (409). A session
        that is gone from the store meanwhile just does not get the turn, as when it is deleted here."""
        st = session.store_state
        if not self.wait:  # sync = "off", this router the store's only writer: written in the background, in order
            st.stored = max(st.stored, turn.id + 1)
            await self.store.put_session(session.id, time.time(), None, [(turn.id, wire.encode_turn(turn))],
                                         wait=False)
            return
        home = session.tree  # the tree `turn` is in; its parent is found again by response id if it is replaced
        with trio.CancelScope(shield=True):  # however the client goes, memory must end up mirroring the store
            async with st.lock:
                await self._store_turn(session, turn, home)

    async def _store_turn(self, session: Session, turn: Turn, home: SessionTree) -> None:
        st = session.store_state
        for _ in range(MAX_WRITE_ATTEMPTS):
            tree, target = session.tree, st.stored
            if tree is home and target < len(tree.turns) and tree.turns[target] is turn:
                write, rebuilt = turn, None  # the next turn the store lacks is this one: stored as it is
            else:  # other turns got the ids first: the same generation is stored as the next free id
                parent = turn.parent
                if parent >= 0:
                    parent = tree.find_response(home.turns[parent].response_id, target)
                    if parent < 0:
                        self._drop_unstored(session)
                        raise SessionBusy(f"the turn this one extends is not stored in session {session.id} "
                                          "(its write failed): retry the request")
                rebuilt = self._tree(tree.turns[:target])
                write = rebuilt.graft(turn, parent)
            now = time.time()
            try:
                result = await self.store.put_session(session.id, now, None, [(write.id, wire.encode_turn(write))],
                                                      wait=True)
            except StoreWriteError:
                self._drop_unstored(session)
                raise
            if result.gone:
                self.registry.gone(session.id)
                return
            if result.taken:  # another router stored a turn under that id first: read what it stored, try again
                try:
                    if not await self._catch_up(session):
                        return
                except StoreError as e:
                    self._drop_unstored(session)
                    raise StoreWriteError(str(e)) from None
                continue
            if rebuilt is not None:
                session.tree = rebuilt
            st.stored, st.touched = write.id + 1, now
            return
        self._drop_unstored(session)
        raise SessionBusy(f"session {session.id} was extended by other routers {MAX_WRITE_ATTEMPTS} times while "
                          "this turn was being stored: retry the request")

    def _drop_unstored(self, session: Session) -> None:
        """Turns in memory that the store does not hold leave memory (their clients got an error)."""
        st = session.store_state
        if len(session.tree.turns) > st.stored:
            session.tree = self._tree(session.tree.turns[:st.stored])

    async def deleted(self, sid: str, *, wait: bool = True) -> None:
        await self.store.delete_session(sid, wait=wait)

    async def expire(self) -> None:
        """Idle expiry, for the whole fleet: the store deletes the sessions no router used for `idle_timeout_s`
        (as stored, plus the touch interval: a use may be stored that much later), except this router's in
        flight; memory drops what this router did not use for that long."""
        self.registry.uncache_idle(time.monotonic())
        keep = [s.id for s in self.registry.sessions.values() if s.inflight]
        try:
            gone = await self.store.expire_sessions(time.time() - self.registry.idle_timeout_s - self.touch_every_s,
                                                    keep)
        except StoreError as e:
            log.warning("session expiry skipped: %s", e)
            return
        for sid in gone:
            self.registry.gone(sid, expired=True)
        if gone:
            log.info("reclaimed %d idle session(s)", len(gone))


def _turns(blobs: list[bytes]) -> list[Turn]:
    return [Turn(**wire.decode_turn(b)) for b in blobs]
