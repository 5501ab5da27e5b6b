"""Sticky placement: which worker a routing key (a session id, a conversation) goes to, the same from every
router, and a key's own in-flight cap.

- **The key** (`routing_key`): the router's own (a session id), else the first of `routing.routing_key_headers`
  present with a usable value, else `routing.sticky_body_field`, else the request id's **lineage** (smg's rule:
  `conv_t2_r1` -> `conv`, one trailing `_r<n>` retry suffix, then one `_t<n>` turn suffix, stripped), from the
  body's `rid` or the first of `routing.request_id_headers`. Header and body keys are lineage-stripped too, so a
  proxy that forwards `conv_t2` as the key pins `conv` (as smg does).
- **Placement agrees without talking** (`rendezvous_order`): highest-random-weight (rendezvous) hashing of the key
  over the workers it may use. The weight mixes an unkeyed blake2b of the key with one of the worker URL, so
  every router process, on any host, ranks the workers of a key the same way and sends its turns to one engine's KV cache; a worker
  that joins or leaves moves only the keys it wins or held. The existing bounded-load spill still applies.
- **A key's in-flight cap** (`KeyInflight`, `routing.sticky_inflight_cap`, smg's 2): when a key already has that
  many requests in flight on its worker (this router's count), the request goes to the key's next worker in
  rendezvous order, so one conversation cannot pile onto its worker.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

MAX_KEY_BYTES = 256
_SUFFIX = {"r": re.compile(r"(.*)_r[0-9]+\Z", re.S), "t": re.compile(r"(.*)_t[0-9]+\Z", re.S)}


def strip_lineage(rid: str) -> str:
    """`conv_t2_r1` -> `conv`: one trailing `_r<n>`, then one trailing `_t<n>`; a rid that is nothing but
    suffixes keys as itself."""
    out = rid
    for tag in ("r", "t"):
        m = _SUFFIX[tag].match(out)
        if m is not None:
            out = m.group(1)
    return out or rid


def usable(value: str | None) -> str | None:
    """A key value that can be used: non-empty once stripped, at most MAX_KEY_BYTES."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return None
    return value


def routing_key(router_key: str | None, header_values: Iterable[str | None], body_value: str | None,
                rid_values: Iterable[str | None]) -> tuple[str, str] | None:
    """(key, source) by the order above; `header_values` and `rid_values` in their configured order (lazily:
    the body's rid is read only when nothing earlier gave a key). None: no key, route by load."""
    if router_key is not None:
        return router_key, "router"
    for v in header_values:
        v = usable(v)
        if v is not None:
            return strip_lineage(v), "header"
    v = usable(body_value)
    if v is not None:
        return strip_lineage(v), "body"
    for v in rid_values:
        v = usable(v)
        if v is not None:
            return strip_lineage(v), "lineage"
    return None


_MASK = (1 << 64) - 1


@lru_cache(maxsize=1 << 16)
def _seed(url: str) -> int:
    """A worker's 64-bit seed: blake2b of its URL (the same in every process; memoized, URLs are few)."""
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "big")


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _weight(kh: int, url: str) -> int:
    """The key's weight for a worker: splitmix64's finalizer over key hash ^ worker seed (a bijective mixer, so
    distinct workers never tie for a key; ~0.4 us, where a blake2b per pair cost ~0.9 us)."""
    x = kh ^ _seed(url)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def rendezvous_order(key: str, urls: Iterable[str]) -> list[str]:
    """`urls` from the key's first choice to its last (highest random weight first)."""
    kh = _key_hash(key)
    return sorted(urls, key=lambda u: -_weight(kh, u))


def preferred(key: str, urls: Sequence[str], inflight_of_key, cap: int) -> tuple[str | None, bool]:
    """The key's worker among `urls` (the ones it may use now): its first rendezvous choice, or, when the key
    already has `cap` requests in flight there (`inflight_of_key(url)`; cap 0: no cap), the first one under the
    cap. (url, moved by the cap). When every one is at the cap, the first choice."""
    if not urls:
        return None, False
    kh = _key_hash(key)
    first = max(urls, key=lambda u: _weight(kh, u))  # one pass; the whole order only when the cap bites
    if cap <= 0 or inflight_of_key(first) < cap:
        return first, False
    for url in sorted(urls, key=lambda u: -_weight(kh, u))[1:]:
        if inflight_of_key(url) < cap:
            return url, True
    return first, False


class KeyInflight:
    """Requests in flight per (key, worker), for the cap. Entries go when their count returns to 0, so its size
    is bounded by the requests in flight."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}

    def count(self, key: str, url: str) -> int:
        return self._counts.get((key, url), 0)

    def add(self, key: str, url: str) -> None:
        self._counts[(key, url)] = self._counts.get((key, url), 0) + 1

    def done(self, key: str, url: str) -> None:
        n = self._counts.get((key, url), 0) - 1
        if n > 0:
            self._counts[(key, url)] = n
        else:
            self._counts.pop((key, url), None)

    def __len__(self) -> int:
        return len(self._counts)
