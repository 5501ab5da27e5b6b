"""Nothing acknowledged is lost: a real router process (`python -m router`, radix-cache-r3 pipeline and agent
sessions, embedded simulated workers, the durable store with sync = "commit") under load (/generate clients and
agents looping chat turns at once) is killed with SIGKILL at a random moment, restarted on the same store, and
- every trajectory whose /generate reply the client received completely must be retrievable exactly: identical
  tokens, logprobs, loss mask and routed experts;
- every session turn whose reply the agent received is there, token for token, and the session continues: the
  next turn's worker input starts with the exact stored tokens.
Requests in flight at the kill may be absent; they must never come back different from what the worker produced.
Each test runs over SQLite and over PostgreSQL (`store_at`)."""

from __future__ import annotations

import base64
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from harness import children_of, free_port, gone
from router.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("builtin:tiny")


SESSIONS = f"""
[sessions]
enabled = true
pipeline = "{ROOT / 'pipelines/session-chat-r3.toml'}"
"""


@dataclass
class RouterProcess:
    folder: Path
    store: str = 'path = "store.db"'  # the [store] table's location line (StoreAt.toml() for another backend)
    port: int = 0
    proc: subprocess.Popen | None = None
    log: list = field(default_factory=list)
    orphans: list = field(default_factory=list)  # children a kill9 left running
    killed_children: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, pipeline: str = "pipelines/radix-cache-r3.toml", store_extra: str = "", env=None,
              preexec_fn=None, sessions: bool = False, token_latency_s: float = 0.0) -> None:
        # A second router on the same store would answer in its place (and outlive kill9): never two at once.
        assert self.proc is None or self.proc.poll() is not None, "the router is still running"
        self.port = free_port()
        cfg = self.folder / "router.toml"
        cfg.write_text(f"""
[server]
port = {self.port}
drain_timeout_s = 1.0
[simulate]
workers = 2
tokenizer = "builtin:tiny"
token_latency_s = {token_latency_s}
[tokenizer]
path = "builtin:tiny"
[store]
{self.store}
{store_extra}
{SESSIONS if sessions else ""}
[[routes]]
path = "/generate"
pipeline = "{ROOT / pipeline}"
""")
        logf = open(self.folder / f"router-{len(self.log)}.log", "wb")
        self.log.append(logf.name)
        self.proc = subprocess.Popen([sys.executable, "-m", "router", "--config", str(cfg)], cwd=ROOT,
                                     stdout=logf, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec_fn)

    async def ready(self, timeout: float = 30.0) -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as c:
            with trio.fail_after(timeout):
                while True:
                    if self.proc.poll() is not None:
                        raise AssertionError(f"router exited {self.proc.returncode}: "
                                             f"{Path(self.log[-1]).read_text()[-2000:]}")
                    try:
                        r = await c.get(self.url + "/health")
                        if r.status_code == 200 and r.json()["healthy_workers"] == 2:
                            return
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.05)

    def kill9(self) -> None:
        """SIGKILL the router; its children (the store's writer process) must exit by themselves."""
        kids = children_of(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 10.0
        while any(not gone(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.orphans += [k for k in kids if not gone(k)]
        self.killed_children += len(kids)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture
def router_proc(tmp_path, store_at):
    """A router process (not started yet) on a store of each backend."""
    rp = RouterProcess(tmp_path, store_at.toml())
    yield rp
    rp.stop()


def prompt_text(task: int, seq: int, cycle: int = 0) -> str:
    # a unique leading tag: no prompt is a prefix of another, so every prompt is tokenized fresh
    return f"[{cycle:03d}-{task:02d}-{seq:05d}] Tell me something about number {seq * 37 % 101}."


async def run_load(url: str, acked: dict, sent: set, *, clients: int, cycle: int, stop: trio.Event) -> None:
    """Clients send /generate until the router dies; completely received 200 replies go to `acked`."""

    async def one(task: int, c: httpx.AsyncClient) -> None:
        seq = 0
        while not stop.is_set():
            text = prompt_text(task, seq, cycle)
            seq += 1
            sent.add(text)
            try:
                r = await c.post("/generate", json={"text": text, "return_logprob": True,
                                                    "sampling_params": {"max_new_tokens": 6 + seq % 20}})
            except httpx.HTTPError:
                return  # the router is gone (or the reply was cut): not acknowledged
            assert r.status_code == 200, r.text
            assert r.headers["x-miles-router-cached-prompt-tokens"] == "0"
            acked[text] = r.json()

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30.0, limits=limits) as c:
        async with trio.open_nursery() as n:
            for task in range(clients):
                n.start_soon(one, task, c)


async def verify(url: str, tiny, acked: dict, sent: set) -> tuple[int, int]:
    """Every acknowledged trajectory is exact and identical to the worker's reply. Returns (acked, present
    among the unacknowledged)."""
    present_unacked = 0
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30.0) as c:
        texts = list(acked)
        for i in range(0, len(texts), 64):
            batch = texts[i:i + 64]
            r = await c.post("/retrieve_from_text", json={"texts": [t + acked[t]["text"] for t in batch]})
            assert r.status_code == 200, r.text
            for text, got in zip(batch, r.json()["results"]):
                out = acked[text]
                O = out["output_ids"]
                P = tiny.encode(text)
                assert got["exact"] is True and got["match"] == "trajectory", (text, got["match"])
                assert got["tokens"] == P + O
                assert got["loss_mask"] == [0] * len(P) + [1] * len(O)
                want = np.asarray([t[0] for t in out["meta_info"]["output_token_logprobs"]], np.float32)
                assert np.asarray(got["rollout_logp"][len(P):], np.float32).tobytes() == want.tobytes()
                assert got["rollout_logp"][:len(P)] == [0.0] * len(P)
                assert base64.b64decode(got["routed_experts"]) == base64.b64decode(out["meta_info"]["routed_experts"])
                assert got["routed_experts_shape"][0] == len(P) + len(O) - 1
        for text in sent - set(acked):
            r = await c.post("/retrieve_from_text", json={"text": text})
            assert r.status_code == 200
            # the prompt alone is never a stored trajectory's text; a committed in-flight trajectory may cover it
            present_unacked += r.json()["match"] != "none"
    return len(acked), present_unacked


async def _turn(c: httpx.AsyncClient, sid: str, messages: list) -> tuple[dict, str]:
    """One chat turn: (the assistant message to send back next time, finish_reason)."""
    r = await c.post(f"/sessions/{sid}/v1/chat/completions",
                     json={"model": "sim", "messages": messages, "max_tokens": 400})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    msg = choice["message"]
    keep = {k: v for k, v in msg.items() if k in ("role", "content", "reasoning_content", "tool_calls") and v}
    return keep, choice["finish_reason"]


async def run_agents(url: str, sessions: dict, *, agents: int, cycle: int, stop: trio.Event) -> None:
    """Agents loop chat turns until the router dies. After each turn whose reply arrived (and the session's state
    read back), sessions[sid] = (messages so far, GET /sessions/{sid})."""

    async def agent(i: int, c: httpx.AsyncClient) -> None:
        try:
            r = await c.post("/sessions")
        except httpx.HTTPError:
            return
        assert r.status_code == 200, r.text
        sid = r.json()["session_id"]
        msgs = [{"role": "user", "content": f"agent {cycle}-{i}: count to {i + 3}"}]
        for t in range(1000):
            if stop.is_set():
                return
            try:
                reply, finish = await _turn(c, sid, msgs)
                state = (await c.get(f"/sessions/{sid}")).json()
            except httpx.HTTPError:
                return  # the router is gone: this turn is not acknowledged
            msgs.append(reply)
            sessions[sid] = (list(msgs), state)
            if finish == "length":  # cut by max_tokens: it cannot be extended (409)
                return
            msgs.append({"role": "user", "content": f"next {t}"})

    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30.0) as c:
        async with trio.open_nursery() as n:
            for i in range(agents):
                n.start_soon(agent, i, c)


async def verify_sessions(url: str, sessions: dict) -> int:
    """Every acknowledged turn is there token for token, and each session continues from exactly those tokens:
    the worker receives them verbatim at the start of the next turn's input. The continuing turn is acknowledged
    too (sessions is updated). Returns how many sessions continued (one whose last turn ended by length cannot)."""
    continued = 0
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30.0) as c:
        sims = [w["url"] for w in (await c.get("/workers")).json()["workers"]]
        for sid, (msgs, state) in list(sessions.items()):
            r = await c.get(f"/sessions/{sid}")
            assert r.status_code == 200, (sid, r.text)
            now = r.json()
            acked_ids = state["metadata"]["accumulated_token_ids"]
            # a later turn may have committed too (its reply cut by the kill): the acknowledged ones are a prefix
            assert now["metadata"]["accumulated_token_ids"][:len(acked_ids)] == acked_ids
            now_nodes = {n["id"]: n for n in now["metadata"]["tree"]["nodes"]}
            assert all(now_nodes.get(n["id"]) == n for n in state["metadata"]["tree"]["nodes"]), sid
            last = max(state["metadata"]["tree"]["nodes"], key=lambda n: n["seq"])
            if last["truncated"]:  # a turn cut by max_tokens cannot be extended (409)
                continue
            nxt = msgs + [{"role": "user", "content": "after the restart?"}]
            reply, _ = await _turn(c, sid, nxt)
            sent = []
            for sim in sims:
                async with httpx.AsyncClient(base_url=sim, trust_env=False, timeout=10.0) as s:
                    sent += [b.get("input_ids") or [] for b in (await s.get("/_sim/stats")).json()["last_bodies"]]
            assert any(ids[:len(acked_ids)] == acked_ids and len(ids) > len(acked_ids) for ids in sent), sid
            sessions[sid] = (nxt + [reply], (await c.get(f"/sessions/{sid}")).json())
            continued += 1
    return continued


async def crash_cycle(rp: RouterProcess, acked: dict, sent: set, cycle: int, *, clients: int = 16,
                      min_s: float = 0.6, max_s: float = 1.5, sessions: dict | None = None, agents: int = 3) -> int:
    # a little latency per token: at any moment most requests are inside the router process (waiting for its
    # embedded workers, or for their commit), not finished replies waiting in the client's socket buffers
    rp.start(sessions=sessions is not None, token_latency_s=0.001)
    await rp.ready()
    stop = trio.Event()
    before = len(acked)
    async with trio.open_nursery() as n:
        n.start_soon(lambda: run_load(rp.url, acked, sent, clients=clients, cycle=cycle, stop=stop))
        if sessions is not None:
            n.start_soon(lambda: run_agents(rp.url, sessions, agents=agents, cycle=cycle, stop=stop))
        await trio.sleep(random.uniform(min_s, max_s))
        rp.kill9()  # mid-load: commits in progress, replies half sent
        stop.set()
    return len(acked) - before


async def test_kill9_under_load_loses_no_acknowledged_trajectory(router_proc, tiny):
    """/generate clients and agents at once, kill -9, restart: every acknowledged trajectory and turn is there."""
    acked: dict = {}
    sent: set = set()
    sessions: dict = {}
    got = await crash_cycle(router_proc, acked, sent, 0, sessions=sessions)
    # a kill that fell between every client's requests left nothing in flight, or came before the agents had
    # a turn acknowledged (a loaded machine): kill again, on the same store
    for cycle in range(1, 5):
        if len(sent) > len(acked) and len(sessions) >= 2:
            break
        got += await crash_cycle(router_proc, acked, sent, cycle, sessions=sessions)
    assert got >= 20, f"only {got} replies before the kill: the load did not run"
    assert len(sent) > len(acked)  # some requests were in flight at a kill
    assert len(sessions) >= 2, "fewer than 2 agents finished a turn before the kill"
    assert router_proc.orphans == []  # the store's writer process does not outlive its router
    assert router_proc.killed_children >= 1
    router_proc.start(sessions=True)
    t0 = time.monotonic()
    await router_proc.ready()
    restart_s = time.monotonic() - t0
    n, _ = await verify(router_proc.url, tiny, acked, sent)
    assert n == len(acked)
    assert await verify_sessions(router_proc.url, sessions) >= 1
    assert restart_s < 20


@pytest.mark.slow
async def test_soak_random_kills_lose_nothing_acknowledged(router_proc, tiny):
    """Many kill -9 / restart cycles on one store, /generate clients and agents at once: after each restart every
    reply and turn acknowledged in any cycle so far is still exact, and every session continues from its stored
    tokens (`STORE_SOAK_CYCLES`, default 15)."""
    acked: dict = {}
    sent: set = set()
    sessions: dict = {}
    cycles = int(os.environ.get("STORE_SOAK_CYCLES", "15"))
    t0 = time.monotonic()
    for cycle in range(cycles):
        await crash_cycle(router_proc, acked, sent, cycle, min_s=0.2, max_s=2.0, sessions=sessions)
        router_proc.start(sessions=True)
        await router_proc.ready()
        await verify(router_proc.url, tiny, acked, sent)
        await verify_sessions(router_proc.url, sessions)
        router_proc.kill9()
    turns = sum(len(state["metadata"]["tree"]["nodes"]) for _, state in sessions.values())
    print(f"soak: {cycles} kills in {time.monotonic() - t0:.0f} s, {len(acked)} acknowledged trajectories and "
          f"{turns} acknowledged turns of {len(sessions)} sessions, 0 lost")
