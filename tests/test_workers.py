"""WorkerPool: selection, in-flight accounting and the health state machine (pure logic)."""

from collections import Counter

from router.core.workers import WorkerPool, WorkerState


def make_pool(n=3, **kw):
    pool = WorkerPool(**kw)
    ws = [pool.add(f"http://127.0.0.1:{9000 + i}")[0] for i in range(n)]
    return pool, ws


def test_add_is_idempotent():
    pool = WorkerPool()
    w1, created1 = pool.add("http://a:1")
    w2, created2 = pool.add("http://a:1")
    assert created1 and not created2 and w1 is w2 and len(pool) == 1


def test_least_inflight_ties_round_robin():
    pool, ws = make_pool(3)
    picks = Counter(pool.pick().url for _ in range(30))
    assert set(picks.values()) == {10}, picks  # all idle: round-robin
    pool.acquire(ws[0])
    pool.acquire(ws[1])
    assert all(pool.pick() is ws[2] for _ in range(5))  # only the idle one
    pool.acquire(ws[2])
    pool.acquire(ws[2])
    assert {pool.pick().url for _ in range(6)} == {ws[0].url, ws[1].url}


def test_pick_respects_exclude_and_health():
    pool, ws = make_pool(2, failure_threshold=1)
    assert pool.pick(exclude=[ws[0]]) is ws[1]
    pool.record_failure(ws[1], "boom")
    assert ws[1].state is WorkerState.QUARANTINED
    assert pool.pick(exclude=[ws[0]]) is None
    assert pool.pick() is ws[0]


def test_quarantine_after_threshold_and_recovery_after_successes():
    pool, (w,) = make_pool(1, failure_threshold=3, success_threshold=2)
    assert pool.record_failure(w, "e1") is None
    assert pool.record_failure(w, "e2") is None
    t = pool.record_failure(w, "e3")
    assert t is not None and t.new is WorkerState.QUARANTINED and w.last_error == "e3"
    assert pool.pick() is None
    assert pool.record_success(w) is None and w.state is WorkerState.QUARANTINED
    t = pool.record_success(w)
    assert t is not None and t.new is WorkerState.HEALTHY and pool.pick() is w


def test_flapping_does_not_quarantine_below_threshold():
    pool, (w,) = make_pool(1, failure_threshold=3)
    for _ in range(20):
        pool.record_failure(w, "x")
        pool.record_failure(w, "x")
        pool.record_success(w)
    assert w.state is WorkerState.HEALTHY and w.quarantines_total == 0


def test_admission_check_holds_recovered_worker():
    pool, (w,) = make_pool(1, failure_threshold=1, success_threshold=1)
    pool.record_failure(w, "down")
    pool.admission_check = lambda worker: "weights are stale"
    pool.record_success(w)
    assert w.state is WorkerState.QUARANTINED and w.held_reason == "weights are stale"
    pool.admission_check = lambda worker: None
    pool.record_success(w)
    assert w.state is WorkerState.HEALTHY and w.held_reason is None


def test_remove_drains_until_inflight_done():
    pool, (w, other) = make_pool(2)
    pool.acquire(w)
    removed = pool.remove(w.url)
    assert removed is w and w.state is WorkerState.DRAINING
    assert w.url not in pool and w in pool.all
    assert all(pool.pick() is other for _ in range(3))
    pool.release(w)
    assert w not in pool.all and pool.get(w.url) is None


def test_readd_while_draining_keeps_inflight():
    pool, (w,) = make_pool(1)
    pool.acquire(w)
    pool.remove(w.url)
    w2, created = pool.add(w.url)
    assert created and w2 is w and w.inflight == 1 and w.state is WorkerState.HEALTHY
    pool.release(w)
    assert w.inflight == 0 and w.url in pool
