"""The keys of a visible text: the cache's keyed identity (`text_key`) and the durable store's digest
(`text_digest`).

`text_key` is two SipHash values (Python's own str/bytes hash, keyed per process) of independent inputs:
128 bits, ~5x cheaper than blake2b, not stable across restarts, and a forged collision needs the
process's hash key. `text_digest` is blake2b-128: stable, the store's key for a trajectory.
"""

from __future__ import annotations

import hashlib
import sys

# Prefix of the text hashed for the second half of `text_key` (an input independent of the text itself).
_KEY_SALT = b"\x00miles-router text key\x00"
_M64 = (1 << 64) - 1
# Python's str/bytes hash is SipHash (keyed per process) on every mainstream build; a build configured with
# another algorithm (e.g. FNV) gets blake2b keys instead.
_SIPHASH = sys.hash_info.algorithm.startswith("siphash")


def text_digest(text: bytes) -> bytes:
    """blake2b-128 of a text: the durable store's key for a trajectory."""
    return hashlib.blake2b(text, digest_size=16).digest()


def text_key(text: bytes) -> int:
    """The cache's 128-bit identity of a visible text (keyed per process, so not stable across restarts)."""
    if _SIPHASH:
        return (hash(text) & _M64) << 64 | (hash(_KEY_SALT + text) & _M64)
    return int.from_bytes(text_digest(text), "little")

