"""The worker pool: registration, health state machine, in-flight accounting and least-in-flight selection.

Pure bookkeeping: the I/O edge calls `record_success`/`record_failure` from health probes and
failed requests, and `acquire`/`release` around every proxied request. Nothing here sleeps or
talks to a socket, so every transition is unit-tested directly.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass, field


class WorkerState(str, enum.Enum):
    HEALTHY = "healthy"
    QUARANTINED = "quarantined"
    DRAINING = "draining"  # removed; stays listed until its in-flight requests finish


@dataclass(eq=False, slots=True)
class Worker:
    url: str
    state: WorkerState = WorkerState.HEALTHY
    inflight: int = 0
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_error: str | None = None
    # Why a worker that passes health checks is still kept out (e.g. stale weights).
    held_reason: str | None = None
    weight_version: str | None = None
    requests_total: int = 0
    failures_total: int = 0
    quarantines_total: int = 0
    added_at: float = field(default_factory=time.time)

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
        }


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change worth logging and counting."""

    worker: Worker
    old: WorkerState
    new: WorkerState
    reason: str


class WorkerPool:
    """Workers by URL, with least-in-flight selection (ties broken round-robin).

    `failure_threshold` consecutive failures quarantine a worker; `success_threshold`
    consecutive successful health probes re-admit it, provided `admission_check` (if set)
    agrees, e.g. that the worker's weights are current.
    """

    def __init__(self, *, failure_threshold: int = 3, success_threshold: int = 2) -> None:
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self._workers: dict[str, Worker] = {}  # active (healthy or quarantined), insertion order
        self._draining: dict[str, Worker] = {}
        self._rr = 0
        self.admission_check = None  # Callable[[Worker], str | None]: reason to hold, or None

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
    def pick(self, exclude: Iterable[Worker] = ()) -> Worker | None:
        """The healthy worker with the fewest in-flight requests; ties go round-robin."""
        candidates = [w for w in self._workers.values() if w.state is WorkerState.HEALTHY and w not in exclude]
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

    def least_loaded(self, exclude: Iterable[Worker] = ()) -> Worker | None:
        return self.pick(exclude)

    def acquire(self, w: Worker) -> None:
        w.inflight += 1
        w.requests_total += 1

    def release(self, w: Worker) -> None:
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

    def inflight_by_url(self) -> dict[str, int]:
        return {w.url: w.inflight for w in self._workers.values()}
