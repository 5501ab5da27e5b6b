"""Continuing a stored text: a later turn whose prompt starts with a trajectory that is only on disk (evicted from
memory, or stored before a restart) reuses its exact tokens, and the store is asked only when the memory cache may
not cover the prompt (issue 19 item 6: every prompt sharing one long system prompt must not cost a store query).
Prefix keys and the key filter as properties; the router over real sockets, once over SQLite and once over
PostgreSQL (a throwaway server, tests/pg.py), for the rest."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import client, start_router, start_sim
from router.core.radix import RadixTree, TrajectoryInput
from router.core.vocab import VocabBytes
from router.core.store import HEAD_BYTES, KeyFilter, prefix_heads, text_head

ROOT = Path(__file__).resolve().parent.parent

# One long system prompt in front of every question (the RL norm), ~1.3 KB.
SYSTEM = ("<|im_start|>system\nYou are a careful assistant. " + " ".join(
    f"Rule {i}: check every step of the work and state the answer plainly." for i in range(20)) + "<|im_end|>\n")


def _question(i: int) -> str:
    return f"{SYSTEM}<|im_start|>user\nQuestion {i}: what is {i} times {i + 7}?<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------- prefix keys
@settings(max_examples=200, deadline=None)
@given(text=st.binary(min_size=HEAD_BYTES, max_size=700), data=st.data())
def test_prefix_heads_include_the_key_of_every_prefix_longer_than_the_match(text, data):
    """The exactness of continuation rests on this: for any stored text V that the prompt starts with and that is
    longer than what memory matched, V's key is among the keys the router asks about."""
    vlen = data.draw(st.integers(HEAD_BYTES, len(text)))
    matched = data.draw(st.integers(0, vlen - 1))
    heads = prefix_heads(text, matched)
    assert text_head(text[:vlen]) in heads
    # a store written before keys moved to the end keyed every text by its first 64 bytes: still asked
    assert int.from_bytes(hashlib.blake2b(text[:HEAD_BYTES], digest_size=8).digest(), "little") >> 1 in heads
    # and one key per block from the block the match ends in (plus that first one), not one per block of the text
    assert len(heads) <= 2 + (len(text) - matched + HEAD_BYTES - 1) // HEAD_BYTES


def test_texts_behind_one_shared_head_have_keys_of_their_own():
    a, b = (_question(i).encode() + b"The answer is " + str(i).encode() * 40 for i in (1, 2))
    assert a[:len(SYSTEM)] == b[:len(SYSTEM)] and len(SYSTEM) > 16 * HEAD_BYTES
    assert text_head(a) != text_head(b)
    # a fresh question's prompt asks about keys neither stored text has
    assert not {text_head(a), text_head(b)} & set(prefix_heads(_question(3).encode()))
    assert text_head(b"x" * (HEAD_BYTES - 1)) is None and prefix_heads(b"x" * (HEAD_BYTES - 1)) == []


@settings(max_examples=50, deadline=None)
@given(keys=st.lists(st.integers(0, 2**63 - 1), max_size=300, unique=True), a=st.integers(0, 300),
       b=st.integers(0, 300))
def test_key_filter_never_forgets_a_key(keys, a, b):
    f = KeyFilter(bits_log2=12)  # small, so the bits collide a lot
    a, b = sorted((a, b))
    f.add_many(np.array(keys[:a], np.int64))
    f.load((k,) for k in keys[a:b])  # as rows from a database cursor
    for k in keys[b:]:
        f.add(k)
    assert all(k in f for k in keys)


def test_key_filter_false_positives_are_rare():
    rng = np.random.default_rng(0)
    f = KeyFilter(bits_log2=20)
    f.add_many(rng.integers(0, 2**63 - 1, 20_000, dtype=np.int64))
    others = rng.integers(0, 2**63 - 1, 20_000, dtype=np.int64).tolist()
    assert sum(k in f for k in others) < 20_000 * 0.002  # ~(1 - e^(-3 * 20k / 1M))^3 = 0.02%


def test_an_evicted_trajectory_reports_the_tag_it_was_given():
    tree = RadixTree(VocabBytes([bytes([i]) for i in range(256)]))
    for i, tag in ((1, 111), (2, None)):
        text = f"prompt {i} and its reply".encode()
        tree.insert(TrajectoryInput(rid=f"r{i}", prompt_ids=np.frombuffer(text[:8], np.uint8).astype(np.int32),
                                    output_ids=np.frombuffer(text[8:], np.uint8).astype(np.int32),
                                    output_logprobs=np.zeros(len(text) - 8, np.float32), visible_text=text), now=i)
        assert tree.peek_exact(text, tag=tag) is not None
    report = tree.evict(budget_bytes=0, hard_budget_bytes=0)
    assert sorted(report.rids) == ["r1", "r2"] and report.tags == [111]


# ---------------------------------------------------------------------------------------------- over real sockets
async def _router(nursery, store_at, sim, store_extra=None, **cache):
    return await start_router(
        nursery, workers={"urls": [sim.url]}, cache=cache,
        routes=[{"path": "/generate", "pipeline": str(ROOT / "pipelines/radix-cache.toml")}],
        store=store_at.config(sync="commit", **(store_extra or {})))


def _count_store_queries(router) -> list:
    """Wrap the router's store so every prefix_candidates query is recorded (the keys asked about, one list per
    query)."""
    store, asked = router.runtime.trajectories.store, []
    real = store.prefix_candidates

    async def counted(heads, max_len):
        assert heads
        asked.append(list(heads))
        return await real(heads, max_len)

    store.prefix_candidates = counted
    return asked


async def _turn(c, sim, text: str, n: int = 16) -> tuple[dict, int, list]:
    """One /generate: (reply, prompt tokens reused from the cache, the input_ids the worker received)."""
    r = await c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": n},
                                        "return_logprob": True})
    assert r.status_code == 200, r.text
    async with client(sim.url) as s:
        sent = (await s.get("/_sim/stats")).json()["last_bodies"][-1]["input_ids"]
    return r.json(), int(r.headers["x-miles-router-cached-prompt-tokens"]), sent


def _assert_reused(cached: int, sent: list, prev: list) -> None:
    """The next turn's input starts with the previous trajectory's tokens verbatim: all of them but at most the
    last few (a stop token whose text the reply does not show, or the bytes of a character that the length limit
    cut in half: the reply shows U+FFFD for those, so the next prompt's text does not continue them)."""
    assert cached >= len(prev) - 4 and sent[:cached] == prev[:cached], (cached, len(prev))


async def _stored_tokens(c, text: str) -> list:
    got = (await c.post("/retrieve_from_text", json={"text": text})).json()
    assert got["exact"] and got["match"] == "trajectory", got
    return got["tokens"]


async def test_the_store_is_not_asked_about_what_memory_holds(nursery, store_at):
    """Fresh questions behind one long system prompt, and conversations continued while their turns are in memory:
    no store query at all on a store only this router writes (SQLite), at most one per prompt on a store other
    routers may have written a moment ago (PostgreSQL), and every next turn reuses the cached tokens."""
    sim = await start_sim(nursery, seed=4, noncanonical_rate=0.5)
    router = await _router(nursery, store_at, sim)
    asked = _count_store_queries(router)
    async with client(router) as c:
        convs = [_question(i) for i in range(6)]
        for turn in range(3):
            for k, text in enumerate(convs):
                out, cached, sent = await _turn(c, sim, text)
                if turn:
                    prev = await _stored_tokens(c, text[:text.rindex(" Next: ")])
                    _assert_reused(cached, sent, prev)
                convs[k] = text + out["text"] + f" Next: and {turn} more?"
    assert asked == [] if not router.runtime.trajectories.store.shared else len(asked) <= 18
    assert router.runtime.trajectories.store.stats().rows == 18


async def test_a_turn_evicted_from_memory_is_continued_with_its_exact_tokens(nursery, store_at):
    """With a memory budget that evicts every trajectory right after it is stored, each next turn's earlier turns
    come back from the store: the worker receives them token for token (the worker spells text non-canonically
    half the time, so a fresh tokenization would differ), and the store is asked only about evicted keys."""
    sim = await start_sim(nursery, seed=5, noncanonical_rate=0.5)
    router = await _router(nursery, store_at, sim, budget_bytes=1, hard_budget_bytes=1)
    asked = _count_store_queries(router)
    async with client(router) as c:
        convs = [_question(i) for i in range(4)]
        for turn in range(3):
            for k, text in enumerate(convs):
                before = len(asked)
                out, cached, sent = await _turn(c, sim, text)
                if turn:
                    prev = await _stored_tokens(c, text[:text.rindex(" Next: ")])
                    _assert_reused(cached, sent, prev)
                    assert len(asked) > before  # it had to come from the store
                convs[k] = text + out["text"] + f" Next: and {turn} more?"
            assert router.runtime.trajectories.tree.stats()["trajectories"] <= 1
    if router.runtime.trajectories.store.shared:  # one query per prompt, for all its keys
        assert len(asked) <= 3 * 4
    else:  # only keys of evicted trajectories were asked about: at most a couple per continued turn
        assert 0 < sum(map(len, asked)) <= 2 * 4 * 2


async def test_a_conversation_stored_before_a_restart_is_continued_exactly(nursery, store_at):
    """After a restart: new questions behind the same system prompt cost no store query (on a shared store, one
    per prompt); a conversation stored before the restart is continued with its exact tokens."""
    await _continued_after_restart(nursery, store_at)


async def test_a_postgresql_store_one_router_writes_is_asked_no_more_than_sqlite(nursery, pg_url):
    """`store.shared = false`: the database is this router's alone, so it is asked only about keys stored before
    the router started (a filter loaded at startup, as SQLite's): no query for new questions, and a conversation
    stored before a restart is still continued exactly."""
    from harness import StoreAt

    await _continued_after_restart(nursery, StoreAt("postgresql", pg_url), {"shared": False})


async def _continued_after_restart(nursery, store_at, store_extra=None):
    sim = await start_sim(nursery, seed=6, noncanonical_rate=0.5)
    texts = []
    async with trio.open_nursery() as n1:
        router = await _router(n1, store_at, sim, store_extra)
        assert router.runtime.trajectories.store.shared == (store_at.kind == "postgresql" and store_extra is None)
        async with client(router) as c:
            for i in range(8):
                out, _, _ = await _turn(c, sim, _question(i))
                texts.append(_question(i) + out["text"])
            stored = [await _stored_tokens(c, t) for t in texts]
        n1.cancel_scope.cancel()
    async with trio.open_nursery() as n2:
        router = await _router(n2, store_at, sim, store_extra)
        asked = _count_store_queries(router)
        async with client(router) as c:
            for i in range(100, 110):
                await _turn(c, sim, _question(i))
            assert asked == [] if not router.runtime.trajectories.store.shared else len(asked) <= 10
            for k in (5, 2):
                out, cached, sent = await _turn(c, sim, texts[k] + " Next: one more?")
                _assert_reused(cached, sent, stored[k])
            assert 0 < len(asked) <= (4 if not router.runtime.trajectories.store.shared else 12)
        n2.cancel_scope.cancel()


async def test_a_store_keyed_by_text_heads_is_still_continued(nursery, store_at):
    """Stores written before keys moved to the end keyed every text by its first 64 bytes: their trajectories are
    still continued with their exact tokens."""
    sim = await start_sim(nursery, seed=7, noncanonical_rate=0.5)
    async with trio.open_nursery() as n1:
        router = await _router(n1, store_at, sim)
        async with client(router) as c:
            out, _, _ = await _turn(c, sim, _question(1))
            text = _question(1) + out["text"]
            stored = await _stored_tokens(c, text)
        n1.cancel_scope.cancel()
    legacy = int.from_bytes(hashlib.blake2b(text.encode()[:HEAD_BYTES], digest_size=8).digest(), "little") >> 1
    if store_at.kind == "sqlite":
        conn = sqlite3.connect(store_at.where)
        assert conn.execute("UPDATE trajectories SET head = ?", (legacy,)).rowcount == 1
        conn.commit()
        conn.close()
    else:
        import psycopg

        with psycopg.connect(store_at.where, autocommit=True) as conn:
            assert conn.execute("UPDATE miles_router.trajectories SET head = %s", (legacy,)).rowcount == 1
    async with trio.open_nursery() as n2:
        router = await _router(n2, store_at, sim)
        async with client(router) as c:
            out, cached, sent = await _turn(c, sim, text + " Next: one more?")
            _assert_reused(cached, sent, stored)
        n2.cancel_scope.cancel()
