"""`miles-router demo-agent`: a short tool-calling agent loop through the session API.

Uses the `openai` SDK (pip install ".[test]" or `pip install openai`) against a running router
(e.g. `miles-router --config router.toml.example`, whose embedded simulated workers answer like a
chat model), then fetches the session's training samples and prints their shapes.
"""

from __future__ import annotations

import json
import sys

TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file of the repository",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]


def run(url: str, turns: int = 4) -> int:
    try:
        import httpx
        import openai
    except ImportError:
        print("demo-agent needs the openai SDK: pip install openai", file=sys.stderr)
        return 2
    import msgspec
    import safetensors.numpy

    http = httpx.Client(base_url=url, trust_env=False, timeout=60)
    sid = http.post("/sessions").json()["session_id"]
    print(f"session {sid}")
    agent = openai.OpenAI(base_url=f"{url}/sessions/{sid}/v1", api_key="unused",
                          http_client=httpx.Client(trust_env=False, timeout=60))
    messages = [{"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": "Read README.md and summarize it."}]
    for turn in range(turns):
        reply = agent.chat.completions.create(model="demo", messages=messages, tools=TOOLS, max_tokens=512)
        choice = reply.choices[0]
        msg = choice.message
        calls = [f"{c.function.name}({c.function.arguments})" for c in msg.tool_calls or ()]
        print(f"turn {turn + 1}: finish={choice.finish_reason} tokens={reply.usage.prompt_tokens}+"
              f"{reply.usage.completion_tokens} thinking={bool(getattr(msg, 'reasoning_content', None))} "
              f"tool_calls={calls or '-'}")
        if choice.finish_reason == "length":
            break
        messages.append(msg.model_dump(exclude_none=True))
        for c in msg.tool_calls or ():
            messages.append({"role": "tool", "tool_call_id": c.id,
                             "content": json.dumps({"path": json.loads(c.function.arguments).get("path"),
                                                    "text": "# miles-router\nAn HTTP router for RL rollouts."})})
        if not msg.tool_calls:
            messages.append({"role": "user", "content": "Thanks. Anything else worth reading?"})
    r = http.post(f"/sessions/{sid}/samples", json={"max_seq_len": None, "metadata": {"reward": 1.0}})
    tensors = safetensors.numpy.load(r.content)  # miles' format (README: Sessions)
    meta = msgspec.json.decode(tensors.pop("_samples_meta").tobytes())
    for i, m in enumerate(meta["samples"]):
        mine = {k.rsplit(".", 1)[0]: v for k, v in tensors.items() if k.rsplit(".", 1)[1] == str(i)}
        shapes = ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in sorted(mine.items()))
        print(f"sample {i}: {shapes}; status={m['status']} response_length={m['response_length']} "
              f"trained tokens={int(mine['loss_mask'].sum())} reward={m['reward']}")
    http.delete(f"/sessions/{sid}")
    return 0
