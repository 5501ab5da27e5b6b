"""The worker pool: registration, health state machine, circuit breaker, in-flight accounting and
least-in-flight selection.

Two kinds of evidence, kept apart. Health probes (`record_success`/`record_failure`; a failed
connect counts too) drive the health state: `failure_threshold` failed probes in a row quarantine a
worker, and no served request erases a failed probe. Request outcomes (`record_outcome`: connect
failures, timeouts, 5xx replies, replies broken off) drive a per-worker circuit breaker: it opens on
`failures` consecutive failures or a failure rate over `window_s`, keeps the worker out of selection
for `cooldown_s`, then admits one trial request whose success closes it (a failed trial opens it
for another cooldown); when every healthy worker's breaker is open, none is kept out
(`admit_when_all_open`). A passing probe never closes a breaker: a worker whose /health answers 200
while its requests fail would otherwise get `failures` more failed requests every cooldown. 4xx
replies are the client's problem and SGLang's `abort` finishes are deliberate: neither is a failure.

Pure bookkeeping: the I/O edge calls these around every proxied request and probe. Nothing here
sleeps or talks to a socket; time comes from `clock` (injectable), so every transition is
unit-tested directly.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, NamedTuple

import msgspec
from msgspec import Meta

from router.core.control import ControlState


class WorkerState(str, enum.Enum):
    HEALTHY = "healthy"
    QUARANTINED = "quarantined"
    DRAINING = "draining"  # removed; stays listed until its in-flight requests finish


class BreakerState(str, enum.Enum):
    CLOSED = "closed"  # in rotation
    OPEN = "open"  # out of selection until the cooldown is over
    HALF_OPEN = "half_open"  # one trial request decides


class BreakerPolicy(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """When request outcomes take a worker out: the config's `[breaker]` table, decoded straight into
    this (router/config.py), and what the pool reads."""

    enabled: bool = True
    failures: Annotated[int, Meta(ge=1)] = 5  # consecutive failed requests -> open
    window_s: Annotated[float, Meta(gt=0)] = 60.0  # ... or a failure rate over this window
    failure_rate: Annotated[float, Meta(gt=0, le=1)] = 0.5  # fraction of failed requests in the window -> open
    min_requests: Annotated[int, Meta(ge=1)] = 20  # the rate rule needs at least this many outcomes in the window
    cooldown_s: Annotated[float, Meta(gt=0)] = 30.0  # open this long, then half-open
    # When every healthy worker's breaker is open, let them through anyway (a trial each) rather
    # than answer 503: a breaker sheds load onto the rest of the pool, and with no rest there is
    # nothing to shed it to (Envoy caps outlier ejection the same way: max_ejection_percent).
    admit_when_all_open: bool = True


@dataclass(slots=True)
class Breaker:
    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    trial_inflight: bool = False
    reason: str | None = None  # why it last opened
    # (time, failed) of recent outcomes, for the rate rule
    window: deque = field(default_factory=deque)
    transitions: dict = field(default_factory=dict)  # "closed->open" -> count

    def describe(self) -> dict:
        return {"state": self.state.value, "consecutive_failures": self.consecutive_failures,
                "reason": self.reason, "transitions": dict(self.transitions)}


@dataclass(eq=False, slots=True)
class Worker:
    url: str
    state: WorkerState = WorkerState.HEALTHY
    inflight: int = 0
    # Requests routed here whose bytes are not all written to the worker yet: a pause waits for them, so it
    # cannot overtake a request that was routed before it (router/net/rl.py `engine_call`).
    unsent: int = 0
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_error: str | None = None
    # Why a worker that passes health checks is still kept out (e.g. stale weights).
    held_reason: str | None = None
    weight_version: str | None = None
    requests_total: int = 0
    failures_total: int = 0
    quarantines_total: int = 0
    request_failures_total: int = 0  # failed request outcomes (what the breaker counts)
    breaker: Breaker = field(default_factory=Breaker)
    added_at: float = field(default_factory=time.time)
    # The SGLang Model Gateway's view (POST /workers): an id and the engine's role. The id is a hash of the URL
    # (a UUID5), so every router process and every router of a fleet names a worker the same: `GET /workers`
    # on one and `DELETE /workers/{id}` on another act on one worker (the gateway draws a random UUID).
    id: str = ""
    worker_type: str = "regular"
    bootstrap_port: int | None = None
    # Labels for selectors (the RL plane's `?selector=`): from the config, POST /workers or /add_worker.
    labels: dict = field(default_factory=dict)
    # Paused / asleep as the control calls through the router left it (router/core/control.py).
    control: ControlState = field(default_factory=ControlState)
    # The engine's own facts for the RL plane's discovery rows (router/net/rl.py), fetched once.
    engine_info: dict | None = None
    engine_info_tried: float = float("-inf")

    def __post_init__(self) -> None:
        if not self.id:
            self.id = str(uuid.uuid5(uuid.NAMESPACE_URL, self.url))

    @property
    def selectable(self) -> bool:
        return self.state is WorkerState.HEALTHY

    def describe(self) -> dict:
        return {
            "url": self.url,
            "state": self.state.value,
            "inflight": self.inflight,
            "consecutive_failures": self.consecutive_failures,
            "consecutive_successes": self.consecutive_successes,
            "last_error": self.last_error,
            "held_reason": self.held_reason,
            "weight_version": self.weight_version,
            "requests_total": self.requests_total,
            "failures_total": self.failures_total,
            "quarantines_total": self.quarantines_total,
            "request_failures_total": self.request_failures_total,
            "breaker": self.breaker.describe(),
            "labels": dict(self.labels),
            "control_state": self.control.name,
        }


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change worth logging and counting."""

    worker: Worker
    old: WorkerState
    new: WorkerState
    reason: str


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    worker: Worker
    old: BreakerState
    new: BreakerState
    reason: str


class Acquired(NamedTuple):
    """What `WorkerPool.acquire` did: whether the request is the breaker's trial (hand it back to
    `release` and `record_outcome`), and the breaker transition it caused (open -> half-open), if any."""

    trial: bool
    transition: BreakerTransition | None = None


class WorkerPool:
    """Workers by URL, with least-in-flight selection (ties broken round-robin).

    `failure_threshold` consecutive failures quarantine a worker; `success_threshold`
    consecutive successful health probes re-admit it, provided `admission_check` (if set)
    agrees, e.g. that the worker's weights are current.
    """

    def __init__(self, *, failure_threshold: int = 3, success_threshold: int = 2,
                 breaker: BreakerPolicy | None = None, max_inflight: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.breaker = breaker or BreakerPolicy()
        self.max_inflight = max_inflight  # per worker; None = no cap
        self.clock = clock
        self._workers: dict[str, Worker] = {}  # active (healthy or quarantined), insertion order
        self._draining: dict[str, Worker] = {}
        self._rr = 0
        self.admission_check = None  # Callable[[Worker], str | None]: reason to hold, or None
        self.candidate: Callable[[Worker], bool] | None = None  # set by `only` while a request is placed

    # ---- registration -------------------------------------------------------------------
    def add(self, url: str) -> tuple[Worker, bool]:
        """Register `url` (already normalized). Idempotent; returns (worker, created)."""
        w = self._workers.get(url)
        if w is not None:
            return w, False
        w = self._draining.pop(url, None)
        if w is not None:  # re-added while draining: keep its in-flight count
            w.state = WorkerState.HEALTHY
            w.consecutive_failures = 0
            self._workers[url] = w
            return w, True
        w = Worker(url)
        self._workers[url] = w
        return w, True

    def remove(self, url: str) -> Worker | None:
        """Take `url` out of selection. It stays listed as draining until in-flight reaches 0."""
        w = self._workers.pop(url, None)
        if w is None:
            return None
        w.state = WorkerState.DRAINING
        if w.inflight > 0:
            self._draining[url] = w
        return w

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url) or self._draining.get(url)

    def __contains__(self, url: str) -> bool:
        return url in self._workers

    def __len__(self) -> int:
        return len(self._workers)

    @property
    def active(self) -> list[Worker]:
        return list(self._workers.values())

    @property
    def all(self) -> list[Worker]:
        return [*self._workers.values(), *self._draining.values()]

    def healthy(self) -> list[Worker]:
        return [w for w in self._workers.values() if w.state is WorkerState.HEALTHY]

    # ---- selection ----------------------------------------------------------------------
    def breaker_admits(self, w: Worker, now: float | None = None) -> bool:
        """Whether the breaker lets a request through (a trial one when it is not closed). When
        every healthy worker's breaker would refuse, all of them are let through
        (`admit_when_all_open`): one request at a time on each is its trial, whose success closes
        the breaker before the cooldown."""
        if self._breaker_lets(w, now):
            return True
        return (self.breaker.admit_when_all_open and w.state is WorkerState.HEALTHY
                and not any(self._breaker_lets(x, now) for x in self._workers.values()
                            if x.state is WorkerState.HEALTHY))

    def _breaker_lets(self, w: Worker, now: float | None) -> bool:
        b = w.breaker
        if b.state is BreakerState.CLOSED or not self.breaker.enabled:
            return True
        if b.trial_inflight:
            return False
        if b.state is BreakerState.HALF_OPEN:
            return True
        return (self.clock() if now is None else now) >= b.opened_at + self.breaker.cooldown_s

    def has_slot(self, w: Worker) -> bool:
        return self.max_inflight is None or w.inflight < self.max_inflight

    def admits(self, w: Worker, now: float | None = None) -> bool:
        """Healthy, under the per-worker cap, let through by its breaker, and a candidate for the request
        being placed (`only`)."""
        return (w.state is WorkerState.HEALTHY and self.has_slot(w) and self.breaker_admits(w, now)
                and (self.candidate is None or self.candidate(w)))

    def routable(self, exclude: Iterable[Worker] = ()) -> list[Worker]:
        """Workers a request could go to once a slot frees (healthy, breaker permitting, a candidate), cap ignored."""
        now = self.clock()
        return [w for w in self._workers.values()
                if w.state is WorkerState.HEALTHY and w not in exclude and self.breaker_admits(w, now)
                and (self.candidate is None or self.candidate(w))]

    @contextmanager
    def only(self, candidate: Callable[[Worker], bool] | None):
        """Within the block, selection (`admits`, `pick`, `routable`, ...) sees only workers `candidate` accepts:
        the request being placed may not use the others (a paused engine, stale weights). The block must not
        await (so no other request is placed meanwhile)."""
        outer, self.candidate = self.candidate, candidate
        try:
            yield
        finally:
            self.candidate = outer

    def pick(self, exclude: Iterable[Worker] = ()) -> Worker | None:
        """The admissible worker with the fewest in-flight requests; ties go round-robin."""
        now = self.clock()
        candidates = [w for w in self._workers.values() if w not in exclude and self.admits(w, now)]
        if not candidates:
            return None
        n = len(candidates)
        start = self._rr % n
        best = None
        best_load = None
        for i in range(n):
            w = candidates[(start + i) % n]
            if best_load is None or w.inflight < best_load:
                best, best_load = w, w.inflight
                if best_load == 0:
                    break
        self._rr = (candidates.index(best) + 1) % n if n > 1 else 0
        return best

    def acquire(self, w: Worker) -> Acquired:
        """Count a request on `w`; whether it is the breaker's trial request, and the transition."""
        w.inflight += 1
        w.requests_total += 1
        b = w.breaker
        if b.state is BreakerState.CLOSED or not self.breaker.enabled:
            return Acquired(False)
        if b.trial_inflight:  # let through while every breaker is open: its outcome only counts
            return Acquired(False)
        t = None
        if b.state is BreakerState.OPEN and self.clock() >= b.opened_at + self.breaker.cooldown_s:
            t = self._breaker_to(w, BreakerState.HALF_OPEN, "cooldown over: one trial request")
        # (still OPEN: let through because every breaker is; its success closes the breaker, its
        # failure changes nothing, so an outage does not flap the breaker on every request)
        b.trial_inflight = True
        return Acquired(True, t)

    def release(self, w: Worker, trial: bool = False) -> None:
        if trial and w.breaker.trial_inflight:
            # The trial ended without an outcome (the client left): the next request is the trial.
            w.breaker.trial_inflight = False
        w.inflight -= 1
        if w.inflight <= 0:
            w.inflight = 0
            if w.state is WorkerState.DRAINING:
                self._draining.pop(w.url, None)

    # ---- health -------------------------------------------------------------------------
    def record_failure(self, w: Worker, error: str) -> Transition | None:
        w.consecutive_failures += 1
        w.consecutive_successes = 0
        w.failures_total += 1
        w.last_error = error
        if w.state is WorkerState.HEALTHY and w.consecutive_failures >= self.failure_threshold:
            w.state = WorkerState.QUARANTINED
            w.quarantines_total += 1
            return Transition(w, WorkerState.HEALTHY, WorkerState.QUARANTINED,
                              f"{w.consecutive_failures} consecutive failures: {error}")
        return None

    def record_success(self, w: Worker) -> Transition | None:
        """A passing health probe: it counts toward re-admission. It leaves the breaker alone: a
        breaker opened by failed requests closes only on a successful request (its trial)."""
        w.consecutive_successes += 1
        w.consecutive_failures = 0
        if w.state is not WorkerState.QUARANTINED:
            w.held_reason = None
            return None
        if w.consecutive_successes < self.success_threshold:
            return None
        hold = self.admission_check(w) if self.admission_check else None
        if hold:
            w.held_reason = hold
            return None
        w.held_reason = None
        w.state = WorkerState.HEALTHY
        w.last_error = None
        return Transition(w, WorkerState.QUARANTINED, WorkerState.HEALTHY,
                          f"{w.consecutive_successes} consecutive successful health checks")

    # ---- circuit breaker ----------------------------------------------------------------
    def record_outcome(self, w: Worker, failed: bool, reason: str = "", trial: bool = False
                       ) -> BreakerTransition | None:
        """A request's outcome. Only the trial request decides a half-open breaker; outcomes of
        requests sent before the breaker opened only count toward the totals."""
        b = w.breaker
        if failed:
            w.request_failures_total += 1
        if not self.breaker.enabled:
            return None
        now = self.clock()
        if b.state is not BreakerState.CLOSED:
            if not trial:
                return None
            b.trial_inflight = False
            if failed:
                if b.state is BreakerState.OPEN:  # let through while every breaker was open
                    return None
                b.opened_at = now
                b.reason = f"trial request failed: {reason}"
                return self._breaker_to(w, BreakerState.OPEN, b.reason)
            b.consecutive_failures = 0
            b.window.clear()
            why = ("trial request succeeded" if b.state is BreakerState.HALF_OPEN
                   else "a request let through while every breaker was open succeeded")
            return self._breaker_to(w, BreakerState.CLOSED, why)
        p = self.breaker
        win = b.window
        win.append((now, failed))
        while win and win[0][0] < now - p.window_s:
            win.popleft()
        if not failed:
            b.consecutive_failures = 0
            return None
        b.consecutive_failures += 1
        why = None
        if b.consecutive_failures >= p.failures:
            why = f"{b.consecutive_failures} consecutive failed requests, last: {reason}"
        elif len(win) >= p.min_requests:
            bad = sum(1 for _, f in win if f)
            if bad >= p.failure_rate * len(win):
                why = f"{bad} of {len(win)} requests failed in {p.window_s:g}s, last: {reason}"
        if why is None:
            return None
        b.opened_at = now
        b.reason = why
        win.clear()
        return self._breaker_to(w, BreakerState.OPEN, why)

    def _breaker_to(self, w: Worker, new: BreakerState, reason: str) -> BreakerTransition:
        b = w.breaker
        old = b.state
        b.state = new
        if new is BreakerState.CLOSED:
            b.consecutive_failures = 0
            b.trial_inflight = False
        key = f"{old.value}->{new.value}"
        b.transitions[key] = b.transitions.get(key, 0) + 1
        return BreakerTransition(w, old, new, reason)

    def by_id(self, worker_id: str) -> Worker | None:
        """The registered (or draining) worker with this gateway id."""
        return next((w for w in self.all if w.id == worker_id), None)

    def inflight_by_url(self) -> dict[str, int]:
        return {w.url: w.inflight for w in self._workers.values()}
