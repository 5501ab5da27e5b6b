"""The durable store's record format: one trajectory as one msgpack blob of raw little-endian arrays.

A record holds exactly what `/retrieve_from_text` answers for its text (the tree's merged answer right after the
insert), so an answer read back from disk is the answer the memory cache gave. Arrays are stored as bytes, never
as lists of numbers: tokens int32, logprobs float32, the loss mask bit-packed (1 bit per token), routed experts at
the narrowest width that holds them (uint8 for models with <= 256 experts, uint16, else int32; widened back to
SGLang's int32 on read). Without routed experts that is 8.125 bytes per token plus a fixed header.
The visible text itself is not stored: the record is found by the 16-byte blake2b digest of it (as the memory
cache finds a terminal), which keeps the text's ~4 bytes per token off the disk.
"""

from __future__ import annotations

import msgspec
import numpy as np

from router.wire.sglang import narrow_experts

FORMAT_VERSION = 1


class StoredTrajectory(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    format: int
    rid: str
    created: float  # unix time of the insert
    prompt_len: int  # tokens the worker received; the rest it generated
    finish: str | None
    worker: str | None
    weight_version: str | None  # the trajectory's own weight version
    versions: list[str | None]  # weight versions along its path, oldest first (as /retrieve_from_text reports)
    tokens: bytes  # int32 LE
    logprobs: bytes  # float32 LE
    loss_mask: bytes  # np.packbits(mask, bitorder="little")
    experts: bytes | None = None  # routed experts rows, `experts_dtype`, C order
    experts_shape: tuple[int, ...] | None = None  # [len(tokens)-1, layers, top_k]
    experts_dtype: str | None = None  # numpy dtype string: "|u1", "<u2" or "<i4"

    @property
    def ntokens(self) -> int:
        return len(self.tokens) // 4


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StoredTrajectory)


def pack(*, rid: str, created: float, prompt_len: int, finish: str | None, worker: str | None,
         weight_version: str | None, versions: list, tokens: np.ndarray, logprobs: np.ndarray,
         loss_mask: np.ndarray, experts: np.ndarray | None) -> StoredTrajectory:
    if not (tokens.size == logprobs.size == loss_mask.size):
        raise ValueError(f"trajectory {rid!r}: {tokens.size} tokens, {logprobs.size} logprobs, "
                         f"{loss_mask.size} mask values")
    rec = StoredTrajectory(
        FORMAT_VERSION, rid, created, int(prompt_len), finish, worker, weight_version, list(versions),
        np.ascontiguousarray(tokens, dtype="<i4").tobytes(),
        np.ascontiguousarray(logprobs, dtype="<f4").tobytes(),
        np.packbits(np.asarray(loss_mask, dtype=np.uint8) & 1, bitorder="little").tobytes(),
    )
    put_experts(rec, experts)
    return rec


def put_experts(rec, experts: np.ndarray | None) -> None:
    """Set a record's `experts`, `experts_shape`, `experts_dtype` (a trajectory's, or a session turn's in
    router/wire/session_store.py): the rows at their narrowest width."""
    if experts is not None:
        narrow = narrow_experts(experts)
        rec.experts, rec.experts_shape, rec.experts_dtype = narrow.tobytes(), tuple(narrow.shape), narrow.dtype.str


def encode(rec: StoredTrajectory) -> bytes:
    return _encoder.encode(rec)


def decode(blob: bytes) -> StoredTrajectory:
    rec = _decoder.decode(blob)
    if rec.format != FORMAT_VERSION:
        raise ValueError(f"stored trajectory format {rec.format}, this router reads {FORMAT_VERSION}")
    return rec


def tokens_of(rec: StoredTrajectory) -> np.ndarray:
    return np.frombuffer(rec.tokens, dtype="<i4")


def logprobs_of(rec: StoredTrajectory) -> np.ndarray:
    return np.frombuffer(rec.logprobs, dtype="<f4")


def loss_mask_of(rec: StoredTrajectory) -> np.ndarray:
    n = rec.ntokens
    return np.unpackbits(np.frombuffer(rec.loss_mask, dtype=np.uint8), count=n, bitorder="little")


def experts_of(rec) -> np.ndarray | None:
    """Routed experts as int32 (SGLang's encoding), or None when the record (a trajectory, a session turn)
    has none."""
    if rec.experts is None or rec.experts_shape is None or rec.experts_dtype is None:
        return None
    return np.frombuffer(rec.experts, dtype=rec.experts_dtype).reshape(rec.experts_shape).astype(np.int32)
