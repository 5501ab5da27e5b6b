"""Disk faults under the durable store: a full disk and a read-only store make requests that need a write fail
with a 503 naming the store while passthrough traffic keeps flowing; a store that cannot be opened stops the
router at startup with exit 2 and one line saying why."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from harness import client, start_router, start_sim
from test_store_crash import RouterProcess

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str):
    """A tmpfs of `size` mounted at `folder` (root only); yields None where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def make_read_only(folder: Path) -> None:
    if os.geteuid() == 0:  # root ignores file modes: remount the store's own file system read-only
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    else:
        for p in folder.iterdir():
            p.chmod(0o444)
        folder.chmod(0o555)


@contextlib.contextmanager
def folder_to_make_read_only(tmp_path: Path):
    """A folder `make_read_only` can turn read-only: a small tmpfs as root (root ignores file modes, so the
    file system is remounted), else a plain folder whose modes are restored afterwards."""
    folder = tmp_path / "ro"
    if os.geteuid() == 0:
        with small_filesystem(folder, "16m") as mounted:
            if mounted is None:
                pytest.skip("cannot mount a tmpfs to make read-only")
            yield folder
        return
    folder.mkdir()
    try:
        yield folder
    finally:
        folder.chmod(0o755)


async def _router(nursery, sim, path: Path):
    return await start_router(
        nursery, workers={"urls": [sim.url]},
        routes=[{"path": "/generate", "pipeline": str(ROOT / "pipelines/radix-cache-r3.toml")}],
        store={"enabled": True, "path": str(path)})


def _gen(i: int, n: int = 16) -> dict:
    return {"text": f"<{i:04d}> a prompt about item {i}", "sampling_params": {"max_new_tokens": n},
            "return_logprob": True}


async def _passthrough_ok(c) -> None:
    # PUT /generate has no route: plain passthrough to a worker, which generates; no store involved
    r = await c.put("/generate", json=_gen(9999))
    assert r.status_code == 200 and r.json()["output_ids"]
    assert (await c.get("/get_model_info")).status_code == 200


async def test_read_only_store_serves_reads_and_refuses_writes_with_503(nursery, tmp_path):
    with folder_to_make_read_only(tmp_path) as folder:
        path = folder / "store.db"
        sim = await start_sim(nursery, seed=5)
        texts = {}
        async with trio.open_nursery() as n1:
            router = await _router(n1, sim, path)
            async with client(router) as c:
                for i in range(5):
                    out = (await c.post("/generate", json=_gen(i))).json()
                    texts[_gen(i)["text"] + out["text"]] = out["output_ids"]
            n1.cancel_scope.cancel()
        make_read_only(folder)
        async with trio.open_nursery() as n2:
            router = await _router(n2, sim, path)
            async with client(router) as c:
                for text, ids in texts.items():
                    got = (await c.post("/retrieve_from_text", json={"text": text})).json()
                    assert got["exact"] and got["tokens"][-len(ids):] == ids
                r = await c.post("/generate", json=_gen(100))
                assert r.status_code == 503
                err = r.json()
                assert err["stage"] == "persist" and err["store"] == str(path)
                assert err["error"].startswith(f"trajectory store {path}: cannot write: ")
                assert "read-only" in err["error"]
                # a stream has already started with 200: it is broken off, never completed with [DONE]
                body = b""
                with pytest.raises(httpx.HTTPError):
                    async with c.stream("POST", "/generate", json={**_gen(101), "stream": True}) as r:
                        assert r.status_code == 200
                        async for chunk in r.aiter_raw():
                            body += chunk
                assert b"data:" in body and b"[DONE]" not in body
                await _passthrough_ok(c)
                assert "miles_router_store_writable 0.0" in (await c.get("/metrics")).text
            n2.cancel_scope.cancel()


async def test_read_only_store_keeps_sessions_readable_and_refuses_their_writes_with_503(nursery, tmp_path):
    """Sessions need writes too: on a read-only store the stored sessions come back and can be read, but a new
    session or a new turn (neither could survive a crash) is a 503 naming the store; passthrough flows."""
    with folder_to_make_read_only(tmp_path) as folder:
        path = folder / "store.db"
        sim = await start_sim(nursery, seed=5, chat_replies=True)

        async def router_on(n):
            return await start_router(n, workers={"urls": [sim.url]}, store={"enabled": True, "path": str(path)},
                                      sessions={"enabled": True, "pipeline": str(ROOT / "pipelines/session-chat.toml")})

        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}
        async with trio.open_nursery() as n1:
            router = await router_on(n1)
            async with client(router) as c:
                sid = (await c.post("/sessions")).json()["session_id"]
                assert (await c.post(f"/sessions/{sid}/v1/chat/completions", json=chat)).status_code == 200
                before = (await c.get(f"/sessions/{sid}")).json()
            n1.cancel_scope.cancel()
        make_read_only(folder)
        async with trio.open_nursery() as n2:
            router = await router_on(n2)
            async with client(router) as c:
                assert (await c.get(f"/sessions/{sid}")).json() == before
                for r in (await c.post("/sessions"),
                          await c.post(f"/sessions/{sid}/v1/chat/completions", json={
                              **chat, "messages": [{"role": "user", "content": "another try"}]})):
                    assert r.status_code == 503, r.text
                    err = r.json()
                    assert err["store"] == str(path) and "read-only" in err["error"]
                    assert err["error"].startswith(f"trajectory store {path}: cannot write: ")
                await _passthrough_ok(c)
            n2.cancel_scope.cancel()


async def test_disk_full_gives_503_naming_the_store_and_passthrough_flows(nursery, tmp_path):
    with small_filesystem(tmp_path / "small", "2m") as folder:
        if folder is None:
            pytest.skip("needs a small tmpfs (root); test_disk_full_under_a_file_size_limit covers the rest")
        filler = folder / "filler"
        filler.write_bytes(b"\0" * (1200 << 10))
        path = folder / "store.db"
        sim = await start_sim(nursery, seed=6, num_layers=16, top_k=8)
        router = await _router(nursery, sim, path)
        acked = {}
        async with client(router) as c:
            status = 200
            for i in range(400):
                r = await c.post("/generate", json=_gen(i, 64))
                status = r.status_code
                if status != 200:
                    break
                acked[_gen(i, 64)["text"] + r.json()["text"]] = r.json()["output_ids"]
            assert status == 503, "the small file system never filled up"
            err = r.json()
            assert err["error"].startswith(f"trajectory store {path}: cannot write: ") and "full" in err["error"]
            await _passthrough_ok(c)
            assert (await c.post("/generate", json=_gen(1000, 64))).status_code == 503
            # every reply acknowledged before the disk filled is still there, exactly
            for text, ids in acked.items():
                got = (await c.post("/retrieve_from_text", json={"text": text})).json()
                assert got["exact"] and got["tokens"][-len(ids):] == ids
            # space comes back: writes succeed again without a restart
            filler.unlink()
            r = await c.post("/generate", json=_gen(2000, 8))
            assert r.status_code == 200, r.text
            assert "miles_router_store_writable 1.0" in (await c.get("/metrics")).text
            assert len(acked) > 3


async def test_disk_full_under_a_file_size_limit(tmp_path):
    """The same fault for any user: the router process runs with RLIMIT_FSIZE (writes past it fail)."""
    limit = 400 << 10

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    rp = RouterProcess(tmp_path)
    rp.start(preexec_fn=limit_file_size)
    try:
        await rp.ready()
        async with httpx.AsyncClient(base_url=rp.url, trust_env=False, timeout=30) as c:
            status = 200
            for i in range(2000):
                r = await c.post("/generate", json=_gen(i, 64))
                status = r.status_code
                if status != 200:
                    break
            assert status == 503, "the file size limit was never reached"
            assert r.json()["error"].startswith(f"trajectory store {tmp_path / 'store.db'}: cannot write: ")
            await _passthrough_ok(c)
    finally:
        rp.stop()


def _run_cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_a_store_that_cannot_be_opened_stops_startup_with_exit_2(tmp_path):
    (tmp_path / "store.db").write_bytes(b"definitely not SQLite " * 200)
    cfg = tmp_path / "router.toml"
    cfg.write_text(f"""
[tokenizer]
path = "builtin:tiny"
[store]
path = "store.db"
[[routes]]
path = "/generate"
pipeline = "{ROOT / 'pipelines/radix-cache.toml'}"
""")
    r = _run_cli("--config", str(cfg))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"miles-router: trajectory store {tmp_path / 'store.db'}: cannot open")
    cfg.write_text(cfg.read_text().replace('path = "store.db"', 'path = "no/such/folder/store.db"'))
    r = _run_cli("--config", str(cfg))
    assert r.returncode == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
