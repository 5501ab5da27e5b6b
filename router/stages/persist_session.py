"""persist_session: make a session turn durable before the client sees the end of the reply.

Reads `scratch["committed_turn"]` (the turn `session_reply` committed to the session's tree) and writes that
turn (messages, assistant reply, prompt and output tokens, logprobs, routed experts, record) to the durable
store (`[store]`, router/net/session_persist.py). With `store.sync = "commit"` the reply waits for the commit.
If the store cannot write, the client gets 503 naming the store instead of the reply, and the turn leaves memory
(which mirrors the store). On a store other routers share, a turn that lost its id to another router's turn of
the same session is stored as the next one (a sibling); one that keeps losing gets a retryable 409. Does nothing
when the store is disabled.
"""

from __future__ import annotations

from router.core.errors import Conflict
from router.core.pipeline import CommitError, Exchange, Stage
from router.core.store import StoreWriteError
from router.stages._session import COMMITTED


class PersistSession(Stage):
    name = "persist_session"
    phase = "response"
    requires = frozenset({COMMITTED})
    uses_store = True

    async def on_response(self, ex: Exchange) -> None:
        persister = self.services.session_persister
        turn = ex.scratch.get(COMMITTED)
        if persister is None or turn is None or ex.status != 200 or ex.session.closed:
            return
        try:
            await persister.turn_committed(ex.session, turn)
        except StoreWriteError as e:
            raise CommitError(503, str(e), store=persister.where) from None
        except Conflict as e:
            raise CommitError(e.status, e.message) from None
