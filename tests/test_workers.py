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


# ---- probes vs. request outcomes; the circuit breaker ------------------------------------------

from router.core.workers import BreakerPolicy, BreakerState  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def breaker_pool(n=2, **policy):
    clock = Clock()
    pool = WorkerPool(failure_threshold=3, breaker=BreakerPolicy(**policy), clock=clock)
    ws = [pool.add(f"http://127.0.0.1:{9000 + i}")[0] for i in range(n)]
    return pool, ws, clock


def test_request_outcomes_never_erase_failed_probes():
    pool, (w, _), _ = breaker_pool()
    pool.record_failure(w, "health 503")
    pool.record_failure(w, "health 503")
    for _ in range(50):  # served requests in between
        pool.record_outcome(w, failed=False)
    t = pool.record_failure(w, "health 503")
    assert t is not None and w.state is WorkerState.QUARANTINED


def test_breaker_opens_on_consecutive_failures_and_a_success_resets_the_run():
    pool, (w, other), clock = breaker_pool(failures=3)
    pool.record_outcome(w, True, "HTTP 500")
    pool.record_outcome(w, True, "HTTP 500")
    pool.record_outcome(w, False)
    pool.record_outcome(w, True, "HTTP 500")
    pool.record_outcome(w, True, "HTTP 500")
    assert w.breaker.state is BreakerState.CLOSED
    t = pool.record_outcome(w, True, "HTTP 502")
    assert t.new is BreakerState.OPEN and "3 consecutive failed requests, last: HTTP 502" in w.breaker.reason
    assert all(pool.pick() is other for _ in range(5)) and not pool.admits(w)
    assert other.breaker.state is BreakerState.CLOSED  # per worker


def test_breaker_failure_rate_over_the_window():
    pool, (w, _), clock = breaker_pool(failures=100, failure_rate=0.5, min_requests=10, window_s=10)
    for i in range(9):
        pool.record_outcome(w, failed=bool(i % 2))
        clock.t += 0.5
    assert w.breaker.state is BreakerState.CLOSED  # 9 < min_requests
    clock.t += 20  # the old outcomes leave the window
    for i in range(9):
        pool.record_outcome(w, failed=i % 2 == 0)
    assert w.breaker.state is BreakerState.CLOSED
    pool.record_outcome(w, failed=True)  # 6 of 10 failed
    assert w.breaker.state is BreakerState.OPEN and "6 of 10 requests failed" in w.breaker.reason


def test_half_open_admits_one_trial_and_its_outcome_decides():
    pool, (w, other), clock = breaker_pool(failures=1, cooldown_s=5)
    pool.record_outcome(w, True, "connect failed")
    clock.t += 4.9
    assert not pool.admits(w)
    clock.t += 0.2
    assert pool.admits(w)
    trial, _ = pool.acquire(w)
    assert trial and w.breaker.state is BreakerState.HALF_OPEN
    assert not pool.admits(w) and pool.pick() is other  # only one trial at a time
    pool.record_outcome(w, False, trial=False)  # a request sent before it opened: doesn't decide
    assert w.breaker.state is BreakerState.HALF_OPEN
    pool.record_outcome(w, True, "HTTP 500", trial=True)
    pool.release(w, trial)
    assert w.breaker.state is BreakerState.OPEN and w.breaker.reason.startswith("trial request failed")
    clock.t += 5.1
    trial, _ = pool.acquire(w)
    pool.release(w, trial)  # the client left: no outcome; the next request is the trial
    assert w.breaker.state is BreakerState.HALF_OPEN and pool.admits(w)
    trial, _ = pool.acquire(w)
    pool.record_outcome(w, False, trial=trial)
    pool.release(w, trial)
    assert w.breaker.state is BreakerState.CLOSED and pool.admits(w)
    assert w.breaker.transitions == {"closed->open": 1, "open->half_open": 2, "half_open->open": 1,
                                     "half_open->closed": 1}


def test_a_passing_probe_never_closes_the_breaker():
    """/health answering 200 says nothing about the requests that failed: only a successful trial
    request closes the breaker (issue 20: a probe closing it let `failures` more requests fail every
    cooldown)."""
    pool, (w, _), clock = breaker_pool(failures=1, cooldown_s=5)
    pool.record_outcome(w, True, "timed out")
    pool.record_success(w)
    assert w.breaker.state is BreakerState.OPEN
    clock.t += 6
    for _ in range(3):
        assert pool.record_success(w) is None
    assert w.breaker.state is BreakerState.OPEN and pool.admits(w)  # its cooldown is over: a trial may go
    trial, _ = pool.acquire(w)
    assert trial and w.breaker.state is BreakerState.HALF_OPEN
    pool.record_success(w)  # a probe while the trial is out decides nothing either
    assert w.breaker.state is BreakerState.HALF_OPEN
    pool.record_outcome(w, False, trial=trial)
    pool.release(w, trial)
    assert w.breaker.state is BreakerState.CLOSED


def test_when_every_breaker_is_open_the_pool_is_not_emptied():
    """With every healthy worker's breaker open, all are let through (one request at a time on
    each is a trial, early): a failed one changes nothing, a success closes that breaker and so
    ends it; a quarantined worker stays out; a passing probe closes no breaker;
    admit_when_all_open=False: nothing is routable (503)."""
    pool, (w, other), clock = breaker_pool(failures=1, cooldown_s=30)
    pool.record_outcome(w, True, "HTTP 500")
    assert pool.pick() is other and not pool.admits(w)  # one open breaker: its load goes elsewhere
    pool.record_outcome(other, True, "HTTP 500")
    assert pool.admits(w) and pool.admits(other) and set(pool.routable()) == {w, other}
    assert pool.pick() in (w, other)
    trial, _ = pool.acquire(w)
    assert trial and w.breaker.state is BreakerState.OPEN  # a trial, early, but no transition yet
    pool.record_outcome(w, True, "HTTP 500", trial=trial)  # failed: nothing changes (no flapping)
    pool.release(w, trial)
    assert w.breaker.state is BreakerState.OPEN and w.breaker.transitions == {"closed->open": 1}
    trial, _ = pool.acquire(w)
    assert trial and pool.admits(w)  # still nothing else: let through, but not as a second trial
    assert pool.acquire(w) == (False, None)
    pool.release(w)
    pool.record_success(other)  # a passing probe closes no breaker
    assert other.breaker.state is BreakerState.OPEN
    pool.record_outcome(w, False, trial=trial)
    pool.release(w, trial)
    assert w.breaker.state is BreakerState.CLOSED and w.breaker.transitions == {"closed->open": 1, "open->closed": 1}
    assert not pool.admits(other) and pool.pick() is w
    # a quarantined worker is never let through: the healthy ones are what counts
    pool.record_outcome(w, True, "HTTP 500")
    for _ in range(3):
        pool.record_failure(other, "health 503")
    assert other.state is WorkerState.QUARANTINED and pool.routable() == [w] and pool.pick() is w
    strict, (a, b), _ = breaker_pool(failures=1, cooldown_s=30, admit_when_all_open=False)
    strict.record_outcome(a, True, "HTTP 500")
    strict.record_outcome(b, True, "HTTP 500")
    assert strict.pick() is None and strict.routable() == []


def test_breaker_disabled_never_opens_and_cap_limits_admission():
    pool, (w, _), _ = breaker_pool(enabled=False, failures=1)
    for _ in range(10):
        pool.record_outcome(w, True, "HTTP 500")
    assert w.breaker.state is BreakerState.CLOSED and w.request_failures_total == 10
    pool.max_inflight = 1
    pool.acquire(w)
    assert not pool.admits(w) and pool.routable() == pool.active


def test_pick_for_key_least_loaded_then_key_hash():
    pool, ws = make_pool(3)
    assert {pool.pick_for_key(h).url for h in range(30)} == {w.url for w in ws}  # ties: by hash
    assert all(pool.pick_for_key(7) is pool.pick_for_key(7) for _ in range(3))  # no cursor
    pool.acquire(ws[0])
    pool.acquire(ws[1])
    assert {pool.pick_for_key(h) for h in range(30)} == {ws[2]}


# ---- the breaker against a reference model (hypothesis) --------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_steps = st.lists(st.one_of(
    st.tuples(st.just("wait"), st.floats(0, 4)),
    st.tuples(st.just("request"), st.booleans()),  # a request that fails (True) or succeeds
    st.tuples(st.just("left"), st.none()),  # a request whose client left: no outcome
    st.tuples(st.just("probe_ok"), st.none()),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps=_steps, failures=st.integers(1, 4), cooldown=st.floats(0.5, 5), window=st.floats(1, 10),
       rate=st.sampled_from([0.5, 0.75, 1.0]), min_requests=st.integers(2, 6))
def test_breaker_matches_reference(steps, failures, cooldown, window, rate, min_requests):
    pool, (w, _), clock = breaker_pool(failures=failures, cooldown_s=cooldown, window_s=window,
                                       failure_rate=rate, min_requests=min_requests)
    # Reference: state, opened_at, run of failures, outcomes in the window.
    state, opened, run, outcomes = "closed", 0.0, 0, []
    counted = 0
    for op, arg in steps:
        now, before = clock.t, state
        returned = []  # every breaker transition comes back from the pool call that made it
        admits = state == "closed" or state == "half_open" or (state == "open" and now >= opened + cooldown)
        assert pool.breaker_admits(w) == admits, (op, state)
        if op == "wait":
            clock.t += arg
        elif op == "probe_ok":
            assert pool.record_success(w) is None  # never moves the breaker
        elif admits:  # a request is sent only when the breaker lets it through
            trial, transition = pool.acquire(w)
            returned.append(transition)
            assert trial == (state != "closed")
            if state == "open":
                state = "half_open"
            if op == "left":
                pool.release(w, trial)
            else:
                failed = arg
                returned.append(pool.record_outcome(w, failed, "x", trial))
                pool.release(w, trial)
                if state == "half_open":
                    state, run, outcomes = ("open", 0, []) if failed else ("closed", 0, [])
                    if failed:
                        opened = now
                else:
                    outcomes = [(t, f) for t, f in outcomes + [(now, failed)] if t >= now - window]
                    run = run + 1 if failed else 0
                    bad = sum(f for _, f in outcomes)
                    if failed and (run >= failures or (len(outcomes) >= min_requests
                                                       and bad >= rate * len(outcomes))):
                        state, opened, outcomes = "open", now, []
        assert w.breaker.state.value == state, (op, arg)
        assert w.inflight == 0
        moves = [(t.old.value, t.new.value) for t in returned if t is not None]
        assert all(t.worker is w for t in returned if t is not None)
        # The returned transitions lead from the state before the step to the state after it, and
        # they are all the breaker counted: none happened without being returned.
        at = before
        for old, new in moves:
            assert old == at
            at = new
        assert at == state
        counted += len(moves)
        assert sum(w.breaker.transitions.values()) == counted
