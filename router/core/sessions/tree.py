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
ended by `length` (or `abort`) is refused: its output has no end-of-turn token to build on.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from router.core.sessions.messages import messages_match
from router.wire.openai import ChatMessageIn

UNFINISHED = frozenset({"length", "abort"})
_ids_encoder = msgspec.json.Encoder()


class TurnLimit(Exception):
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
    routed_experts: Any = None  # np.int32 [rows, layers, top_k] for positions [start, end-1), or None
    end: int  # tokens on the path through this turn
    finish_reason: str  # OpenAI: stop / tool_calls / length (abort when the worker aborted)
    weight_version: str | None = None
    response_id: str = ""
    created_at: float = 0.0
    # The turn's prompt + output ids as JSON list items ("1,2,3"), so a later turn's input_ids are a
    # join of per-turn pieces rather than a re-encode of the whole history. Derived: recomputed when empty.
    ids_json: bytes = b""
    record: Any = None  # what GET /sessions/{id} shows for the turn (router/stages/session_reply.py)

    @property
    def start(self) -> int:
        """Tokens on the path before this turn's prompt."""
        return self.end - len(self.prompt_ids) - len(self.output_ids)

    @property
    def extendable(self) -> bool:
        return self.finish_reason not in UNFINISHED


class SessionTree:
    def __init__(self, max_turns: int = 1024) -> None:
        self.turns: list[Turn] = []
        self.children: dict[int, list[int]] = {-1: []}
        self.max_turns = max_turns
        # One clock for request starts and commits, so "B started after A was committed" (a retry,
        # not a concurrent sibling) is `B.request_seq > A.seq`.
        self._clock = 0

    def __len__(self) -> int:
        return len(self.turns)

    def next_request_seq(self) -> int:
        self._clock += 1
        return self._clock

    # ---- matching ---------------------------------------------------------------------------
    def attach_point(self, messages: list[ChatMessageIn]) -> tuple[int, int]:
        """(deepest matching turn id or -1, number of request messages its path covers)."""
        best, best_len, best_seq = -1, 0, -1
        stack = [(c, 0) for c in self.children[-1]]
        n = len(messages)
        while stack:
            tid, pos = stack.pop()
            t = self.turns[tid]
            k = len(t.messages)
            if pos + k + 1 > n:
                continue
            # List/Struct equality in C first (a client that echoes the history unchanged costs one
            # comparison per turn); the lenient message-level match only where that fails.
            if not (messages[pos:pos + k] == t.messages and messages[pos + k] == t.assistant):
                if not all(messages_match(t.messages[i], messages[pos + i]) for i in range(k)):
                    continue
                if not messages_match(t.assistant, messages[pos + k]):
                    continue
            covered = pos + k + 1
            if covered > best_len or (covered == best_len and t.seq > best_seq):
                best, best_len, best_seq = tid, covered, t.seq
            stack.extend((c, covered) for c in self.children.get(tid, ()))
        return best, best_len

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

    def path_ids_json(self, tid: int) -> list[bytes]:
        """The path's token ids as JSON list items, one piece per turn (join with b",")."""
        pieces = []
        for t in self.path(tid):
            if not t.ids_json:
                t.ids_json = _ids_encoder.encode(np.concatenate([t.prompt_ids, t.output_ids]).tolist())[1:-1]
            pieces.append(t.ids_json)
        return pieces

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
            self.children.setdefault(t.parent, []).append(t.id)
            self.children.setdefault(t.id, [])
            self._clock = max(self._clock, t.seq, t.request_seq)

    def commit(self, parent: int, **fields: Any) -> Turn:
        """Store a finished generation as a child of `parent` (-1: a new root)."""
        self.check_room()
        self._clock += 1
        tid = len(self.turns)
        prompt_ids, output_ids = fields["prompt_ids"], fields["output_ids"]
        end = self.path_length(parent) + len(prompt_ids) + len(output_ids)
        turn = Turn(id=tid, parent=parent, seq=self._clock, end=end, **fields)
        self.turns.append(turn)
        self.children.setdefault(parent, []).append(tid)
        self.children[tid] = []
        return turn
