"""miles' samples wire format: one safetensors blob (written by the `safetensors` library).

Per sample i: `tokens.i` int64, `loss_mask.i` uint8, `rollout_log_probs.i` float64 and, when the
routed experts were captured, `rollout_routed_experts.i` int32 `[len(tokens)-1, layers, top_k]`.
`_samples_meta` is a uint8 tensor holding UTF-8 JSON:
`{"samples": [{response, response_length, status, weight_versions, spec_info, prefix_cache_info,
metadata, reward, nulls}], "session_metadata": {...}, "empty_reason": null | "no_records" | "all_truncated"}`;
`nulls` names the tensors a sample does not carry.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import safetensors.numpy

SAMPLES_META_KEY = "_samples_meta"
CONTENT_TYPE = b"application/octet-stream"
# Tensors miles' decoder knows and a sample may lack (it then lists them in `nulls`).
OPTIONAL_TENSORS = ("rollout_sampling_mask", "rollout_routed_experts", "rollout_indexer_topk")


def encode_samples(samples: list[Any], metas: list[dict[str, Any]], session_metadata: dict[str, Any],
                   empty_reason: str | None) -> bytes:
    """`samples` carry numpy `tokens`, `loss_mask`, `rollout_log_probs`, `routed_experts` (or None)."""
    tensors: dict[str, np.ndarray] = {}
    out_metas = []
    for i, (s, meta) in enumerate(zip(samples, metas)):
        tensors[f"tokens.{i}"] = np.ascontiguousarray(s.tokens, dtype=np.int64)
        tensors[f"loss_mask.{i}"] = np.ascontiguousarray(s.loss_mask, dtype=np.uint8)
        tensors[f"rollout_log_probs.{i}"] = np.ascontiguousarray(s.rollout_log_probs, dtype=np.float64)
        nulls = ["rollout_sampling_mask", "rollout_indexer_topk"]
        if s.routed_experts is not None:
            tensors[f"rollout_routed_experts.{i}"] = np.ascontiguousarray(s.routed_experts, dtype=np.int32)
        else:
            nulls.insert(1, "rollout_routed_experts")
        out_metas.append({"spec_info": {}, "prefix_cache_info": {}, **meta, "nulls": nulls})
    meta_json = msgspec.json.encode({"samples": out_metas, "session_metadata": session_metadata,
                                     "empty_reason": empty_reason})
    tensors[SAMPLES_META_KEY] = np.frombuffer(meta_json, dtype=np.uint8)
    return safetensors.numpy.save(tensors)


def decode_samples(payload: bytes) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """(per-sample tensors by field name, the meta JSON): for tests and tools."""
    tensors = safetensors.numpy.load(payload)
    meta = msgspec.json.decode(tensors.pop(SAMPLES_META_KEY).tobytes())
    out = []
    for i in range(len(meta["samples"])):
        out.append({k.rsplit(".", 1)[0]: v for k, v in tensors.items() if k.rsplit(".", 1)[1] == str(i)})
    return out, meta
