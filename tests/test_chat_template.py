"""The builtin tokenizers' Qwen3-style chat template (router.tokenizer.QWEN3_CHAT_TEMPLATE).

Expected strings are what Qwen3's own template renders for the same messages; the property tests
pin down the prefix stability the session API builds on (see Tokenizer.apply_chat_template).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.tokenizer import Tokenizer, load_tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)


def call(name: str, arguments: str | dict, call_id: str = "call_0") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.fixture(scope="module", params=["builtin:qwen", "builtin:tiny"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return load_tokenizer(request.param)


def test_old_call_form_still_renders_plain_chatml(tok: Tokenizer) -> None:
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template([{"role": "system", "content": "S"}], False) == "<|im_start|>system\nS<|im_end|>\n"


def test_tools_tool_calls_and_grouped_tool_results(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and 東京?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Two cities: two calls.",
            "tool_calls": [call("get_weather", '{"city":"Paris"}'), call("get_weather", {"city": "東京"}, "call_1")],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
    ]
    assert tok.apply_chat_template(messages, tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\nBe brief.\n\n" + TOOLS_HEADER
        + "<|im_start|>user\nWeather in Paris and 東京?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nTwo cities: two calls.\n</think>\n\n"
        # a string argument is written as given; a dict one as JSON (", "/": " separators, no escaping)
        '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )  # fmt: skip


def test_tools_without_system_and_content_before_a_call(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call("get_weather", '{"city": "Paris"}')]},
    ]
    assert tok.apply_chat_template(messages, False, tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\n" + TOOLS_HEADER + "<|im_start|>user\nParis?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nChecking.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    )


def test_thinking_is_dropped_before_the_last_user_query(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "\nR2\n"},
        {"role": "assistant", "content": "A3"},  # after the last query, not last, no reasoning: no block
        {"role": "assistant", "content": "<think>\nR4\n</think>\n\nA4"},  # reasoning inline in content
    ]
    assert tok.apply_chat_template(messages, False) == (
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\nR2\n</think>\n\nA2<|im_end|>\n"
        "<|im_start|>assistant\nA3<|im_end|>\n<|im_start|>assistant\n<think>\nR4\n</think>\n\nA4<|im_end|>\n"
    )


def test_wrapped_tool_response_user_message_is_not_a_query(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "reasoning_content": "R"},
        {"role": "user", "content": "<tool_response>\nx\n</tool_response>"},
    ]
    assert "<think>\nR\n</think>" in tok.apply_chat_template(messages)


def test_enable_thinking_kwarg(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert tok.apply_chat_template(messages, enable_thinking=True).endswith("<|im_start|>assistant\n")


def test_content_parts_render_their_text(tok: Tokenizer) -> None:
    parts = [{"type": "text", "text": "Hel"}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "lo"}]
    assert tok.apply_chat_template([{"role": "user", "content": parts}], False) == "<|im_start|>user\nHello<|im_end|>\n"


def test_hf_folder_uses_its_own_template(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    base = load_tokenizer("builtin:tiny")
    base.hf.save_pretrained(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
        "{% if tools %}<{{ tools | length }} tools>{% endif %}{% if add_generation_prompt %}>{% endif %}{{ flavour }}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    own = load_tokenizer(str(folder))
    text = own.apply_chat_template([{"role": "user", "content": "Hi"}], tools=[WEATHER_TOOL], flavour="!")
    assert text == "[user:Hi]<1 tools>>!"


# --- prefix stability --------------------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8", exclude_characters="<>\r"), max_size=12)
arguments = st.dictionaries(st.sampled_from(["city", "n", "正"]), st.one_of(st.integers(), texts), max_size=3)


@st.composite
def assistant_turns(draw: st.DrawFn, reasoning: st.SearchStrategy = texts) -> dict:
    calls = draw(st.lists(st.tuples(st.sampled_from(["get_weather", "search"]), arguments), max_size=2))
    return {
        "role": "assistant",
        "content": draw(st.one_of(st.none(), texts)),
        "reasoning_content": draw(reasoning),
        "tool_calls": [call(n, json.dumps(a, ensure_ascii=False), f"c{i}") for i, (n, a) in enumerate(calls)],
    }


@st.composite
def conversations(draw: st.DrawFn) -> list[dict]:
    messages: list[dict] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(texts)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(texts)})
        messages.append(draw(assistant_turns()))
        for _ in range(draw(st.integers(0, 2))):
            messages.append({"role": "tool", "content": draw(texts)})
            messages.append(draw(assistant_turns()))
    return messages


tool_results = st.lists(st.builds(lambda c: {"role": "tool", "content": c}, texts), min_size=1, max_size=3)
appended = st.one_of(
    tool_results,
    st.builds(lambda c: [{"role": "user", "content": c}], texts),
    st.builds(lambda r, c: r + [{"role": "user", "content": c}], tool_results, texts),
)


@settings(max_examples=60, deadline=None)
@given(conversations(), assistant_turns(reasoning=texts.filter(lambda r: r.strip("\n") != "")), tool_results,
       st.booleans(), st.booleans())  # fmt: skip
def test_tool_results_after_a_thinking_turn_are_prefix_stable(
    history: list[dict], last: dict, results: list[dict], with_tools: bool, thinking: bool
) -> None:
    qwen = load_tokenizer("builtin:qwen")
    kwargs = {"tools": [WEATHER_TOOL] if with_tools else None, "enable_thinking": thinking}
    before = qwen.apply_chat_template(history + [last], False, **kwargs)
    after = qwen.apply_chat_template(history + [last] + results, True, **kwargs)
    assert before.endswith("<|im_end|>\n")
    assert after.startswith(before)
    # the junction: `before` minus the "\n" after <|im_end|> (never generated) + what render_appended gives
    suffix = qwen.render_appended(results, **kwargs)
    assert after == before[:-1] + suffix
    # and token-exact: tokenization never merges across <|im_end|> (an added token), so the stored
    # tokens through <|im_end|> + the appended text's own tokens are the fresh render's tokens
    assert qwen.encode(after) == qwen.encode(before[:-1]) + qwen.encode(suffix)


@settings(max_examples=60, deadline=None)
@given(conversations(), appended, st.booleans())
def test_render_appended_is_what_a_fresh_render_appends(history: list[dict], new: list[dict], with_tools: bool) -> None:
    qwen = load_tokenizer("builtin:qwen")
    tools = [WEATHER_TOOL] if with_tools else None
    full = qwen.apply_chat_template(history + new, tools=tools)
    suffix = qwen.render_appended(new, tools=tools)
    assert suffix.startswith("\n<|im_start|>user\n") and suffix.endswith("<|im_start|>assistant\n")
    assert full.endswith("<|im_end|>" + suffix)
    # the history's part of the fresh render: the history rendered alone, up to thinking blocks
    # (which a new user query drops from earlier turns) - so compare with thinking removed
    head = full[: len(full) - len(suffix)] + "\n"
    alone = qwen.apply_chat_template(history, False, tools=tools)
    if not any(m["role"] == "user" for m in new) and (history[-1]["reasoning_content"] or "").strip("\n"):
        assert head == alone


def test_render_appended_needs_an_eos_closed_assistant_turn(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    load_tokenizer("builtin:tiny").hf.save_pretrained(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }};{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="does not end an assistant turn with the eos token"):
        load_tokenizer(str(folder)).render_appended([{"role": "user", "content": "x"}])


# --- the Python renderer of the builtin template agrees with the Jinja template --------------------

odd_texts = st.one_of(
    texts, st.sampled_from(["<think>\nr\n</think>\n\nc", "</think>x", "<tool_response>\nx\n</tool_response>", "\n\n"])
)
contents = st.one_of(
    st.none(), odd_texts, st.integers(), st.just({"a": 1}),
    st.lists(st.one_of(st.builds(lambda t: {"type": "text", "text": t}, odd_texts),
                       st.just({"type": "image_url", "image_url": {"url": "u"}}), st.just({"type": "text"}),
                       st.just("bare string part")), max_size=3),
)  # fmt: skip
calls_any = st.lists(
    st.one_of(
        st.builds(lambda n, a: {"id": "x", "type": "function", "function": {"name": n, "arguments": a}},
                  st.sampled_from(["f", "get_weather", "名前"]), st.one_of(st.just('{"a": 1}'), arguments)),
        st.builds(lambda n, a: {"name": n, "arguments": a}, st.just("bare"), arguments),  # no "function" wrapper
        st.just({"function": {"name": "f"}}), st.just({"function": {"name": 3, "arguments": {}}}), st.just("x"),
    ),
    max_size=2,
) | st.none() | st.just({"not": "a list"})  # fmt: skip
any_message = st.builds(
    lambda role, content, reasoning, calls: {k: v for k, v in (("role", role), ("content", content),
        ("reasoning_content", reasoning), ("tool_calls", calls)) if v is not ...},
    st.sampled_from(["system", "user", "assistant", "tool", "developer"]) | st.just(...),
    contents | st.just(...), st.one_of(st.just(...), st.none(), odd_texts, st.just(7)), calls_any | st.just(...),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(any_message, max_size=6), st.booleans(), st.sampled_from([None, [], [WEATHER_TOOL]]),
       st.sampled_from([{}, {"enable_thinking": False}, {"enable_thinking": True}, {"enable_thinking": 0}]))  # fmt: skip
def test_python_renderer_matches_the_jinja_template(messages: list[dict], gen: bool, tools, kwargs: dict) -> None:
    qwen = load_tokenizer("builtin:qwen")
    assert qwen.fast_qwen3_template
    try:
        expected = qwen.hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen, **kwargs)
    except Exception:  # transformers refuses this input (e.g. no messages): nothing to compare with
        return
    assert qwen.apply_chat_template(messages, gen, tools=tools, **kwargs) == expected
