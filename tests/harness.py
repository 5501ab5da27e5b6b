"""Test harness: real simulated workers and a real router on loopback, inside the test's nursery."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import msgspec
import trio

from router.config import Config
from router.net.server import RouterHandle, run_router
from router.sim import SimOptions, serve_sim_worker


@dataclass
class Sim:
    url: str
    worker: object  # router.sim.SimWorker
    scope: trio.CancelScope

    def kill(self) -> None:
        """Stop the worker abruptly: its sockets close, in-flight requests break."""
        self.scope.cancel()


async def start_sim(nursery: trio.Nursery, **options) -> Sim:
    options.setdefault("tokenizer", "builtin:tiny")
    opts = SimOptions(**options)
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await serve_sim_worker(opts, "127.0.0.1", 0, task_status=task_status)

    url, worker = await nursery.start(run)
    return Sim(url, worker, scope)


def free_port() -> int:
    """A loopback port nothing listens on (right now)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def make_config(**sections) -> Config:
    """A Config from plain dicts; fast health checks and a free port by default."""
    data = {
        "server": {"port": 0, "drain_timeout_s": 5.0},
        "workers": {"health_interval_s": 0.1, "health_timeout_s": 1.0},
        "tokenizer": {"path": "builtin:tiny"},
        # In-process test routers keep trajectories in memory unless a test gives the store a path.
        "store": {"enabled": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return msgspec.convert(data, Config)


async def start_router(nursery: trio.Nursery, config: Config | None = None, **sections) -> RouterHandle:
    cfg = config or make_config(**sections)
    return await nursery.start(partial(run_router, cfg, install_signals=False))


def client(handle_or_url, **kw) -> httpx.AsyncClient:
    url = handle_or_url if isinstance(handle_or_url, str) else handle_or_url.url
    return httpx.AsyncClient(base_url=url, trust_env=False, timeout=kw.pop("timeout", 30.0), **kw)


async def generate_text(c: httpx.AsyncClient, text: str, n: int = 16) -> dict:
    """One `/generate` of `text` with logprobs (`n` new tokens): the reply, 200 asserted, plus `cached`: the prompt
    tokens the router's cache supplied (x-miles-router-cached-prompt-tokens)."""
    r = await c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": n},
                                        "return_logprob": True})
    assert r.status_code == 200, r.text
    return r.json() | {"cached": int(r.headers["x-miles-router-cached-prompt-tokens"])}


async def text_conversations(c: httpx.AsyncClient, head: str, n: int) -> list[str]:
    """`n` two-turn text conversations through `/generate`, each starting with `head` (a system prompt): every
    turn's visible text (prompt + reply), in order."""
    texts = []
    for i in range(n):
        text = f"{head}Question {i}: what is {i} times {i + 7}? "
        for turn in range(2):
            text += (await generate_text(c, text))["text"]
            texts.append(text)
            text += f" Next {turn}: and plus one? "
    return texts


async def chat_turn(c: httpx.AsyncClient, sid: str, messages: list, **kw) -> dict:
    """One session chat turn (up to 400 tokens unless `max_tokens` says otherwise): the reply, 200 asserted."""
    r = await c.post(f"/sessions/{sid}/v1/chat/completions",
                     json={"model": "sim", "messages": messages, "max_tokens": 400, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def assistant_message(reply: dict) -> dict:
    """A chat reply's assistant message as an agent sends it back next turn (its non-empty fields)."""
    msg = reply["choices"][0]["message"]
    return {k: v for k, v in msg.items() if k in ("role", "content", "reasoning_content", "tool_calls") and v}


async def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(interval)


def store_cli(*args) -> subprocess.CompletedProcess:
    """`miles-router store ARGS...` as its own process, from the repository root."""
    return subprocess.run([sys.executable, "-m", "router", "store", *args], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120)


@dataclass
class StoreAt:
    """Where a test's durable store lives: an SQLite file, or a PostgreSQL database (tests/pg.py), so one test
    runs over both backends (the `store_at` fixture in tests/conftest.py)."""

    kind: str  # "sqlite" | "postgresql"
    where: str  # the file's path, or the database's URL

    def config(self, **extra) -> dict:
        """The router's [store] table for it."""
        key = "url" if self.kind == "postgresql" else "path"
        return {"enabled": True, key: self.where, **extra}

    def toml(self) -> str:
        """The same, as lines of a [store] table."""
        return f'{"url" if self.kind == "postgresql" else "path"} = "{self.where}"'

    @property
    def shown(self) -> str:
        """How the router names it (503 replies' "store", `store stats`' path)."""
        if self.kind == "postgresql":
            from router.net.store_pg import redact

            return redact(self.where)
        return self.where

    def open(self, **kw):
        """The backend itself, outside any router (call `start()` before its async methods)."""
        if self.kind == "postgresql":
            from router.net.store_pg import PgStore

            return PgStore(self.where, **kw)
        from router.net.store_sqlite import SqliteStore

        return SqliteStore(self.where, **kw)


# ---------------------------------------------------------------------------------------------- processes
def parent_of(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rindex(b")") + 2:].split()[1])


def gone(pid: int) -> bool:
    """Exited (a zombie has closed its sockets already)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):  # reaped before the open, or between the open and the read
        return True
    return data[data.rindex(b")") + 2:].split()[0] == b"Z"


def children_of(pid: int) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and parent_of(int(d)) == pid:
                found.append(int(d))
        except (OSError, ValueError, IndexError):  # exited meanwhile
            continue
    return found

