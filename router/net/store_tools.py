"""`miles-router store stats|export|vacuum`: offline tools on the trajectory store (SQLite or PostgreSQL, as the
config selects; no event loop).

Export writes the trajectories as one safetensors file, in one of two layouts (`--format`):

`samples` (the default): the per-trajectory layout of `/sessions/{id}/samples` (miles' samples wire format), so the
trainer reads both the same way. For trajectory i:
  tokens.i                  int64   [T]        prompt + response tokens
  loss_mask.i               uint8   [R]        the response part (R = T - prompt tokens); 1 = generated
  rollout_log_probs.i       float64 [R]        0.0 where the mask is 0
  rollout_routed_experts.i  int32   [T-1, layers, top_k]   when routed experts were captured
and `_samples_meta`, a uint8 tensor holding JSON {"samples": [{response, response_length, status,
weight_versions, prefix_cache_info, metadata, reward, nulls}], "session_metadata": {}, "empty_reason": null |
"no_records"}, written by the samples route's own encoder (router/wire/samples.py, miles' v2 field set).
The response starts at the first generated token, so earlier turns of a multi-turn text conversation are part of
it with their own mask (as miles merges turns).

`retrieve`: the batch layout of `/retrieve_from_text`'s safetensors form (router/wire/retrieve.py), i.e. what a
`{"texts": [...], "format": "safetensors"}` retrieve of every exported trajectory answers: `tokens.i` int32,
`loss_mask.i` uint8 and `rollout_logp.i` float32 over the whole sequence, `routed_experts.i` at the narrowest
width, and `_retrieve_meta` {"results": [...]} with the retrieve fields plus the store's `finish`, `worker`,
`created` and `prompt_len`. The store keeps no text: `response` is the tokens' text (the stop token's included).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from router.net.endpoints import stored_answer
from router.net.store_open import open_existing
from router.wire import retrieve as retrieve_wire
from router.wire import store as wire

LAYOUTS = ("samples", "retrieve")

_STATUS = {"stop": "completed", "length": "truncated", "abort": "aborted"}  # miles' Sample.Status values


def stats(cfg) -> dict:
    store = open_existing(cfg)
    try:
        st = store.stats()
        oldest, newest, tokens = store.summary()
        sessions, turns = store.session_counts()
        return {**st.__dict__, "tokens": tokens, "oldest": oldest, "newest": newest,
                "bytes_per_token": round(st.payload_bytes / tokens, 3) if tokens else None,
                "sessions": sessions, "session_turns": turns}
    finally:
        store.close_sync()


def vacuum(cfg) -> dict:
    """Apply the retention policy once (without knowledge of stale weight versions), then VACUUM."""
    store = open_existing(cfg, retention=True)
    try:
        if store.read_only:
            from router.core.store import StoreOpenError

            raise StoreOpenError(f"{store.name}: cannot vacuum: {store.write_error}")
        before = store.file_bytes()
        plan = store.apply_retention_now(time.time())
        store.vacuum()
        return {"deleted": len(plan.delete), "deleted_unretrieved": plan.evicted_unretrieved,
                "file_bytes_before": before, "file_bytes_after": store.file_bytes()}
    finally:
        store.close_sync()


def _tokenizer(cfg):
    from router.tokenizer import load_tokenizer

    return load_tokenizer(cfg.tokenizer.path)


def export(cfg, out: str, *, unretrieved_only: bool = True, layout: str = "samples") -> dict:
    if layout == "retrieve":
        return _export_retrieve(cfg, out, unretrieved_only=unretrieved_only)
    if layout != "samples":
        raise ValueError(f"export layout {layout!r}: one of {', '.join(LAYOUTS)}")
    from router.core.sessions.samples import Sample
    from router.wire.samples import encode_samples

    store = open_existing(cfg)
    tok = None
    samples = []
    try:
        for _, rec in store.scan(unretrieved_only=unretrieved_only):
            tokens = wire.tokens_of(rec)
            mask = wire.loss_mask_of(rec)
            logp = wire.logprobs_of(rec)
            gen = np.flatnonzero(mask)
            start = int(gen[0]) if gen.size else int(rec.prompt_len)
            experts = wire.experts_of(rec)
            if tok is None:
                tok = _tokenizer(cfg)
            samples.append(Sample(
                tokens=tokens.astype(np.int64), response=tok.text_bytes(tokens[start:]).decode("utf-8", "replace"),
                response_length=int(tokens.size - start), loss_mask=np.ascontiguousarray(mask[start:], dtype=np.uint8),
                rollout_log_probs=np.where(mask[start:] == 1, logp[start:], 0.0).astype(np.float64),
                rollout_routed_experts=None if experts is None else np.ascontiguousarray(experts, dtype=np.int32),
                status=_STATUS.get(rec.finish or "", "completed"),
                weight_versions=[v for v in rec.versions if v is not None],
                prefix_cache_info={"cached_tokens": 0, "total_prompt_tokens": start},
                metadata={"rid": rec.rid, "finish": rec.finish, "worker": rec.worker, "created": rec.created,
                          "prompt_tokens": start}))
    finally:
        store.close_sync()
    payload = encode_samples(samples, {}, None if samples else "no_records")
    Path(out).write_bytes(payload)
    return {"exported": len(samples), "file": out, "bytes": len(payload)}


def _export_retrieve(cfg, out: str, *, unretrieved_only: bool) -> dict:
    """The trajectories in `/retrieve_from_text`'s safetensors batch layout (each one as the store answers it)."""
    from safetensors.numpy import save_file

    store = open_existing(cfg)
    tok = None
    answers = []
    try:
        for _, rec in store.scan(unretrieved_only=unretrieved_only):
            if tok is None:
                tok = _tokenizer(cfg)
            text = tok.text_bytes(wire.tokens_of(rec)).decode("utf-8", "replace")
            answers.append(stored_answer(text, rec, finish=rec.finish, worker=rec.worker, created=rec.created,
                                         prompt_len=int(rec.prompt_len)))
    finally:
        store.close_sync()
    save_file(retrieve_wire.tensors_of(answers, single=False), out)
    return {"exported": len(answers), "file": out, "bytes": Path(out).stat().st_size, "format": "retrieve"}
