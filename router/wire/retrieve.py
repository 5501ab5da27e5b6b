"""`/retrieve_from_text`'s binary form: one safetensors blob (written by the `safetensors` library).

Asked for with `Accept: application/octet-stream` or `"format": "safetensors"` in the body. Tensors, one set per
answered text (a single `{"text"}` request has no suffix; a batch `{"texts"}` suffixes result i with `.i`, as
miles' samples format does):
  tokens           int32   [T]
  loss_mask        uint8   [T]          1 = generated
  rollout_logp     float32 [T]          zeros with `"return_logp": false`
  routed_experts   [T-1, layers, top_k] only when the JSON form has them; the narrowest unsigned width that holds
                                        every id (uint8 for <= 256 experts, uint16, else int32; the tensor's dtype
                                        says which), or int32 with `"routed_experts_dtype": "int32"`
and `_retrieve_meta`, a uint8 tensor holding UTF-8 JSON: every other field of the JSON form (response,
token_length, loss_mask_length, exact, match, matched_chars, text_chars, fresh_tokens, weight_version,
weight_versions, routed_experts_shape, rid, alternatives), as one object for a single text and as
`{"results": [...]}` for a batch, so the metadata has the JSON form's shape without its arrays.

The metadata is a tensor (as `_samples_meta` is in the samples format), not the header's `__metadata__`: that is a
str -> str map (no booleans, nulls or lists) and `safetensors.numpy.load(bytes)` does not return it.
`miles-router store export --format retrieve` writes this batch layout too (router/net/store_tools.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import msgspec
import numpy as np
import safetensors.numpy

from router.wire.api import Trajectory
from router.wire.sglang import narrow_experts

META_KEY = "_retrieve_meta"
CONTENT_TYPE = b"application/octet-stream"
# The JSON form's arrays; every other field of it is the metadata.
ARRAYS = ("tokens", "loss_mask", "rollout_logp", "routed_experts")

# One answer's fields besides its arrays: the JSON form's (`Trajectory`) keys, in its order.
RetrieveMeta = msgspec.defstruct(
    "RetrieveMeta",
    [(f.name, f.type) if f.required else (f.name, f.type, f.default)
     for f in msgspec.structs.fields(Trajectory) if f.name not in ARRAYS],
    module=__name__)


class StoredMeta(RetrieveMeta, kw_only=True):
    """An exported store row's metadata: the retrieve fields plus what the store knows about the generation."""

    finish: str | None = None
    worker: str | None = None
    created: float | None = None
    prompt_len: int | None = None  # tokens the worker received; the rest it generated


class _MetaBatch(msgspec.Struct):
    results: list[RetrieveMeta]


@dataclass(slots=True)
class Answer:
    """One text's answer: its metadata and its numpy arrays (any integer dtype for the experts)."""

    meta: RetrieveMeta
    tokens: np.ndarray
    loss_mask: np.ndarray
    rollout_logp: np.ndarray
    routed_experts: np.ndarray | None


_encoder = msgspec.json.Encoder()


def experts_tensor(experts: np.ndarray, dtype: str = "narrow") -> np.ndarray:
    if dtype == "int32":
        # SGLang's dtype, whatever integer width the cache holds the rows in
        return np.ascontiguousarray(experts, dtype="<i4")
    return narrow_experts(experts)


def tensors_of(answers: Sequence[Answer], *, single: bool, experts_dtype: str = "narrow") -> dict[str, np.ndarray]:
    """The blob's tensors, straight from the numpy arrays (no copy where the dtype already fits)."""
    if single and len(answers) != 1:
        raise ValueError(f"a single answer's blob holds one answer, got {len(answers)}")
    tensors: dict[str, np.ndarray] = {}
    for i, a in enumerate(answers):
        sfx = "" if single else f".{i}"
        tensors["tokens" + sfx] = np.ascontiguousarray(a.tokens, dtype="<i4")
        tensors["loss_mask" + sfx] = np.ascontiguousarray(a.loss_mask, dtype="|u1")
        tensors["rollout_logp" + sfx] = np.ascontiguousarray(a.rollout_logp, dtype="<f4")
        if a.routed_experts is not None:
            tensors["routed_experts" + sfx] = experts_tensor(a.routed_experts, experts_dtype)
    meta = answers[0].meta if single else _MetaBatch([a.meta for a in answers])
    tensors[META_KEY] = np.frombuffer(_encoder.encode(meta), dtype=np.uint8)
    return tensors


def encode(answers: Sequence[Answer], *, single: bool, experts_dtype: str = "narrow") -> bytes:
    return safetensors.numpy.save(tensors_of(answers, single=single, experts_dtype=experts_dtype))


def decode(payload: bytes) -> dict[str, Any]:
    """The blob as the JSON form's shape with numpy arrays: `{...fields, "tokens": array, ...}` for a single text,
    `{"results": [...]}` for a batch; `routed_experts` is None where the blob has none (for tests and clients)."""
    tensors = safetensors.numpy.load(payload)
    meta = msgspec.json.decode(tensors.pop(META_KEY).tobytes())
    if "results" not in meta:
        return {**meta, **{n: tensors.get(n) for n in ARRAYS}}
    return {"results": [{**m, **{n: tensors.get(f"{n}.{i}") for n in ARRAYS}} for i, m in enumerate(meta["results"])]}


def wants_binary(accept: bytes | None) -> bool:
    """Whether an Accept header prefers `application/octet-stream` to JSON: its q is above 0 and above JSON's (on
    equal q the range listed first wins). Wildcards (`*/*`) never ask for the binary form."""
    if not accept or b"octet-stream" not in accept.lower():
        return False
    q = {}
    for order, part in enumerate(accept.decode("latin-1").lower().split(",")):
        kind, *params = (p.strip() for p in part.split(";"))
        if kind not in ("application/octet-stream", "application/json") or kind in q:
            continue
        weight = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        q[kind] = (weight, -order)
    binary = q.get("application/octet-stream", (0.0, 0))
    return binary[0] > 0 and binary > q.get("application/json", (0.0, 1))
