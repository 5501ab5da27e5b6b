"""router.core.chat_output: Qwen3 reasoning and Hermes tool-call parsing of generated text."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.chat_output import AssistantOutput, finish_reason, parse_assistant_output, tool_call_id
from router.tokenizer import load_tokenizer
from router.wire.openai import AssistantMessage, FunctionCall, ToolCall


def calls_of(out: AssistantOutput) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in out.tool_calls]


def test_thinking_content_and_two_calls() -> None:
    text = (
        "<think>\nCheck both 城市.\n</think>\n\nLet me look.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city":  "Paris", "unit": "\\u00b0C"}}\n</tool_call>\n'
        '<tool_call>\n{"arguments": {"q": [1, 2]}, "name": "search"}\n</tool_call>'
    )
    out = parse_assistant_output(text, id_seed="sess-1/turn-3")
    assert out.reasoning_content == "Check both 城市."
    assert out.content == "Let me look."
    # arguments are the model's own text: spacing, key order and escapes kept
    assert calls_of(out) == [("get_weather", '{"city":  "Paris", "unit": "\\u00b0C"}'), ("search", '{"q": [1, 2]}')]
    assert [c.index for c in out.tool_calls] == [0, 1]
    assert [c.id for c in out.tool_calls] == [tool_call_id("sess-1/turn-3", 0), tool_call_id("sess-1/turn-3", 1)]
    assert all(c.type == "function" for c in out.tool_calls)


def test_ids_are_deterministic_and_distinct() -> None:
    assert tool_call_id("a", 0) == tool_call_id("a", 0)
    ids = {tool_call_id(seed, i) for seed in ("a", "b", "") for i in range(3)}
    assert len(ids) == 9
    assert all(i.startswith("call_") and len(i) == 29 for i in ids)


def test_reply_starting_inside_thinking() -> None:
    out = parse_assistant_output("still thinking\n</think>\n\nThe answer is 42.")
    assert (out.reasoning_content, out.content, out.tool_calls) == ("still thinking", "The answer is 42.", [])


def test_unclosed_thinking_is_all_reasoning() -> None:
    out = parse_assistant_output("<think>\nlong thoughts, cut by max_new_tokens")
    assert (out.reasoning_content, out.content) == ("long thoughts, cut by max_new_tokens", None)


def test_empty_think_block_and_plain_text() -> None:
    assert parse_assistant_output("<think>\n\n</think>\n\nHi").reasoning_content is None
    out = parse_assistant_output("Just text, a < b > c.\n")
    assert (out.reasoning_content, out.content, out.tool_calls) == (None, "Just text, a < b > c.", [])
    assert parse_assistant_output("").content is None


def test_think_tag_not_at_start_is_content() -> None:
    out = parse_assistant_output("I like the <think> tag")
    assert (out.reasoning_content, out.content) == (None, "I like the <think> tag")


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',  # unbalanced
        '<tool_call>\n["f", {}]\n</tool_call>',
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": "not an object"}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {}} trailing\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {},}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}}',  # cut off before the closing tag
        "<tool_call>\n" + "[" * 5000 + "\n</tool_call>",
    ],
)
def test_malformed_blocks_stay_in_content(block: str) -> None:
    good = '<tool_call>\n{"name": "ok", "arguments": {}}\n</tool_call>'
    out = parse_assistant_output("Before.\n" + block + "\n" + good)
    assert out.content == "Before.\n" + block
    assert calls_of(out) == [("ok", "{}")] and out.tool_calls[0].index == 0


def test_arguments_forms() -> None:
    as_string = parse_assistant_output('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>')
    assert calls_of(as_string) == [("f", '{"a": 1}')] and as_string.content is None
    missing = parse_assistant_output('<tool_call>{"name": "f"}</tool_call>')
    assert calls_of(missing) == [("f", "{}")]


def test_tools_disabled_keeps_blocks_as_content() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    out = parse_assistant_output(text, tools_enabled=False)
    assert (out.content, out.tool_calls) == (text, [])


def test_finish_reason() -> None:
    assert finish_reason("stop", False) == "stop"
    assert finish_reason("stop", True) == "tool_calls"
    assert finish_reason("length", True) == "length"
    assert finish_reason("length", False) == "length"
    with pytest.raises(ValueError, match="'abort' is not a finished chat turn"):
        finish_reason("abort", False)


def test_wire_shapes() -> None:
    call = ToolCall(id="call_x", index=0, function=FunctionCall(name="f", arguments="{}"))
    message = AssistantMessage(content=None, tool_calls=[call])
    assert json.loads(msgspec.json.encode(message)) == {
        "role": "assistant",
        "content": None,
        "reasoning_content": None,
        "tool_calls": [{"id": "call_x", "index": 0, "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    assert msgspec.json.decode(msgspec.json.encode(message), type=AssistantMessage) == message
    out = parse_assistant_output('<tool_call>{"name": "f", "arguments": {}}</tool_call>', id_seed="s")
    assert out.to_message() == AssistantMessage(content=None, tool_calls=[ToolCall(
        id=tool_call_id("s", 0), index=0, function=FunctionCall(name="f", arguments="{}"))])  # fmt: skip
    assert parse_assistant_output("hi").to_message() == AssistantMessage(content="hi")


# --- round trip through the builtin chat template ------------------------------------------------

# Message text: any characters (multi-byte included) but the tag opener; "\n" runs at the ends
# are template separators, so generated values carry none there.
plain = st.text(st.characters(codec="utf-8", exclude_characters="<"), max_size=20).map(lambda s: s.strip("\n"))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
argument_texts = st.builds(
    lambda obj, ascii_only, compact: json.dumps(
        obj, ensure_ascii=ascii_only, separators=(",", ":") if compact else None
    ),
    st.dictionaries(st.text(max_size=6), json_values, max_size=4), st.booleans(), st.booleans(),
)  # fmt: skip
# the template writes the name unescaped into JSON: no quote, backslash or control character
names = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"), exclude_characters='"\\<'), min_size=1, max_size=12
)


@settings(max_examples=300, deadline=None)
@given(plain, plain, st.lists(st.tuples(names, argument_texts), max_size=3), st.text(max_size=6))
def test_render_then_parse_round_trip(content: str, reasoning: str, calls: list[tuple[str, str]], seed: str) -> None:
    qwen = load_tokenizer("builtin:qwen")
    message = {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": [{"id": "x", "type": "function", "function": {"name": n, "arguments": a}} for n, a in calls],
    }
    rendered = qwen.apply_chat_template([{"role": "user", "content": "q"}, message], False)
    head = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert rendered.startswith(head) and rendered.endswith("<|im_end|>\n")
    generated = rendered[len(head) : -len("<|im_end|>\n")]  # what the model wrote before its stop token
    out = parse_assistant_output(generated, id_seed=seed)
    assert out.content == (content or None)
    assert out.reasoning_content == (reasoning or None)
    assert calls_of(out) == calls
    assert [(c.id, c.index) for c in out.tool_calls] == [(tool_call_id(seed, i), i) for i in range(len(calls))]
    # and the parsed message renders back to the same text
    again = {**message, "content": out.content, "reasoning_content": out.reasoning_content,
             "tool_calls": [msgspec.to_builtins(c) for c in out.tool_calls]}  # fmt: skip
    assert qwen.apply_chat_template([{"role": "user", "content": "q"}, again], False) == rendered


tag_soup = st.lists(
    st.sampled_from(["<think>", "</think>", "<tool_call>", "</tool_call>", "\n", '{"name": "f", "arguments": {}}',
                     '{"name": ', "{", "}", '"', "\\", "x", "é", "🙂"]) | st.text(max_size=4),
    max_size=30,
).map("".join)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(tag_soup, st.booleans())
def test_parse_never_raises_and_loses_nothing_but_markup(text: str, tools_enabled: bool) -> None:
    out = parse_assistant_output(text, tools_enabled=tools_enabled)
    assert out.content is None or out.content
    for i, call in enumerate(out.tool_calls):
        assert call.index == i and isinstance(json.loads(call.function.arguments), dict)
        assert call.function.arguments in text
    if not tools_enabled:
        assert out.tool_calls == []
