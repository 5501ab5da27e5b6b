"""Router endpoints beyond worker admin: trajectory retrieval and cache statistics.

`POST /retrieve_from_text` answers, for one text or many, the exact tokens, loss mask and
logprobs recorded for it (miles-compatible keys) plus how much of the text matched exactly:
as JSON (the default) or, when asked, as one safetensors blob (router/wire/retrieve.py).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

import msgspec
import numpy as np
import trio

from router.wire import DECODE_ERRORS, decode_error_text, validation_problem
from router.core.pipeline import Reply, StageError
from router.core.radix import text_digest
from router.core.store import StoreError
from router.net.routes import Route
from router.wire import retrieve as retrieve_wire
from router.wire import store as store_wire
from router.wire.api import EXPERTS_DTYPES, FORMATS, RetrieveBatch, Trajectory, json_encoder, retrieve_request_decoder


def routes(runtime) -> list[Route]:
    return [Route(("POST",), "/retrieve_from_text", _retrieve_handler(runtime),
                  "text -> the engine's exact tokens, logprobs, loss mask, routed experts (JSON or safetensors)"),
            Route(("GET",), "/cache/stats", _stats_handler(runtime), "trajectory cache and store counters")]


def _need_tree(runtime):
    if not runtime.tree_wanted():
        raise StageError(404, "the trajectory cache is not enabled: route /generate through a pipeline with "
                              "radix stages (e.g. pipelines/radix-cache.toml)")
    return runtime.trajectories.tree


# A reply covering more tokens than this is built (array -> list -> JSON) in a worker thread: for
# a text of megabytes that takes a few hundred ms, which on the event loop would stall every other
# request (tests/test_bad_input.py::test_megabyte_retrieve_is_bounded_and_does_not_stall).
_OFFLOAD_TOKENS = 32_768


@dataclass(slots=True)
class _Found:
    """What the cache (and, for an unmatched tail, the tokenizer) gave for one text: arrays only."""

    text: str
    exact: bool
    match: str
    tokens: np.ndarray
    logp: np.ndarray
    mask: np.ndarray
    matched_chars: int
    fresh: int
    versions: list
    experts: np.ndarray | None
    rid: str | None = None
    alternatives: int = 0


class _RidNotFound(Exception):
    pass


async def _lookup(runtime, text: str, rid: str | None = None, handed_out: set | None = None) -> _Found:
    """One text's answer. `rid` selects one of several spellings (a _RidNotFound when no trajectory with this
    text has it); `handed_out` (batch) makes the answer the oldest spelling not handed out yet."""
    tree = _need_tree(runtime)
    data = text.encode("utf-8", "surrogatepass")
    r = tree.retrieve(data, now=time.time(), rid=rid, handed_out=handed_out)
    store = runtime.trajectories.store
    if store is not None:
        digest = text_digest(data)
        # Not in memory (evicted, or stored before a restart): the store has it if it was ever acknowledged. In
        # memory, on a store other routers share: they may have stored other spellings of the same text (a GRPO
        # group spread over routers), and then the text alone is as ambiguous here as there.
        fleet = r.exact and rid is None and store.shared
        if (not r.exact and not r.ambiguous) or fleet:
            try:
                stored = await store.get_all(digest)
            except StoreError as e:  # the store cannot be read now (its database is away): say so, do not guess
                raise StageError(503, str(e), store=str(getattr(store, "path", store.name))) from None
            if fleet:
                spellings = {rec.tokens for rec in stored}
                spellings.add(r.tokens.astype("<i4", copy=False).tobytes())
                if len(spellings) == 1:
                    stored = []  # only the one memory has: its answer stands
            found = _from_store(text, stored, rid, handed_out)
            if found is not None:
                if found.exact:
                    store.mark_retrieved(digest)
                return found
        if r.exact:
            store.mark_retrieved(digest)
    if rid is not None and not r.exact:
        raise _RidNotFound(rid)
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
        tail = await _encode_tail(runtime.tokenizer, data[matched:].decode("utf-8", "surrogatepass"))
        fresh = int(tail.size)
        tokens = np.concatenate([tokens, tail])
        logp = np.concatenate([logp, np.zeros(fresh, np.float32)])
        mask = np.concatenate([mask, np.zeros(fresh, np.uint8)])
    matched_chars = len(data[:matched].decode("utf-8", "ignore"))
    versions = [v for v in r.versions if v is not None]
    match = _match_kind(r.exact, r.anchored, covered=data != b"" and fresh == 0 and matched == len(data),
                        cached_tokens=int(tokens.size) - fresh, ambiguous=r.ambiguous)
    return _Found(text, match in _EXACT_MATCHES, match, tokens, logp, mask,
                  matched_chars, fresh, versions, r.routed_experts if fresh == 0 else None, r.rid, r.alternatives)


def _stored(text: str, rec, alternatives: int = 1) -> _Found:
    """A trajectory read back from the durable store: the memory cache's exact answer, as it was recorded."""
    tokens = store_wire.tokens_of(rec)
    return _Found(text, True, "trajectory", tokens, store_wire.logprobs_of(rec), store_wire.loss_mask_of(rec),
                  len(text), 0, [v for v in rec.versions if v is not None], store_wire.experts_of(rec), rec.rid,
                  alternatives)


def _from_store(text: str, records: list, rid: str | None, handed_out: set | None) -> _Found | None:
    """The stored answer for a text, by the memory cache's rules when it has several token spellings: exact only
    when determined (one spelling, a `rid`, or a batch hand-out of the oldest spelling none of whose rids was
    handed out), else `ambiguous` with the newest spelling and the count. None: nothing stored (for that rid)."""
    spellings: dict[bytes, list] = {}
    for rec in records:  # oldest first
        spellings.setdefault(rec.tokens, []).append(rec)
    groups = list(spellings.values())
    if rid is not None:
        rec = next((r for g in groups for r in g if r.rid == rid), None)
        return None if rec is None else _stored(text, rec, len(groups))
    if not groups:
        return None
    if len(groups) == 1:
        return _stored(text, groups[0][-1])
    if handed_out is not None:
        for g in groups:
            if not any(r.rid in handed_out for r in g):
                return _stored(text, g[-1], len(groups))
    found = _stored(text, records[-1], len(groups))
    found.exact, found.match, found.rid = False, "ambiguous", None
    return found


# `exact` is true only when the tokens are exactly what an engine saw or produced for this text, cut where
# the engine itself started or stopped generating (README, "What `exact` means").
_EXACT_MATCHES = frozenset(("trajectory", "prefix"))


def _match_kind(exact: bool, anchored: bool, *, covered: bool, cached_tokens: int, ambiguous: bool = False) -> str:
    """How the text was answered:
    - "trajectory": a stored trajectory's visible text; its own record (prompt + output incl. the stop token);
    - "prefix": covered by a longer cached trajectory up to a generation boundary (a prompt's end or right
      after a generated token): the engine's own tokens for this text, but no stop token, and loss mask /
      logprobs are those of whichever trajectories cover it;
    - "ambiguous": several stored token spellings fit the whole text (a GRPO group where samples spelled the
      same text differently) and nothing said which: the newest one's tokens, not exact (`alternatives`
      counts them; a `rid` or a batch naming the text once per sample picks each exactly);
    - "inside_prompt": covered by cached tokens, but the text ends inside another trajectory's prompt where
      no generation started or ended (e.g. an evicted trajectory's text re-covered by a later turn's prompt):
      somebody else's prompt tokenization, not exact;
    - "partial": a cached prefix, then a freshly tokenized tail (`fresh_tokens`);
    - "none": nothing cached; all tokens fresh."""
    if exact:
        return "trajectory"
    if ambiguous:
        return "ambiguous"
    if covered:
        return "prefix" if anchored else "inside_prompt"
    return "partial" if cached_tokens > 0 else "none"


async def _encode_tail(tokenizer, text: str) -> np.ndarray:
    if len(text) < _OFFLOAD_TOKENS:
        return np.asarray(await tokenizer.encode_async(text), dtype=np.int32)
    # Long: tokenize (Rust, GIL released) *and* turn the ids into an array off the event loop.
    return await trio.to_thread.run_sync(
        lambda: np.asarray(tokenizer.raw.encode_batch([text], False)[0].ids, dtype=np.int32))


def _tolist(a: np.ndarray, piece: int = 1 << 16) -> list:
    """`a.tolist()` in pieces: one call on a million elements holds the GIL for tens of ms, which
    (from the worker thread) would stall the event loop just the same."""
    if a.size <= piece:
        return a.tolist()
    out: list = []
    for i in range(0, a.size, piece):
        out.extend(a[i:i + piece].tolist())
    return out


def _fields(f: _Found) -> dict:
    """The answer's fields besides its arrays (the same in the JSON and the safetensors form)."""
    return dict(
        response=f.text,
        token_length=int(f.tokens.size),
        loss_mask_length=int(f.mask.size),
        exact=f.exact,
        match=f.match,
        matched_chars=f.matched_chars,
        text_chars=len(f.text),
        fresh_tokens=f.fresh,
        weight_version=f.versions[-1] if f.versions else None,
        weight_versions=f.versions,
        routed_experts_shape=list(f.experts.shape) if f.experts is not None else None,
        rid=f.rid if f.exact else None,
        alternatives=f.alternatives,
    )


def _trajectory(f: _Found) -> Trajectory:
    experts = None
    if f.experts is not None:
        # SGLang's encoding: base64 of little-endian int32, whatever integer width the cache holds the rows in
        experts = base64.b64encode(np.ascontiguousarray(f.experts, dtype="<i4").tobytes()).decode()
    return Trajectory(
        tokens=_tolist(f.tokens),
        loss_mask=_tolist(f.mask),
        rollout_logp=_tolist(f.logp.astype(np.float64)),
        routed_experts=experts,
        **_fields(f),
    )


def _answer(f: _Found, return_logp: bool) -> retrieve_wire.Answer:
    """The safetensors form's answer: the arrays as they are (int32 ids, uint8 mask, float32 logprobs)."""
    logp = f.logp if return_logp else np.zeros(f.tokens.size, np.float32)
    return retrieve_wire.Answer(retrieve_wire.RetrieveMeta(**_fields(f)), f.tokens, f.mask, logp, f.experts)


def stored_answer(text: str, rec, **store_fields) -> retrieve_wire.Answer:
    """A stored record as a safetensors retrieve of its text answers it, its metadata a StoredMeta with the
    store's own fields (`miles-router store export --format retrieve`)."""
    f = _stored(text, rec)
    return retrieve_wire.Answer(retrieve_wire.StoredMeta(**_fields(f), **store_fields), f.tokens, f.mask, f.logp,
                                f.experts)


async def _lookup_all(runtime, texts: list[str], rids: list[str | None]) -> list[_Found]:
    """A text named several times in one batch (a GRPO group retrieved together) gets each stored spelling
    once, oldest first, besides those named by rid; named once, it is answered as a single text is."""
    count: dict[str, int] = {}
    handed: dict[str, set] = {}
    for t, rid in zip(texts, rids):
        count[t] = count.get(t, 0) + 1
        if rid is not None:
            handed.setdefault(t, set()).add(rid)
    found = []
    for i, (t, rid) in enumerate(zip(texts, rids)):  # the cache itself is only touched here, on the loop
        given = handed.setdefault(t, set()) if rid is None and count[t] > 1 else None
        try:
            f = await _lookup(runtime, t, rid, given)
        except _RidNotFound:
            where = "" if len(texts) == 1 else f"texts[{i}]: "
            raise StageError(404, f"{where}no cached trajectory with rid {rid!r} has this text") from None
        if given is not None and f.exact and f.rid is not None:
            given.add(f.rid)
        found.append(f)
    return found


async def _retrieve_body(runtime, texts: list[str], single: bool, rids: list[str | None] | None = None,
                         return_logp: bool = True) -> bytes:
    found = await _lookup_all(runtime, texts, rids or [None] * len(texts))

    def build() -> bytes:
        trajectories = [_trajectory(f) for f in found]
        if not return_logp:  # miles' `return_logp: false`: the logprobs are zeros
            for t in trajectories:
                t.rollout_logp = [0.0] * t.token_length
        return json_encoder.encode(trajectories[0] if single else RetrieveBatch(trajectories))

    if sum(f.tokens.size for f in found) > _OFFLOAD_TOKENS:
        return await trio.to_thread.run_sync(build)
    return build()


# The safetensors form costs about one copy of its bytes (~1 ms per MB here) plus, for routed experts the cache
# holds wider than needed, one pass to narrow them. Past this many bytes it is built in a worker thread: numpy's
# passes release the GIL there; safetensors' copy does not, so that part still stalls the loop (~1 ms/MB) either way.
_OFFLOAD_BINARY_BYTES = 4 << 20


async def _retrieve_binary(runtime, texts: list[str], single: bool, rids: list[str | None] | None = None,
                           return_logp: bool = True, experts_dtype: str = "narrow") -> bytes:
    found = await _lookup_all(runtime, texts, rids or [None] * len(texts))
    answers = [_answer(f, return_logp) for f in found]

    def build() -> bytes:
        return retrieve_wire.encode(answers, single=single, experts_dtype=experts_dtype)

    size = sum(9 * f.tokens.size + (f.experts.nbytes if f.experts is not None else 0) for f in found)
    if size > _OFFLOAD_BINARY_BYTES:
        return await trio.to_thread.run_sync(build)
    return build()


def _char_aligned_prefix(tokenizer, tokens: np.ndarray, data: bytes) -> int:
    """How many leading `tokens` end on a UTF-8 character boundary of `data` (at the latest)."""
    if tokens.size == 0:
        return 0
    ends = np.cumsum(tokenizer.token_bytes(tokens)[1].astype(np.int64))
    starts = np.append((np.frombuffer(data, np.uint8) & 0xC0) != 0x80, True)
    ok = np.flatnonzero(starts[np.minimum(ends, len(data))])
    return int(ok[-1]) + 1 if ok.size else 0


# Fields whose bad value gets the allowed values appended to the router's wording of the problem.
_CHOICES = {"$.format": FORMATS, "$.routed_experts_dtype": EXPERTS_DTYPES}


def _invalid_body(e: msgspec.ValidationError, body: bytes) -> str:
    msg = f"invalid /retrieve_from_text body: {decode_error_text(e, body)}"
    choices = _CHOICES.get(validation_problem(e)[0])
    if choices:
        msg += " (allowed: " + ", ".join(f'"{c}"' for c in choices) + ")"
    return msg


def _binary(req, scope) -> bool:
    """The safetensors form: `"format": "safetensors"`, or no `format` and an Accept header preferring it."""
    if req.format is not None:
        return req.format == "safetensors"
    accept = b",".join(v for k, v in scope["headers"] if k == b"accept")
    return retrieve_wire.wants_binary(accept)


def _retrieve_handler(runtime):
    async def handler(scope, body: bytes) -> Reply:
        try:
            req = retrieve_request_decoder.decode(body)
        except msgspec.ValidationError as e:
            raise StageError(400, _invalid_body(e, body)) from None
        except DECODE_ERRORS as e:
            raise StageError(400, f"invalid JSON body: {decode_error_text(e, body)}") from None
        if (req.text is None) == (req.texts is None):
            raise StageError(400, 'send exactly one of {"text": "..."} or {"texts": ["...", ...]}')
        if req.text is not None:
            if req.rids is not None:
                raise StageError(400, '"rids" goes with "texts"; use "rid" with "text"')
            texts, rids, single = [req.text], [req.rid], True
        else:
            if req.rid is not None:
                raise StageError(400, '"rid" goes with "text"; use "rids" (one per text) with "texts"')
            if req.rids is not None and len(req.rids) != len(req.texts):
                raise StageError(400, f'"rids" has {len(req.rids)} entries for {len(req.texts)} texts')
            texts, rids, single = req.texts, req.rids, False
        if _binary(req, scope):
            blob = await _retrieve_binary(runtime, texts, single, rids, req.return_logp, req.routed_experts_dtype)
            return Reply(200, blob, [(b"content-type", retrieve_wire.CONTENT_TYPE)])
        return Reply(200, await _retrieve_body(runtime, texts, single, rids, req.return_logp))

    return handler


def _stats_handler(runtime):
    async def handler(scope, body: bytes) -> Reply:
        tree = runtime.trajectories.tree_if_loaded
        stats = tree.stats() if tree is not None else {}
        c = runtime.config.cache
        stats.update(enabled=runtime.tree_wanted(), budget_bytes=c.budget_bytes, hard_budget_bytes=c.hard_budget_bytes)
        if runtime.trajectories.store is not None:
            stats["store"] = runtime.trajectories.store.stats()
        return Reply(200, json_encoder.encode(stats))

    return handler
