"""`tito_session_mismatch`: where a session's stored tokens differ from a fresh render of its messages.

miles reports this list in `GET /sessions/{id}` and in the samples' metadata (its `TokenSeqComparator`):
both sequences are cut into segments at special tokens (each special token its own segment, the runs
between them content segments); trailing tokens of a given set (Qwen3: the `\\n` after `<|im_end|>`) are
dropped from both first. A different segment count or special/content pattern is one
`special_token_count` mismatch; otherwise each differing special token is `special_token_type` and each
content segment whose text differs is `assistant_text` (it follows an `<|im_start|>assistant` opener:
expected, the model's own tokens) or `non_assistant_text` (a bug in token-in/token-out).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence


def _segments(ids: Sequence[int], special: Collection[int]) -> list[tuple[bool, list[int]]]:
    out: list[tuple[bool, list[int]]] = []
    run: list[int] = []
    for t in ids:
        if t in special:
            if run:
                out.append((False, run))
                run = []
            out.append((True, [t]))
        else:
            run.append(t)
    if run:
        out.append((False, run))
    return out


def _trim(ids: list[int], trailing: Collection[int]) -> list[int]:
    end = len(ids)
    while end and ids[end - 1] in trailing:
        end -= 1
    return ids[:end]


def compare(expected: list[int], actual: list[int], *, special: Collection[int], decode: Callable[[list[int]], str],
            assistant_start: str | None, trailing: Collection[int] = ()) -> list[dict]:
    """miles' mismatch list of `actual` (the stored tokens) against `expected` (a fresh render)."""
    exp = _segments(_trim(expected, trailing), special)
    act = _segments(_trim(actual, trailing), special)

    def shape(segs) -> str:
        return " ".join(f"[{decode(ids)}]" if sp else f"({len(ids)} tokens)" for sp, ids in segs)

    detail = None
    if len(exp) != len(act):
        detail = f"segment count differs: expected {len(exp)}, got {len(act)}"
    elif [sp for sp, _ in exp] != [sp for sp, _ in act]:
        detail = "segment structure (special/content pattern) differs"
    if detail is not None:
        return [{"type": "special_token_count", "segment_index": -1, "expected_text": shape(exp),
                 "actual_text": shape(act), "detail": detail}]

    def is_assistant(segs, i: int) -> bool:
        if assistant_start is None or i == 0 or segs[i][0] or not segs[i - 1][0]:
            return False
        return (decode(segs[i - 1][1]) + decode(segs[i][1][:20])).startswith(assistant_start)

    out = []
    for i, ((special_e, ids_e), (_, ids_a)) in enumerate(zip(exp, act)):
        if special_e:
            if ids_e != ids_a:
                out.append({"type": "special_token_type", "segment_index": i, "expected_text": decode(ids_e),
                            "actual_text": decode(ids_a), "detail": ""})
            continue
        text_e, text_a = decode(ids_e), decode(ids_a)
        if text_e != text_a:
            kind = "assistant_text" if is_assistant(exp, i) and is_assistant(act, i) else "non_assistant_text"
            out.append({"type": kind, "segment_index": i, "expected_text": text_e, "actual_text": text_a,
                        "detail": ""})
    return out
