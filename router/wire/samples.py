"""miles' samples wire format (`POST /sessions/{id}/samples`): one safetensors blob, written as miles main's
`encode_samples` writes it (shared/miles_samples/README.md §2).

Per sample *i* (its position in `_samples_meta.samples`): `tokens.i` int64, `loss_mask.i` uint8 and
`rollout_log_probs.i` float64 (both `response_length` long), and when present `rollout_routed_experts.i`
int32 `[len(tokens)-1, layers, top_k]` / `rollout_indexer_topk.i` int32. A replay tensor a sample does not
carry is named in its `nulls`; only these tensor fields ever are. `_samples_meta` is a uint8 tensor holding
compact UTF-8 JSON `{"samples": [{response, response_length, status, weight_versions, prefix_cache_info,
metadata[, reward], nulls}], "session_metadata": {...}, "empty_reason": null | "no_records" | "all_truncated"}`
(`reward` in the v2 field set only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import numpy as np
import safetensors.numpy

SAMPLES_META_KEY = "_samples_meta"
CONTENT_TYPE = b"application/octet-stream"
# miles' field set, in its order: (name, wire dtype or None for a JSON field)
FIELDS_V1: tuple[tuple[str, Any], ...] = (
    ("tokens", np.int64), ("response", None), ("response_length", None), ("loss_mask", np.uint8),
    ("rollout_log_probs", np.float64), ("rollout_routed_experts", np.int32), ("rollout_indexer_topk", np.int32),
    ("status", None), ("weight_versions", None), ("prefix_cache_info", None), ("metadata", None),
)
FIELDS_V2 = FIELDS_V1 + (("reward", None),)
TENSOR_FIELDS = frozenset(name for name, dtype in FIELDS_V2 if dtype is not None)
_REPLAY = frozenset({"rollout_routed_experts", "rollout_indexer_topk"})  # must already be int32

# compact, non-ASCII kept raw, like miles' json.dumps(ensure_ascii=False, separators=(",", ":"))
_meta_encoder = msgspec.json.Encoder()


def encode_samples(samples: Sequence[Any], session_metadata: dict[str, Any], empty_reason: str | None,
                   variant: Literal["v1", "v2"] = "v2") -> bytes:
    """`samples` have the fields of the variant's field set as attributes (router/core/sessions/samples.py)."""
    fields = FIELDS_V2 if variant == "v2" else FIELDS_V1
    tensors: dict[str, np.ndarray] = {}
    metas = []
    for i, s in enumerate(samples):
        meta: dict[str, Any] = {}
        nulls = []
        for name, dtype in fields:
            value = getattr(s, name)
            if dtype is None:
                meta[name] = value
                continue
            if value is None:
                nulls.append(name)
                continue
            arr = np.asarray(value)
            if name in _REPLAY:
                if arr.dtype != dtype:
                    raise ValueError(f"{name} must have dtype {np.dtype(dtype)}, got {arr.dtype}")
            elif arr.dtype != dtype:
                converted = arr.astype(dtype)
                if not np.array_equal(converted, arr):
                    raise ValueError(f"{name} values do not fit wire dtype {np.dtype(dtype)}")
                arr = converted
            tensors[f"{name}.{i}"] = np.ascontiguousarray(arr)
        meta["nulls"] = nulls
        metas.append(meta)
    body = _meta_encoder.encode({"samples": metas, "session_metadata": session_metadata,
                                 "empty_reason": empty_reason})
    tensors[SAMPLES_META_KEY] = np.frombuffer(body, dtype=np.uint8)
    return safetensors.numpy.save(tensors)
