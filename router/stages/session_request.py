"""session_request: decode a chat.completions request and find where it attaches in the session.

Reads the client's body and `scratch["session"]` (the live Session the session routes looked
up). Writes `scratch["session_turn"]`: a PendingTurn with the attach point (the deepest stored
turn whose path of messages the request repeats) and the messages the request appends after it.
400 for a bad body, an unknown role or n != 1; 409 for extending a turn that ended by `length`
(or `abort`), or a session at its turn limit.
"""

from __future__ import annotations

import time

import msgspec

from router.wire import DECODE_ERRORS, decode_error_text
from router.core.pipeline import Exchange, Stage, StageError
from router.core.sessions.tree import TurnLimit
from router.stages._session import TURN, PendingTurn
from router.wire.openai import chat_request_decoder


class Options(msgspec.Struct, forbid_unknown_fields=True):
    # Roles a request may carry (anything else is a 400 naming it).
    roles: list[str] = msgspec.field(default_factory=lambda: ["system", "developer", "user", "assistant", "tool"])


class SessionRequest(Stage):
    name = "session_request"
    phase = "request"
    provides = frozenset({TURN})
    Options = Options

    async def on_request(self, ex: Exchange) -> None:
        session = ex.scratch["session"]
        try:
            req = chat_request_decoder.decode(ex.body)
        except DECODE_ERRORS as e:
            raise StageError(400, f"invalid chat completions body: {decode_error_text(e, ex.body)}") from None
        if not req.messages:
            raise StageError(400, "messages must not be empty")
        if req.n != 1:
            raise StageError(400, f"n must be 1 in a session (got {req.n}): open one session per sample")
        tree = session.tree
        parent, covered = tree.attach_point(req.messages)
        # Only the appended messages need a role check: a matched one has the role of a stored one.
        for i in range(covered, len(req.messages)):
            if req.messages[i].role not in self.options.roles:
                raise StageError(400, f"messages[{i}].role {req.messages[i].role!r} is not allowed "
                                      f"(allowed: {', '.join(self.options.roles)})")
        if parent >= 0 and not tree.turns[parent].extendable:
            t = tree.turns[parent]
            raise StageError(409, f"cannot extend turn {t.id}: it ended by {t.finish_reason!r}, so its output "
                                  f"has no end of turn to build on")
        try:
            tree.check_room()
        except TurnLimit as e:
            raise StageError(409, str(e)) from None
        ex.scratch[TURN] = PendingTurn(session=session, request=req, parent=parent,
                                       new_messages=req.messages[covered:],
                                       request_seq=tree.next_request_seq(), requested_at=time.time())
        return None
