"""One session's turns as a tree (miles' v2 "always branch", with its lessons).

A turn is one generation: the messages the request appended to its parent's path (prompt), the
tokens those messages added, and what the worker produced (ids incl. the stop token, logprobs,
routed-experts rows for the new positions only). A turn's path is root .. turn; its full token
sequence is the concatenation of `prompt_ids + output_ids` along the path, so no turn ever holds
(or copies) the history's tokens, and nothing already stored is re-rendered or re-tokenized.

A request attaches at the deepest turn whose whole path of messages (each turn's appended
messages, then its assistant reply) is a prefix of the request's messages; ties go to the latest
turn. The rest of the request becomes a new child, so a retry or a divergence never destroys
anything, and two concurrent requests from one parent become siblings. Extending a turn that
ended by `length` is refused, as miles' v2 does: truncation closes that path (branch before it).

A turn costs the router no Python work per earlier turn or message. The turns are grouped into
*segments*: chains where each turn is its parent's first child (a conversation without retries is
one segment). A segment keeps its turns' messages as one flat list of their JSON bytes and its
turns' token ids as one JSON byte string, so matching a request is one C-level comparison of the
request's message bytes per segment, without decoding them (the message matcher runs only on a
message whose bytes differ, and the client's spelling then replaces the stored one in
the index, so its next request compares bytes again), and a worker's `input_ids` are one join of a
few byte slices, appended to once per turn.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

import msgspec
import numpy as np

from router.core.errors import Conflict
from router.core.sessions.messages import BUILTIN_MATCHERS, Matcher
from router.wire.chat_messages import RequestMessages
from router.wire.openai import ChatMessageIn, json_encoder

UNFINISHED = frozenset({"length"})
_ids_encoder = msgspec.json.Encoder()


class TurnLimit(Conflict):
    """The session holds its maximum number of turns."""


class Turn(msgspec.Struct, kw_only=True):
    """One generation in a session (a node of the tree). Arrays are numpy, never Python lists."""

    id: int
    parent: int  # -1 for a root
    request_seq: int  # the tree's clock when the turn's request started
    seq: int  # the tree's clock at commit: the only ordering key (wall clock is display only)
    messages: list[ChatMessageIn]  # appended by the request, in the client's spelling
    assistant: ChatMessageIn  # the reply, as the router sent it
    prompt_ids: Any  # np.int32: tokens the appended messages added (root: the whole rendered prompt)
    output_ids: Any  # np.int32: sampled tokens, stop token included
    output_logprobs: Any  # np.float64, one per output token
    # np.int32 [rows, layers, top_k] for positions [r3_start, r3_start + rows), or None (no payload). Full R3:
    # the rows of the turn's new positions [max(start-1, 0), end-1); incremental: what the worker returned.
    routed_experts: Any = None
    r3_start: int = 0
    r3_error: str | None = None  # the worker's routed experts could not be read: /samples answers 422
    end: int  # tokens on the path through this turn
    finish_reason: str  # OpenAI: stop / tool_calls / length (abort when the worker aborted)
    weight_version: str | None = None
    response_id: str = ""
    created_at: float = 0.0
    record: Any = None  # router/wire/sessions.py TurnRecord: what GET /sessions/{id} shows for the turn

    @property
    def start(self) -> int:
        """Tokens on the path before this turn's prompt."""
        return self.end - len(self.prompt_ids) - len(self.output_ids)

    @property
    def extendable(self) -> bool:
        return self.finish_reason not in UNFINISHED


class _Segment:
    """A chain of turns, each the first child of the one before (the first also of a turn in
    `parent`, at index `branch`, or a root). Positions are absolute: the segment's messages are
    the request positions `msg_start ..`; `msg_ends[i]` is how many messages the path through its
    i-th turn covers."""

    __slots__ = ("parent", "branch", "turn_ids", "msg_start", "msg_ends", "messages", "raws", "children",
                 "ids", "ids_ends")

    def __init__(self, parent: _Segment | None, branch: int, msg_start: int) -> None:
        self.parent = parent
        self.branch = branch
        self.turn_ids: list[int] = []
        self.msg_start = msg_start
        self.msg_ends: list[int] = []
        # The turns' messages then assistant replies, flat, as stored (`messages`) and as JSON
        # (`raws`): an index for matching only. A raw entry is replaced by the equivalent spelling
        # a client sent (the router's own reply spelling rarely is the client's).
        self.messages: list[ChatMessageIn] = []
        self.raws: list[msgspec.Raw] = []
        self.children: list[_Segment] = []
        # Token ids of the first len(ids_ends) turns as JSON list items, each turn's followed by ",";
        # filled when a turn is first extended, so a turn's ids are encoded once, a leaf's never.
        self.ids = bytearray()
        self.ids_ends: list[int] = []


def _first_difference(a: list, a0: int, b: list, b0: int, n: int) -> int:
    """The smallest i < n with a[a0 + i] != b[b0 + i], or n: C-level list comparisons, halving
    the range that holds the difference (at most 2n element comparisons, log n Python steps)."""
    if a[a0:a0 + n] == b[b0:b0 + n]:
        return n
    lo, hi = 0, n  # a[a0:a0+lo] == b[b0:b0+lo], and the first difference is below hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[a0 + lo:a0 + mid] == b[b0 + lo:b0 + mid]:
            lo = mid
        else:
            hi = mid
    return lo


class SessionTree:
    def __init__(self, max_turns: int = 1024, matcher: Matcher = BUILTIN_MATCHERS["lenient"]) -> None:
        self.matcher = matcher  # decides when a re-sent message whose bytes differ is the stored one
        self.turns: list[Turn] = []
        self.children: dict[int, list[int]] = {-1: []}
        self.max_turns = max_turns
        # One clock for request starts and commits, so "B started after A was committed" (a retry,
        # not a concurrent sibling) is `B.request_seq > A.seq`.
        self._clock = 0
        self._roots: list[_Segment] = []
        self._where: list[tuple[_Segment, int]] = []  # turn id -> (its segment, its index there)
        # miles' "active leaf": the turn the last request attached to, or the last one committed (-1: none).
        # GET /sessions/{id} and v1 samples show the path root .. active.
        self.active = -1

    def __len__(self) -> int:
        return len(self.turns)

    def next_request_seq(self) -> int:
        self._clock += 1
        return self._clock

    # ---- matching ---------------------------------------------------------------------------
    def attach_point(self, messages: RequestMessages) -> tuple[int, int]:
        """(deepest matching turn id or -1, number of request messages its path covers).
        Decodes only the request messages whose bytes differ from the stored ones (BadMessage
        if one is not a chat message)."""
        best, best_len, best_seq = -1, 0, -1
        n = len(messages)
        stack = list(self._roots)
        while stack:
            seg = stack.pop()
            matched = self._match(seg, messages, n)
            if not matched:
                continue
            tid, covered = seg.turn_ids[matched - 1], seg.msg_ends[matched - 1]
            seq = self.turns[tid].seq
            if covered > best_len or (covered == best_len and seq > best_seq):
                best, best_len, best_seq = tid, covered, seq
            stack.extend(c for c in seg.children if c.branch < matched)
        return best, best_len

    def _match(self, seg: _Segment, messages: RequestMessages, n: int) -> int:
        """How many of `seg`'s turns have their whole path repeated by `messages` (the segment's
        ancestors already matched)."""
        fits = bisect_right(seg.msg_ends, n)
        if not fits:
            return 0
        start, end = seg.msg_start, seg.msg_ends[fits - 1]
        raws, stored = messages.raw, seg.raws
        pos = start
        while pos < end:
            pos += _first_difference(raws, pos, stored, pos - start, end - pos)
            if pos == end:
                break
            new = messages[pos]  # decoded (BadMessage if it is not a chat message)
            if not self.matcher(stored[pos - start], seg.messages[pos - start], raws[pos], new):
                break
            stored[pos - start] = raws[pos]  # equivalent: the next request compares bytes (or identity)
            pos += 1
        return bisect_right(seg.msg_ends, pos, 0, fits)

    # ---- paths ------------------------------------------------------------------------------
    def path(self, tid: int) -> list[Turn]:
        out = []
        while tid >= 0:
            t = self.turns[tid]
            out.append(t)
            tid = t.parent
        out.reverse()
        return out

    def path_tokens(self, tid: int) -> np.ndarray:
        """The full token sequence through turn `tid` (empty for -1)."""
        parts = []
        for t in self.path(tid):
            parts.append(t.prompt_ids)
            parts.append(t.output_ids)
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def join_path_ids(self, tid: int, before: bytes, items: bytes, after: bytes) -> bytes:
        """`before` + the token ids of the path through `tid` and then `items` (JSON list items,
        "1,2,3") as one comma-separated item list + `after`, in one copy. Each turn's ids are
        encoded once, when a request first extends it."""
        chain = []
        seg, index = self._where[tid] if tid >= 0 else (None, -1)
        while seg is not None:
            chain.append((seg, index))
            seg, index = seg.parent, seg.branch
        views = []
        try:
            for seg, index in reversed(chain):
                if len(seg.ids_ends) <= index:
                    self._encode_ids(seg, index)
                views.append(memoryview(seg.ids)[:seg.ids_ends[index]])
            if views and not items:  # no items after the path: drop its trailing ","
                views[-1] = views[-1][:-1]
            return b"".join([before, *views, items, after])
        finally:
            for v in views:  # a bytearray with live views cannot grow
                v.release()

    def _encode_ids(self, seg: _Segment, index: int) -> None:
        for i in range(len(seg.ids_ends), index + 1):
            t = self.turns[seg.turn_ids[i]]
            seg.ids += _ids_encoder.encode(t.prompt_ids.tolist())[1:-1]
            seg.ids += b","
            if len(t.output_ids):
                seg.ids += _ids_encoder.encode(t.output_ids.tolist())[1:-1]
                seg.ids += b","
            seg.ids_ends.append(len(seg.ids))

    def path_length(self, tid: int) -> int:
        return 0 if tid < 0 else self.turns[tid].end

    def leaves(self) -> list[Turn]:
        return [t for t in self.turns if not self.children.get(t.id)]

    def latest_leaf(self) -> Turn | None:
        leaves = self.leaves()
        return max(leaves, key=lambda t: t.seq) if leaves else None

    # ---- commit -----------------------------------------------------------------------------
    def check_room(self) -> None:
        if len(self.turns) >= self.max_turns:
            raise TurnLimit(f"the session holds its maximum of {self.max_turns} turns (sessions.max_turns_per_session)")

    def restore(self, turns: list[Turn]) -> None:
        """Rebuild the tree from stored turns, in id order (the durable store, after a restart)."""
        for t in turns:
            if t.id != len(self.turns):
                raise ValueError(f"stored turns out of order: turn {t.id} at position {len(self.turns)}")
            self.turns.append(t)
            self._place(t)
            self.children.setdefault(t.parent, []).append(t.id)
            self.children.setdefault(t.id, [])
            self._clock = max(self._clock, t.seq, t.request_seq)
        self.active = len(self.turns) - 1

    def commit(self, parent: int, raws: list[msgspec.Raw] | None = None, assistant_raw: msgspec.Raw | None = None,
               **fields: Any) -> Turn:
        """Store a finished generation as a child of `parent` (-1: a new root). `raws`: the
        appended messages' JSON as the client sent them, `assistant_raw`: the reply's message as the
        client got it (default: their canonical encoding)."""
        self.check_room()
        self._clock += 1
        tid = len(self.turns)
        prompt_ids, output_ids = fields["prompt_ids"], fields["output_ids"]
        end = self.path_length(parent) + len(prompt_ids) + len(output_ids)
        turn = Turn(id=tid, parent=parent, seq=self._clock, end=end, **fields)
        self.turns.append(turn)
        self._place(turn, raws, assistant_raw)
        self.children.setdefault(parent, []).append(tid)
        self.children[tid] = []
        self.active = tid
        return turn

    def graft(self, turn: Turn, parent: int) -> Turn:
        """Commit the generation another tree's `turn` holds (a tree of the same session) as a child of `parent`
        here, under this tree's next id: the same messages, tokens, experts and record. How a turn that lost its
        id to another router's is stored as the next one (router/net/session_persist.py)."""
        fields = {f: getattr(turn, f) for f in turn.__struct_fields__ if f not in ("id", "parent", "seq", "end")}
        return self.commit(parent, **fields)

    def find_response(self, response_id: str, below: int) -> int:
        """The id of the turn among the first `below` whose response id this is, or -1."""
        for tid in range(min(below, len(self.turns)) - 1, -1, -1):
            if self.turns[tid].response_id == response_id:
                return tid
        return -1

    def _place(self, turn: Turn, raws: list[msgspec.Raw] | None = None,
               assistant_raw: msgspec.Raw | None = None) -> None:
        """Put a new turn in its segment: its parent's, when it is the parent's first child."""
        if turn.parent < 0:
            seg = _Segment(None, -1, 0)
            self._roots.append(seg)
        else:
            seg, index = self._where[turn.parent]
            if index != len(seg.turn_ids) - 1:  # the parent already has a child: branch off
                child = _Segment(seg, index, seg.msg_ends[index])
                seg.children.append(child)
                seg = child
        self._where.append((seg, len(seg.turn_ids)))
        seg.turn_ids.append(turn.id)
        seg.messages.extend(turn.messages)
        seg.messages.append(turn.assistant)
        if raws is None:
            raws = [msgspec.Raw(json_encoder.encode(m)) for m in turn.messages]
        seg.raws.extend(raws)
        if assistant_raw is None:
            message = getattr(turn.record, "message", None)  # a restored turn: the reply as the client got it
            assistant_raw = message if message is not None and bytes(message) != b"null" else \
                msgspec.Raw(json_encoder.encode(turn.assistant))
        seg.raws.append(assistant_raw)
        seg.msg_ends.append(seg.msg_start + len(seg.messages))
