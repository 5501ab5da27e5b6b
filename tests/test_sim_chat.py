"""The simulated worker answering ChatML chat prompts like a chat model (router/sim/chat.py), over sockets."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from router.core.chat_output import parse_assistant_output
from router.tokenizer import load_tokenizer
from tests.harness import client, start_sim

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["C", "F"]}},
    }}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "exact": {"type": "boolean"}},
    }}},
]  # fmt: skip
PROPERTIES = {t["function"]["name"]: set(t["function"]["parameters"]["properties"]) for t in TOOLS}


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer("builtin:qwen")


def prompt(qwen, i: int, tools=TOOLS, **kwargs) -> str:
    return qwen.apply_chat_template([{"role": "user", "content": f"Question {i}: 天気 and news?"}], tools=tools, **kwargs)


async def generate(c, text: str, max_new_tokens: int = 400, **extra) -> dict:
    r = await c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": max_new_tokens}, **extra})
    assert r.status_code == 200, r.text
    return r.json()


async def test_chat_replies_think_call_tools_and_end_with_im_end(nursery, qwen) -> None:
    sim = await start_sim(nursery, tokenizer="builtin:qwen", num_layers=3, top_k=2)
    seen = {"reasoning": 0, "no_reasoning": 0, "calls": 0, "two_calls": 0, "content_only": 0, "calls_and_content": 0}
    async with client(sim.url) as c:
        for i in range(40):
            p = prompt(qwen, i)
            out = await generate(c, p, return_logprob=True, return_routed_experts=True)
            meta, ids = out["meta_info"], out["output_ids"]
            # the stop token is produced (and in output_ids) but its text stripped, as SGLang does
            assert meta["finish_reason"] == {"type": "stop", "matched": qwen.eos_token_id}
            assert ids[-1] == qwen.eos_token_id and "<|im_end|>" not in out["text"]
            assert qwen.decode(ids[:-1]) == out["text"]
            assert [t[1] for t in meta["output_token_logprobs"]] == ids
            assert all(t[0] < 0 for t in meta["output_token_logprobs"])
            rows = np.frombuffer(base64.b64decode(meta["routed_experts"]), "<i4").reshape(-1, 3, 2)
            assert rows.shape[0] == meta["prompt_tokens"] + len(ids) - 1
            parsed = parse_assistant_output(out["text"])
            assert "<think>" not in (parsed.content or "") and "</think>" not in (parsed.content or "")
            assert "<tool_call>" not in (parsed.content or "")  # every block the sim writes is valid
            for call in parsed.tool_calls:
                args = json.loads(call.function.arguments)
                assert set(args) == PROPERTIES[call.function.name]
                if "unit" in args:
                    assert args["unit"] in ("C", "F")
            seen["reasoning" if parsed.reasoning_content else "no_reasoning"] += 1
            seen["calls"] += bool(parsed.tool_calls)
            seen["two_calls"] += len(parsed.tool_calls) == 2
            seen["content_only"] += not parsed.tool_calls and bool(parsed.content)
            seen["calls_and_content"] += bool(parsed.tool_calls) and bool(parsed.content)
            # deterministic: the same prompt gets the same reply
            assert (await generate(c, p, return_logprob=True))["output_ids"] == ids
    assert all(n > 0 for n in seen.values()), seen


async def test_reply_inside_an_opened_think_block(nursery, qwen) -> None:
    sim = await start_sim(nursery, tokenizer="builtin:qwen")
    async with client(sim.url) as c:
        for i in range(8):
            out = await generate(c, prompt(qwen, i) + "<think>\n")
            assert not out["text"].startswith("<think>") and "\n</think>\n\n" in out["text"]
            assert parse_assistant_output(out["text"]).reasoning_content


async def test_enable_thinking_false_and_no_tools(nursery, qwen) -> None:
    sim = await start_sim(nursery, tokenizer="builtin:qwen")
    async with client(sim.url) as c:
        for i in range(12):
            out = await generate(c, prompt(qwen, i, enable_thinking=False))
            assert "think>" not in out["text"]
            plain = parse_assistant_output((await generate(c, prompt(qwen, i, tools=None)))["text"])
            assert plain.tool_calls == [] and plain.content


async def test_max_new_tokens_cuts_the_reply(nursery, qwen) -> None:
    sim = await start_sim(nursery, tokenizer="builtin:qwen")
    async with client(sim.url) as c:
        for i in range(6):
            full = await generate(c, prompt(qwen, i))
            cut = len(full["output_ids"]) // 2
            part = await generate(c, prompt(qwen, i), max_new_tokens=cut)
            assert part["meta_info"]["finish_reason"] == {"type": "length", "length": cut}
            assert part["output_ids"] == full["output_ids"][:cut]
            parse_assistant_output(part["text"])  # a cut reply (open <think>, half a call) still parses


async def test_tiny_tokenizer_and_input_ids(nursery) -> None:
    tiny = load_tokenizer("builtin:tiny")
    sim = await start_sim(nursery)  # builtin:tiny
    ids = tiny.encode(tiny.apply_chat_template([{"role": "user", "content": "hi"}], tools=TOOLS))
    async with client(sim.url) as c:
        r = await c.post("/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 500}})
        out = r.json()
    assert out["output_ids"][-1] == tiny.eos_token_id
    parsed = parse_assistant_output(out["text"])
    assert parsed.content or parsed.tool_calls


async def test_non_chat_prompts_unchanged_and_switch_off(nursery, qwen) -> None:
    on = await start_sim(nursery, tokenizer="builtin:qwen")
    off = await start_sim(nursery, tokenizer="builtin:qwen", chat_replies=False)
    chat_prompt = prompt(qwen, 1)
    async with client(on.url) as a, client(off.url) as b:
        for text in ("Once upon a time", "<|im_start|>user\nhi<|im_end|>\n", "<|im_start|>assistant\nhi"):
            assert (await generate(a, text))["output_ids"] == (await generate(b, text))["output_ids"]
        assert (await generate(a, chat_prompt))["output_ids"] != (await generate(b, chat_prompt))["output_ids"]
        # ignore_eos: a chat reply keeps talking to max_new_tokens, no stop token
        r = await a.post("/generate", json={"text": chat_prompt,
                                            "sampling_params": {"max_new_tokens": 700, "ignore_eos": True}})
        out = r.json()
        assert out["meta_info"]["finish_reason"]["type"] == "length" and len(out["output_ids"]) == 700
        assert qwen.eos_token_id not in out["output_ids"]
