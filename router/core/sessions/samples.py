"""Training samples from a session tree, assembled exactly as miles' session server does (pure logic).

The rules are miles main's (shared/miles_samples/README.md, the authoritative contract; `merge.py`,
`sample_utils.py`, `v2/utils.py`, `drop_retries.py`, `default_postprocess.py` there):

1. Per turn of a path, a *turn sample*: tokens = the prompt the worker received + the sampled ids,
   response = the sampled ids decoded (special tokens kept), loss mask all 1, the worker's logprobs,
   status by finish reason (`completed` for stop/tool_calls, `truncated` for length, `aborted` for
   abort, else `pending`), weight version, prefix-cache counts, `metadata.lifecycle` (and, with debug
   data on, the last turn's `metadata.messages`).
2. `max_seq_len` cuts at turn level: turns that fit stay whole, the first turn past it loses its last
   output tokens (`truncated`; if nothing of its output fits it is dropped) and later turns go.
3. Merge in order: tokens of the later turn, the tokens between two outputs (tool results, the next
   user turn, template text) get loss mask 0 and logprob 0.0, and the merge stops after the first turn
   that is not `completed`, or before a turn that lacks routed experts the earlier ones had.
   Routed experts are the last merged turn's rows `[len(tokens)-1, layers, top_k]`; with incremental R3
   (`routed_experts_start_len`) the turns' patches must tile the rows exactly, else 422.
4. v1 ("linear"): one sample, from the active path (root .. the node the last request attached to or
   committed). v2 ("tree"): one per leaf; the `drop_retries` picker drops a leaf that has a later
   sibling (a retry superseded it) and orders the rest by path length then node id, both descending;
   the postprocessor lays the agent's metadata under the server's keys, gives every sample the agent's
   `reward`, and trains each completion in one sample only (the kept leaf with the smallest id).

A turn here is router/core/sessions/tree.py's `Turn`; it stores only its own new tokens (and routed
experts rows), so a path's sequence is their concatenation. What needs the tokenizer or the chat
template (decoding, the tito mismatch re-render, debug messages) comes in as callables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from router.core.errors import Unprocessable
from router.core.sessions.tree import SessionTree, Turn

Variant = Literal["v1", "v2"]
SERVER_OWNED_KEYS = ("accumulated_token_ids", "tito_session_mismatch", "leaf")
_STATUS = {"stop": "completed", "tool_calls": "completed", "length": "truncated", "abort": "aborted"}


class SampleError(Unprocessable):
    """The session cannot be assembled into samples (miles' AssertionError/ValueError): 422."""


@dataclass(slots=True)
class Sample:
    """The fields of miles' `Sample` that cross the samples wire."""

    tokens: np.ndarray  # int64
    response: str
    response_length: int
    loss_mask: np.ndarray  # uint8, response only
    rollout_log_probs: np.ndarray  # float64, response only
    rollout_routed_experts: np.ndarray | None  # int32 [len(tokens)-1, layers, top_k]
    status: str
    weight_versions: list[Any]
    prefix_cache_info: dict[str, int]
    metadata: dict[str, Any] = field(default_factory=dict)
    reward: Any = None
    rollout_indexer_topk: None = None  # indexer replay is not captured (README: differences)
    # assembly bookkeeping, never on the wire
    has_rows: bool = False  # the turn (the merged sample's last turn) carried routed experts (full R3)
    turn_index: int = 0  # the turn's position in its path (the merged sample's last turn)

    def strip_last_output_tokens(self, n: int, decode: Callable[[np.ndarray], str]) -> None:
        if n <= 0:
            return
        self.tokens = self.tokens[:-n]
        self.response_length -= n
        self.rollout_log_probs = self.rollout_log_probs[:-n]
        self.loss_mask = self.loss_mask[:-n]
        self.response = decode(self.tokens[-self.response_length:]) if self.response_length > 0 else ""


@dataclass(frozen=True, slots=True)
class Assembly:
    """What the samples of a session depend on besides its tree."""

    variant: Variant = "v2"
    addition_r3: bool = False  # turns asked for their new routed-experts rows only (routed_experts_start_len)
    decode: Callable[[np.ndarray], str] = lambda ids: ""  # ids -> text, special tokens kept
    # path of turns -> miles' `tito_session_mismatch` list, or None when it cannot be computed
    mismatch: Callable[[list[Turn]], list | None] = lambda path: None
    # the last turn of a path -> its request's messages + the reply message (`metadata.messages`), or None
    debug_messages: Callable[[list[Turn]], list | None] | None = None


@dataclass(slots=True)
class Collected:
    samples: list[Sample]
    session_metadata: dict[str, Any]
    empty_reason: str | None


# ---- the session as miles describes it -------------------------------------------------------------

def completion_span(turn: Turn) -> list[int]:
    """[start, end) of the turn's sampled tokens in its path's sequence."""
    return [turn.end - len(turn.output_ids), turn.end]


def tree_metadata(tree: SessionTree) -> dict[str, Any]:
    """miles v2's `tree` block: one node per commit (its id is the commit index) and the leaves."""
    nodes = [{"id": t.id, "parent": t.parent if t.parent >= 0 else None, "seq": t.id,
              "truncated": t.finish_reason == "length", "committed_at": t.record.timestamp,
              "completion_span": completion_span(t), "num_tokens": t.end, "response_id": t.response_id}
             for t in tree.turns]
    leaves = [{"node_id": t.id, "path_node_ids": [p.id for p in tree.path(t.id)]} for t in tree.leaves()]
    return {"nodes": nodes, "leaves": leaves}


def session_metadata(tree: SessionTree, active: int, variant: Variant, asm: Assembly) -> dict[str, Any]:
    """`GET /sessions/{id}`'s `metadata` (and the samples' `session_metadata`): the active path's view."""
    out: dict[str, Any] = {}
    path = tree.path(active)
    if path:
        mismatch = asm.mismatch(path)
        if mismatch is not None:
            out["tito_session_mismatch"] = mismatch
    out["accumulated_token_ids"] = tree.path_tokens(active).tolist() if path else []
    out["max_trim_tokens"] = 0
    if variant == "v2":
        out["tree"] = tree_metadata(tree)
    return out


# ---- per turn, cut, merge ------------------------------------------------------------------------------

def _lifecycle(turn: Turn, prev: Turn | None, index: int) -> dict[str, Any]:
    rec = turn.record
    t1 = rec.timestamp
    seg: dict[str, Any] = {"t0": t1 - rec.e2e_latency if rec.e2e_latency is not None else None, "t1": t1,
                           "turn": index + 1}
    if rec.request_timestamp is not None:
        seg["req_ts"] = rec.request_timestamp
    if prev is not None:
        seg["prev_t1"] = prev.record.timestamp
    return seg


def _rows_through(path: list[Turn], k: int) -> np.ndarray | None:
    """Routed-experts rows for positions [0, end-1) of path[k]. Full R3: miles takes the last merged turn's
    own payload; each turn here keeps only the rows of its new positions (the worker returns the same rows
    for cached positions), so it is their concatenation, and unknown if an earlier turn has none."""
    parts = [t.routed_experts for t in path[:k + 1]]
    if any(p is None for p in parts):
        return None
    for t in path[:k + 1]:
        if t.r3_start + len(t.routed_experts) != t.end - 1:
            raise SampleError(f"turn {t.id}: {len(t.routed_experts)} routed-experts rows from position {t.r3_start}, "
                              f"expected {t.end - 1 - t.r3_start}")
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def turn_samples(path: list[Turn], asm: Assembly) -> list[Sample]:
    for t in path:
        if t.r3_error is not None:  # miles decodes every record's payload: a bad one fails the whole op
            raise SampleError(f"turn {t.id}: {t.r3_error}")
    out = []
    tokens = np.zeros(0, np.int64)
    for i, t in enumerate(path):
        tokens = np.concatenate([tokens, t.prompt_ids, t.output_ids]).astype(np.int64, copy=False)
        n = len(t.output_ids)
        rec = t.record
        s = Sample(tokens=tokens, response=asm.decode(t.output_ids), response_length=n,
                   loss_mask=np.ones(n, np.uint8), rollout_log_probs=np.asarray(t.output_logprobs, np.float64),
                   rollout_routed_experts=None, status=_STATUS.get(t.finish_reason, "pending"),
                   weight_versions=[t.weight_version] if t.weight_version is not None else [],
                   prefix_cache_info={"cached_tokens": rec.cached_tokens, "total_prompt_tokens": rec.prompt_tokens},
                   metadata={"lifecycle": _lifecycle(t, path[i - 1] if i else None, i)},
                   has_rows=not asm.addition_r3 and t.routed_experts is not None, turn_index=i)
        if i == len(path) - 1 and asm.debug_messages is not None:
            messages = asm.debug_messages(path)
            if messages is not None:
                s.metadata["messages"] = messages
        out.append(s)
    return out


def truncate(samples: list[Sample], max_seq_len: int, decode: Callable[[np.ndarray], str]) -> list[Sample]:
    """miles' `truncate_samples_by_total_tokens` (turn samples hold cumulative tokens)."""
    out = []
    for s in samples:
        total = len(s.tokens)
        if total <= max_seq_len:
            out.append(s)
            continue
        overshoot = total - max_seq_len
        if s.response_length - overshoot <= 0:
            break
        s = replace(s)
        s.strip_last_output_tokens(overshoot, decode)
        s.status = "truncated"
        out.append(s)
        break
    return out


def _pop_lifecycle(md: dict) -> tuple[dict, list]:
    if "lifecycle" not in md:
        return md, []
    value = md["lifecycle"]
    return {k: v for k, v in md.items() if k != "lifecycle"}, value if isinstance(value, list) else [value]


def _pop_messages(md: dict) -> tuple[dict, Any]:
    if "messages" not in md:
        return md, None
    return {k: v for k, v in md.items() if k != "messages"}, md["messages"]


def _merge_pair(a: Sample, b: Sample, decode: Callable[[np.ndarray], str]) -> Sample:
    obs = len(b.tokens) - len(a.tokens) - b.response_length
    if obs <= 0 or not np.array_equal(b.tokens[:len(a.tokens)], a.tokens):
        raise SampleError(f"turn tokens do not extend the previous turn (observation length {obs})")
    rest_a, life_a = _pop_lifecycle(a.metadata)
    rest_b, life_b = _pop_lifecycle(b.metadata)
    rest_a, msgs_a = _pop_messages(rest_a)
    rest_b, msgs_b = _pop_messages(rest_b)
    metadata = dict(rest_a)
    if life_a or life_b:
        metadata["lifecycle"] = life_a + life_b
    if (messages := msgs_b or msgs_a) is not None:
        metadata["messages"] = messages
    return Sample(
        tokens=b.tokens,
        response=a.response + decode(b.tokens[len(a.tokens):len(a.tokens) + obs]) + b.response,
        response_length=a.response_length + obs + b.response_length,
        loss_mask=np.concatenate([a.loss_mask, np.zeros(obs, np.uint8), b.loss_mask]),
        rollout_log_probs=np.concatenate([a.rollout_log_probs, np.zeros(obs, np.float64), b.rollout_log_probs]),
        rollout_routed_experts=b.rollout_routed_experts,
        status=b.status,
        weight_versions=a.weight_versions + b.weight_versions,
        prefix_cache_info={k: a.prefix_cache_info[k] + b.prefix_cache_info[k] for k in a.prefix_cache_info},
        metadata=metadata,
        has_rows=b.has_rows,
        turn_index=b.turn_index,
    )


def merge(samples: list[Sample], decode: Callable[[np.ndarray], str]) -> Sample:
    """miles' `merge_samples`: stop after a turn that is not completed, or before a replay gap."""
    acc = samples[0]
    for s in samples[1:]:
        if acc.status != "completed":
            break
        if acc.has_rows and not s.has_rows:
            break
        acc = _merge_pair(acc, s, decode)
    return acc


def addition_r3(merged: Sample, path: list[Turn]) -> Sample:
    """miles' `merge_samples_with_addition_r3`: each turn's patch must start where the previous ended and
    they must cover `len(tokens) - 1` rows."""
    if all(t.routed_experts is None for t in path):
        return merged
    required = len(merged.tokens) - 1
    covered = 0
    chunks = []
    for i, t in enumerate(path):
        if chunks and covered >= required:
            break
        if t.routed_experts is None:
            raise SampleError(f"additional R3: record {i} has no routed_experts payload")
        if t.r3_start != covered:
            raise SampleError(f"additional R3: record {i} starts at row {t.r3_start}; expected {covered}")
        end = t.end - 1
        if end < t.r3_start:
            raise SampleError(f"additional R3: record {i} has invalid offsets (start={t.r3_start}, end={end})")
        delta = end - t.r3_start
        if bool(len(t.routed_experts)) != bool(delta):
            raise SampleError(f"additional R3: record {i} payload presence does not match {delta} rows")
        if len(t.routed_experts) != delta:
            raise SampleError(f"additional R3: record {i} carries {len(t.routed_experts)} rows for {delta} positions "
                              f"[{t.r3_start}, {end})")
        if delta or required == 0:
            chunks.append(t.routed_experts)
        covered = end
    if covered < required:
        raise SampleError(f"additional R3 covers {covered} rows but the merged sample needs {required} "
                          f"(len(tokens) - 1)")
    merged.rollout_routed_experts = np.concatenate(chunks)[:required]
    return merged


def path_sample(path: list[Turn], max_seq_len: int | None, asm: Assembly) -> Sample | None:
    """One merged sample of a path, or None when `max_seq_len` leaves no turn."""
    turns = turn_samples(path, asm)
    if max_seq_len is not None:
        turns = truncate(turns, max_seq_len, asm.decode)
    if not turns:
        return None
    merged = merge(turns, asm.decode)
    if asm.addition_r3:
        return addition_r3(merged, path)
    if merged.has_rows:
        rows = _rows_through(path, merged.turn_index)
        merged.rollout_routed_experts = None if rows is None else rows[:len(merged.tokens) - 1]
    return merged


# ---- v2: leaves, picker, postprocessor ---------------------------------------------------------------

def leaf_material(tree: SessionTree, max_seq_len: int | None, asm: Assembly) -> list[Sample]:
    material = []
    for leaf in tree.leaves():
        path = tree.path(leaf.id)
        sample = path_sample(path, max_seq_len, asm)
        if sample is None:
            continue
        flat: dict[str, Any] = {
            "accumulated_token_ids": tree.path_tokens(leaf.id).tolist(),
            "leaf": {"node_id": leaf.id, "parent": leaf.parent if leaf.parent >= 0 else None,
                     "path_node_ids": [t.id for t in path], "response_id": leaf.response_id},
        }
        mismatch = asm.mismatch(path)
        if mismatch is not None:
            flat["tito_session_mismatch"] = mismatch
        sample.metadata = {**sample.metadata, **flat}
        material.append(sample)
    return material


def drop_retries(samples: list[Sample], tree: SessionTree) -> list[Sample]:
    """A leaf with a later sibling (a larger id under the same parent) was superseded by a retry."""
    kept = []
    for s in samples:
        leaf = s.metadata["leaf"]
        parent = leaf["parent"]
        if parent is not None and any(c > leaf["node_id"] for c in tree.children.get(parent, ())):
            continue
        kept.append(s)
    return sorted(kept, key=lambda s: (len(s.metadata["leaf"]["path_node_ids"]), s.metadata["leaf"]["node_id"]),
                  reverse=True)


def postprocess(samples: list[Sample], tree: SessionTree, agent: dict[str, Any] | None) -> list[Sample]:
    """miles' `default_postprocess`: each completion trained in one sample, agent metadata under the
    server's keys, the agent's reward on every sample."""
    agent = agent or {}
    reward = agent.get("reward")
    agent_keys = {k: v for k, v in agent.items() if k not in SERVER_OWNED_KEYS}
    owner: dict[int, int] = {}
    for s in samples:
        leaf = s.metadata["leaf"]
        for nid in leaf["path_node_ids"]:
            owner[nid] = min(leaf["node_id"], owner.get(nid, leaf["node_id"]))
    for s in samples:
        leaf = s.metadata["leaf"]
        response_start = len(s.tokens) - s.response_length
        for nid in leaf["path_node_ids"]:
            if owner[nid] == leaf["node_id"]:
                continue
            start, end = completion_span(tree.turns[nid])
            lo, hi = max(start - response_start, 0), min(end - response_start, s.response_length)
            if hi > lo:
                s.loss_mask = s.loss_mask.copy()
                s.loss_mask[lo:hi] = 0
        server = {k: s.metadata[k] for k in SERVER_OWNED_KEYS if k in s.metadata}
        s.metadata = {**s.metadata, **agent_keys, **server}
        if reward is not None:
            s.reward = reward
    return samples


# ---- the samples op ------------------------------------------------------------------------------------

def collect(tree: SessionTree, active: int, asm: Assembly, *, max_seq_len: int | None = None,
            agent_metadata: dict[str, Any] | None = None) -> Collected:
    """`POST /sessions/{id}/samples`: the samples, `session_metadata` and `empty_reason`."""
    meta = session_metadata(tree, active, asm.variant, asm)
    if asm.variant == "v1":
        path = tree.path(active)
        if not path:
            return Collected([], meta, "no_records")
        sample = path_sample(path, max_seq_len, asm)
        return Collected([sample] if sample is not None else [], meta, None if sample is not None else "all_truncated")
    if agent_metadata is not None:
        meta["agent"] = agent_metadata
    if not tree.turns:
        return Collected([], meta, "no_records")
    material = leaf_material(tree, max_seq_len, asm)
    samples = postprocess(drop_retries(material, tree), tree, agent_metadata)
    return Collected(samples, meta, None if samples else "all_truncated")


def wire_fields(s: Sample, variant: Variant) -> dict[str, Any]:
    """The JSON fields of a sample's `_samples_meta` entry, in miles' encoder order (`nulls` is the encoder's)."""
    out = {"response": s.response, "response_length": s.response_length, "status": s.status,
           "weight_versions": s.weight_versions, "prefix_cache_info": s.prefix_cache_info, "metadata": s.metadata}
    if variant == "v2":
        out["reward"] = s.reward
    return out
