"""The tree's nodes: a `Node` holds a run of tokens (with their flags and logprobs in one int32 array),
a `Terminal` is one stored spelling of a visible text ending at a node. Sizes for the byte budget are
here too (`nbytes`)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import numpy as np

MASK = 1  # flag: generated token (loss mask 1)
ANCHOR = 2  # flag: a generation boundary (a prompt's end, after a generated token): a text prompt may cut here
# flag: a prompt token the router tokenized from text itself, after which the tokenizer splits any text (an added
# token such as <|im_end|>): a text prompt may cut here too, and its tokens are the ones tokenizing it would give
SPLIT = 4
FLAG_SHIFT = 28  # flags live in bits 28-30 of a node's token codes, so token ids must be < 2**28
TOKEN_BITS = (1 << FLAG_SHIFT) - 1
GEN_CODE = np.int32((MASK | ANCHOR) << FLAG_SHIFT)
ANCHOR_CODE = np.int32(ANCHOR << FLAG_SHIFT)
ANCHOR_BIT = ANCHOR << FLAG_SHIFT
SPLIT_CODE = np.int32(SPLIT << FLAG_SHIFT)
CUT_BIT = (ANCHOR | SPLIT) << FLAG_SHIFT  # where a text prompt may cut: either flag
# Fixed per-object estimates for `nbytes` (CPython 3.11, numpy 2; calibrated with tracemalloc by
# tests/test_radix.py::test_nbytes_tracks_real_memory): the Node object, its array header, its entries in the
# parent's child index, its heap entry; a Terminal with its key and index entry.
NODE_OVERHEAD = 560
TERMINAL_OVERHEAD = 420
ALIAS_OVERHEAD = 100  # one more rid on a Terminal (a str in a list)
MAX_ALIASES = 64  # rids kept per Terminal (same text, same tokens); the oldest goes first
# r3_version of a node whose rows were recorded under more than one weight version.
MIXED_VERSIONS = "\x00mixed"
NO_CHILDREN: Any = MappingProxyType({})  # shared by every leaf (read-only; replaced by a dict on first child)


class Terminal:
    """One stored spelling of a visible text: the path ending at `node`. Trajectories with the same text AND
    the same tokens (e.g. two GRPO samples that generated identical ids) share one Terminal; its `rid` is the
    newest one and `older_rids` the others (at most MAX_ALIASES), so each stays retrievable by its rid."""

    __slots__ = ("rid", "older_rids", "version", "finish", "created", "retrieved", "key", "node", "tag")

    def __init__(self, rid, version, finish, created, key, node):
        self.rid, self.version, self.finish, self.created = rid, version, finish, created
        self.retrieved, self.key, self.node = False, key, node  # key: text_key(visible text)
        self.older_rids: list[str] | None = None
        self.tag: int | None = None  # the caller's (peek_exact), reported when the terminal is evicted

    def rids(self) -> list[str]:
        return [*(self.older_rids or ()), self.rid]

    def has_rid(self, rid: str) -> bool:
        return rid == self.rid or (self.older_rids is not None and rid in self.older_rids)


class Node:
    __slots__ = ("data", "tlen", "thash", "r3", "r3_known", "r3_version", "version", "worker", "last_access",
                 "by_first", "first_lens", "parent", "terminals", "hseq")

    def __init__(self, data: np.ndarray, tlen: int, thash: int, parent):
        self.data = data  # int32 [2, n]: token codes (id | flags << FLAG_SHIFT), float32 logprob bits
        self.tlen, self.thash = tlen, thash  # byte length and hash() of the run's text
        self.r3 = self.r3_known = self.r3_version = None
        self.version = self.worker = None
        self.last_access = 0.0
        # The children, indexed by the exact bytes of their FIRST TOKEN -> the child (a list only when several
        # first tokens have the same bytes), and the distinct lengths of those keys, so a text walk probes
        # len(first_lens) slices, not every sibling; a child by token id is found through its bytes too. Leaves
        # share one read-only empty mapping.
        self.by_first: dict[bytes, Node | list[Node]] = NO_CHILDREN
        self.first_lens: tuple[int, ...] = ()
        self.parent: Node | None = parent  # None once evicted (and for the root)
        self.terminals: tuple[Terminal, ...] = ()
        self.hseq = 0

    @property
    def size(self) -> int:
        return self.data.shape[1]

    @property
    def tokens(self) -> np.ndarray:
        return self.data[0] & TOKEN_BITS

    @property
    def flags(self) -> np.ndarray:
        return (self.data[0] >> FLAG_SHIFT).astype(np.uint8)

    @property
    def logprobs(self) -> np.ndarray:
        return self.data[1].view(np.float32)

    def first_token(self) -> int:
        return self.data.item(0, 0) & TOKEN_BITS

    def kids(self) -> list[Node]:
        out = []
        for v in self.by_first.values():
            if v.__class__ is Node:
                out.append(v)
            else:
                out.extend(v)
        return out

    @property
    def children(self) -> dict[int, Node]:
        """The children by first token id (built on demand: for inspection, not the hot paths)."""
        return {c.first_token(): c for c in self.kids()}

    def payload_bytes(self) -> int:
        n = self.data.nbytes
        if self.r3 is not None:
            n += self.r3.nbytes
        if self.r3_known is not None:
            n += self.r3_known.nbytes
        return n

    def nbytes(self) -> int:
        n = self.payload_bytes() + NODE_OVERHEAD + TERMINAL_OVERHEAD * len(self.terminals)
        for t in self.terminals:
            if t.older_rids:
                n += ALIAS_OVERHEAD * len(t.older_rids)
        return n

    def reclaimable(self) -> bool:
        for t in self.terminals:
            if not t.retrieved:
                return False
        return True

