"""The durable trajectory store: its interface and its retention policy (pure: no I/O, no clock).

The memory cache (router/core/radix/) is a cache over a store. A backend keeps, per trajectory, the record the
cache would answer for its visible text (router/wire/store.py), found by the text's 16-byte digest. The embedded
backend is SQLite (router/net/store_sqlite.py); the networked one, PostgreSQL (router/net/store_pg.py), implements
the same `TrajectoryStore` protocol, so several routers can share it (README, "Scaling past one machine").

Retention (`plan_retention`), applied by the backend on a schedule:
1. age: records older than `retention_s` that were retrieved, or whose weight version is stale, are deleted;
2. size: while the store holds more than `max_bytes`, the oldest retrieved records go;
3. only then unretrieved ones (stale weight versions first, then oldest), each counted, and the caller warns:
   that is data nobody trained on yet.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from router.core.errors import Unavailable
from router.wire.store import StoredTrajectory


HEAD_BYTES = 64  # a stored text is found as a prompt's prefix by the hash of its first HEAD_BYTES bytes


def text_head(text: bytes) -> int | None:
    """The prefix key of a text: a 63-bit hash of its first HEAD_BYTES bytes (None when shorter). Every text
    that starts with a stored text at least HEAD_BYTES long has the same key, so a next turn's prompt finds
    the earlier turns it continues without scanning."""
    if len(text) < HEAD_BYTES:
        return None
    return int.from_bytes(hashlib.blake2b(text[:HEAD_BYTES], digest_size=8).digest(), "little") >> 1


class Keyed(NamedTuple):
    """A record and the keys it is found by."""

    digest: bytes  # blake2b-16 of the visible text: /retrieve_from_text
    record: StoredTrajectory
    head: int | None = None  # text_head(visible text): continuing a conversation after a restart
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


class TrajectoryStore(Protocol):
    """What the router needs from a durable store: everything the router calls on `runtime.store`, so a new
    backend (PostgreSQL, Valkey) is one class implementing this and nothing else changes. Async methods run on
    the router's event loop and must not block it; the synchronous ones are cheap (in memory) or run at startup
    before serving. `scan` is for offline tools (`miles-router store export`). router/net/store_sqlite.py is the
    embedded implementation, router/net/store_pg.py the PostgreSQL one; tests/test_store.py runs the router over
    a third, in-memory one."""

    name: str  # "trajectory store <where>", used in every error message
    path: object  # where it lives (a file, a URL), named in 503 replies as `"store"`

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
        """Whether a stored text with this prefix key may exist (cheap, in memory; false positives allowed)."""

    async def prefix_candidates(self, head: int, max_len: int) -> list[tuple[int, int, bytes]]:
        """(id, visible length, digest) of records with this prefix key and a text no longer than max_len,
        newest first (bounded)."""

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
    async def put_session(self, sid: str, created: float, header: bytes | None,
                          turns: Sequence[tuple[int, bytes]], *, wait: bool) -> None:
        """Create a session (header given) or update its header, and add turns (written once each); durable on
        return when wait=True, else StoreWriteError."""

    async def delete_session(self, sid: str, *, wait: bool) -> None:
        """Remove a session and its turns."""

    def load_sessions(self) -> Iterator[tuple[str, float, bytes | None, list[bytes]]]:
        """(id, created, header, turn blobs in turn order) of every stored session (startup, before serving)."""

    def meta_get(self, key: str) -> str | None:
        """A small startup value (the session registry's key), or None."""

    def meta_set_now(self, key: str, value: str) -> None:
        """Store a small startup value at once (before `start`)."""

    async def aclose(self) -> None: ...
