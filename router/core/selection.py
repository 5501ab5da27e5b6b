"""Worker selection policies beyond least-in-flight: prefix affinity and sticky keys, both with
bounded-load spill.

`PrefixIndex` remembers, per block of a token (or text) prefix, the few workers that most
recently received it, so it is exact at block granularity (chained 64-bit block hashes, like a
worker's own radix KV cache) and it learns at routing time: the 16 samples of a GRPO group that
arrive together already agree on one worker. Keeping several owners per block matters: a spill
adds an owner instead of dragging a group's shared prefix (and so every later turn of its
conversations) to the spill target, and a prefix every worker holds (a common system prompt)
doesn't pin new groups to whichever worker saw it last (measured in bench/bench_routing.py). `StickyTable` pins a routing key (`X-SMG-Routing-Key`) to a worker
with an idle expiry. `choose` applies the spill rule both share: keep the preferred worker unless
it is both `abs_threshold` requests and `rel_threshold` times busier than the least-loaded one —
affinity must never lock a saturated worker into thrash (prime-rl#3255) nor drop affinity under
ordinary load (sglang#32195).

`select_by_prefix` (prefix affinity) also weighs what a move would cost: the *stake* is the part
of the matched prefix the least-loaded worker is not known to hold (what it would prefill again;
a block the index saw go to `owners_per_block` workers, like a shared system prompt, counts as
held everywhere). A small stake — a new sample of a GRPO group whose problem prompt one worker
has seen, behind the system prompt — buys little load: the request stays while the preferred
worker has at most `stake / tokens_per_request` more in flight than the least-loaded one. A large
stake — a conversation's history — keeps the rule above with its relative threshold raised in
proportion (up to 4x). So a group spreads over a few workers early (its turns' prefills do not
all land on one worker at once, and the load stays even) while a conversation stays where its
history is (measured in bench/bench_routing.py, which chose tokens_per_request = 32).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from router.core.workers import Worker, WorkerPool


@dataclass(frozen=True, slots=True)
class SpillRule:
    abs_threshold: int = 8
    rel_threshold: float = 1.5
    # Stake-aware spill (prefix affinity): each this many stake tokens allow the preferred worker one
    # more request in flight than the least-loaded one. 0: off (the fixed rule for every request).
    tokens_per_request: int = 0

    def overloaded(self, preferred: Worker, least: Worker, stake_tokens: int | None = None) -> bool:
        """Fixed rule: more than abs_threshold requests AND rel_threshold times the least-loaded
        worker's. With a stake (and tokens_per_request): `allowed` = stake / tokens_per_request
        requests (at least 1); below abs_threshold the gap alone decides; from there on the fixed
        rule holds with rel_threshold raised by allowed / abs_threshold, up to 4x: a long history
        leaves only for a worker that is nearly idle by comparison (which also keeps the first
        requests of a fresh router, whose index does not yet know that every worker holds the
        system prompt, from piling up past abs_threshold)."""
        gap = preferred.inflight - least.inflight
        rel_threshold = self.rel_threshold
        if stake_tokens is not None and self.tokens_per_request > 0:
            allowed = max(1, stake_tokens // self.tokens_per_request)
            if allowed < self.abs_threshold:
                return gap > allowed
            rel_threshold *= min(allowed / max(self.abs_threshold, 1), 4.0)
        return gap > self.abs_threshold and preferred.inflight > rel_threshold * max(least.inflight, 1)


def choose(pool: WorkerPool, preferred: Worker | None, rule: SpillRule, hit_reason: str,
           exclude=(), stake_tokens: int | None = None, least: Worker | None = None) -> tuple[Worker | None, str]:
    """The preferred worker unless it is unusable or overloaded; else the least-loaded one (`least`
    if the caller picked it already). `stake_tokens`: what moving to the least-loaded worker would
    recompute (see SpillRule)."""
    least = least if least is not None else pool.pick(exclude)
    if least is None:
        return None, "none"
    if preferred is None:
        return least, "least_inflight"
    if preferred in exclude or not pool.admits(preferred):
        return least, "least_inflight"
    if preferred is not least and rule.overloaded(preferred, least, stake_tokens):
        return least, "spill"
    return preferred, hit_reason


def select_by_prefix(pool: WorkerPool, index: PrefixIndex, seq: np.ndarray | bytes,
                     rule: SpillRule) -> tuple[Worker | None, str]:
    """Prefix affinity for a request whose prompt is `seq` (token ids or text bytes): the least-loaded
    usable worker among those holding its longest known prefix, unless `rule` says it is overloaded
    given the stake (the matched blocks the least-loaded worker is not known to hold,
    `PrefixIndex.block_tokens` tokens each); then the least-loaded worker. The choice is recorded in
    the index. Reasons: affinity_hit, affinity_miss (nobody holds a prefix), spill, none (no usable
    worker)."""

    def usable(url: str) -> bool:
        w = pool.get(url)
        return w is not None and pool.admits(w)

    least = pool.pick()
    if least is None:
        return None, "none"
    keys = index.keys(seq)
    owners, blocks = index.lookup_keys(keys, usable)
    preferred = min((pool.get(u) for u in owners), key=lambda w: w.inflight) if owners else None
    stake = None
    if preferred is not None and preferred.inflight - least.inflight > 1:  # (a gap of 1 never spills)
        stake = index.unheld(keys, blocks, least.url) * index.block_tokens
    w, reason = choose(pool, preferred, rule, "affinity_hit", stake_tokens=stake, least=least)
    if reason == "least_inflight":
        reason = "affinity_miss"
    if w is not None:
        index.record_keys(keys, w.url)
    return w, reason


def _block_keys(data: bytes, block_bytes: int) -> list[bytes]:
    """Chained hashes of every whole block: key i identifies the prefix data[:(i+1)*block]; then,
    when a partial block is left, one more key for the whole of `data` (salted so it never equals
    a whole block's key). That last key lets a prompt shorter than a block (or the tail of a longer
    one) find the worker that received exactly this prompt before, e.g. the rest of a GRPO group."""
    keys = []
    h = b""
    end = len(data) - len(data) % block_bytes
    for start in range(0, end, block_bytes):
        h = hashlib.blake2b(h + data[start:start + block_bytes], digest_size=8).digest()
        keys.append(h)
    if end < len(data):
        keys.append(hashlib.blake2b(h + data[end:], digest_size=8, person=b"partial").digest())
    return keys


class PrefixIndex:
    """Longest known prefix -> the workers that hold it (up to `owners_per_block`, most recent
    first; LRU over blocks, bounded)."""

    def __init__(self, block_tokens: int = 16, block_bytes: int = 64, capacity_blocks: int = 1 << 20,
                 owners_per_block: int = 4) -> None:
        self.block_tokens = block_tokens
        self.block_bytes = block_bytes
        self.capacity = capacity_blocks
        self.owners_per_block = owners_per_block
        self._owners: OrderedDict[bytes, tuple[str, ...]] = OrderedDict()

    def keys(self, seq: np.ndarray | bytes) -> list[bytes]:
        """The block keys of `seq` (what `lookup_keys` / `record_keys` take)."""
        if isinstance(seq, (bytes, bytearray)):
            return [b"t" + k for k in _block_keys(bytes(seq), self.block_bytes)]
        raw = np.ascontiguousarray(seq, dtype="<i4").tobytes()
        return _block_keys(raw, self.block_tokens * 4)

    def lookup(self, seq: np.ndarray | bytes, usable=None) -> tuple[list[str], int]:
        """(owners, matched blocks) of the longest prefix with an owner that is `usable` (if given);
        owners most recent first, unusable ones left out. A match of the whole of `seq` through
        its trailing partial block counts that block too."""
        return self.lookup_keys(self.keys(seq), usable)

    def lookup_keys(self, keys: list[bytes], usable=None) -> tuple[list[str], int]:
        for i in range(len(keys) - 1, -1, -1):
            owners = self._owners.get(keys[i])
            if owners:
                found = [u for u in owners if usable is None or usable(u)]
                if found:
                    return found, i + 1
        return [], 0

    def unheld(self, keys: list[bytes], blocks: int, url: str) -> int:
        """How many of the first `blocks` blocks, counted back from the last, `url` is not known to
        hold: what sending this prefix to `url` would compute again. A block with a full owner list
        counts as held (a prefix that many workers received, like a shared system prompt)."""
        table, k = self._owners, self.owners_per_block
        for i in range(blocks - 1, -1, -1):
            owners = table.get(keys[i], ())
            if url in owners or len(owners) >= k:
                return blocks - 1 - i
        return blocks

    def record(self, seq: np.ndarray | bytes, url: str) -> None:
        self.record_keys(self.keys(seq), url)

    def record_keys(self, keys: list[bytes], url: str) -> None:
        table, k = self._owners, self.owners_per_block
        for key in keys:
            owners = table.get(key, ())
            if owners[:1] != (url,):
                table[key] = ((url,) + tuple(o for o in owners if o != url))[:k]
            table.move_to_end(key)
        while len(table) > self.capacity:
            table.popitem(last=False)

    def __len__(self) -> int:
        return len(self._owners)


class StickyTable:
    """Routing key -> worker url, forgotten after `idle_s` without use."""

    def __init__(self, idle_s: float = 600.0, capacity: int = 1 << 20) -> None:
        self.idle_s = idle_s
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, key: str, now: float) -> str | None:
        e = self._entries.get(key)
        if e is None:
            return None
        url, last = e
        if now - last > self.idle_s:
            del self._entries[key]
            return None
        return url

    def put(self, key: str, url: str, now: float) -> None:
        self._entries[key] = (url, now)
        self._entries.move_to_end(key)
        self._expire(now)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (url, last) = next(iter(entries.items()))
            if now - last <= self.idle_s and len(entries) <= self.capacity:
                break
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
