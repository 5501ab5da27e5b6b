"""The durable trajectory store: its interface and its retention policy (pure: no I/O, no clock).

The memory cache (router/core/radix/) is a cache over a store. A backend keeps, per trajectory, the record the
cache would answer for its visible text (router/wire/store.py), found by the text's 16-byte digest. The embedded
backend is SQLite (router/net/store_sqlite.py), written by one router; the networked one, PostgreSQL
(router/net/store_pg.py), implements the same `TrajectoryStore` protocol and is `shared`: a fleet of routers
uses it at once (README, "Scaling past one machine").

Continuing a stored text (a later turn whose prompt starts with a trajectory evicted from memory, or stored before
a restart): each record is also stored under its prefix key (`text_head`, a hash of its text up to its last 64-byte
block boundary, so texts behind one long shared system prompt still get keys of their own). `radix_lookup` asks
the store only about the keys of the prompt's block boundaries past what the memory cache matched
(`prefix_heads`), and of those only the ones the memory cache may not cover: `may_continue` (records this process
did not write) or a key whose trajectory this process evicted (router/net/trajectories.py), all in one query. A prompt
that continues nothing missing from memory therefore costs no store query, on a store only this router writes; on
a shared one every key may name another router's record, so a prompt past the memory cache's match costs one.

Retention (`plan_retention`), applied by the backend on a schedule:
1. age: records older than `retention_s` that were retrieved, or whose weight version is stale, are deleted;
2. size: while the store holds more than `max_bytes`, the oldest retrieved records go;
3. only then unretrieved ones (stale weight versions first, then oldest), each counted, and the caller warns:
   that is data nobody trained on yet.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from router.core.errors import Unavailable

if TYPE_CHECKING:  # (at run time this module needs neither: a store's writer process imports it)
    import numpy as np

    from router.wire.store import StoredTrajectory


HEAD_BYTES = 64  # prefix keys are hashes of a text's first k * HEAD_BYTES bytes (k >= 1)
_M64 = (1 << 64) - 1


def _key(h) -> int:
    return int.from_bytes(h.digest(), "little") >> 1  # digest() leaves the hash open for more updates


def text_head(text: bytes) -> int | None:
    """The prefix key of a stored text: a 63-bit hash of its longest prefix that is a whole number of HEAD_BYTES
    blocks (None when shorter than one block). Keyed near its END, so texts that share a long head (one system
    prompt in front of every question) still have keys of their own; every text that starts with this one has
    the same prefix at the same length, so `prefix_heads` of a next turn's prompt includes it."""
    n = len(text) - len(text) % HEAD_BYTES
    if n == 0:
        return None
    return _key(hashlib.blake2b(memoryview(text)[:n], digest_size=8))


def prefix_heads(text: bytes, matched: int = 0) -> list[int]:
    """Every prefix key under which a stored text that `text` starts with, longer than `matched` bytes, can be
    stored: the keys of `text`'s block-aligned prefixes from the last block boundary at or before `matched` up
    to the whole text (a stored text's key is at its last boundary, which is at or after that one when it is
    longer than `matched`), and first the key of the first block alone, under which stores written before keys
    moved to the end kept every text. One incremental hash over the text: ~0.5 µs per 64-byte block, ~2% of
    tokenizing the same bytes."""
    n = len(text)
    if n < HEAD_BYTES:
        return []
    h = hashlib.blake2b(text[:HEAD_BYTES], digest_size=8)
    out = [_key(h)]
    start = max(HEAD_BYTES, matched - matched % HEAD_BYTES)
    if start > HEAD_BYTES:
        h.update(text[HEAD_BYTES:start])
        out.append(_key(h))
    update, digest, from_bytes, append = h.update, h.digest, int.from_bytes, out.append
    for end in range(start, n - HEAD_BYTES + 1, HEAD_BYTES):
        update(text[end:end + HEAD_BYTES])
        append(from_bytes(digest(), "little") >> 1)
    return out


class KeyFilter:
    """A set of prefix keys that may answer "maybe" for a key never added (a Bloom filter: 3 bits per key in a
    fixed bitmap, so memory does not grow with the keys), never "no" for one that was. At 2**27 bits (16 MiB) a
    key never added is taken for one ~0.001% of the time with a million keys, ~0.1% with five million; each
    such false "maybe" only costs a store query."""

    PROBES = 3
    _MULTS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)

    def __init__(self, bits_log2: int = 27) -> None:
        self._shift = 64 - bits_log2
        self._bytes = bytearray(1 << (bits_log2 - 3))

    def add(self, key: int) -> None:
        b, s = self._bytes, self._shift
        for m in self._MULTS:
            i = ((key * m) & _M64) >> s
            b[i >> 3] |= 1 << (i & 7)

    def __contains__(self, key: int) -> bool:
        b, s = self._bytes, self._shift  # unrolled: asked for every block of a prompt
        i = ((key * 0x9E3779B97F4A7C15) & _M64) >> s
        if not b[i >> 3] >> (i & 7) & 1:
            return False
        i = ((key * 0xC2B2AE3D27D4EB4F) & _M64) >> s
        if not b[i >> 3] >> (i & 7) & 1:
            return False
        i = ((key * 0x165667B19E3779F9) & _M64) >> s
        return bool(b[i >> 3] >> (i & 7) & 1)

    def load(self, rows) -> None:
        """Add every key of `rows` (an iterable of 1-tuples, e.g. a database cursor), in vectorized chunks."""
        import numpy as np  # (here, not at the top: see the imports)

        it = iter(rows)
        while chunk := list(itertools.islice(it, 1 << 16)):
            self.add_many(np.fromiter((k for (k,) in chunk), np.int64, len(chunk)))

    def add_many(self, keys: np.ndarray) -> None:
        """Add an array of keys at once (vectorized: a store's keys at startup)."""
        import numpy as np

        bits = np.frombuffer(self._bytes, np.uint8)
        k = np.asarray(keys, np.int64).view(np.uint64)
        for m in self._MULTS:
            idx = (k * np.uint64(m)) >> np.uint64(self._shift)
            np.bitwise_or.at(bits, (idx >> np.uint64(3)).astype(np.intp),
                             (np.uint8(1) << (idx & np.uint64(7)).astype(np.uint8)))


class Keyed(NamedTuple):
    """A record and the keys it is found by."""

    digest: bytes  # blake2b-16 of the visible text: /retrieve_from_text
    record: StoredTrajectory
    head: int | None = None  # text_head(visible text): a later turn finds it (after a restart, or evicted)
    vlen: int = 0  # bytes of the visible text


class StoreError(Unavailable):
    """The store cannot do what was asked; the message names the store and the reason (one line)."""


class StoreOpenError(StoreError):
    """The store cannot be opened at all (the router refuses to start)."""


class StoreWriteError(StoreError):
    """A write failed (disk full, read-only file, I/O error): what needed it fails with 503."""


class RowInfo(NamedTuple):
    """What retention needs to know about one stored record."""

    id: int  # insertion order
    created: float
    retrieved: bool
    version: str | None
    nbytes: int


@dataclass
class RetentionPlan:
    delete: list[int] = field(default_factory=list)  # ids, in the order chosen
    freed_bytes: int = 0
    expired: int = 0  # phase 1
    evicted_retrieved: int = 0  # phase 2
    evicted_unretrieved: int = 0  # phase 3: the caller warns and counts


def plan_retention(rows: Iterable[RowInfo], *, now: float, total_bytes: int, retention_s: float, max_bytes: int,
                   stale_versions: frozenset = frozenset()) -> RetentionPlan:
    """Which records to delete. `rows` are candidates (any order); `total_bytes` is what the whole store holds.
    `retention_s` <= 0 disables phase 1, `max_bytes` <= 0 disables phases 2 and 3."""
    plan = RetentionPlan()
    left = sorted(rows, key=lambda r: r.id)
    remaining = total_bytes
    if retention_s > 0:
        cutoff = now - retention_s
        keep = []
        for r in left:
            if r.created < cutoff and (r.retrieved or r.version in stale_versions):
                plan.delete.append(r.id)
                plan.expired += 1
                remaining -= r.nbytes
            else:
                keep.append(r)
        left = keep
    if max_bytes > 0 and remaining > max_bytes:
        for r in left:
            if remaining <= max_bytes:
                break
            if r.retrieved:
                plan.delete.append(r.id)
                plan.evicted_retrieved += 1
                remaining -= r.nbytes
        if remaining > max_bytes:
            unretrieved = sorted((r for r in left if not r.retrieved),
                                 key=lambda r: (r.version not in stale_versions, r.id))
            for r in unretrieved:
                if remaining <= max_bytes:
                    break
                plan.delete.append(r.id)
                plan.evicted_unretrieved += 1
                remaining -= r.nbytes
    plan.freed_bytes = total_bytes - remaining
    return plan


@dataclass
class StoreStats:
    path: str
    rows: int
    unretrieved: int
    payload_bytes: int  # bytes of the records themselves
    file_bytes: int  # what the backend occupies (database + log files)
    pending_writes: int
    writable: bool
    write_error: str | None
    commits: int = 0
    deleted: int = 0
    deleted_unretrieved: int = 0


class SessionWrite(NamedTuple):
    """What a session write did (`put_session`)."""

    gone: bool = False  # the session has no row (deleted or expired, by any router): nothing was written
    taken: tuple[int, ...] = ()  # turn ids some writer had already stored: those turns were NOT written


class TrajectoryStore(Protocol):
    """What the router needs from a durable store: everything the router calls on `runtime.trajectories.store`, so a new
    backend (PostgreSQL, Valkey) is one class implementing this and nothing else changes. Async methods run on
    the router's event loop and must not block it; the synchronous ones are cheap (in memory) or run at startup
    before serving. `scan` is for offline tools (`miles-router store export`). router/net/store_sqlite.py is the
    embedded implementation, router/net/store_pg.py the PostgreSQL one; tests/test_store.py runs the router over
    a third, in-memory one."""

    name: str  # "trajectory store <where>", used in every error message
    path: object  # where it lives (a file, a URL), named in 503 replies as `"store"`
    # Other processes (routers of a fleet) may write it while this one runs: the router then re-reads a session's
    # turns before using it, and asks about every prefix key a prompt has (`may_continue` answers "maybe").
    shared: bool

    def start(self) -> None:
        """Start background work (a writer); called once on the router's event loop, after the restore."""

    # ---- trajectories ------------------------------------------------------------------------------
    async def put(self, records: Sequence[Keyed], *, wait: bool) -> None:
        """Store records under their keys. With wait=True return only once they are durable; raise StoreWriteError
        if they cannot be. With wait=False they are written in the background (a crash may lose the last ones)."""

    async def get(self, digest: bytes) -> StoredTrajectory | None:
        """The record stored under this digest (pending writes included) when that answer is determined: every
        record under it has the same tokens (the newest is returned). None when nothing is stored, and None when
        records with different token spellings share the text (a GRPO group whose samples spelled the same text
        differently): the text alone does not say which one is meant, and an answer would look exact."""

    async def get_all(self, digest: bytes) -> list[StoredTrajectory]:
        """Every record stored under this digest, oldest first (pending writes included): the alternatives
        among which a `rid` or a batch hand-out picks."""

    def may_continue(self, head: int) -> bool:
        """Whether the store may hold a record under this prefix key that THIS process did not `put`: one stored
        before it started, or by another process sharing the store. Cheap (in memory, no I/O): the router asks it
        for every block of a prompt it does not cover from memory. False positives are allowed (they cost a
        `prefix_candidates` query), false negatives are not. This process's own records need not be counted:
        the router keeps them in its memory cache and remembers the keys of those it evicts (counting them
        anyway is correct, only slower). A shared store cannot know in memory what another router wrote a moment
        ago (a conversation's previous turn, on another router): it answers True for every key."""

    async def prefix_candidates(self, heads: Sequence[int], max_len: int) -> list[tuple[int, int, bytes]]:
        """(id, visible length, digest) of records with any of these prefix keys (any writer) and a text no longer
        than max_len, newest first per key (bounded per key); one query for all of them."""

    async def get_ids(self, ids: Sequence[int]) -> list[StoredTrajectory]:
        """Records by id, in the order asked."""

    def mark_retrieved(self, digest: bytes) -> None:
        """Best effort, in the background: retention treats retrieved records as reclaimable."""

    async def maintain(self, *, now: float, stale_versions: frozenset) -> RetentionPlan:
        """Apply the retention policy once."""

    def stats(self) -> StoreStats: ...

    def scan(self, *, unretrieved_only: bool) -> Iterator[tuple[int, StoredTrajectory]]:
        """Every record, oldest first (offline use)."""

    # ---- sessions (router/net/session_persist.py; the blobs are router/wire/session_store.py's) ---------
    # A session is a row (its header and when it was last used, wall clock) plus one row per turn, keyed by
    # (session, turn id) and written once. Any router may write any session: a turn id another writer took
    # first is reported, never overwritten, and a session that is gone is never brought back by a turn.
    async def put_session(self, sid: str, at: float, header: bytes | None,
                          turns: Sequence[tuple[int, bytes]], *, wait: bool) -> SessionWrite:
        """With a header: create the session (or replace its header), used at `at`. Without: the session, if it
        still exists, was used at `at`, and gets these turns. Durable on return when wait=True (else
        StoreWriteError), and then says which turns were not written (`SessionWrite`); with wait=False the write
        is queued and the answer is an empty SessionWrite."""

    async def session_turns(self, sid: str, after: int = -1) -> list[bytes] | None:
        """The blobs of the session's turns with ids above `after`, in id order (one indexed query); None when
        the session has no row (never stored, deleted or expired)."""

    def touch_session(self, sid: str, at: float) -> None:
        """Best effort, in the background: the session was used at `at` (wall clock), so that no router's idle
        expiry reclaims it before `at` + the idle timeout."""

    async def expire_sessions(self, before: float, keep: Sequence[str]) -> list[str]:
        """Delete every session last used before `before` (wall clock), with its turns, except those in `keep`
        (this router's sessions with a request in flight) and any another writer is writing right now. Returns
        the ids deleted."""

    async def delete_session(self, sid: str, *, wait: bool) -> None:
        """Remove a session and its turns."""

    def meta_setdefault(self, key: str, value: str) -> str:
        """The small startup value stored under `key` (the session registry's key), storing `value` first when
        there is none: routers starting at once on one store all get the value the first of them stored. A
        read-only store stores nothing and answers what it holds, else `value`."""

    async def aclose(self) -> None: ...
