"""A session's chat request, decoded without re-reading the history it repeats.

An agent's next request is its last request's bytes up to the last message, then the messages it
appends, then the same trailing fields: OpenAI clients serialize the history the same way every
turn. So a session keeps its last body (`SharedPrefix`), and a request that starts with those
bytes up to the start of their last message is decoded as the spliced document
``body[:first] + body[last:]`` (the fields before the messages, then the messages from the last
one on, then the fields after), its skipped messages taken from the last request as they were. Only
a byte comparison (memcmp) touches the history; msgspec parses the rest. Any other request (the
first one, a client that changed a byte before the last message, an odd body) is decoded whole.

Why the splice decodes to what the whole body does: the JSON parser is in the same state after the
common bytes ``body[:first]`` in both documents (inside the messages array, before its first value),
and ``body[first:last]`` is, byte for byte, whole messages each followed by a comma. Dropping them
leaves the state "before a value" where it was "after a comma"; the two differ only in that an
immediate ``]`` is valid after ``[`` and not after ``,`` -- so the splice must yield at least one
message, and it must be the array the splice continues (a later duplicate "messages" key would
override it in both documents). The skipped messages were checked as chat messages when the last
request was taken.

Messages are held as `msgspec.Raw` that own their bytes (a view would keep a whole body alive): the
tree's match index stores the same objects, so a repeated message usually compares by identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np

from router.wire.errors import DECODE_ERRORS
from router.wire.openai import ChatMessageIn, ChatRequest, chat_request_decoder, json_encoder

_message_decoder = msgspec.json.Decoder(ChatMessageIn)
_fields_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_NULL = msgspec.Raw(b"null")


class BadMessage(ValueError):
    """`messages[index]` of a request is not a chat message; `error` is the decode error."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(f"messages[{index}]: {error}")
        self.index, self.error = index, error


class RequestMessages:
    """A request's messages: `raw[i]` is message i's JSON exactly as the client sent it (owning its
    bytes), `self[i]` the message decoded (once, on first use; BadMessage if it is not one)."""

    __slots__ = ("raw", "_decoded")

    def __init__(self, raw: list[msgspec.Raw]) -> None:
        self.raw = raw
        self._decoded: dict[int, ChatMessageIn] = {}

    @classmethod
    def of(cls, messages: list[ChatMessageIn]) -> RequestMessages:
        """Already decoded messages (in their canonical JSON spelling)."""
        out = cls([msgspec.Raw(json_encoder.encode(m)) for m in messages])
        out._decoded = dict(enumerate(messages))
        return out

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> ChatMessageIn:
        m = self._decoded.get(index)
        if m is None:
            try:
                m = self._decoded[index] = _message_decoder.decode(self.raw[index])
            except DECODE_ERRORS as e:
                raise BadMessage(index, e) from None
        return m


@dataclass(frozen=True, slots=True)
class SharedPrefix:
    """What a session's next request may share with `body`: its messages (`raws`, at least two)
    start at byte `first`, the last of them at byte `last`."""

    body: bytes
    first: int
    last: int
    raws: list[msgspec.Raw]


@dataclass(slots=True)
class DecodedRequest:
    request: ChatRequest  # `request.messages` is `messages.raw`
    messages: RequestMessages
    prefix: SharedPrefix | None  # for the session's next request, once these messages are checked
    spliced: bool  # decoded from the shared prefix (the history's bytes compared, not parsed)
    document: bytes  # what was parsed: the body, or the body without the history it repeats

    def fields_without_messages(self) -> dict[str, msgspec.Raw]:
        """The request's top-level fields as JSON, in the client's order, `messages` a `null` placeholder
        (the spliced document holds only the last messages). Each value owns its bytes."""
        return {k: _NULL if k == "messages" else v.copy() for k, v in _fields_decoder.decode(self.document).items()}


def decode_chat_request(body: bytes, shared: SharedPrefix | None = None) -> DecodedRequest:
    """`body` as `chat_request_decoder` decodes it (raising what it raises), reusing `shared`."""
    if shared is not None and body.startswith(memoryview(shared.body)[:shared.last]):
        view = memoryview(body)
        spliced = b"".join((view[:shared.first], view[shared.last:]))
        try:
            req = chat_request_decoder.decode(spliced)
        except DECODE_ERRORS:
            req = None  # decoded whole below, so an error names the client's own byte offsets
        # The decoded messages must be the array that continues at the splice (not a later
        # "messages" key, which would win in both documents), and not empty (`[A,]` is no JSON).
        base = _address(spliced)
        if req is not None and req.messages and _offset(req.messages[0], spliced, base) == shared.first:
            tail = req.messages
            at = _offset(tail[-1], spliced, base)
            # the last request's last message, usually unchanged: keep its object (the index holds it)
            kept = shared.raws if tail[0] == shared.raws[-1] else shared.raws[:-1] + [tail[0].copy()]
            req.messages = kept + list(map(msgspec.Raw.copy, tail[1:]))
            prefix = None
            if at is not None:
                prefix = SharedPrefix(body, shared.first, shared.last + at - shared.first, req.messages)
            return DecodedRequest(req, RequestMessages(req.messages), prefix, True, spliced)
    req = chat_request_decoder.decode(body)
    views = req.messages
    req.messages = list(map(msgspec.Raw.copy, views))
    prefix = None
    if len(views) >= 2:
        base = _address(body)
        first, last = _offset(views[0], body, base), _offset(views[-1], body, base)
        if first is not None and last is not None:
            prefix = SharedPrefix(body, first, last, req.messages)
    return DecodedRequest(req, RequestMessages(req.messages), prefix, False, body)


def _address(buffer) -> int:
    return np.frombuffer(buffer, np.uint8).__array_interface__["data"][0]


def _offset(raw: msgspec.Raw, buffer: bytes, base: int) -> int | None:
    """Where the decoded `raw` lies in the `buffer` it was decoded from (msgspec's Raw is a view
    of its input; `base` is the buffer's address); None if it is not there, which only turns the
    splice off."""
    at = _address(raw) - base
    return at if 0 <= at and buffer.startswith(raw, at) else None
