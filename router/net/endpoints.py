"""Router endpoints beyond worker admin: trajectory retrieval and cache statistics.

`POST /retrieve_from_text` answers, for one text or many, the exact tokens, loss mask and
logprobs recorded for it (miles-compatible keys) plus how much of the text matched exactly.
"""

from __future__ import annotations

import base64
import time

import msgspec
import numpy as np

from router.core.pipeline import Reply, StageError
from router.wire.api import RetrieveBatch, Trajectory, json_encoder, retrieve_request_decoder


def install(app, runtime) -> None:
    app.register("POST", "/retrieve_from_text", _retrieve_handler(runtime))
    app.register("GET", "/cache/stats", _stats_handler(runtime))
    from router.net import fanout

    fanout.install(app, runtime)


def _need_tree(runtime):
    if not runtime.tree_wanted():
        raise StageError(404, "the trajectory cache is not enabled: route /generate through a pipeline with "
                              "radix stages (e.g. pipelines/radix-cache.toml)")
    return runtime.tree


async def retrieve_one(runtime, text: str) -> Trajectory:
    tree = _need_tree(runtime)
    data = text.encode("utf-8", "surrogatepass")
    r = tree.retrieve(data, now=time.time())
    tokens = r.tokens.astype(np.int32, copy=False)
    logp = r.logprobs.astype(np.float32, copy=False)
    mask = r.loss_mask.astype(np.uint8, copy=False)
    fresh = 0
    matched = r.matched_bytes
    if not r.exact and matched < len(data):
        # Unmatched tail: tokenized fresh, loss mask 0, and reported (exact=False, fresh_tokens).
        # The cached part must end on a character boundary for the tail to be text.
        keep = _char_aligned_prefix(runtime.tokenizer, tokens, data)
        tokens, logp, mask = tokens[:keep], logp[:keep], mask[:keep]
        matched = len(runtime.tokenizer.text_bytes(tokens))
        tail = np.asarray(await runtime.tokenizer.encode_async(data[matched:].decode("utf-8", "surrogatepass")),
                          dtype=np.int32)
        fresh = int(tail.size)
        tokens = np.concatenate([tokens, tail])
        logp = np.concatenate([logp, np.zeros(fresh, np.float32)])
        mask = np.concatenate([mask, np.zeros(fresh, np.uint8)])
    experts = None
    shape = None
    if r.routed_experts is not None and fresh == 0:
        experts = base64.b64encode(np.ascontiguousarray(r.routed_experts, dtype="<i4").tobytes()).decode()
        shape = list(r.routed_experts.shape)
    matched_chars = len(data[:matched].decode("utf-8", "ignore"))
    versions = [v for v in r.versions if v is not None]
    return Trajectory(
        response=text,
        tokens=tokens.tolist(),
        loss_mask=mask.tolist(),
        rollout_logp=logp.astype(np.float64).tolist(),
        token_length=int(tokens.size),
        loss_mask_length=int(mask.size),
        exact=bool(r.exact or (fresh == 0 and matched == len(data))),
        matched_chars=matched_chars,
        text_chars=len(text),
        fresh_tokens=fresh,
        weight_version=versions[-1] if versions else None,
        weight_versions=versions,
        routed_experts=experts,
        routed_experts_shape=shape,
    )


def _char_aligned_prefix(tokenizer, tokens: np.ndarray, data: bytes) -> int:
    """How many leading `tokens` end on a UTF-8 character boundary of `data` (at the latest)."""
    if tokens.size == 0:
        return 0
    ends = np.cumsum(tokenizer.token_bytes(tokens)[1].astype(np.int64))
    starts = np.append((np.frombuffer(data, np.uint8) & 0xC0) != 0x80, True)
    ok = np.flatnonzero(starts[np.minimum(ends, len(data))])
    return int(ok[-1]) + 1 if ok.size else 0


def _retrieve_handler(runtime):
    async def handler(scope, body: bytes) -> Reply:
        try:
            req = retrieve_request_decoder.decode(body)
        except msgspec.ValidationError as e:
            raise StageError(400, f"invalid /retrieve_from_text body: {e}") from None
        except msgspec.DecodeError as e:
            raise StageError(400, f"invalid JSON body: {e}") from None
        if (req.text is None) == (req.texts is None):
            raise StageError(400, 'send exactly one of {"text": "..."} or {"texts": ["...", ...]}')
        if req.text is not None:
            return Reply(200, json_encoder.encode(await retrieve_one(runtime, req.text)))
        results = [await retrieve_one(runtime, t) for t in req.texts]
        return Reply(200, json_encoder.encode(RetrieveBatch(results)))

    return handler


def _stats_handler(runtime):
    async def handler(scope, body: bytes) -> Reply:
        tree = runtime.tree_if_loaded
        stats = tree.stats() if tree is not None else {}
        c = runtime.config.cache
        stats.update(enabled=runtime.tree_wanted(), budget_bytes=c.budget_bytes, hard_budget_bytes=c.hard_budget_bytes)
        return Reply(200, json_encoder.encode(stats))

    return handler
