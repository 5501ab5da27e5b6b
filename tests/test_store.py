"""The durable trajectory store: record format, retention policy, the backends, and the router over them
(restart, eviction to disk, group commit, sync off), in process over loopback. Tests taking `store_at` run once
over SQLite and once over PostgreSQL (a throwaway server, tests/pg.py)."""

from __future__ import annotations

import base64
import os
import signal
import re
import sqlite3
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import StoreAt, client, start_router, start_sim
from router.core.radix import text_digest
from router.core.store import RowInfo, StoreWriteError, plan_retention
from router.net.store_sqlite import SqliteStore
from router.wire import store as wire

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- record format
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), experts=st.sampled_from([None, 8, 256, 300, 70000]), layers=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_record_roundtrip_is_exact(n, experts, layers, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 2**31 - 1, n, dtype=np.int64).astype(np.int32)
    logprobs = rng.normal(size=n).astype(np.float32)
    mask = rng.integers(0, 2, n).astype(np.uint8)
    rows = None if experts is None else rng.integers(0, experts, (n - 1, layers, 2)).astype(np.int32)
    rec = wire.pack(rid="r", created=1.5, prompt_len=3, finish="stop", worker="w", weight_version="v2",
                    versions=[None, "v1", "v2"], tokens=tokens, logprobs=logprobs, loss_mask=mask, experts=rows)
    back = wire.decode(wire.encode(rec))
    assert back == rec
    assert np.array_equal(wire.tokens_of(back), tokens)
    assert wire.logprobs_of(back).tobytes() == logprobs.tobytes()  # bit-exact, NaN included
    assert np.array_equal(wire.loss_mask_of(back), mask)
    if rows is None:
        assert wire.experts_of(back) is None
    else:
        got = wire.experts_of(back)
        assert got.dtype == np.int32 and np.array_equal(got, rows)
        # stored at the width the ids need: 1 byte while every id is < 256, 2 while < 65536
        top = int(rows.max()) if rows.size else 0
        width = 1 if top < 256 else 2 if top < 65536 else 4
        assert len(back.experts) == rows.size * width
    # without routed experts: 8.125 bytes per token plus a fixed header
    if rows is None:
        assert len(wire.encode(rec)) <= 8.125 * n + 80


# ---------------------------------------------------------------------------------------------- retention
rows_strategy = st.lists(st.tuples(st.floats(0, 1000), st.booleans(), st.sampled_from([None, "a", "b"]),
                                   st.integers(1, 100)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(rows=rows_strategy, retention=st.sampled_from([0.0, 100.0, 500.0]), max_bytes=st.integers(0, 2000),
       stale=st.sampled_from([frozenset(), frozenset({"a"})]))
def test_retention_plan_properties(rows, retention, max_bytes, stale):
    infos = [RowInfo(i, c, r, v, n) for i, (c, r, v, n) in enumerate(rows)]
    total = sum(r.nbytes for r in infos)
    now = 1000.0
    plan = plan_retention(infos, now=now, total_bytes=total, retention_s=retention, max_bytes=max_bytes,
                          stale_versions=stale)
    deleted = set(plan.delete)
    assert len(deleted) == len(plan.delete)
    kept = [r for r in infos if r.id not in deleted]
    assert plan.freed_bytes == total - sum(r.nbytes for r in kept)
    assert plan.expired + plan.evicted_retrieved + plan.evicted_unretrieved == len(plan.delete)
    expired = [r for r in infos if retention > 0 and r.created < now - retention and (r.retrieved or r.version in stale)]
    # phase 1 deletes exactly the expired reclaimable rows
    assert {r.id for r in expired} <= deleted and plan.expired == len(expired)
    after_age = total - sum(r.nbytes for r in expired)
    if max_bytes <= 0 or after_age <= max_bytes:
        assert plan.delete == [r.id for r in expired]  # nothing else goes
        return
    kept_bytes = sum(r.nbytes for r in kept)
    assert kept_bytes <= max_bytes
    # unretrieved rows are deleted only once no retrieved row is left
    if plan.evicted_unretrieved:
        assert all(not r.retrieved for r in kept)
    # size phases are minimal: putting back the last row deleted for size would exceed the cap
    size_deleted = [i for i in plan.delete if i not in {r.id for r in expired}]
    last = next(r for r in infos if r.id == size_deleted[-1])
    assert kept_bytes + last.nbytes > max_bytes
    # retrieved rows go oldest first
    gone_retrieved = [i for i in size_deleted if infos[i].retrieved]
    left_retrieved = [r.id for r in kept if r.retrieved]
    assert not gone_retrieved or not left_retrieved or max(gone_retrieved) < min(left_retrieved)


def test_retention_examples():
    rows = [RowInfo(0, 0.0, True, "v1", 10), RowInfo(1, 0.0, False, "v1", 10), RowInfo(2, 0.0, False, "v2", 10),
            RowInfo(3, 990.0, True, "v2", 10)]
    # age: old retrieved and old stale go, old fresh unretrieved stays, young retrieved stays
    p = plan_retention(rows, now=1000.0, total_bytes=40, retention_s=100, max_bytes=0, stale_versions=frozenset({"v1"}))
    assert p.delete == [0, 1] and p.expired == 2 and p.evicted_unretrieved == 0
    # size: retrieved first (oldest first), then unretrieved with a count
    p = plan_retention(rows, now=1000.0, total_bytes=40, retention_s=0, max_bytes=15)
    assert p.delete == [0, 3, 1] and p.evicted_retrieved == 2 and p.evicted_unretrieved == 1


# ---------------------------------------------------------------------------------------------- backend
def _rec(i: int, n: int = 50) -> wire.StoredTrajectory:
    return wire.pack(rid=f"r{i}", created=float(i), prompt_len=10, finish="stop", worker=None, weight_version="v",
                     versions=["v"], tokens=np.arange(n, dtype=np.int32) + i, logprobs=np.full(n, -0.5, np.float32),
                     loss_mask=np.r_[np.zeros(10, np.uint8), np.ones(n - 10, np.uint8)], experts=None)


async def test_backend_put_get_reopen_and_retention(store_at):
    store = store_at.open(max_bytes=0)
    store.start()
    digests = [text_digest(f"text {i}".encode()) for i in range(20)]
    await store.put([(d, _rec(i)) for i, d in enumerate(digests)], wait=True)
    assert store.stats().rows == 20 and store.stats().unretrieved == 20
    got = await store.get(digests[7])
    assert got.rid == "r7" and np.array_equal(wire.tokens_of(got), np.arange(50) + 7)
    assert await store.get(text_digest(b"never stored")) is None
    for d in digests[:5]:
        store.mark_retrieved(d)
    await store.put([], wait=True)
    await store.aclose()

    # reopen: counts come back from disk; a cap deletes the oldest retrieved first
    one = len(wire.encode(_rec(0)))
    store = store_at.open(retention_s=0, max_bytes=one * 12 + 20)  # r10..r19 are a byte longer
    store.start()
    assert store.stats().rows == 20 and store.stats().unretrieved == 15
    plan = await store.maintain(now=100.0)
    assert plan.evicted_retrieved == 5 and plan.evicted_unretrieved == 3
    assert sorted(plan.delete) == [0 + 1, 1 + 1, 2 + 1, 3 + 1, 4 + 1, 5 + 1, 6 + 1, 7 + 1]  # ids are 1-based
    assert await store.get(digests[4]) is None and await store.get(digests[7]) is None
    assert (await store.get(digests[8])).rid == "r8"
    st_ = store.stats()
    assert st_.rows == 12 and st_.unretrieved == 12 and st_.deleted_unretrieved == 3
    await store.aclose()


async def test_backend_write_failure_is_a_store_error_and_recovers(tmp_path):
    path = tmp_path / "s.db"
    store = SqliteStore(path)
    store.start()
    await store.put([(b"a" * 16, _rec(0))], wait=True)
    # the writer is a process of its own: another connection makes its inserts of big records fail
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TRIGGER fail BEFORE INSERT ON payloads WHEN length(NEW.data) > 10000 "
                  "BEGIN SELECT RAISE(ABORT, 'injected write failure'); END")
    with pytest.raises(StoreWriteError, match=rf"trajectory store {path}: cannot write: injected write failure"):
        await store.put([(b"b" * 16, _rec(1, n=20_000))], wait=True)
    assert store.stats().writable is False and store.stats().rows == 1
    assert await store.get(b"b" * 16) is None  # a failed write leaves nothing behind
    other.execute("DROP TRIGGER fail")
    await store.put([(b"c" * 16, _rec(2))], wait=True)
    assert store.stats().writable is True and (await store.get(b"c" * 16)).rid == "r2"
    await store.aclose()
    other.close()


async def test_sqlite_writer_process_killed_fails_what_it_had_not_answered_and_restarts(tmp_path):
    """The SQLite writer runs in a child process (router/net/writer_process.py). Killed while a reply waits for
    its commit, that reply fails naming the store, and the next write goes to a new writer."""
    path = tmp_path / "s.db"
    store = SqliteStore(path)
    store.start()
    await store.put([(b"a" * 16, _rec(0))], wait=True)
    first = store._child.pid
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the writer cannot commit until this ends: the kill comes first
    os.kill(first, signal.SIGKILL)
    with pytest.raises(StoreWriteError, match=rf"trajectory store {path}: cannot write: writer process killed by "
                                              rf"signal {int(signal.SIGKILL)}$"):
        await store.put([(b"b" * 16, _rec(1))], wait=True)
    other.execute("ROLLBACK")
    await store.put([(b"c" * 16, _rec(2))], wait=True)
    assert store._child.pid != first and store.stats().writable is True
    assert await store.get(b"b" * 16) is None and (await store.get(b"c" * 16)).rid == "r2"
    assert store.stats().rows == 2
    child = store._child
    await store.aclose()
    assert child.poll() == 0  # closed: it wrote what it had and exited
    other.close()


async def test_writes_queued_during_a_commit_go_to_the_writer_in_one_send(tmp_path, monkeypatch):
    """While the writer process has an operation it has not answered, nothing more is sent to it: what queues
    meanwhile goes in one send when the answer comes (one system call on the event loop per commit, not per write),
    and is written in one commit. The writer runs as SCHED_BATCH (woken by a send, it does not preempt the loop)."""
    from router.net.writer_process import ProcessQueue

    sends: list[int] = []
    send_all = ProcessQueue._send_all

    async def counted(sock, data):
        sends.append(len(data))
        await send_all(sock, data)

    monkeypatch.setattr(ProcessQueue, "_send_all", staticmethod(counted))
    path = tmp_path / "s.db"
    store = SqliteStore(path)
    store.start()
    await store.put([(b"a" * 16, _rec(0))], wait=True)
    assert len(sends) == 2  # the configuration, the first write
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the writer's next commit waits for this
    commits = store.stats().commits
    async with trio.open_nursery() as n:
        n.start_soon(partial(store.put, [(b"b" * 16, _rec(1))], wait=True))
        await trio.sleep(0.2)  # sent: the writer holds it, waiting for the lock
        assert len(sends) == 3
        for i in range(2, 12):  # one at a time, each in a later turn of the event loop
            n.start_soon(partial(store.put, [(bytes([i]) * 16, _rec(i))], wait=True))
            await trio.sleep(0.01)
        assert len(sends) == 3, "nothing is sent while the writer has not answered"
        other.execute("ROLLBACK")
    assert len(sends) == 4, "what queued during the commit goes in one send"
    assert store.stats().commits == commits + 2 and store.stats().rows == 12
    if hasattr(os, "SCHED_BATCH"):  # woken by a send, the writer does not preempt the event loop
        assert os.sched_getscheduler(store._child.pid) == os.SCHED_BATCH
    await store.aclose()
    other.close()


def test_not_a_store_cannot_be_opened(tmp_path):
    from router.core.store import StoreOpenError
    from router.net.store_sqlite import check_openable

    bad = tmp_path / "garbage.db"
    bad.write_bytes(b"this is not an sqlite file" * 100)
    with pytest.raises(StoreOpenError, match=rf"trajectory store {bad}: cannot open"):
        check_openable(bad)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(StoreOpenError, match="not a miles-router store"):
        check_openable(other)
    with pytest.raises(StoreOpenError, match="does not exist"):
        check_openable(tmp_path / "missing-folder" / "s.db")


# ---------------------------------------------------------------------------------------------- the router over it
async def store_router(nursery, store_at: StoreAt, *, pipeline="pipelines/radix-cache-r3.toml", sims=None, cache=None,
                       sync="commit", **sim_kw):
    sims = sims or [await start_sim(nursery, seed=i, **sim_kw) for i in range(1)]
    return await start_router(
        nursery,
        workers={"urls": [s.url for s in sims]},
        routes=[{"path": "/generate", "pipeline": str(ROOT / pipeline)}],
        store=store_at.config(sync=sync),
        cache=cache or {},
    ), sims


def _prompt(i: int) -> str:
    return f"question {i}: how many {'abc'[i % 3]} are there in {i * 7919 % 1000}? "


async def _generate(c, text, n=12):
    r = await c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": n},
                                        "return_logprob": True})
    assert r.status_code == 200, r.text
    return r.json()


async def _retrieve(c, text):
    r = await c.post("/retrieve_from_text", json={"text": text})
    assert r.status_code == 200, r.text
    return r.json()


async def test_restart_serves_retrieve_exactly_as_before(nursery, store_at):
    """Multi-turn text conversations (merged loss mask over earlier turns, R3 over the whole sequence): after a
    restart on the same store, /retrieve_from_text answers every trajectory byte for byte as before."""
    sim = await start_sim(nursery, seed=3)
    texts, before = [], {}
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as n1:
            router, _ = await store_router(n1, store_at, sims=[sim])
            async with client(router) as c:
                for conv in range(6):
                    text = _prompt(conv)
                    for turn in range(3):
                        out = await _generate(c, text)
                        text = text + out["text"]
                        texts.append(text)
                        text = text + f" and then {turn}? "
                for t in texts:
                    before[t] = await _retrieve(c, t)
            scope.cancel()
    assert all(b["exact"] and b["match"] == "trajectory" and b["routed_experts"] for b in before.values())
    # a multi-turn record carries the earlier turns' generated tokens in its loss mask
    assert any(0 < b["loss_mask"].index(1) and 0 in b["loss_mask"][b["loss_mask"].index(1):] for b in before.values())

    async with trio.open_nursery() as n2:
        router, _ = await store_router(n2, store_at, sims=[sim])
        assert router.runtime.trajectories.tree.stats()["trajectories"] == 0  # nothing was loaded: read lazily
        async with client(router) as c:
            for t in texts:
                assert await _retrieve(c, t) == before[t]
            stats = (await c.get("/cache/stats")).json()["store"]
            assert stats["rows"] == len(texts) and stats["unretrieved"] == 0
            metrics = (await c.get("/metrics")).text
            assert f"miles_router_store_rows {float(len(texts))}" in metrics
            assert "miles_router_store_pending_writes 0.0" in metrics and "miles_router_store_bytes " in metrics
        n2.cancel_scope.cancel()
    async with trio.open_nursery() as n3:  # a fresh process-equivalent: the commit histogram counts batches
        router, _ = await store_router(n3, store_at, sims=[sim])
        async with client(router) as c:
            await _generate(c, _prompt(99))
            metrics = (await c.get("/metrics")).text
            # one trajectory, in one commit (a retention pass may have committed an empty batch meanwhile)
            assert "miles_router_store_batch_records_sum 1.0" in metrics
            count = float(re.search(r"^miles_router_store_commit_seconds_count (\S+)$", metrics, re.M).group(1))
            assert 1.0 <= count <= 3.0
        n3.cancel_scope.cancel()


async def test_memory_budget_moves_trajectories_to_disk_not_out_of_existence(nursery, store_at):
    router, (sim,) = await store_router(nursery, store_at, cache={"budget_bytes": 1, "hard_budget_bytes": 1})
    replies = {}
    async with client(router) as c:
        for i in range(60):
            out = await _generate(c, _prompt(i), n=20)
            replies[_prompt(i) + out["text"]] = out
            assert router.runtime.trajectories.tree.nbytes < 64_000  # memory stays flat: at most the tree's skeleton
        for text, out in replies.items():
            got = await _retrieve(c, text)
            assert got["exact"] and got["match"] == "trajectory"
            assert got["tokens"][-len(out["output_ids"]):] == out["output_ids"]
            assert got["rollout_logp"][-len(out["output_ids"]):] == pytest.approx(
                [t[0] for t in out["meta_info"]["output_token_logprobs"]], abs=1e-6)
            rows = np.frombuffer(base64.b64decode(got["routed_experts"]), "<i4")
            assert rows.tobytes() == base64.b64decode(out["meta_info"]["routed_experts"])
        assert router.runtime.trajectories.tree.stats()["trajectories"] <= 1


async def test_group_commit_shares_commits_between_concurrent_replies(nursery, store_at):
    router, _ = await store_router(nursery, store_at, token_latency_s=0.001)
    async with client(router) as c:
        async with trio.open_nursery() as n:
            for i in range(48):
                n.start_soon(_generate, c, _prompt(i), 8)
    st_ = router.runtime.trajectories.store.stats()
    assert st_.rows == 48 and st_.pending_writes == 0
    assert st_.commits < 48, "concurrent replies should share commits"


async def test_sync_off_is_readable_at_once_and_durable_after_close(nursery, store_at):
    sim = await start_sim(nursery, seed=1)
    async with trio.open_nursery() as n1:
        router, _ = await store_router(n1, store_at, sims=[sim], sync="off",
                                       cache={"budget_bytes": 1, "hard_budget_bytes": 1})
        async with client(router) as c:
            out = await _generate(c, _prompt(1))
            got = await _retrieve(c, _prompt(1) + out["text"])  # evicted from memory, maybe not committed yet
            assert got["exact"] and got["tokens"][-len(out["output_ids"]):] == out["output_ids"]
        n1.cancel_scope.cancel()
    store = store_at.open()
    assert store.stats().rows == 1 and len(list(store.scan(unretrieved_only=False))) == 1
    store.close_sync()


async def test_store_disabled_keeps_trajectories_in_memory_only(nursery, tmp_path):
    sim = await start_sim(nursery)
    router = await start_router(nursery, workers={"urls": [sim.url]},
                                routes=[{"path": "/generate", "pipeline": str(ROOT / "pipelines/radix-cache.toml")}],
                                store={"enabled": False, "path": str(tmp_path / "never.db")})
    async with client(router) as c:
        out = await _generate(c, _prompt(2))
        assert (await _retrieve(c, _prompt(2) + out["text"]))["exact"]
        assert "store" not in (await c.get("/cache/stats")).json()
    assert router.runtime.trajectories.store is None and not (tmp_path / "never.db").exists()


async def test_backend_sessions_survive_reopen_and_delete(store_at):
    """Sessions by id: turns after a given id, each turn id written once (a second write of it is reported, not
    applied), a session that is gone is never brought back by its turns, and the startup key is set once."""
    from router.core.store import SessionWrite

    a, b, c = "a" * 32, "b" * 32, "c" * 32
    store = store_at.open()
    store.start()
    assert await store.put_session(a, 1.0, b"header-a", [(0, b"turn0"), (1, b"turn1")], wait=True) == SessionWrite()
    assert await store.put_session(b, 2.0, None, [(0, b"b0")], wait=True) == SessionWrite(gone=True)  # never created
    assert await store.put_session(a, 1.5, None, [(1, b"other1"), (2, b"turn2")], wait=True) == \
        SessionWrite(taken=(1,))
    assert store.meta_setdefault("k", "v") == "v" and store.meta_setdefault("k", "w") == "v"
    await store.aclose()
    store = store_at.open()
    store.start()
    assert await store.session_turns(a) == [b"turn0", b"turn1", b"turn2"]
    assert await store.session_turns(a, 0) == [b"turn1", b"turn2"] and await store.session_turns(a, 2) == []
    assert await store.session_turns(b) is None
    assert store.meta_setdefault("k", "x") == "v"
    await store.put_session(c, 3.0, b"header-c", [], wait=True)
    await store.delete_session(a, wait=True)
    assert await store.session_turns(a) is None
    assert await store.put_session(a, 4.0, None, [(3, b"turn3")], wait=True) == SessionWrite(gone=True)
    assert await store.session_turns(a) is None and await store.session_turns(c) == []
    await store.aclose()


async def test_backend_expires_only_sessions_idle_everywhere(store_at):
    """Idle expiry by last use: creation and turn writes count as uses, and so do touches (from any router);
    sessions named in `keep` (in flight here) stay."""
    store = store_at.open()
    store.start()
    ids = [f"{i:032x}" for i in range(5)]
    for sid in ids:
        await store.put_session(sid, 100.0, b"h", [], wait=True)
    await store.put_session(ids[1], 200.0, None, [(0, b"t0")], wait=True)  # a turn: used at 200
    store.touch_session(ids[2], 300.0)  # a request started (another router's, say)
    await store.put_session(ids[0], 100.0, None, [], wait=True)  # after the touch, in queue order
    assert sorted(await store.expire_sessions(150.0, keep=[ids[3]])) == [ids[0], ids[4]]
    assert await store.session_turns(ids[0]) is None and await store.session_turns(ids[1]) == [b"t0"]
    assert await store.expire_sessions(150.0, keep=[]) == [ids[3]]
    assert sorted(await store.expire_sessions(250.0, keep=[])) == [ids[1]]
    store.touch_session(ids[2], 50.0)  # an older use never moves it back
    await store.put_session(ids[2], 10.0, None, [], wait=True)
    assert await store.expire_sessions(299.0, keep=[]) == []
    await store.aclose()


async def test_backend_retention_by_age(store_at):
    store = store_at.open(retention_s=100.0, max_bytes=0)
    store.start()
    recs = [_rec(i) for i in range(6)]
    for i, r in enumerate(recs):
        r.created = 1000.0 + i * 100  # 1000 .. 1500
        r.weight_version = "old" if i == 1 else "v"
    digests = [bytes([i]) * 16 for i in range(6)]
    await store.put(list(zip(digests, recs)), wait=True)
    store.mark_retrieved(digests[0])
    store.mark_retrieved(digests[5])
    plan = await store.maintain(now=1450.0, stale_versions=frozenset({"old"}))
    # older than 1350: #0 retrieved and #1 stale go; #2, #3 (unretrieved, current version) stay; #5 is young
    assert sorted(plan.delete) == [1, 2] and plan.expired == 2
    assert [await store.get(d) is not None for d in digests] == [False, False, True, True, True, True]
    assert store.stats().rows == 4 and store.stats().unretrieved == 3
    await store.aclose()


async def test_next_turn_after_restart_reuses_the_stored_tokens(nursery, store_at):
    """A text conversation continued after a restart: the next turn's prompt starts with the exact tokens the
    engine produced before the restart (loaded back from the store), not a fresh tokenization of the text."""
    sim = await start_sim(nursery, seed=8, noncanonical_rate=0.5)
    t1 = "You are a careful assistant who answers briefly and precisely. Question: what is 7 times 6? "
    assert len(t1.encode()) >= 64
    async with trio.open_nursery() as n1:
        router, _ = await store_router(n1, store_at, sims=[sim])
        async with client(router) as c:
            out1 = await _generate(c, t1, n=24)
            before = await _retrieve(c, t1 + out1["text"])
        n1.cancel_scope.cancel()
    stored = before["tokens"]
    async with trio.open_nursery() as n2:
        router, _ = await store_router(n2, store_at, sims=[sim])
        async with client(router) as c:
            t2 = t1 + out1["text"] + " Thanks. And 8 times 6?"
            r = await c.post("/generate", json={"text": t2, "sampling_params": {"max_new_tokens": 8},
                                                "return_logprob": True})
            assert r.status_code == 200
            cached = int(r.headers["x-miles-router-cached-prompt-tokens"])
            async with client(sim.url) as s:
                sent = (await s.get("/_sim/stats")).json()["last_bodies"][-1]["input_ids"]
            # everything but a stop token whose text the reply does not show is reused, token for token
            assert cached >= len(stored) - 1 and sent[:cached] == stored[:cached]
            # and the restored turn answers exactly as before the restart, from memory now
            assert await _retrieve(c, t1 + out1["text"]) == before
            assert router.runtime.trajectories.tree.peek_exact((t1 + out1["text"]).encode()) is not None
        n2.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------- same text, two spellings
async def _two_spellings(c, tiny, text: str, c2=None):
    """Two trajectories whose visible text is `text` with different tokens: the prompt spelled canonically and cut
    in two, each generation stopped at its first token (whose text the engine strips); the second through `c2`
    when given (another router). (token lists, rids)"""
    cut = next(i for i in range(1, len(text)) if tiny.encode(text[:i]) + tiny.encode(text[i:]) != tiny.encode(text))
    want, rids = [], []
    for c, ids in ((c, tiny.encode(text)), (c2 or c, tiny.encode(text[:cut]) + tiny.encode(text[cut:]))):
        first = await c.post("/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 1}})
        tok = first.json()["output_ids"][0]
        r = await c.post("/generate", json={"input_ids": ids, "return_logprob": True, "sampling_params": {
            "max_new_tokens": 8, "stop_token_ids": [tok]}})
        out = r.json()
        assert r.status_code == 200 and out["output_ids"] == [tok] and out["text"] == "", out
        want.append(ids + [tok])
        rids.append(out["meta_info"]["id"])
    assert want[0] != want[1]
    return want, rids


async def _stored_two_spellings(nursery, store_at: StoreAt, text: str):
    """A router stores two spellings of `text` (checked ambiguous while in memory) and stops; returns
    (the worker, each spelling's tokens, their rids)."""
    from router.tokenizer import load_tokenizer

    tiny = load_tokenizer("builtin:tiny")
    sim = await start_sim(nursery, seed=2)
    async with trio.open_nursery() as n1:
        router, _ = await store_router(n1, store_at, sims=[sim])
        async with client(router) as c:
            want, rids = await _two_spellings(c, tiny, text)
            before = await _retrieve(c, text)
            assert before["match"] == "ambiguous" and before["exact"] is False and before["alternatives"] == 2
        n1.cancel_scope.cancel()
    return sim, want, rids


async def test_same_text_two_spellings_is_never_exact_from_disk(nursery, store_at):
    """A GRPO group whose samples spelled the same text differently (issue 9 item 6), read back from the store
    after a restart: the text alone must not come back `exact: true` with one sample's tokens for both."""
    text = "<0001> Say hello to the wonderful world, please, and then stop."
    sim, want, rids = await _stored_two_spellings(nursery, store_at, text)
    store = store_at.open()
    store.start()
    records = await store.get_all(text_digest(text.encode()))
    assert [wire.tokens_of(r).tolist() for r in records] == want and [r.rid for r in records] == rids
    assert await store.get(text_digest(text.encode())) is None  # not determined by the text alone
    await store.aclose()
    async with trio.open_nursery() as n2:
        router, _ = await store_router(n2, store_at, sims=[sim])
        async with client(router) as c:
            after = await _retrieve(c, text)
            assert after["exact"] is False and after["match"] != "trajectory", after["match"]
        n2.cancel_scope.cancel()


async def test_same_text_two_spellings_by_rid_and_batch_after_restart(nursery, store_at):
    """After a restart the stored spellings are picked as the memory cache picks them: ambiguous for the text
    alone, exact by rid, and a batch naming the text twice gets each spelling once."""
    text = "<0002> Say hello to the wonderful world, please, and then stop."
    sim, want, rids = await _stored_two_spellings(nursery, store_at, text)
    async with trio.open_nursery() as n2:
        router, _ = await store_router(n2, store_at, sims=[sim])
        async with client(router) as c:
            amb = await _retrieve(c, text)
            assert amb["match"] == "ambiguous" and amb["alternatives"] == 2
            for rid, toks in zip(rids, want):
                got = (await c.post("/retrieve_from_text", json={"text": text, "rid": rid})).json()
                assert got.get("exact") is True and got["tokens"] == toks and got["rid"] == rid
            batch = (await c.post("/retrieve_from_text", json={"texts": [text, text]})).json()["results"]
            assert [b["tokens"] for b in batch] == want and all(b["exact"] for b in batch)
        n2.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------- the store protocol
@pytest.mark.parametrize("backend", ["router.net.store_sqlite:SqliteStore", "router.net.store_pg:PgStore",
                                     "test_store:MemoryStore"])
def test_each_store_implements_the_whole_protocol(backend):
    """Every member of TrajectoryStore exists on SqliteStore, PgStore and the in-memory one below with the same
    parameters: the protocol is what the router uses, and a backend implementing it is enough (test below)."""
    import importlib
    import inspect

    from router.core.store import TrajectoryStore

    module, cls = backend.split(":")
    Store = getattr(importlib.import_module(module), cls)

    members = [m for m in vars(TrajectoryStore) if not m.startswith("_")] + list(TrajectoryStore.__annotations__)
    assert {"put", "get", "get_all", "put_session", "session_turns", "touch_session", "expire_sessions",
            "meta_setdefault", "start", "aclose"} <= set(members)
    for name in members:
        if name in TrajectoryStore.__annotations__:
            if name == "shared":  # a class attribute: whether other processes write the store too
                assert isinstance(Store.shared, bool)
            continue  # the others are set per instance
        want = inspect.signature(getattr(TrajectoryStore, name))
        got = inspect.signature(getattr(Store, name))
        assert list(got.parameters) == list(want.parameters), name
        assert inspect.iscoroutinefunction(getattr(Store, name)) == inspect.iscoroutinefunction(
            getattr(TrajectoryStore, name)), name


class MemoryStore:
    """A second TrajectoryStore backend, in memory, written against router/core/store.py only: what a PostgreSQL or
    Valkey backend would implement. One instance outlives routers (a "restart" is a new router on it)."""

    instances: dict = {}

    def __new__(cls, path, **kw):
        inst = cls.instances.get(str(path))
        if inst is None:
            inst = cls.instances[str(path)] = super().__new__(cls)
            inst._init(path)
        return inst

    def __init__(self, path, **kw) -> None:
        pass

    shared = False  # one router at a time

    def _init(self, path) -> None:
        self.path = str(path)
        self.name = f"trajectory store {path}"
        self.rows: list = []  # (id, digest, head, vlen, created, retrieved, record)
        self.sessions: dict = {}  # sid -> [last used, header, {turn: blob}]
        self.meta: dict = {}
        self.fail_writes: str | None = None
        self.commits = 0

    def start(self) -> None:
        pass

    async def put(self, records, *, wait):
        from router.core.store import StoreWriteError

        if self.fail_writes:
            raise StoreWriteError(f"{self.name}: cannot write: {self.fail_writes}")
        await trio.sleep(0)
        for r in records:
            self.rows.append([len(self.rows) + 1, r.digest, r.head, r.vlen, r.record.created, False, r.record])
        self.commits += 1

    async def get_all(self, digest):
        return [row[6] for row in self.rows if row[1] == digest]

    async def get(self, digest):
        recs = await self.get_all(digest)
        return recs[-1] if recs and all(r.tokens == recs[-1].tokens for r in recs) else None

    def may_continue(self, head):
        return any(row[2] == head for row in self.rows)

    async def prefix_candidates(self, heads, max_len):
        return [(row[0], row[3], row[1]) for head in heads for row in reversed(self.rows)
                if row[2] == head and row[3] <= max_len]

    async def get_ids(self, ids):
        by_id = {row[0]: row[6] for row in self.rows}
        return [by_id[i] for i in ids]

    def mark_retrieved(self, digest):
        for row in self.rows:
            if row[1] == digest:
                row[5] = True

    async def maintain(self, *, now, stale_versions):
        from router.core.store import RetentionPlan

        return RetentionPlan()

    def stats(self):
        from router.core.store import StoreStats

        nbytes = sum(len(wire.encode(row[6])) for row in self.rows)
        return StoreStats(path=self.path, rows=len(self.rows), unretrieved=sum(not row[5] for row in self.rows),
                          payload_bytes=nbytes, file_bytes=nbytes, pending_writes=0, writable=not self.fail_writes,
                          write_error=self.fail_writes, commits=self.commits)

    def scan(self, *, unretrieved_only):
        for row in self.rows:
            if not (unretrieved_only and row[5]):
                yield row[0], row[6]

    async def put_session(self, sid, at, header, turns, *, wait):
        from router.core.store import SessionWrite, StoreWriteError

        if self.fail_writes:
            raise StoreWriteError(f"{self.name}: cannot write: {self.fail_writes}")
        if header is not None:
            self.sessions.setdefault(sid, [at, None, {}])[1] = header
        elif sid not in self.sessions:
            return SessionWrite(gone=True)
        s = self.sessions[sid]
        s[0] = max(s[0], at)
        taken = tuple(t for t, _ in turns if t in s[2])
        s[2].update((t, blob) for t, blob in turns if t not in taken)
        return SessionWrite(taken=taken)

    async def session_turns(self, sid, after=-1):
        s = self.sessions.get(sid)
        return None if s is None else [s[2][t] for t in sorted(s[2]) if t > after]

    def touch_session(self, sid, at):
        if sid in self.sessions:
            self.sessions[sid][0] = max(self.sessions[sid][0], at)

    async def expire_sessions(self, before, keep):
        gone = [sid for sid, s in self.sessions.items() if s[0] < before and sid not in keep]
        for sid in gone:
            del self.sessions[sid]
        return gone

    async def delete_session(self, sid, *, wait):
        self.sessions.pop(sid, None)

    def meta_setdefault(self, key, value):
        return self.meta.setdefault(key, value)

    async def aclose(self):
        pass


async def test_the_router_runs_over_another_backend_of_the_protocol(nursery, tmp_path, monkeypatch):
    """The router over MemoryStore (above) instead of SQLite, nothing else changed: trajectories retrieved exactly
    after a restart, a text conversation continued with the stored tokens, sessions that survive, and a 503 naming
    the store when it cannot write."""
    from router.net.trajectories import TrajectoryService

    monkeypatch.setattr(TrajectoryService, "store_backend", MemoryStore)
    path = tmp_path / "elsewhere"
    sim = await start_sim(nursery, seed=8, chat_replies=True)
    t1 = "You are a careful assistant who answers briefly and precisely. Question: what is 7 times 6? "

    async def router_on(n):
        return await start_router(
            n, workers={"urls": [sim.url]}, store={"enabled": True, "path": str(path)},
            routes=[{"path": "/generate", "pipeline": str(ROOT / "pipelines/radix-cache-r3.toml")}],
            sessions={"enabled": True, "pipeline": str(ROOT / "pipelines/session-chat-r3.toml")})

    async with trio.open_nursery() as n1:
        router = await router_on(n1)
        assert isinstance(router.runtime.trajectories.store, MemoryStore)
        async with client(router) as c:
            out1 = await _generate(c, t1, n=24)
            before = await _retrieve(c, t1 + out1["text"])
            sid = (await c.post("/sessions")).json()["session_id"]
            msgs = [{"role": "user", "content": "hello there"}]
            r = await c.post(f"/sessions/{sid}/v1/chat/completions", json={"model": "m", "messages": msgs})
            assert r.status_code == 200, r.text
            session_before = (await c.get(f"/sessions/{sid}")).json()
        n1.cancel_scope.cancel()
    store = MemoryStore.instances[str(path)]
    assert len(store.rows) == 1 and sid in store.sessions

    async with trio.open_nursery() as n2:
        router = await router_on(n2)
        assert router.runtime.trajectories.tree.stats()["trajectories"] == 0
        async with client(router) as c:
            assert await _retrieve(c, t1 + out1["text"]) == before  # from the backend, byte for byte
            t2 = t1 + out1["text"] + " Thanks. And 8 times 6?"
            r = await c.post("/generate", json={"text": t2, "sampling_params": {"max_new_tokens": 8},
                                                "return_logprob": True})
            assert r.status_code == 200
            assert int(r.headers["x-miles-router-cached-prompt-tokens"]) >= len(before["tokens"]) - 1
            assert (await c.get(f"/sessions/{sid}")).json() == session_before
            assert (await c.get("/cache/stats")).json()["store"]["rows"] == 2
            store.fail_writes = "the network store is unreachable"
            r = await c.post("/generate", json={"text": "<x> one more", "sampling_params": {"max_new_tokens": 4}})
            assert r.status_code == 503 and r.json()["store"] == str(path)
            assert r.json()["error"] == f"trajectory store {path}: cannot write: the network store is unreachable"
            r = await c.post("/sessions")
            assert r.status_code == 503 and "unreachable" in r.json()["error"]
        n2.cancel_scope.cancel()
    MemoryStore.instances.pop(str(path))
