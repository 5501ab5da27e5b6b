"""The tree: insert, text and token lookups, retrieve, eviction, statistics (the design is in
router/core/radix/__init__.py). Its records (`TrajectoryInput` in; `InsertResult`, `PrefixMatch`,
`Retrieved`, `EvictionReport` out) are msgspec Structs."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from itertools import accumulate
from typing import Any

import msgspec
import numpy as np

from router.core.radix.heaps import LeafHeaps
from router.core.radix.keys import text_key
from router.core.radix.node import (ALIAS_OVERHEAD, ANCHOR_BIT, ANCHOR_CODE, CUT_BIT, FLAG_SHIFT, GEN_CODE, MASK,
                                    MAX_ALIASES, MIXED_VERSIONS, NO_CHILDREN, NODE_OVERHEAD, SPLIT_CODE,
                                    TERMINAL_OVERHEAD, TOKEN_BITS, Node, Terminal)
from router.core.vocab import VocabBytes
from router.wire.sglang import expert_dtype

_EMPTY_I32 = np.zeros(0, np.int32)
_HEAD_TOKENS = 64  # the first run of tokens a partial node match rebuilds and compares


class TrajectoryInput(msgspec.Struct, kw_only=True):
    """One finished /generate call, as the worker saw and produced it."""

    rid: str
    prompt_ids: Any  # int array-like: the prompt tokens as sent to the worker
    output_ids: Any  # int array-like: generated tokens, including a trailing stop/eos token
    output_logprobs: Any  # float array-like, one per output token
    visible_text: bytes  # what the client sees: prompt text + response text (stop text stripped/trimmed)
    weight_version: str | None = None
    worker: str | None = None
    finish: str = "stop"  # "stop" | "length" | "abort"
    # int [len(prompt)+len(output)-1, L, K] or None; rows of -1 mean "not reported" (e.g. the worker was asked
    # for rows from routed_experts_start_len on) and leave the cached rows in place
    routed_experts: Any = None
    # The prompt tokens from this index on are the router's own tokenization of the prompt's text (None: the
    # prompt came as ids, or nobody knows). After a split token there (VocabBytes.split_after), a later text
    # prompt may cut: those tokens are what tokenizing its text would give.
    tokenized_from: int | None = None


class InsertResult(msgspec.Struct):
    shared_tokens: int  # leading tokens already cached
    new_tokens: int  # tokens stored by this insert
    splits: int
    # An earlier trajectory no longer retrievable by its rid: more than MAX_ALIASES trajectories had the same
    # visible text and the same tokens (other spellings of a text never replace each other).
    replaced_rid: str | None


class PrefixMatch(msgspec.Struct):
    tokens: np.ndarray  # int32: the matched prefix
    matched_bytes: int
    worker: str | None  # worker of the deepest matched node (prefix affinity)
    version: str | None


class Retrieved(msgspec.Struct):
    exact: bool  # a terminal matched the whole text
    tokens: np.ndarray  # int32
    logprobs: np.ndarray  # float32, 0.0 on prompt tokens
    loss_mask: np.ndarray  # uint8, 1 = generated
    matched_bytes: int
    versions: list  # weight versions of the terminals along the path, oldest first, deduplicated
    # [len(tokens)-1, L, K] at the tree's width (uint8/uint16/int32: `routed_experts_dtype`); None when any
    # needed row is unknown. Wire formats convert to SGLang's int32.
    routed_experts: np.ndarray | None
    rid: str | None = None
    finish: str | None = None
    version: str | None = None  # the matched terminal's weight version
    # The matched tokens end on an anchor: where a generation started or ended (a prompt's end, after a generated
    # token, a terminal), not at a cut inside somebody else's prompt. Always True when exact.
    anchored: bool = False
    # Distinct stored token spellings of the whole text of the kind answered (trajectories when one matched,
    # else anchored spellings covering the text); 0 when the text is not covered.
    alternatives: int = 0
    # Several spellings fit and nothing (rid, batch hand-out) said which: `tokens` is the most recently stored
    # one, and neither `exact` nor the choice should be trusted.
    ambiguous: bool = False


class EvictionReport(msgspec.Struct):
    nodes: int = 0
    tokens: int = 0
    freed_bytes: int = 0
    evicted_stale: int = 0  # terminals dropped in phase 1
    evicted_retrieved: int = 0  # terminals dropped in phase 2
    evicted_unretrieved: int = 0  # never-retrieved terminals dropped in phase 3 (the caller should warn)
    rids: list = msgspec.field(default_factory=list)
    tags: list = msgspec.field(default_factory=list)  # the `tag` of each evicted terminal that had one


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    neq = a[:n] != b[:n]
    i = int(neq.argmax()) if n else 0
    return i if n and neq[i] else n


def _match_len(a: bytes, mv: memoryview, pos: int) -> int:
    """Common prefix length of `a` and mv[pos:] (memcmp via startswith: galloping, then bisection)."""
    n = min(len(a), len(mv) - pos)
    if a.startswith(mv[pos:pos + n]):
        return n
    lo, hi, step = 0, n, 8  # a[:lo] matches, a[:hi] does not
    while lo + step < hi and a.startswith(mv[pos:pos + lo + step]):
        lo, step = lo + step, step * 2
    hi = min(hi, lo + step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a.startswith(mv[pos:pos + mid]):
            lo = mid
        else:
            hi = mid
    return lo


def _newer(old: str | None, new: str | None) -> str | None:
    if new is None or old is None:
        return old if new is None else new
    try:
        return new if int(new) >= int(old) else old
    except ValueError:
        return new  # non-numeric versions: the most recent insert wins


def _dedup(xs) -> list:
    seen: set = set()
    return [x for x in xs if not (x in seen or seen.add(x))]


_WIDTH = {np.dtype(np.uint8): 0, np.dtype(np.uint16): 1, np.dtype(np.int32): 2}


class RadixTree:
    def __init__(self, vocab: VocabBytes, *, num_experts: int | None = None):
        if vocab.size > TOKEN_BITS:
            raise ValueError(f"vocabulary of {vocab.size} tokens: the trajectory cache takes ids < {TOKEN_BITS + 1}")
        self._vocab = vocab
        self._split_after = vocab.split_after
        self._lens = vocab.lengths
        self._pieces = vocab.pieces
        self.root = Node(np.zeros((2, 0), np.int32), 0, hash(b""), None)
        self.root.by_first = {}
        # text_key(visible text) -> its spellings (Terminals, one per distinct token path), oldest insert first
        self._by_key: dict[int, list[Terminal]] = {}
        self._r3_shape: tuple[int, int] | None = None
        # Routed-expert ids are stored at the narrowest width seen so far (`num_experts` from the model, when
        # known, sets the starting width); a larger id widens every node, never truncates.
        self._r3_dtype = np.dtype(expert_dtype(num_experts - 1 if num_experts else 0))
        self._strings: dict[str, str] = {}  # one object per distinct version / finish string
        # (text, anchors_only, segs, bytes) of the last match_text, until the tree changes (insert, eviction)
        self._last_match: tuple | None = None
        self._nbytes = 0
        self._nterminals = 0
        self._nodes = 0
        self._ntokens = 0
        self._leaves = LeafHeaps()  # the eviction order (heaps.py)
        self._stats = dict(hits=0, misses=0, inserts=0, splits=0, evictions=0, evicted_unretrieved=0,
                           retrieve_exact=0, retrieve_partial=0, retrieve_ambiguous=0, superseded=0)

    @property
    def routed_experts_dtype(self) -> np.dtype:
        return self._r3_dtype

    def _intern(self, s: str | None) -> str | None:
        return None if s is None else self._strings.setdefault(s, s)

    # ----------------------------------------------------------------------------------------------- insert
    def insert(self, t: TrajectoryInput, *, now: float) -> InsertResult:
        prompt = np.asarray(t.prompt_ids, dtype=np.int32).ravel()
        out = np.asarray(t.output_ids, dtype=np.int32).ravel()
        lps = np.asarray(t.output_logprobs, dtype=np.float32).ravel()
        P, n = prompt.size, prompt.size + out.size
        if n == 0 or lps.size != out.size:
            raise ValueError(f"trajectory {t.rid!r}: {n} tokens, {out.size} outputs, {lps.size} logprobs")
        toks = np.concatenate((prompt, out))
        # before anything changes: one pass (a negative id is a huge one as uint32)
        if int(toks.view(np.uint32).max()) >= self._vocab.size:
            raise ValueError(f"trajectory {t.rid!r}: token id out of range for the vocabulary "
                             f"(size {self._vocab.size})")
        self._last_match = None
        r3 = None
        if t.routed_experts is not None:
            a = np.asarray(t.routed_experts)
            if a.ndim != 3 or a.shape[0] != n - 1:
                raise ValueError(f"routed_experts shape {a.shape}, expected [{n - 1}, L, K]")
            if a.dtype.kind not in "iu":
                raise ValueError(f"routed_experts must hold integers, not {a.dtype}")
            if self._r3_shape is None:
                self._r3_shape = (a.shape[1], a.shape[2])
            elif a.shape[1:] != self._r3_shape:
                raise ValueError(f"routed_experts shape {a.shape[1:]} != cached {self._r3_shape}")
            r3 = a.reshape(n - 1, -1)
            if r3.size:
                self._fit_expert_width(r3)
        version = self._intern(t.weight_version)
        split_from = t.tokenized_from if self._split_after is not None else None
        args = (P, n, lps, r3, version, t.worker, now, split_from)
        node, pos, splits = self.root, 0, 0
        for child, at, m in self._token_path(toks):
            if m < child.size:
                child = self._split(child, m)
                splits += 1
            self._write(child, at, *args)
            node, pos = child, at + m
        shared = pos
        if pos < n:
            node = self._new_leaf(node, toks[pos:], pos, args)
        visible = t.visible_text
        key = text_key(visible)
        group = self._by_key.get(key)
        same = next((tm for tm in group if tm.node is node), None) if group else None
        dropped = None
        if same is not None:
            # The same text spelled by the same tokens: one more rid on the existing spelling.
            dropped = self._add_alias(same, t.rid)
            same.version, same.finish, same.created = version, self._intern(t.finish), now
            group.remove(same)
            group.append(same)  # a group lists its spellings by their latest insert, oldest first
        else:
            term = Terminal(t.rid, version, self._intern(t.finish), now, key, node)
            node.terminals += (term,)
            if group is None:
                group = self._by_key[key] = []
            group.append(term)
            self._nterminals += 1
            self._nbytes += TERMINAL_OVERHEAD
        self._push(node)
        self._stats["inserts"] += 1
        return InsertResult(shared, n - shared, splits, dropped)

    def _add_alias(self, term: Terminal, rid: str) -> str | None:
        """Make `rid` the terminal's newest rid; returns a rid that no longer fits (MAX_ALIASES), if any."""
        if term.has_rid(rid):
            if rid != term.rid:
                term.older_rids.remove(rid)
                term.older_rids.append(term.rid)
                term.rid = rid
            return None
        if term.older_rids is None:
            term.older_rids = []
        term.older_rids.append(term.rid)
        term.rid = rid
        self._nbytes += ALIAS_OVERHEAD
        if len(term.older_rids) < MAX_ALIASES:
            return None
        self._nbytes -= ALIAS_OVERHEAD
        self._stats["superseded"] += 1
        return term.older_rids.pop(0)

    def _write(self, node: Node, pos, P, n, lps, r3, version, worker, now, split_from) -> None:
        """Merge one trajectory into `node`, which holds its positions [pos, pos+len)."""
        L = node.size
        codes = node.data[0]
        lo = max(P - pos, 0)  # first generated position, node-local
        if lo < L:
            codes[lo:] |= GEN_CODE
            node.data[1, lo:] = lps[pos + lo - P:pos + L - P].view(np.int32)
        if 0 <= P - 1 - pos < L:
            codes[P - 1 - pos] |= ANCHOR_CODE  # end of the prompt
        if split_from is not None and split_from - pos < min(lo, L):
            # split tokens in the part of the prompt the router tokenized itself
            run = codes[max(split_from - pos, 0):min(lo, L)]
            run[self._split_after[run & TOKEN_BITS]] |= SPLIT_CODE
        hi = min(L, n - 1 - pos)  # routed-expert rows: none for the trajectory's last token
        if r3 is not None and hi > 0:
            self._write_r3(node, r3[pos:pos + hi], version)
        node.version = _newer(node.version, version)
        if worker is not None:
            node.worker = worker
        node.last_access = now

    def _write_r3(self, node: Node, rows: np.ndarray, version: str | None) -> None:
        """Store the reported rows (a row of -1 = not reported: the node's own row stays)."""
        have = rows[:, 0] >= 0
        if not have.any():
            return
        full = bool(have.all())
        L, hi = node.size, rows.shape[0]
        if node.r3 is None:
            node.r3 = np.zeros((L, rows.shape[1]), self._r3_dtype)
            node.r3_known = np.zeros(L, np.bool_)
            node.r3_version = version
            self._nbytes += node.r3.nbytes + node.r3_known.nbytes
        elif version != node.r3_version:
            # Rows recorded under another weight version that this write does not replace: the node mixes them.
            old = node.r3_known
            kept = (np.ones(L, np.bool_) if old is None else old.copy())
            kept[:hi] &= ~have
            node.r3_version = MIXED_VERSIONS if kept.any() else version
        if full:
            node.r3[:hi] = rows
        else:
            node.r3[:hi][have] = rows[have]
        known = node.r3_known
        if known is not None:
            known[:hi] |= have
            if known.all():
                node.r3_known = None
                self._nbytes -= known.nbytes

    def _fit_expert_width(self, r3: np.ndarray) -> None:
        """Widen the tree's routed-expert width if `r3` holds a larger id; refuse ids no row can hold."""
        top = int(r3.max())
        if int(r3.min()) < 0:
            known = r3[r3[:, 0] >= 0]
            if known.size and int(known.min()) < 0:
                raise ValueError("routed_experts holds a negative expert id in a reported row")
        if top > 0x7FFFFFFF:
            raise ValueError(f"routed_experts holds expert id {top}, past int32")
        need = np.dtype(expert_dtype(top))
        if _WIDTH[need] <= _WIDTH[self._r3_dtype]:
            return
        self._r3_dtype = need
        stack = self.root.kids()
        while stack:
            nd = stack.pop()
            stack.extend(nd.kids())
            if nd.r3 is not None:
                wide = nd.r3.astype(need)
                self._nbytes += wide.nbytes - nd.r3.nbytes
                nd.r3 = wide

    def _new_leaf(self, parent: Node, toks: np.ndarray, pos: int, args) -> Node:
        blob, lens = self._vocab(toks)
        L = toks.size
        data = np.empty((2, L), np.int32)
        data[0] = toks
        data[1] = 0
        node = Node(data, len(blob), hash(blob), parent)
        self._nbytes += node.nbytes()  # before _write, which accounts for the r3 rows it allocates
        self._write(node, pos, *args)
        self._attach(parent, node)
        self._nodes += 1
        self._ntokens += L
        return node

    def _token_path(self, q: np.ndarray):
        """(node, its first position, m) down the path `q` (int32) continues: m = how many of the node's tokens
        q matches (the walk ends after a node q leaves or ends inside)."""
        node, pos = self.root, 0
        while pos < q.size:
            child = self._child(node, int(q[pos]))
            if child is None:
                return
            size = child.data.shape[1]
            m = _common_prefix(child.data[0] & TOKEN_BITS, q[pos:pos + size])
            yield child, pos, m
            if m < size:
                return
            node, pos = child, pos + m

    def _child(self, node: Node, tid: int) -> Node | None:
        """The child of `node` whose first token is `tid`."""
        v = node.by_first.get(self._pieces[tid])
        if v is None or v.__class__ is Node:
            return v if v is None or v.first_token() == tid else None
        for c in v:
            if c.first_token() == tid:
                return c
        return None

    def _attach(self, parent: Node, node: Node) -> None:
        node.parent = parent
        if not parent.by_first:  # a leaf's shared empty mapping
            parent.by_first = {}
        key = self._pieces[node.first_token()]
        v = parent.by_first.get(key)
        if v is None:
            parent.by_first[key] = node
            if len(key) not in parent.first_lens:
                parent.first_lens = tuple(sorted((*parent.first_lens, len(key))))
        elif v.__class__ is Node:
            parent.by_first[key] = [v, node]
        else:
            v.append(node)

    def _detach(self, parent: Node, node: Node) -> None:
        key = self._pieces[node.first_token()]
        v = parent.by_first[key]
        if v.__class__ is Node:
            del parent.by_first[key]
            if not any(len(k) == len(key) for k in parent.by_first):
                parent.first_lens = tuple(n for n in parent.first_lens if n != len(key))
        else:
            v.remove(node)
            if len(v) == 1:
                parent.by_first[key] = v[0]
        if not parent.by_first and parent is not self.root:
            parent.by_first = NO_CHILDREN

    def _split(self, node: Node, m: int) -> Node:
        """Cut `node` after its first m tokens; return the new upper part (the lower part keeps its identity,
        children and terminals, so Terminal.node never moves)."""
        parent = node.parent
        blob, lens = self._vocab(node.data[0] & TOKEN_BITS)
        cut = int(lens[:m].sum(dtype=np.int64))
        self._nbytes -= node.payload_bytes()
        up = Node(node.data[:, :m].copy(), cut, hash(blob[:cut]), parent)
        up.version, up.worker, up.last_access = node.version, node.worker, node.last_access
        if node.r3 is not None:
            up.r3, node.r3 = node.r3[:m].copy(), node.r3[m:].copy()
            up.r3_version = node.r3_version
            known = node.r3_known
            if known is not None:
                up.r3_known = known[:m].copy() if not known[:m].all() else None
                node.r3_known = known[m:].copy() if not known[m:].all() else None
        key = self._pieces[up.first_token()]  # same first token, so the same key
        v = parent.by_first[key]
        if v.__class__ is Node:
            parent.by_first[key] = up
        else:
            v[v.index(node)] = up
        node.data = node.data[:, m:].copy()
        node.tlen, node.thash = node.tlen - cut, hash(blob[cut:])
        self._attach(up, node)
        self._nodes += 1
        self._nbytes += up.payload_bytes() + node.payload_bytes() + NODE_OVERHEAD
        self._stats["splits"] += 1
        return up

    def _forget(self, term: Terminal) -> None:
        group = self._by_key.get(term.key)
        if group is None or term not in group:
            return
        group.remove(term)
        self._nterminals -= 1
        if not group:
            del self._by_key[term.key]

    # ----------------------------------------------------------------------------------------------- text
    def _bytes_upto(self, node: Node, k: int) -> int:
        """Byte length of the node's first k tokens."""
        if k == node.size:
            return node.tlen
        return int(self._lens[node.data[0, :k] & TOKEN_BITS].sum(dtype=np.int64))

    def _partial_match(self, node: Node, text: bytes, mv: memoryview, pos: int) -> tuple[int, int]:
        """(k, bytes of those k tokens) for a node whose whole text does not match at text[pos:]: k = its leading
        tokens whose bytes all match. The node's bytes are rebuilt in growing runs (64, 256, 1024... tokens: a
        text usually ends or differs within the first) and compared with memcmp; the first run by joining the
        vocabulary's bytes objects, longer ones by one numpy gather."""
        codes = node.data[0]
        n, tlen = codes.size, len(text)
        k0, b, run = 0, pos, _HEAD_TOKENS
        while True:
            stop = min(n, k0 + run)
            ids = codes[k0:stop] & TOKEN_BITS
            if run == _HEAD_TOKENS:
                pieces = list(map(self._pieces.__getitem__, ids.tolist()))
                blob, lens = b"".join(pieces), None
            else:
                blob, lens = self._vocab(ids)
            c = _match_len(blob, mv, b)
            if c < len(blob) or stop == n or b + c >= tlen:
                if lens is None:
                    ends = list(accumulate(map(len, pieces)))
                    j = bisect_right(ends, c)  # whole tokens inside the match
                    return k0 + j, b - pos + (ends[j - 1] if j else 0)
                ends = lens.cumsum(dtype=np.int64)
                j = int(ends.searchsorted(c, side="right"))
                return k0 + j, b - pos + (int(ends[j - 1]) if j else 0)
            k0, b, run = stop, b + c, run * 4

    def node_text(self, node: Node) -> bytes:
        """The exact bytes of a node's run (derived from its tokens)."""
        return self._vocab(node.data[0] & TOKEN_BITS)[0]

    # ----------------------------------------------------------------------------------------------- lookups
    def match_tokens(self, tokens: np.ndarray, *, now: float) -> PrefixMatch:
        q = np.asarray(tokens, dtype=np.int32).ravel()
        nbytes, end, segs = 0, 0, []
        for child, at, m in self._token_path(q):
            segs.append((child, m))
            nbytes += child.tlen if m == child.size else int(self._lens[q[at:at + m]].sum(dtype=np.int64))
            end = at + m
        return self._matched(segs, q[:end].copy(), nbytes, now)

    def match_text(self, text: bytes, *, now: float, anchors_only: bool = True) -> PrefixMatch:
        """Longest prefix of `text` spelled by cached tokens that ends where a text prompt may cut: on an anchor
        or after a split token of a prompt the router tokenized (any token boundary when anchors_only=False).
        Ties between different token paths go to the most recently used."""
        memo = self._last_match
        if memo is not None and memo[1] == anchors_only and memo[0] == text:
            segs, nbytes = memo[2], memo[3]  # a GRPO group sends the same prompt n times in a row
        else:
            segs, nbytes, _ = self._text_walk(text, CUT_BIT if anchors_only else 0)
            self._last_match = (text, anchors_only, segs, nbytes)
        if segs:
            toks = np.concatenate([nd.data[0, :k] for nd, k in segs])
            toks &= TOKEN_BITS
        else:
            toks = _EMPTY_I32.copy()
        return self._matched(segs, toks, nbytes, now)

    def _matched(self, segs, toks, nbytes, now) -> PrefixMatch:
        self._stats["hits" if segs else "misses"] += 1
        for seg in segs:
            seg[0].last_access = now  # the heap entry catches up lazily (see _evict_while)
        if not segs:
            return PrefixMatch(toks, 0, None, None)
        last = segs[-1][0]
        return PrefixMatch(toks, nbytes, last.worker, last.version)

    def _text_walk(self, text: bytes, ends: int) -> tuple[list, int, int]:
        """Depth-first over the children whose first token matches the text (normally one per level; several
        only where different tokenizations spell the same bytes). Returns the best [(node, k tokens)] path
        (most bytes, ties to the most recently used) ending after a token with one of the flag bits `ends`
        (0: after any token), its length in bytes, and how many distinct token paths reach that length (each
        (node, k) ends a different token sequence)."""
        best: tuple = (0, 0.0, None)  # (bytes, recency, linked path)
        ties = 0
        stack = [(self.root, 0, None)]
        pending = []  # matched runs whose last matched token is no anchor: searched only if they could win
        mv, tlen = memoryview(text), len(text)
        while stack:
            node, pos, path = stack.pop()
            for flen in node.first_lens:
                if pos + flen > tlen:
                    break
                found = node.by_first.get(text[pos:pos + flen])
                if found is None:
                    continue
                for child in ((found,) if found.__class__ is Node else found):
                    size = child.tlen
                    if pos + size <= tlen and hash(text[pos:pos + size]) == child.thash:  # the whole node matches
                        whole, k, end = True, child.data.shape[1], pos + size
                    else:
                        k, kbytes = self._partial_match(child, text, mv, pos)  # k >= 1: its first token matched
                        whole, end = False, pos + kbytes
                    if ends and not child.data.item(0, k - 1) & ends:
                        pending.append((end, pos, child, k, path))
                    else:
                        ties = 1 if end > best[0] else ties + (end == best[0])
                        if end > best[0] or (end == best[0] and child.last_access > best[1]):
                            best = (end, child.last_access, ((child, k), path))
                    if whole:
                        stack.append((child, end, ((child, k), path)))
        pending.sort(key=lambda p: p[0], reverse=True)
        for bound, pos, child, k, path in pending:  # an anchor inside the run ends before `bound`
            if bound <= best[0]:
                break
            idx = np.flatnonzero(child.data[0, :k - 1] & ends)
            if idx.size:
                i = int(idx[-1])
                b = pos + self._bytes_upto(child, i + 1)
                ties = 1 if b > best[0] else ties + (b == best[0])
                if b > best[0] or (b == best[0] and child.last_access > best[1]):
                    best = (b, child.last_access, ((child, i + 1), path))
        segs, link = [], best[2]
        while link is not None:
            segs.append(link[0])
            link = link[1]
        segs.reverse()
        return segs, best[0], ties if best[2] is not None else 0

    # ----------------------------------------------------------------------------------------------- retrieve
    def retrieve(self, text: bytes, *, now: float, rid: str | None = None,
                 handed_out: set | None = None) -> Retrieved:
        """Exact trajectory for a full visible text (exact=True, tokens include the stripped eos), else the
        longest prefix of `text` ending on any cached token boundary (exact=False; `anchored` says whether it ends
        on an anchor, and a whole-text match prefers a spelling that does).

        Several trajectories may have the same visible text with different tokens (a GRPO group where one sample
        spelled "Hello" as "H"+"ello"). Then the answer is exact only when it is determined: by `rid` (one of the
        trajectory's rids), or by `handed_out` (a batch hand-out: the oldest spelling none of whose rids is in
        the set is answered exactly and the caller adds its rids). Otherwise it is `ambiguous` (not exact, the
        newest spelling's tokens) and `alternatives` says how many there are. A `rid` that names no trajectory
        with this text gives the non-exact answer, as for an unknown text."""
        tlen = len(text)
        group = self._by_key.get(text_key(text))
        if group:
            term, ambiguous = self._choose(group, rid, handed_out)
            if term is not None:
                path = self.path(term.node)
                versions = [tm.version for nd in path[:-1] for tm in nd.terminals] + [term.version]
                toks, lps, mask, r3 = self.gather([(nd, nd.size) for nd in path])
                if ambiguous:
                    self._stats["retrieve_ambiguous"] += 1
                    return Retrieved(False, toks, lps, mask, tlen, _dedup(versions), r3, None, term.finish,
                                     term.version, anchored=True, alternatives=len(group), ambiguous=True)
                if not term.retrieved:
                    term.retrieved = True
                    self._push(term.node)
                self._stats["retrieve_exact"] += 1
                return Retrieved(True, toks, lps, mask, tlen, _dedup(versions), r3, rid or term.rid, term.finish,
                                 term.version, anchored=True, alternatives=len(group))
        segs, nbytes, _ = self._text_walk(text, 0)
        anchored = bool(segs) and bool(segs[-1][0].data.item(0, segs[-1][1] - 1) & ANCHOR_BIT)
        alternatives = 0
        if segs and nbytes == tlen:
            # The whole text is covered. Count the spellings that end on an anchor (a cut inside somebody else's
            # prompt, e.g. a later turn's prompt over an evicted trajectory's text, is no spelling of its own);
            # one of them is preferred to a cut inside a prompt.
            asegs, abytes, aties = self._text_walk(text, ANCHOR_BIT)
            if abytes == tlen:
                segs, anchored, alternatives = asegs, True, aties
            else:
                alternatives = 1
        versions = [tm.version for nd, k in segs if k == nd.size for tm in nd.terminals]
        self._stats["retrieve_partial"] += 1
        toks, lps, mask, r3 = self.gather(segs)
        return Retrieved(False, toks, lps, mask, nbytes, _dedup(versions), r3, anchored=anchored,
                         alternatives=alternatives, ambiguous=alternatives > 1)

    @staticmethod
    def _choose(group: list[Terminal], rid: str | None, handed_out: set | None) -> tuple[Terminal | None, bool]:
        """(terminal, ambiguous) for a text's spellings; (None, False) when `rid` is not among them."""
        if rid is not None:
            return next((tm for tm in group if tm.has_rid(rid)), None), False
        if handed_out is not None:
            for tm in group:
                if tm.rid not in handed_out:
                    return tm, False
        return group[-1], len(group) > 1

    def path(self, node: Node) -> list[Node]:
        """Nodes from the root's child down to `node`."""
        out = []
        while node is not self.root:
            out.append(node)
            node = node.parent
        out.reverse()
        return out

    def gather(self, segs: list[tuple[Node, int]]):
        """(tokens int32, logprobs float32, loss_mask uint8, routed_experts|None) for the first k tokens of each
        node in `segs`."""
        if not segs:
            return _EMPTY_I32.copy(), np.zeros(0, np.float32), np.zeros(0, np.uint8), self._r3_rows([], 0)
        both = np.concatenate([nd.data[:, :k] for nd, k in segs], axis=1)
        codes = both[0]
        mask = (codes >> FLAG_SHIFT).astype(np.uint8)
        mask &= MASK
        codes &= TOKEN_BITS
        return codes, both[1].view(np.float32), mask, self._r3_rows(segs, codes.size - 1)

    def _r3_rows(self, segs, need: int) -> np.ndarray | None:
        if self._r3_shape is None:
            return None
        parts, got = [], 0
        for nd, k in segs:
            take = min(k, need - got)
            if take <= 0:
                break
            if nd.r3 is None or (nd.r3_known is not None and not nd.r3_known[:take].all()):
                return None
            parts.append(nd.r3[:take])
            got += take
        rows = np.concatenate(parts) if parts else np.zeros((0, 1), self._r3_dtype)
        return rows.reshape(max(need, 0), *self._r3_shape)

    def routed_experts_prefix(self, tokens: np.ndarray, *, version: str | None) -> np.ndarray | None:
        """Routed-expert rows [s, L, K] (the tree's width) for the longest run of leading positions of `tokens`
        whose rows are all cached and were recorded under weight version `version`; None when there are none.
        Incremental R3 asks the worker for rows from s on (`routed_experts_start_len`) and stitches these in
        front. Read-only: no recency or statistics change."""
        if self._r3_shape is None:
            return None
        pos, parts = 0, []
        for child, at, m in self._token_path(np.asarray(tokens, dtype=np.int32).ravel()):
            if child.r3 is None or child.r3_version != version:
                break
            known = child.r3_known
            take = m if known is None or known[:m].all() else int(np.argmin(known[:m]))
            if take:
                parts.append(child.r3[:take])
            pos = at + take
            if take < child.size:
                break
        if not parts:
            return None
        return np.concatenate(parts).reshape(pos, *self._r3_shape)

    # ----------------------------------------------------------------------------------------------- eviction
    def _push(self, node: Node) -> None:
        self._leaves.push(node, self._nodes, self.root)

    def evict(self, *, budget_bytes: int, hard_budget_bytes: int,
              stale_versions: Callable[[str | None], bool] | None = None) -> EvictionReport:
        rep = EvictionReport()
        stale_cache: dict = {}

        def is_stale(v):
            if v not in stale_cache:
                stale_cache[v] = bool(stale_versions(v))
            return stale_cache[v]

        # Phases 1-2 until neither evicts more (an eviction may expose a parent that is stale or reclaimable,
        # also one that phase 1 has already passed), then one phase-3 eviction, and again.
        while True:
            progressed = 0
            if stale_versions is not None:
                progressed += self._evict_while(budget_bytes, lambda key: is_stale(key[0]), "evicted_stale", rep)
            progressed += self._evict_while(budget_bytes, lambda key: key[1], "evicted_retrieved", rep)
            if progressed:
                continue
            if not self._evict_while(hard_budget_bytes, lambda key: True, "evicted_unretrieved", rep, 1):
                break
        self._stats["evictions"] += rep.nodes
        return rep

    def _evict_while(self, limit: int, eligible, counter: str, rep: EvictionReport, most: int = -1) -> int:
        done = 0
        while self._nbytes > limit and done != most:
            node = self._leaves.pop_oldest(eligible)
            if node is None:
                break
            self._evict_node(node, counter, rep)
            done += 1
        return done

    def _evict_node(self, node: Node, counter: str, rep: EvictionReport) -> None:
        self._last_match = None
        parent = node.parent
        self._detach(parent, node)
        freed = node.nbytes()
        for term in node.terminals:
            self._forget(term)
            rep.rids.extend(term.rids())
            if term.tag is not None:
                rep.tags.append(term.tag)
            if counter != "evicted_unretrieved" or not term.retrieved:
                setattr(rep, counter, getattr(rep, counter) + 1)
        if counter == "evicted_unretrieved":
            self._stats["evicted_unretrieved"] += sum(not t.retrieved for t in node.terminals)
        # Break the node <-> terminal cycle so refcounting frees the arrays now: the router runs
        # with a tuned, rarely-full GC, and cycles left for it held several times the budget
        # (tests/test_faults.py::test_evicted_cache_nodes_are_freed_without_the_cycle_collector).
        for term in node.terminals:
            term.node = None
        node.terminals = ()
        node.parent = None
        size = node.size
        self._nbytes -= freed
        self._nodes -= 1
        self._ntokens -= size
        rep.nodes, rep.tokens, rep.freed_bytes = rep.nodes + 1, rep.tokens + size, rep.freed_bytes + freed
        self._push(parent)  # a parent becomes a candidate once its last child goes

    # ----------------------------------------------------------------------------------------------- store hook
    def peek_exact(self, text: bytes, rid: str | None = None, *, tag: int | None = None) -> Retrieved | None:
        """What `retrieve(text, rid=rid)` answers for an exact hit, without marking it retrieved or counting it,
        or None (no such trajectory, or several spellings of the text and no `rid` to pick one). The durable
        store (router/stages/persist.py) records this answer right after the insert, and tags the trajectory
        (`tag`, kept on it and listed in `EvictionReport.tags` when it is evicted) with its prefix key, so the
        router knows which stored texts are no longer in memory."""
        group = self._by_key.get(text_key(text))
        if not group:
            return None
        term, ambiguous = self._choose(group, rid, None)
        if term is None or ambiguous or term.node is None:
            return None
        if tag is not None:
            term.tag = tag
        path = self.path(term.node)
        versions = [tm.version for nd in path[:-1] for tm in nd.terminals] + [term.version]
        toks, lps, mask, r3 = self.gather([(nd, nd.size) for nd in path])
        return Retrieved(True, toks, lps, mask, len(text), _dedup(versions), r3, rid or term.rid, term.finish,
                         term.version, anchored=True, alternatives=len(group))

    # ----------------------------------------------------------------------------------------------- stats
    @property
    def nbytes(self) -> int:
        return self._nbytes

    def stats(self) -> dict:
        return dict(nodes=self._nodes, tokens=self._ntokens, bytes=self._nbytes,
                    trajectories=self._nterminals, **self._stats)

