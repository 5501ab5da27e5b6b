"""A decoder of miles' `/samples` safetensors reply, written from the rules in shared/miles_samples/README.md §2
and §5.1 (what miles' `decode_samples_and_merge_input_sample` checks), not from the router's encoder.

`decode(payload, variant)` raises `WireError` wherever miles' decoder raises, and returns the samples as
dicts of their fields (tensors as numpy arrays, a null-marked tensor as None, a null `tokens` as []), the
`session_metadata` and the `empty_reason`. It also checks what miles' merge asserts of the lengths."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import safetensors.numpy

TENSORS = {"tokens": np.int64, "loss_mask": np.uint8, "rollout_log_probs": np.float64,
           "rollout_routed_experts": np.int32, "rollout_indexer_topk": np.int32}
JSON_V1 = ("response", "response_length", "status", "weight_versions", "prefix_cache_info", "metadata")
STATUSES = {"pending", "completed", "truncated", "aborted", "failed"}
ORDER_V1 = ("response", "response_length", "status", "weight_versions", "prefix_cache_info", "metadata", "nulls")


class WireError(Exception):
    pass


@dataclass
class Reply:
    samples: list[dict]
    session_metadata: dict
    empty_reason: str | None
    meta_text: str


def decode(payload: bytes, variant: str = "v2") -> Reply:
    try:
        tensors = safetensors.numpy.load(payload)
    except Exception as e:  # noqa: BLE001 - miles: SafetensorError
        raise WireError(f"not a safetensors container: {e}") from None
    if "_samples_meta" not in tensors:
        raise WireError("no _samples_meta")
    meta_arr = tensors.pop("_samples_meta")
    if meta_arr.ndim != 1 or meta_arr.dtype != np.uint8:
        raise WireError("_samples_meta must be a rank-one uint8 tensor")
    text = meta_arr.tobytes().decode("utf-8")
    meta = json.loads(text)
    for key in ("samples", "session_metadata", "empty_reason"):
        if key not in meta:
            raise WireError(f"_samples_meta lacks {key!r}")
    json_fields = JSON_V1 + (("reward",) if variant == "v2" else ())
    out = []
    for i, sm in enumerate(meta["samples"]):
        if "nulls" not in sm:
            raise WireError(f"sample {i} has no nulls")
        nulls = set(sm["nulls"])
        if nulls - set(TENSORS):
            raise WireError(f"null markers reference non-tensor fields: {sorted(nulls - set(TENSORS))}")
        sample: dict = {}
        for key in json_fields:
            if key not in sm:
                raise WireError(f"sample {i} lacks {key!r}")
            sample[key] = sm[key]
        if sample["status"] not in STATUSES:
            raise WireError(f"sample {i}: {sample['status']!r} is not a Sample.Status value")
        if not isinstance(sample["metadata"], dict):
            raise WireError(f"sample {i}: metadata is not an object")
        for name, dtype in TENSORS.items():
            if name in nulls:
                sample[name] = [] if name == "tokens" else None
                continue
            key = f"{name}.{i}"
            if key not in tensors:
                raise WireError(f"missing tensor {key}")
            arr = tensors.pop(key)
            if arr.dtype != dtype:
                raise WireError(f"{name} must have dtype {np.dtype(dtype)}, got {arr.dtype}")
            sample[name] = arr
        # what miles' merge and Sample.validate assert
        n = sample["response_length"]
        if len(sample["loss_mask"]) != n or len(sample["rollout_log_probs"]) != n or len(sample["tokens"]) < n:
            raise WireError(f"sample {i}: response_length {n}, loss_mask {len(sample['loss_mask'])}, "
                            f"rollout_log_probs {len(sample['rollout_log_probs'])}, tokens {len(sample['tokens'])}")
        rows = sample["rollout_routed_experts"]
        if rows is not None and (rows.ndim != 3 or len(rows) != len(sample["tokens"]) - 1):
            raise WireError(f"sample {i}: rollout_routed_experts {rows.shape} for {len(sample['tokens'])} tokens")
        if tuple(k for k in sm if k != "reward") != ORDER_V1:
            raise WireError(f"sample {i}: keys out of miles' encoder order: {list(sm)}")
        out.append(sample)
    if tensors:
        raise WireError(f"payload carries unreferenced tensors: {sorted(tensors)}")
    return Reply(out, meta["session_metadata"], meta["empty_reason"], text)
