"""A tokenizer's vocabulary as bytes: the one table of what every token id stands for.

The tokenizer builds it once (router/tokenizer/vocab.py reads the pieces out of a Hugging Face
tokenizer) and hands the same object to the trajectory cache (router/core/radix/), whose nodes
derive their text from it. Pure data, no tokenizer import.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Below this many ids a join of the pieces beats one numpy gather (its fixed cost, and per-byte passes).
_GATHER_MIN_IDS = 256


class VocabBytes:
    """The exact bytes of each token id (`pieces`; a token may hold part of a multi-byte UTF-8
    character), their lengths (`lengths`, uint32), all of them in one `blob` with each id's start in
    `offsets` (int64, one more entry than ids, so id i is blob[offsets[i]:offsets[i + 1]]).

    `split_after` (bool per id, or None: none) marks the ids after which the tokenizer splits any text: for a
    text that its encode spells with such an id ending at byte b, encode(text) == encode(text[:b]) +
    encode(text[b:]). The tokenizer sets it (router/tokenizer/vocab.py `split_after_ids`, which checks it)."""

    __slots__ = ("pieces", "lengths", "blob", "offsets", "size", "split_after", "_blob_u8")

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self.pieces: list[bytes] = list(pieces)
        self.size = len(self.pieces)
        self.lengths = np.fromiter(map(len, self.pieces), dtype=np.uint32, count=self.size)
        self.offsets = np.zeros(self.size + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.blob = b"".join(self.pieces)
        self._blob_u8 = np.frombuffer(self.blob, dtype=np.uint8)
        self.split_after: np.ndarray | None = None

    def set_split_after(self, ids: Sequence[int]) -> None:
        table = np.zeros(self.size, np.bool_)
        table[list(ids)] = True
        self.split_after = table if table.any() else None

    def __len__(self) -> int:
        return self.size

    def __call__(self, ids: np.ndarray, gather_from: int = _GATHER_MIN_IDS) -> tuple[bytes, np.ndarray]:
        """(the concatenated bytes of `ids`, uint32 byte length of each). Ids must be in range; from
        `gather_from` ids on, one numpy gather over the blob instead of a join."""
        ids = np.asarray(ids, dtype=np.int64)
        lens = self.lengths[ids]
        if ids.size < gather_from:
            pieces = self.pieces
            return b"".join([pieces[i] for i in ids.tolist()]), lens
        total = int(lens.sum(dtype=np.int64))
        if total == 0:
            return b"", lens
        out_start = lens.cumsum(dtype=np.int64) - lens
        idx = np.repeat(self.offsets[ids] - out_start, lens) + np.arange(total, dtype=np.int64)
        return self._blob_u8[idx].tobytes(), lens
