"""Chat-model replies for the simulated worker (pure; used by `SimModel.complete`).

A prompt that is a ChatML conversation awaiting an assistant turn (it ends with
``<|im_start|>assistant\\n``, possibly followed by an opened ``<think>\\n`` or by the empty
``<think>\\n\\n</think>\\n\\n`` that ``enable_thinking=False`` pre-fills) gets a reply shaped like
Qwen3's, in the format router/wire/qwen3.py spells and the builtin template renders:

    [<think>\\n]{reasoning}\\n</think>\\n\\n   sometimes; always when the prompt opened <think>,
                                             never when it pre-filled an empty block
    {content}                                 always without tool calls, sometimes with them
    \\n<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>   0-2 blocks, only when
                                             the prompt's system turn lists <tools>

followed by the eos token (``<|im_end|>``). Every choice is a function of the generation key,
so a reply is deterministic per (worker seed, prompt, sampling seed, sample index). Tool calls
name tools from the prompt's ``<tools>`` section and fill their declared parameters with values
of the declared types (valid JSON, multi-byte strings included).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from router.tokenizer import Tokenizer
from router.wire import qwen3

GENERATION_PROMPT = qwen3.GENERATION_PROMPT.encode()
THINK_OPENED = GENERATION_PROMPT + qwen3.THINK_OPEN.encode() + b"\n"
THINK_DISABLED = GENERATION_PROMPT + qwen3.EMPTY_THINK.encode()
_TAIL_TOKENS = 32  # enough for the longest marker above even in the byte-level tiny tokenizer
_HEAD_TOKENS = 8192  # the <tools> section sits in the first (system) turn
_TOOLS_OPEN, _TOOLS_CLOSE = b"<tools>\n", b"\n</tools>"

_VALUES = ("Paris", "東京", "Zürich", "São Paulo", "cafés", "数据", "rollout 🚀", "señor", "42 apples", "naïve")


def chat_mode(tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> str | None:
    """"open" (reply starts a turn), "thinking" (the prompt opened <think>), "no_thinking"
    (the prompt pre-filled an empty think block) or None (not a chat awaiting an assistant turn)."""
    try:
        tail = tokenizer.text_bytes(list(prompt_ids[-_TAIL_TOKENS:]))
    except ValueError:  # ids past the vocabulary (the simulator accepts any id): not text at all
        return None
    if tail.endswith(THINK_DISABLED):
        return "no_thinking"
    if tail.endswith(THINK_OPENED):
        return "thinking"
    if tail.endswith(GENERATION_PROMPT):
        return "open"
    return None


def prompt_tools(tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> list[tuple[str, dict[str, Any]]]:
    """(name, JSON-schema properties) of each tool in the prompt's rendered <tools> section."""
    try:
        head = tokenizer.text_bytes(list(prompt_ids[:_HEAD_TOKENS]))
    except ValueError:
        return []
    start = head.find(_TOOLS_OPEN)
    end = head.find(_TOOLS_CLOSE, start + 1)
    if start == -1 or end == -1:
        return []
    tools = []
    for line in head[start + len(_TOOLS_OPEN) : end].split(b"\n"):
        try:
            spec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(spec, dict):
            continue
        fn = spec.get("function", spec)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        tools.append((fn["name"], props if isinstance(props, dict) else {}))
    return tools


class Draw:
    """Deterministic choices from a key: `Draw(key)(salt)` is a uniform 64-bit integer."""

    def __init__(self, key: int) -> None:
        self.key = key

    def __call__(self, *salt: int) -> int:
        data = b"".join((x & ((1 << 64) - 1)).to_bytes(8, "little") for x in (self.key, *salt))
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

    def chance(self, p: float, *salt: int) -> bool:
        return self(*salt) % 10_000 < p * 10_000


def _value(schema: Any, draw: Draw, salt: int) -> Any:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(schema, dict) and isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][draw(salt) % len(schema["enum"])]
    if kind == "integer":
        return draw(salt) % 1000
    if kind == "number":
        return (draw(salt) % 100_000) / 100
    if kind == "boolean":
        return bool(draw(salt) & 1)
    if kind == "array":
        return [_value(schema.get("items"), draw, salt * 31 + i) for i in range(draw(salt) % 3)]
    return _VALUES[draw(salt) % len(_VALUES)]


def tool_call_text(name: str, props: dict[str, Any], draw: Draw, salt: int) -> str:
    """One Hermes block's JSON body, arguments filled per the declared parameters."""
    if props:
        args = {p: _value(s, draw, salt * 1009 + i) for i, (p, s) in enumerate(props.items())}
    else:
        args = {"query": _VALUES[draw(salt) % len(_VALUES)]}
    return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)


class ChatPlan:
    """The structural choices of one reply; the text of reasoning/content comes from pieces."""

    def __init__(self, mode: str, tools: list[tuple[str, dict[str, Any]]], key: int) -> None:
        draw = Draw(key)
        self.think = mode == "thinking" or (mode == "open" and draw.chance(0.5, 1))
        self.think_opened = mode == "thinking"  # the prompt wrote "<think>\n" already
        calls = 0
        if tools and draw.chance(0.55, 2):
            calls = 1 + int(draw.chance(0.3, 3))
        self.calls = [
            tool_call_text(*tools[draw(4, i) % len(tools)], draw, 5 + i) for i in range(calls)
        ]
        self.has_content = not calls or draw.chance(0.5, 6)

    def think_prefix(self) -> str:
        return "" if self.think_opened else qwen3.THINK_OPEN + "\n"

    @staticmethod
    def think_suffix() -> str:
        return "\n" + qwen3.THINK_CLOSE + "\n\n"

    def calls_text(self, has_content: bool) -> str:
        """The tool-call blocks, each preceded by "\\n" except a first one without content."""
        parts = []
        for i, body in enumerate(self.calls):
            sep = "\n" if has_content or i else ""
            parts.append(f"{sep}{qwen3.TOOL_CALL_OPEN}\n{body}\n{qwen3.TOOL_CALL_CLOSE}")
        return "".join(parts)
