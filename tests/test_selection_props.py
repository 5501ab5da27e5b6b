"""Property tests: PrefixIndex, StickyTable and choose against small reference models (issue #4)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.selection import PrefixIndex, SpillRule, StickyTable, choose
from router.core.workers import WorkerPool, WorkerState

URLS = [f"http://w{i}:1" for i in range(4)]


# ---- PrefixIndex ------------------------------------------------------------------------------

class RefPrefixIndex:
    """Block-aligned prefixes (as tuples), plus the whole sequence when it ends in a partial block,
    -> the k most recent distinct owners, LRU over blocks: what PrefixIndex promises."""

    def __init__(self, block: int, capacity: int, k: int = 4) -> None:
        self.block, self.capacity, self.k = block, capacity, k
        self.owner: OrderedDict[tuple, list[str]] = OrderedDict()

    def _prefixes(self, seq) -> list[tuple]:
        seq = tuple(seq)
        whole = [seq[:end] for end in range(self.block, len(seq) + 1, self.block)]
        return whole + [seq] if len(seq) % self.block else whole

    def record(self, seq, url) -> None:
        for p in self._prefixes(seq):
            owners = [url] + [o for o in self.owner.get(p, []) if o != url]
            self.owner[p] = owners[: self.k]
            self.owner.move_to_end(p)
        while len(self.owner) > self.capacity:
            self.owner.popitem(last=False)

    def lookup(self, seq, usable=None):
        prefixes = self._prefixes(seq)
        for i in range(len(prefixes) - 1, -1, -1):
            found = [u for u in self.owner.get(prefixes[i], []) if usable is None or usable(u)]
            if found:
                return found, i + 1
        return [], 0


seqs = st.lists(st.integers(0, 2), min_size=0, max_size=14)  # tiny alphabet: lots of shared prefixes
ops = st.lists(st.tuples(st.sampled_from(["record", "lookup"]), seqs, st.sampled_from(URLS),
                         st.sets(st.sampled_from(URLS))), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops=ops, block=st.integers(1, 3), capacity=st.integers(1, 12))
def test_prefix_index_matches_reference_on_token_ids(ops, block, capacity):
    idx, ref = PrefixIndex(block_tokens=block, capacity_blocks=capacity), RefPrefixIndex(block, capacity)
    for op, seq, url, banned in ops:
        arr = np.asarray(seq, dtype=np.int32)
        if op == "record":
            idx.record(arr, url)
            ref.record(seq, url)
            assert len(idx) == len(ref.owner) <= capacity
        else:
            usable = (lambda u: u not in banned) if banned else None
            assert idx.lookup(arr, usable) == ref.lookup(seq, usable)


@settings(max_examples=200, deadline=None)
@given(ops=ops, block=st.integers(1, 3))
def test_prefix_index_matches_reference_on_text_bytes(ops, block):
    idx, ref = PrefixIndex(block_bytes=block), RefPrefixIndex(block, 1 << 20)
    for op, seq, url, banned in ops:
        data = bytes(b"abc"[i] for i in seq)
        if op == "record":
            idx.record(data, url)
            ref.record(data, url)
        else:
            usable = (lambda u: u not in banned) if banned else None
            assert idx.lookup(data, usable) == ref.lookup(data, usable)


def test_token_and_text_keys_never_collide():
    idx = PrefixIndex(block_tokens=1, block_bytes=4)
    ids = np.asarray([0x64636261], dtype=np.int32)  # the same 4 bytes as b"abcd" little-endian
    idx.record(ids, URLS[0])
    assert idx.lookup(b"abcd") == ([], 0)


# ---- StickyTable ------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["put", "get"]), st.sampled_from("abcde"),
                                st.sampled_from(URLS), st.floats(0, 4)), max_size=40),
       idle=st.floats(0.5, 5), capacity=st.integers(1, 4))
def test_sticky_table_matches_reference(steps, idle, capacity):
    t = StickyTable(idle_s=idle, capacity=capacity)
    ref: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key -> (url, last put), oldest put first
    now = 0.0
    for op, key, url, dt in steps:
        now += dt  # monotonic clock, as in the runtime
        if op == "put":
            t.put(key, url, now)
            ref[key] = (url, now)
            ref.move_to_end(key)
            while ref:
                k, (_, last) = next(iter(ref.items()))
                if now - last <= idle and len(ref) <= capacity:
                    break
                ref.popitem(last=False)
            assert len(t) <= capacity
        else:
            e = ref.get(key)
            want = None
            if e is not None:
                if now - e[1] > idle:
                    del ref[key]
                else:
                    want = e[0]
            assert t.get(key, now) == want
        assert len(t) == len(ref)


# ---- choose -----------------------------------------------------------------------------------

@settings(max_examples=500, deadline=None)
@given(loads=st.lists(st.integers(0, 30), min_size=1, max_size=5),
       states=st.lists(st.sampled_from([WorkerState.HEALTHY] * 3 + [WorkerState.QUARANTINED]), min_size=5,
                       max_size=5),
       pref=st.one_of(st.none(), st.integers(0, 4)), excluded=st.sets(st.integers(0, 4)),
       abs_t=st.integers(0, 10), rel=st.floats(1.0, 3.0), rr=st.integers(0, 7))
def test_choose_matches_reference(loads, states, pref, excluded, abs_t, rel, rr):
    pool = WorkerPool()
    workers = []
    for i, load in enumerate(loads):
        w, _ = pool.add(URLS[i % 4] + str(i))
        w.inflight, w.state = load, states[i]
        workers.append(w)
    pool._rr = rr
    exclude = [workers[i] for i in excluded if i < len(workers)]
    preferred = workers[pref] if pref is not None and pref < len(workers) else None
    rule = SpillRule(abs_t, rel)
    got, reason = choose(pool, preferred, rule, "hit", exclude)

    candidates = [w for w in workers if w.selectable and w not in exclude]
    if not candidates:
        assert (got, reason) == (None, "none")
        return
    least = min(w.inflight for w in candidates)
    assert got in candidates
    if preferred is None or preferred not in candidates:
        assert reason == "least_inflight" and got.inflight == least
    elif preferred.inflight - least > abs_t and preferred.inflight > rel * max(least, 1):
        assert reason == "spill" and got.inflight == least and got is not preferred
    else:
        assert (got, reason) == (preferred, "hit")
