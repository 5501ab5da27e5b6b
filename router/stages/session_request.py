"""session_request: decode a chat.completions request and find where it attaches in the session.

Reads the client's body and `ex.session` (the live Session the session routes looked
up), whose `shared_prefix` (its last request's body) lets the history's bytes be compared instead
of parsed (router/wire/chat_messages.py); sets it to this request's once every message is checked.
Writes `scratch["session_turn"]`: a PendingTurn with the attach point (the deepest stored
turn whose path of messages the request repeats; it becomes the session's active turn, as in miles),
the messages the request appends after it, the effective chat template kwargs (`[sessions]
chat_template_kwargs` under the request's own) and the request's fields for its record.
400 for a bad body, n != 1, or a new message whose role the served chat template does not render
(the model would never see it); 409 for extending a turn that ended by `length`, or a session at its
turn limit; 500 when the configured message matcher fails.
"""

from __future__ import annotations

import time

import msgspec

from router.wire import DECODE_ERRORS, decode_error_text, validation_problem
from router.core.pipeline import Exchange, Stage, StageError
from router.core.sessions.messages import MatcherError
from router.core.sessions.tree import TurnLimit
from router.stages._session import TURN, PendingTurn
from router.wire.chat_messages import BadMessage, decode_chat_request


class Options(msgspec.Struct, forbid_unknown_fields=True):
    # Roles a new message may have, besides being rendered by the chat template (None: any it renders).
    roles: list[str] | None = None


class SessionRequest(Stage):
    name = "session_request"
    phase = "request"
    provides = frozenset({TURN})
    Options = Options
    uses_tokenizer = True

    async def on_request(self, ex: Exchange) -> None:
        session = ex.session
        try:
            decoded = decode_chat_request(ex.body, session.shared_prefix)
        except DECODE_ERRORS as e:
            raise StageError(400, f"invalid chat completions body: {decode_error_text(e, ex.body)}") from None
        req, messages = decoded.request, decoded.messages
        if not req.messages:
            raise StageError(400, "messages must not be empty")
        if req.n != 1:
            raise StageError(400, f"n must be 1 in a session (got {req.n}): open one session per sample")
        tree = session.tree
        try:
            parent, covered = tree.attach_point(messages)
            # Every message is now checked: decoded here (appended) or during the match (its bytes
            # differed), or byte-equal to a stored one. Only appended ones need a role check.
            new_messages = [messages[i] for i in range(covered, len(messages))]
        except BadMessage as e:
            raise StageError(400, f"invalid chat completions body: {_message_error(e, ex.body)}") from None
        except MatcherError as e:
            raise StageError(500, str(e)) from None
        if parent >= 0 and not tree.turns[parent].extendable:
            raise StageError(409, f"truncated generation cannot be extended: turn {parent} ended by 'length'; "
                                  f"branch before the cut instead")
        tree.active = parent  # miles' view moves to the attach point before the worker is asked
        tok = self.services.tokenizer
        allowed = self.options.roles
        for i, m in enumerate(new_messages, covered):
            if not tok.renders_role(m.role):
                raise StageError(400, f"messages[{i}].role {m.role!r} is not rendered by {tok.template_name}: "
                                      f"the model would never see this message")
            if allowed is not None and m.role not in allowed:
                raise StageError(400, f"messages[{i}].role {m.role!r} is not allowed "
                                      f"(allowed: {', '.join(allowed)})")
        session.shared_prefix = decoded.prefix  # every message is a valid one: the next request may skip them
        if decoded.spliced:
            self.services.sessions.history_reused_total += 1
        try:
            tree.check_room()
        except TurnLimit as e:
            raise StageError(409, str(e)) from None
        kwargs = {**self.services.config.sessions.chat_template_kwargs, **(req.chat_template_kwargs or {})}
        fields = decoded.fields_without_messages()
        fields.pop("stream", None)
        fields.pop("stream_options", None)
        ex.scratch[TURN] = PendingTurn(session=session, request=req, parent=parent, tree=tree,
                                       new_messages=new_messages, new_raws=messages.raw[covered:],
                                       request_seq=tree.next_request_seq(), requested_at=time.time(),
                                       request_fields=fields, chat_template_kwargs=kwargs)
        return None


def _message_error(e: BadMessage, body: bytes) -> str:
    """The reason, with the message's JSON path (`$.messages[i]...`) as a whole-body decode says it."""
    if isinstance(e.error, msgspec.ValidationError):
        path, reason = validation_problem(e.error)
        return f"{reason} at $.messages[{e.index}]{path[1:]}"
    return decode_error_text(e.error, body)  # (invalid UTF-8 in a string: its offset in the body)
