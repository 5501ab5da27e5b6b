"""persist_session: make a session turn durable before the client sees the end of the reply.

Reads `scratch["committed_turn"]` (the turn `session_reply` committed to the session's tree) and writes that
turn (messages, assistant reply, prompt and output tokens, logprobs, routed experts, record) to the durable
store (`[store]`, router/net/session_persist.py). With `store.sync = "commit"` the reply waits for the commit.
If the store cannot write, the client gets 503 naming the store instead of the reply (the turn stays in memory
as an unacknowledged branch: a retry becomes its sibling). Does nothing when the store is disabled.
"""

from __future__ import annotations

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
