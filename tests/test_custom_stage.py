"""The README's worked custom-stage example, extracted from the README and run end to end."""

from __future__ import annotations

import re
from pathlib import Path

from harness import client, start_router, start_sim

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> tuple[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("**Worked example: a custom stage.**"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    toml = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    return code, toml


async def test_readme_custom_stage_works(nursery, tmp_path, monkeypatch):
    code, toml = readme_example()
    (tmp_path / "my_stages.py").write_text(code)
    (tmp_path / "capped.toml").write_text(toml)
    monkeypatch.syspath_prepend(str(tmp_path))
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]},
                                routes=[{"path": "/generate", "pipeline": str(tmp_path / "capped.toml")}])
    async with client(router) as c:
        r = await c.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 5000}})
        assert r.status_code == 200
        async with client(sim.url) as d:
            sent = (await d.get("/_sim/stats")).json()["last_bodies"][-1]
        assert sent["sampling_params"]["max_new_tokens"] == 512 and "input_ids" in sent
        r = await c.post("/generate", json={"text": "x" * 300_000})
        assert r.status_code == 413
        assert r.json() == {"error": "prompt too long", "stage": "cap_tokens"}
        assert (await c.post("/generate", json={"text": "still fine"})).status_code == 200
