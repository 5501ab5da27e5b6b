"""The one decoder of SGLang /generate replies (router/wire/sglang.py) that the radix cache's `capture` and the
session stages share."""

from __future__ import annotations

import math

import msgspec
import pytest

from router.wire.sglang import BadOutput, decode_generate_outputs


def reply(**meta):
    base = {"id": "r1", "finish_reason": {"type": "stop", "matched": 2}, "weight_version": "w3",
            "output_token_logprobs": [[-0.5, 7, "a"], [None, 2, None]], "completion_tokens": 2}
    return {"text": "a", "output_ids": [7, 2], "meta_info": {**base, **meta}}


def test_fields_and_a_null_logprob_is_nan_not_zero():
    (out,) = decode_generate_outputs(msgspec.json.encode(reply(cached_tokens=3, e2e_latency=0.25, extra={"x": 1})))
    assert out.output_ids.tolist() == [7, 2] and out.logprobs[0] == -0.5 and math.isnan(out.logprobs[1])
    assert (out.rid, out.weight_version, out.finish.type, out.finish.matched) == ("r1", "w3", "stop", 2)
    assert (out.cached_tokens, out.e2e_latency, out.routed_experts) == (3, 0.25, None)
    # meta_info passes on as the worker wrote it, minus what a reader leaves out
    assert msgspec.json.decode(out.meta_without(("extra",))).keys() == {
        "id", "finish_reason", "weight_version", "output_token_logprobs", "completion_tokens", "cached_tokens",
        "e2e_latency"}


def test_arrays_ids_from_triples_and_a_stream_cut_short():
    outs = decode_generate_outputs(msgspec.json.encode([reply(), {"meta_info": {
        "output_token_logprobs": [[-1.0, 5, None]], "finish_reason": None}}]))
    assert [o.output_ids.tolist() for o in outs] == [[7, 2], [5]] and outs[1].finish is None


@pytest.mark.parametrize("body,words", [
    (b"not json", "not an SGLang /generate output"),
    (msgspec.json.encode({"text": "a"}), "not an SGLang /generate output"),
    (msgspec.json.encode(reply(output_token_logprobs=[[-0.5, 7, None]])), "1 output logprobs for 2 output ids"),
    (msgspec.json.encode(reply(output_token_logprobs=[[-0.5, 7, None], [-1, 3, None]])),
     "output_token_logprobs ids differ from output_ids"),
    (msgspec.json.encode(reply(weight_version=5)), "meta_info is malformed"),
])
def test_inconsistent_replies_are_named(body, words):
    with pytest.raises(BadOutput, match=words):
        decode_generate_outputs(body)
