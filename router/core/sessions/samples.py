"""Training samples from a session tree: one per kept leaf, each completion trained once.

- A leaf is dropped when a sibling's request started after the leaf was committed: the agent
  retried that turn. Siblings whose requests overlapped (concurrent requests) are all kept, and so
  is a line abandoned by a divergence higher up (its leaf has no later sibling).
- Kept leaves are ordered by commit; a turn's output is trained (loss mask 1) only in the first
  kept leaf whose path holds it, and masked (0) in the others.
- Prompt tokens (system, user, tool messages, the template's scaffolding) have loss mask 0 and
  logprob 0. Output tokens have the worker's logprobs.
- `max_seq_len` cuts at turn level: turns that fit are kept whole, the turn that crosses the limit
  is cut at it (status TRUNCATED) and later turns are dropped.
- Routed experts: each turn holds the rows of its own new positions, so the path's rows concatenate
  to `[len(tokens) - 1, layers, top_k]`; a path where any turn lacks them has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from router.core.sessions.tree import SessionTree, Turn

SERVER_METADATA_KEYS = ("leaf",)
STATUS = {"stop": "COMPLETED", "tool_calls": "COMPLETED", "length": "TRUNCATED", "abort": "ABORTED"}


class SampleError(Exception):
    """The tree cannot be assembled into samples (a broken invariant): 422."""


@dataclass(slots=True)
class Sample:
    tokens: np.ndarray  # int64
    loss_mask: np.ndarray  # uint8
    rollout_log_probs: np.ndarray  # float64
    routed_experts: np.ndarray | None  # int32 [len(tokens)-1, layers, top_k]
    prompt_length: int
    status: str
    weight_versions: list[list[dict[str, Any]]]  # per turn, miles' spans {version, abs_start, abs_end}
    leaf: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def response_length(self) -> int:
        return len(self.tokens) - self.prompt_length


def kept_leaves(tree: SessionTree) -> list[Turn]:
    """Leaves that no later request retried, in commit order."""
    kept = []
    for leaf in tree.leaves():
        siblings = tree.children.get(leaf.parent, ())
        if any(tree.turns[s].request_seq > leaf.seq for s in siblings if s != leaf.id):
            continue
        kept.append(leaf)
    kept.sort(key=lambda t: t.seq)
    return kept


def assemble(tree: SessionTree, max_seq_len: int | None = None) -> tuple[list[Sample], str | None]:
    """(samples, empty_reason): "no_records" for a session without turns, "all_truncated" when
    `max_seq_len` left no sample with a generated token."""
    if not tree.turns:
        return [], "no_records"
    if max_seq_len is not None and max_seq_len < 1:
        raise SampleError(f"max_seq_len must be >= 1, got {max_seq_len}")
    owner: dict[int, int] = {}  # turn id -> the leaf that trains its output
    samples = []
    for leaf in kept_leaves(tree):
        path = tree.path(leaf.id)
        for t in path:
            owner.setdefault(t.id, leaf.id)
        sample = _sample(path, leaf, owner, max_seq_len)
        if sample.response_length > 0:
            samples.append(sample)
    if not samples:
        return [], "all_truncated"
    return samples, None


def _sample(path: list[Turn], leaf: Turn, owner: dict[int, int], max_seq_len: int | None) -> Sample:
    tokens, mask, logps, rows = [], [], [], []
    have_rows = True
    total = 0
    status = STATUS.get(leaf.finish_reason, "COMPLETED")
    versions = []
    cut = False
    for t in path:
        if max_seq_len is not None and total >= max_seq_len:
            status, cut = "TRUNCATED", True
            break
        p, o = len(t.prompt_ids), len(t.output_ids)
        trained = owner[t.id] == leaf.id
        seg_tokens = np.concatenate([t.prompt_ids, t.output_ids]).astype(np.int64)
        seg_mask = np.zeros(p + o, np.uint8)
        if trained:
            seg_mask[p:] = 1
        seg_logps = np.zeros(p + o, np.float64)
        seg_logps[p:] = t.output_logprobs
        if t.routed_experts is None:
            have_rows = False
        else:
            expected = t.end - 1 - max(t.start - 1, 0)
            if len(t.routed_experts) != expected:
                raise SampleError(f"turn {t.id}: {len(t.routed_experts)} routed-experts rows for positions "
                                  f"[{max(t.start - 1, 0)}, {t.end - 1}), expected {expected}")
            rows.append(t.routed_experts)
        out_start = total + p
        versions.append([] if t.weight_version is None else
                        [{"version": t.weight_version, "abs_start": out_start, "abs_end": out_start + o}])
        if max_seq_len is not None and total + p + o > max_seq_len:
            keep = max_seq_len - total
            seg_tokens, seg_mask, seg_logps = seg_tokens[:keep], seg_mask[:keep], seg_logps[:keep]
            status, cut = "TRUNCATED", True
            for span in versions[-1]:
                span["abs_end"] = max(min(span["abs_end"], max_seq_len), span["abs_start"])
        tokens.append(seg_tokens)
        mask.append(seg_mask)
        logps.append(seg_logps)
        total += len(seg_tokens)
        if cut:
            break
        if t is not leaf and not t.extendable:
            raise SampleError(f"turn {t.id} ended by {t.finish_reason} yet has children")
    all_tokens = np.concatenate(tokens)
    experts = None
    if have_rows and rows:
        experts = np.concatenate(rows)[: max(len(all_tokens) - 1, 0)]
    return Sample(
        tokens=all_tokens,
        loss_mask=np.concatenate(mask),
        rollout_log_probs=np.concatenate(logps),
        routed_experts=experts,
        prompt_length=min(len(path[0].prompt_ids), len(all_tokens)),
        status=status,
        weight_versions=versions,
        leaf={"node_id": leaf.id, "parent": leaf.parent, "path_node_ids": [t.id for t in path],
              "response_id": leaf.response_id},
    )


def sample_meta(sample: Sample, decode: Callable[[np.ndarray], str], agent_metadata: dict[str, Any] | None) -> dict:
    """The `_samples_meta` entry of one sample (miles' wire format)."""
    metadata = {k: v for k, v in (agent_metadata or {}).items() if k not in SERVER_METADATA_KEYS}
    metadata["leaf"] = sample.leaf
    return {
        "response": decode(sample.tokens[sample.prompt_length:]),
        "response_length": sample.response_length,
        "status": sample.status,
        "weight_versions": sample.weight_versions,
        "metadata": metadata,
        "reward": (agent_metadata or {}).get("reward"),
    }
