"""Exact text -> token trajectory cache: a token-keyed radix tree with a text index.

RL rollout code that speaks TEXT needs, at training time, the EXACT token ids the engine saw and produced, their
logprobs and a loss mask (`/retrieve_from_text {"text": P+R}`). miles and slime once shipped a radix tree keyed by
TEXT for this (a router middleware, since removed from both projects); it got four things wrong, which this module
is built to avoid:

1. no node splitting: a branch diverging inside a node was stored again as a sibling, and a query ending inside a
   node matched nothing;
2. token/text misalignment: on a partial hit the leftover text was re-tokenized on its own and glued on, so BPE
   merges across the cut differed from what the engine saw (and got logprob 0 / mask 0);
3. unstable keys: the key was `decode(ids)` as str, which does not round-trip (special tokens, partial UTF-8);
4. the rewrite never reached the worker (a pipeline problem, handled by the stages that call this module).

This module is the pure data structure (no I/O, no clock, no tokenizer import). Its answers:

* The tree is keyed by TOKENS (a compressed trie over token ids, split on divergence like SGLang's RadixCache), so
  every cached sequence is exactly what an engine produced; text is only an index. Each node holds a run of tokens
  as compact numpy arrays (`tokens` int32, `logprobs` float32, `flags` uint8 with bit0 = loss mask and bit1 =
  "anchor after this token", optional routed-expert rows `r3` int32 [n, L*K] with -1 for unknown rows) plus the
  run's exact text as ONE bytes blob and `ends` (uint32 cumulative byte end of each token). All text is bytes
  (`token_bytes` gives each token's exact bytes; a token may hold half a UTF-8 character): nothing is decoded.
* Text walk: each node indexes its children by the exact bytes of their first token, so only children whose first
  token matches are visited (several only where different tokenizations spell the same bytes: then all are
  explored and the longest match wins, ties to the most recently used). A node's blob is compared with
  `bytes.startswith` (memcmp; galloping + bisection for the mismatch position) and bytes map to whole tokens with
  `searchsorted(ends)`, so a query ending inside a token or a node matches up to the last whole-token boundary.
* Anchors: a text-keyed request may reuse cached tokens only up to a boundary the ENGINE produced: after each
  generated token, at the end of each trajectory's prompt, at terminals. A boundary inside someone else's prompt
  is not one: reusing half of another prompt's tokenization would hand the engine a non-canonical tokenization.
* Terminals: inserting a trajectory splits nodes so its end is a node end and records a `Terminal` there, indexed
  by `blake2b(visible_text)`. The engine strips the stop token's text (and may trim stop strings) from the text it
  returns, so the client's P+R is usually a strict prefix of the token text: the digest makes the exact lookup
  O(len) and uniform, and `retrieve(P+R)` returns prompt + output INCLUDING the eos whose text R lacks. When the
  visible text is a prefix of the path's token text (the usual case) a second index keyed by Python's own bytes
  hash is tried first and its hit is verified byte by byte against the path (cheaper than blake2b, and exact).
* Same text, several spellings: two trajectories may have the same visible text with different tokens (a GRPO
  group where one sample generated "H"+"ello" and another "Hello"). The digest indexes a group with one Terminal
  per distinct token path; `retrieve` answers exactly only when the spelling is determined (one spelling, a `rid`,
  or a batch hand-out), otherwise `ambiguous` with the number of `alternatives`. Trajectories with the same text
  AND the same tokens share one Terminal that keeps each one's rid.
* Merge rule when paths overlap: "generated wins" (a later trajectory never turns generated tokens back into prompt
  tokens; its own generated range is written with its logprobs); the newest trajectory's routed-expert rows
  overwrite the path's rows where it has them; version/worker/last_access are updated along the whole path.
* Eviction removes leaves only, least recently used first, in three phases (stale weight version; fully retrieved
  or terminal-less; anything, past the hard budget), using lazily invalidated heaps: O(k log n) for k evictions.
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Any, Callable, Sequence

import msgspec
import numpy as np

MASK = 1  # flags bit0: generated token (loss mask 1)
ANCHOR = 2  # flags bit1: a text-keyed request may cut right after this token
# Fixed per-object estimates for `nbytes` (CPython 3.11, numpy 2; calibrated with tracemalloc by
# tests/test_radix.py::test_nbytes_tracks_real_memory): the Node object, its numpy array headers, the bytes
# header, the dicts/lists that hold it, its heap entries; a Terminal plus its digest-dict entry.
NODE_OVERHEAD = 1100
TERMINAL_OVERHEAD = 350
ALIAS_OVERHEAD = 100  # one more rid on a Terminal (a str in a list)
MAX_ALIASES = 64  # rids kept per Terminal (same text, same tokens); the oldest goes first

TokenBytes = Callable[[np.ndarray], "tuple[bytes, np.ndarray]"]
_EMPTY_I32 = np.zeros(0, np.int32)
_MASK8 = np.uint8(MASK)


def text_digest(text: bytes) -> bytes:
    return hashlib.blake2b(text, digest_size=16).digest()


class VocabBytes:
    """A vectorized `token_bytes` callable built from one exact byte string per token id."""

    def __init__(self, pieces: Sequence[bytes]):
        lens = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        self._blob = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        self._starts = np.cumsum(lens) - lens
        self._lens = lens.astype(np.uint32)

    def __call__(self, ids: np.ndarray) -> tuple[bytes, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        lens = self._lens[ids]
        total = int(lens.sum())
        if total == 0:
            return b"", lens
        out_start = np.cumsum(lens, dtype=np.int64) - lens
        idx = np.repeat(self._starts[ids] - out_start, lens) + np.arange(total)
        return self._blob[idx].tobytes(), lens


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
    # int32 [len(prompt)+len(output)-1, L, K] or None; rows of -1 mean "not reported" (e.g. the worker was asked
    # for rows from routed_experts_start_len on) and leave the cached rows in place
    routed_experts: Any = None


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
    routed_experts: np.ndarray | None  # int32 [len(tokens)-1, L, K]; None when any needed row is unknown
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


class Terminal:
    """One stored spelling of a visible text: the path ending at `node`. Trajectories with the same text AND
    the same tokens (e.g. two GRPO samples that generated identical ids) share one Terminal; its `rid` is the
    newest one and `older_rids` the others (at most MAX_ALIASES), so each stays retrievable by its rid."""

    __slots__ = ("rid", "older_rids", "version", "finish", "created", "retrieved", "digest", "vlen", "hkey", "node")

    def __init__(self, rid, version, finish, created, digest, vlen, hkey, node):
        self.rid, self.version, self.finish, self.created = rid, version, finish, created
        self.retrieved, self.digest, self.vlen, self.node = False, digest, vlen, node
        self.older_rids: list[str] | None = None
        self.hkey = hkey  # hash(visible) when the visible text is spelled by the path's token text, else None

    def rids(self) -> list[str]:
        return [*(self.older_rids or ()), self.rid]

    def has_rid(self, rid: str) -> bool:
        return rid == self.rid or (self.older_rids is not None and rid in self.older_rids)


class Node:
    __slots__ = ("tokens", "logprobs", "flags", "text", "ends", "r3", "version", "worker", "last_access",
                 "children", "by_first", "first_lens", "parent", "terminals", "alive", "hseq")

    def __init__(self, tokens, logprobs, flags, text, ends, r3, parent):
        self.tokens, self.logprobs, self.flags, self.text, self.ends, self.r3 = tokens, logprobs, flags, text, ends, r3
        self.version = self.worker = None
        self.last_access = 0.0
        self.children: dict[int, Node] = {}
        # text index of the children: the exact bytes of their FIRST TOKEN -> children (normally one), and the
        # distinct lengths of those keys, so a text walk probes len(first_lens) slices, not every sibling
        self.by_first: dict[bytes, list[Node]] = {}
        self.first_lens: tuple[int, ...] = ()
        self.parent: Node | None = parent
        self.terminals: list[Terminal] = []
        self.alive = True
        self.hseq = 0

    def first_key(self) -> bytes:
        return self.text[:self.ends.item(0)]

    def nbytes(self) -> int:
        n = self.tokens.nbytes + self.logprobs.nbytes + self.flags.nbytes + self.ends.nbytes + len(self.text)
        if self.r3 is not None:
            n += self.r3.nbytes
        n += NODE_OVERHEAD + TERMINAL_OVERHEAD * len(self.terminals)
        for t in self.terminals:
            if t.older_rids:
                n += ALIAS_OVERHEAD * len(t.older_rids)
        return n

    def reclaimable(self) -> bool:
        for t in self.terminals:
            if not t.retrieved:
                return False
        return True


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


class RadixTree:
    def __init__(self, token_bytes: TokenBytes):
        self._token_bytes = token_bytes
        self.root = Node(_EMPTY_I32, np.zeros(0, np.float32), np.zeros(0, np.uint8), b"",
                         np.zeros(0, np.uint32), None, None)
        # blake2b(visible text) -> its spellings (Terminals, one per distinct token path), oldest insert first
        self._by_digest: dict[bytes, list[Terminal]] = {}
        # retrieve's fast path: Python's hash (SipHash, keyed per process, ~5x cheaper than blake2b) of a visible
        # text that is a prefix of its path's token text -> its group. Only a hint: a hit is verified byte by
        # byte against a path's text; a miss or a failed check falls back to the digest.
        self._by_hash: dict[int, list[Terminal]] = {}
        self._r3_shape: tuple[int, int] | None = None
        self._nbytes = 0
        self._nterminals = 0
        self._nodes = 0
        self._ntokens = 0
        self._heaps: dict[tuple, list] = {}  # (version, reclaimable) -> [(last_access, seq, node)]
        self._heap_entries = 0
        self._seq = 0
        self._stats = dict(hits=0, misses=0, inserts=0, splits=0, evictions=0, evicted_unretrieved=0,
                           retrieve_exact=0, retrieve_partial=0, retrieve_ambiguous=0, superseded=0)

    # ----------------------------------------------------------------------------------------------- insert
    def insert(self, t: TrajectoryInput, *, now: float) -> InsertResult:
        prompt = np.asarray(t.prompt_ids, dtype=np.int32).ravel()
        out = np.asarray(t.output_ids, dtype=np.int32).ravel()
        lps = np.asarray(t.output_logprobs, dtype=np.float32).ravel()
        P, n = prompt.size, prompt.size + out.size
        if n == 0 or lps.size != out.size:
            raise ValueError(f"trajectory {t.rid!r}: {n} tokens, {out.size} outputs, {lps.size} logprobs")
        toks = np.concatenate((prompt, out))
        r3 = None
        if t.routed_experts is not None:
            a = np.asarray(t.routed_experts, dtype=np.int32)
            if a.ndim != 3 or a.shape[0] != n - 1:
                raise ValueError(f"routed_experts shape {a.shape}, expected [{n - 1}, L, K]")
            if self._r3_shape is None:
                self._r3_shape = (a.shape[1], a.shape[2])
            elif a.shape[1:] != self._r3_shape:
                raise ValueError(f"routed_experts shape {a.shape[1:]} != cached {self._r3_shape}")
            r3 = a.reshape(n - 1, -1)
        args = (P, n, lps, r3, t.weight_version, t.worker, now)
        node, pos, splits = self.root, 0, 0
        while pos < n:
            child = node.children.get(int(toks[pos]))
            if child is None:
                break
            m = _common_prefix(child.tokens, toks[pos:pos + child.tokens.size])
            if m < child.tokens.size:
                child = self._split(child, m)
                splits += 1
            self._write(child, pos, *args)
            node, pos = child, pos + m
        shared = pos
        if pos < n:
            node = self._new_leaf(node, toks[pos:].copy(), pos, args)
        digest = text_digest(t.visible_text)
        group = self._by_digest.get(digest)
        same = next((tm for tm in group if tm.node is node), None) if group else None
        dropped = None
        if same is not None:
            # The same text spelled by the same tokens: one more rid on the existing spelling.
            dropped = self._add_alias(same, t.rid)
            same.version, same.finish, same.created = t.weight_version, t.finish, now
            group.remove(same)
            group.append(same)  # a group lists its spellings by their latest insert, oldest first
        else:
            hkey = hash(t.visible_text) if self._spells(self.path(node), t.visible_text) else None
            term = Terminal(t.rid, t.weight_version, t.finish, now, digest, len(t.visible_text), hkey, node)
            node.terminals.append(term)
            if group is None:
                group = self._by_digest[digest] = []
            group.append(term)
            if hkey is not None:
                self._by_hash[hkey] = group
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

    @staticmethod
    def _spells(path: list[Node], visible: bytes) -> bool:
        """True when `visible` is a prefix of the token text of `path` (memcmp per node)."""
        off, mv = 0, memoryview(visible)
        for nd in path:
            if off + len(nd.text) >= len(visible):
                return nd.text.startswith(mv[off:])
            if not visible.startswith(nd.text, off):
                return False
            off += len(nd.text)
        return off == len(visible)

    def _write(self, node: Node, pos, P, n, lps, r3, version, worker, now) -> None:
        """Merge one trajectory into `node`, which holds its positions [pos, pos+len)."""
        L = node.tokens.size
        lo = max(P - pos, 0)  # first generated position, node-local
        if lo < L:
            node.flags[lo:] |= MASK | ANCHOR
            node.logprobs[lo:] = lps[pos + lo - P:pos + L - P]
        if 0 <= P - 1 - pos < L:
            node.flags[P - 1 - pos] |= ANCHOR  # end of the prompt
        hi = min(L, n - 1 - pos)  # routed-expert rows: none for the trajectory's last token
        if r3 is not None and hi > 0:
            rows = r3[pos:pos + hi]
            have = rows[:, 0] >= 0  # -1 rows = not reported (e.g. routed_experts_start_len): keep ours
            if have.any():
                if node.r3 is None:
                    node.r3 = np.full((L, r3.shape[1]), -1, np.int32)
                    self._nbytes += node.r3.nbytes
                if have.all():
                    node.r3[:hi] = rows
                else:
                    node.r3[:hi][have] = rows[have]
        node.version = _newer(node.version, version)
        if worker is not None:
            node.worker = worker
        node.last_access = now

    def _new_leaf(self, parent: Node, toks: np.ndarray, pos: int, args) -> Node:
        blob, lens = self._token_bytes(toks)
        lens = np.asarray(lens)
        ends = np.cumsum(lens, dtype=np.uint32)
        if lens.size != toks.size or (ends[-1] if ends.size else 0) != len(blob):
            raise ValueError("token_bytes returned inconsistent lengths")
        L = toks.size
        node = Node(toks, np.zeros(L, np.float32), np.zeros(L, np.uint8), bytes(blob), ends, None, parent)
        self._nbytes += node.nbytes()  # before _write, which accounts for the r3 rows it allocates
        self._write(node, pos, *args)
        self._attach(parent, node)
        self._nodes += 1
        self._ntokens += L
        return node

    def _attach(self, parent: Node, node: Node) -> None:
        node.parent = parent
        parent.children[int(node.tokens[0])] = node
        key = node.first_key()
        lst = parent.by_first.get(key)
        if lst is None:
            parent.by_first[key] = [node]
            if len(key) not in parent.first_lens:
                parent.first_lens = tuple(sorted((*parent.first_lens, len(key))))
        else:
            lst.append(node)

    def _detach(self, parent: Node, node: Node) -> None:
        del parent.children[int(node.tokens[0])]
        key = node.first_key()
        lst = parent.by_first[key]
        lst.remove(node)
        if not lst:
            del parent.by_first[key]
            if not any(len(k) == len(key) for k in parent.by_first):
                parent.first_lens = tuple(n for n in parent.first_lens if n != len(key))

    def _split(self, node: Node, m: int) -> Node:
        """Cut `node` after its first m tokens; return the new upper part (the lower part keeps its identity,
        children and terminals, so Terminal.node never moves)."""
        parent = node.parent
        cut = int(node.ends[m - 1])
        r3 = node.r3
        up = Node(node.tokens[:m].copy(), node.logprobs[:m].copy(), node.flags[:m].copy(), node.text[:cut],
                  node.ends[:m].copy(), None if r3 is None else r3[:m].copy(), parent)
        up.version, up.worker, up.last_access = node.version, node.worker, node.last_access
        parent.children[int(up.tokens[0])] = up  # same first token, so the same keys in both indexes
        lst = parent.by_first[node.first_key()]
        lst[lst.index(node)] = up
        node.tokens, node.logprobs, node.flags = node.tokens[m:].copy(), node.logprobs[m:].copy(), node.flags[m:].copy()
        node.text, node.ends = node.text[cut:], node.ends[m:] - np.uint32(cut)
        node.r3 = None if r3 is None else r3[m:].copy()
        self._attach(up, node)
        self._nodes += 1
        self._nbytes += NODE_OVERHEAD
        self._stats["splits"] += 1
        return up

    def _forget(self, term: Terminal) -> None:
        group = self._by_digest.get(term.digest)
        if group is None or term not in group:
            return
        group.remove(term)
        self._nterminals -= 1
        if not group:
            del self._by_digest[term.digest]
        if term.hkey is not None and self._by_hash.get(term.hkey) is group:
            if not any(tm.hkey is not None for tm in group):
                del self._by_hash[term.hkey]

    # ----------------------------------------------------------------------------------------------- lookups
    def match_tokens(self, tokens: np.ndarray, *, now: float) -> PrefixMatch:
        q = np.asarray(tokens, dtype=np.int32).ravel()
        node, pos, nbytes, segs = self.root, 0, 0, []
        while pos < q.size:
            child = node.children.get(int(q[pos]))
            if child is None:
                break
            m = _common_prefix(child.tokens, q[pos:pos + child.tokens.size])
            segs.append((child, m))
            pos, nbytes = pos + m, nbytes + int(child.ends[m - 1])
            if m < child.tokens.size:
                break
            node = child
        return self._matched(segs, q[:pos].copy(), nbytes, now)

    def match_text(self, text: bytes, *, now: float, anchors_only: bool = True) -> PrefixMatch:
        """Longest prefix of `text` spelled by cached tokens that ends on an anchor (any token boundary when
        anchors_only=False). Ties between different token paths go to the most recently used."""
        segs, nbytes, _ = self._text_walk(text, anchors_only)
        toks = np.concatenate([nd.tokens[:k] for nd, k in segs]) if segs else _EMPTY_I32.copy()
        return self._matched(segs, toks, nbytes, now)

    def _matched(self, segs, toks, nbytes, now) -> PrefixMatch:
        self._stats["hits" if segs else "misses"] += 1
        for nd, _ in segs:
            nd.last_access = now
        if not segs:
            return PrefixMatch(toks, 0, None, None)
        last = segs[-1][0]
        self._push(last)
        return PrefixMatch(toks, nbytes, last.worker, last.version)

    def _text_walk(self, text: bytes, anchors_only: bool) -> tuple[list, int, int]:
        """Depth-first over the children whose first token matches the text (normally one per level; several
        only where different tokenizations spell the same bytes). Returns the best [(node, k tokens)] path
        (most bytes, ties to the most recently used), its length in bytes, and how many distinct token paths
        reach that length (each (node, k) ends a different token sequence)."""
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
                for child in node.by_first.get(text[pos:pos + flen], ()):
                    size = len(child.text)
                    if text.startswith(child.text, pos):  # the whole node matches (memcmp)
                        c, k = size, child.tokens.size
                    else:
                        c = _match_len(child.text, mv, pos)
                        k = int(child.ends.searchsorted(c, side="right"))  # whole tokens inside the match (>= 1)
                    end = pos + child.ends.item(k - 1)
                    if anchors_only and not child.flags.item(k - 1) & ANCHOR:
                        pending.append((end, pos, child, k, path))
                    else:
                        b = end
                        ties = 1 if b > best[0] else ties + (b == best[0])
                        if b > best[0] or (b == best[0] and child.last_access > best[1]):
                            best = (b, child.last_access, ((child, k), path))
                    if c == size:
                        stack.append((child, pos + size, ((child, k), path)))
        pending.sort(key=lambda p: p[0], reverse=True)
        for bound, pos, child, k, path in pending:  # an anchor inside the run ends before `bound`
            if bound <= best[0]:
                break
            idx = np.flatnonzero(child.flags[:k - 1] & ANCHOR)
            if idx.size:
                b = pos + child.ends.item(idx[-1])
                ties = 1 if b > best[0] else ties + (b == best[0])
                if b > best[0] or (b == best[0] and child.last_access > best[1]):
                    best = (b, child.last_access, ((child, int(idx[-1]) + 1), path))
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
        group = self._by_hash.get(hash(text))
        if group is not None and not self._verified(group, text):
            group = None
        if group is None:
            group = self._by_digest.get(text_digest(text))
        if group:
            term, ambiguous = self._choose(group, rid, handed_out)
            if term is not None:
                path = self.path(term.node)
                versions = [tm.version for nd in path[:-1] for tm in nd.terminals] + [term.version]
                toks, lps, mask, r3 = self.gather([(nd, nd.tokens.size) for nd in path])
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
        segs, nbytes, _ = self._text_walk(text, False)
        anchored = bool(segs) and bool(segs[-1][0].flags.item(segs[-1][1] - 1) & ANCHOR)
        alternatives = 0
        if segs and nbytes == tlen:
            # The whole text is covered. Count the spellings that end on an anchor (a cut inside somebody else's
            # prompt, e.g. a later turn's prompt over an evicted trajectory's text, is no spelling of its own);
            # one of them is preferred to a cut inside a prompt.
            asegs, abytes, aties = self._text_walk(text, True)
            if abytes == tlen:
                segs, anchored, alternatives = asegs, True, aties
            else:
                alternatives = 1
        versions = [tm.version for nd, k in segs if k == nd.tokens.size for tm in nd.terminals]
        self._stats["retrieve_partial"] += 1
        toks, lps, mask, r3 = self.gather(segs)
        return Retrieved(False, toks, lps, mask, nbytes, _dedup(versions), r3, anchored=anchored,
                         alternatives=alternatives, ambiguous=alternatives > 1)

    def _verified(self, group: list[Terminal], text: bytes) -> bool:
        """The hash-index hit `group` really holds `text`: one of its paths spells it, byte by byte."""
        for tm in group:
            if tm.hkey is not None:
                return tm.vlen == len(text) and self._spells(self.path(tm.node), text)
        return False

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
        """(tokens, logprobs, loss_mask, routed_experts|None) for the first k tokens of each node in `segs`."""
        if not segs:
            return _EMPTY_I32.copy(), np.zeros(0, np.float32), np.zeros(0, np.uint8), self._r3_rows([], 0)
        if segs[-1][1] == segs[-1][0].tokens.size:  # only the last node can be cut (and, in an exact hit, isn't)
            nodes = [nd for nd, _ in segs]
            toks = np.concatenate([nd.tokens for nd in nodes])
            lps = np.concatenate([nd.logprobs for nd in nodes])
            mask = np.concatenate([nd.flags for nd in nodes])
        else:
            toks = np.concatenate([nd.tokens[:k] for nd, k in segs])
            lps = np.concatenate([nd.logprobs[:k] for nd, k in segs])
            mask = np.concatenate([nd.flags[:k] for nd, k in segs])
        np.bitwise_and(mask, _MASK8, out=mask)
        return toks, lps, mask, self._r3_rows(segs, toks.size - 1)

    def _r3_rows(self, segs, need: int) -> np.ndarray | None:
        if self._r3_shape is None:
            return None
        parts, got = [], 0
        for nd, k in segs:
            take = min(k, need - got)
            if take <= 0:
                break
            if nd.r3 is None or (nd.r3[:take, 0] < 0).any():
                return None
            parts.append(nd.r3[:take])
            got += take
        rows = np.concatenate(parts) if parts else np.zeros((0, 1), np.int32)
        return rows.reshape(max(need, 0), *self._r3_shape)

    def path_arrays(self, node: Node):
        """Full (tokens, logprobs, loss_mask, routed_experts|None) of the path ending at `node`."""
        return self.gather([(nd, nd.tokens.size) for nd in self.path(node)])

    # ----------------------------------------------------------------------------------------------- eviction
    def _push(self, node: Node) -> None:
        """(Re)register a leaf in the heap of its (version, reclaimable) group; older entries go stale."""
        if node.children or not node.alive or node is self.root:
            return
        self._seq += 1
        node.hseq = self._seq
        heapq.heappush(self._heaps.setdefault((node.version, node.reclaimable()), []),
                       (node.last_access, self._seq, node))
        self._heap_entries += 1
        if self._heap_entries > 4 * self._nodes + 1024:
            self._rebuild_heaps()

    def _rebuild_heaps(self) -> None:
        self._heaps, self._heap_entries = {}, 0
        stack = list(self.root.children.values())
        while stack:
            nd = stack.pop()
            if nd.children:
                stack.extend(nd.children.values())
            else:
                self._heaps.setdefault((nd.version, nd.reclaimable()), []).append((nd.last_access, nd.hseq, nd))
                self._heap_entries += 1
        for h in self._heaps.values():
            heapq.heapify(h)

    def evict(self, *, budget_bytes: int, hard_budget_bytes: int,
              stale_versions: Callable[[str | None], bool] | None = None) -> EvictionReport:
        rep = EvictionReport()
        stale_cache: dict = {}

        def is_stale(v):
            if v not in stale_cache:
                stale_cache[v] = bool(stale_versions(v))
            return stale_cache[v]

        while True:  # phases 1-2 again after each phase-3 eviction: it may expose a reclaimable parent
            if stale_versions is not None:
                self._evict_while(budget_bytes, lambda key: is_stale(key[0]), "evicted_stale", rep)
            self._evict_while(budget_bytes, lambda key: key[1], "evicted_retrieved", rep)
            if not self._evict_while(hard_budget_bytes, lambda key: True, "evicted_unretrieved", rep, 1):
                break
        self._stats["evictions"] += rep.nodes
        return rep

    def _evict_while(self, limit: int, eligible, counter: str, rep: EvictionReport, most: int = -1) -> int:
        done = 0
        while self._nbytes > limit and done != most:
            best_key = best = None
            for key in list(self._heaps):  # one heap per (version, reclaimable): few groups
                h = self._heaps[key]
                while h and (h[0][2].hseq != h[0][1] or h[0][2].children or not h[0][2].alive):
                    heapq.heappop(h)  # stale entry
                    self._heap_entries -= 1
                if not h:
                    del self._heaps[key]
                elif eligible(key) and (best is None or h[0] < best):
                    best_key, best = key, h[0]
            if best is None:
                break
            heapq.heappop(self._heaps[best_key])
            self._heap_entries -= 1
            self._evict_node(best[2], counter, rep)
            done += 1
        return done

    def _evict_node(self, node: Node, counter: str, rep: EvictionReport) -> None:
        parent = node.parent
        self._detach(parent, node)
        freed = node.nbytes()
        for term in node.terminals:
            self._forget(term)
            rep.rids.extend(term.rids())
            if counter != "evicted_unretrieved" or not term.retrieved:
                setattr(rep, counter, getattr(rep, counter) + 1)
        if counter == "evicted_unretrieved":
            self._stats["evicted_unretrieved"] += sum(not t.retrieved for t in node.terminals)
        # Break the node <-> terminal cycle so refcounting frees the arrays now: the router runs
        # with a tuned, rarely-full GC, and cycles left for it held several times the budget
        # (tests/test_faults.py::test_evicted_cache_nodes_are_freed_without_the_cycle_collector).
        for term in node.terminals:
            term.node = None
        node.terminals = []
        node.alive, node.parent = False, None
        self._nbytes -= freed
        self._nodes -= 1
        self._ntokens -= node.tokens.size
        rep.nodes, rep.tokens, rep.freed_bytes = rep.nodes + 1, rep.tokens + node.tokens.size, rep.freed_bytes + freed
        self._push(parent)  # a parent becomes a candidate once its last child goes

    # ----------------------------------------------------------------------------------------------- store hook
    def peek_exact(self, text: bytes, rid: str | None = None) -> Retrieved | None:
        """What `retrieve(text, rid=rid)` answers for an exact hit, without marking it retrieved or counting it,
        or None (no such trajectory, or several spellings of the text and no `rid` to pick one). The durable
        store (router/stages/persist.py) records this answer right after the insert."""
        group = self._by_digest.get(text_digest(text))
        if not group:
            return None
        term, ambiguous = self._choose(group, rid, None)
        if term is None or ambiguous or term.vlen != len(text) or term.node is None:
            return None
        path = self.path(term.node)
        versions = [tm.version for nd in path[:-1] for tm in nd.terminals] + [term.version]
        toks, lps, mask, r3 = self.gather([(nd, nd.tokens.size) for nd in path])
        return Retrieved(True, toks, lps, mask, len(text), _dedup(versions), r3, rid or term.rid, term.finish,
                         term.version, anchored=True, alternatives=len(group))

    # ----------------------------------------------------------------------------------------------- stats
    @property
    def nbytes(self) -> int:
        return self._nbytes

    def stats(self) -> dict:
        return dict(nodes=self._nodes, tokens=self._ntokens, bytes=self._nbytes,
                    trajectories=self._nterminals, **self._stats)
