"""The worker supervisor: who the workers are and whether they are up, and taking one for a request.

- Registration: `add` / `remove` (idempotent; labels from `workers.labels` and the caller), one health prober
  per worker in the root nursery, each in its own cancel scope so removing a worker cancels exactly its prober.
- Health and the breaker: probes (`/health`, and `/model_info` for the weight version) and request outcomes go
  to the pool's state machine (router/core/workers.py); each transition it returns is logged and counted here.
- Placement: `take` asks the routing policies (router/core/routing.py) for a worker among those the request may
  use, counts it in flight, and waits when it must: in the FIFO slot queue while every usable worker is at
  `workers.max_inflight_per_worker`, in the hold queue while every worker it may use is paused. `give_back` ends
  the request's claim and wakes the next waiter.

The data path's connections (router/net/upstream.py) are the forward stage's; this module only drops a
removed worker's. The control plane (probes, /model_info, engine calls) uses httpx, one client per worker
(`control_client`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx
import trio

from router.core.control import ControlState
from router.core.eligibility import HoldTimeout
from router.core.labels import check_labels
from router.core.pipeline import StageError
from router.core.routing import Router
from router.core.urls import normalize_worker_url
from router.core.workers import BreakerState, BreakerTransition, Transition, Worker, WorkerPool
from router.net.admission import FifoQueue, QueueTimeout
from router.wire.sglang import ReplySummary

log = logging.getLogger("miles_router")


class WorkerSupervisor:
    def __init__(self, config, nursery: trio.Nursery, pool: WorkerPool, router: Router, metrics, upstream) -> None:
        self.config, self.nursery, self.pool, self.router = config, nursery, pool, router
        self.metrics, self.upstream = metrics, upstream
        w = config.workers
        self.retry_statuses = frozenset(config.retry.statuses)
        self._control_clients: dict[str, httpx.AsyncClient] = {}
        self._control_tls = None  # one TLS context for all of them (httpx builds one per client: ~23 ms each)
        # Requests waiting for a worker slot (workers.max_inflight_per_worker), and generation requests held while
        # every worker they may use is paused (routing.hold_when_paused): one FIFO mechanism, router/net/admission.py.
        self.slot_queue = FifoQueue("worker_slot", metrics.queue_waited)
        self.hold_queue = FifoQueue("pause_hold", metrics.queue_waited)
        self.config_labels = {normalize_worker_url(u): check_labels(v) for u, v in w.labels.items()}
        self._probers: dict[str, trio.CancelScope] = {}
        self._all_sent: dict[str, trio.Event] = {}  # per worker URL: set when its last unsent request is written
        if config.routing.weight_version_gate:
            pool.admission_check = router.version_hold

    # ---- registration -------------------------------------------------------------------------
    def add(self, url: str, labels: dict | None = None) -> tuple[Worker, bool]:
        """Register `url` (idempotent). Its labels: `workers.labels` for the URL, then `labels` per key; a
        re-registration without labels keeps the worker's."""
        url = normalize_worker_url(url)
        worker, created = self.pool.add(url)
        if not created and worker.control.name != "running":
            # An engine registers itself when it starts: whatever pause the router saw before, it generates now.
            log.info("worker %s registered again while %s: running", url, worker.control.name)
            worker.control = ControlState()
            self.control_changed(worker)
        if created or labels is not None:
            worker.labels = {**self.config_labels.get(url, {}), **(labels or {})}
            seed = worker.labels.pop("weight_version", None)  # smg's registration label; the engine's own wins later
            if seed is not None and worker.weight_version is None:
                self.observe_version(worker, seed)
        if created and url not in self._probers:
            scope = trio.CancelScope()
            self._probers[url] = scope
            self.nursery.start_soon(self._probe_forever, worker, scope, name=f"prober {url}")
            log.info("worker added: %s", url)
            self.slot_queue.wake()
        return worker, created

    def remove(self, url: str) -> Worker | None:
        url = normalize_worker_url(url)
        worker = self.pool.remove(url)
        if worker is not None:
            scope = self._probers.pop(url, None)
            if scope is not None:
                scope.cancel()
            self.upstream.drop_origin(url)
            client = self._control_clients.pop(url, None)
            if client is not None:
                self.nursery.start_soon(client.aclose)
            log.info("worker removed: %s (%d in flight)", url, worker.inflight)
        return worker

    def control_client(self, worker: Worker) -> httpx.AsyncClient:
        """The httpx client for `worker`'s control calls. One per worker, not one for all: httpx's pool looks at
        every connection it holds for each request (`_assign_requests_to_connections`, and `is_idle` on each when
        a response closes), so with one shared client a probe cost ~11–16 µs per registered worker, and 1,000
        workers' probes alone took more than a core (BENCHMARKS.md §8)."""
        client = self._control_clients.get(worker.url)
        if client is None:
            w = self.config.workers
            if self._control_tls is None:
                self._control_tls = httpx.create_ssl_context()
            client = self._control_clients[worker.url] = httpx.AsyncClient(
                trust_env=False, verify=self._control_tls, timeout=httpx.Timeout(w.health_timeout_s),
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=4,
                                    keepalive_expiry=w.keepalive_expiry_s))
        return client

    # ---- health and the breaker ------------------------------------------------------------------
    def _transition(self, t: Transition | BreakerTransition | None) -> None:
        if t is None:
            return
        if isinstance(t, BreakerTransition):
            lvl = logging.WARNING if t.new is BreakerState.OPEN else logging.INFO
            log.log(lvl, "worker %s: breaker %s -> %s (%s)", t.worker.url, t.old.value, t.new.value, t.reason)
            self.metrics.breaker_transition(t.worker.url, t.old.value, t.new.value)
        else:
            lvl = logging.WARNING if t.new.value == "quarantined" else logging.INFO
            log.log(lvl, "worker %s: %s -> %s (%s)", t.worker.url, t.old.value, t.new.value, t.reason)
        if t.new.value in ("healthy", "closed"):
            self.slot_queue.wake()

    def control_changed(self, worker: Worker) -> None:
        """A control call changed `worker`'s paused/asleep state or its weights: requests waiting may now go."""
        self.hold_queue.wake()
        self.slot_queue.wake()

    def on_worker_error(self, worker: Worker, error: str) -> None:
        """Evidence as strong as a failed probe (a refused connect): counts toward quarantine."""
        self._transition(self.pool.record_failure(worker, error))

    def on_outcome(self, worker: Worker, failed: bool, reason: str = "", trial: bool = False) -> None:
        """A proxied request's outcome, for the breaker. It never touches the probe counters: a
        served request says nothing about a failed /health, and a 5xx is not a success."""
        self._transition(self.pool.record_outcome(worker, failed, reason, trial))

    async def probe_once(self, worker: Worker) -> tuple[bool, str]:
        timeout = self.config.workers.health_timeout_s
        try:
            r = await self.control_client(worker).get(worker.url + "/health", timeout=timeout)
        except httpx.TimeoutException:
            return False, f"health check timed out after {timeout:g}s"
        except httpx.HTTPError as e:
            return False, f"health check failed: {type(e).__name__}: {e}"
        if r.status_code != 200:
            return False, f"health check answered HTTP {r.status_code}"
        return True, ""

    async def _probe_forever(self, worker: Worker, scope: trio.CancelScope) -> None:
        with scope:
            interval = self.config.workers.health_interval_s
            await self.fetch_weight_version(worker)
            while True:
                ok, error = await self.probe_once(worker)
                if ok:
                    if not worker.selectable:
                        # Re-admission is gated on the version the worker serves now.
                        await self.fetch_weight_version(worker)
                    self._transition(self.pool.record_success(worker))
                else:
                    self.on_worker_error(worker, error)
                await trio.sleep(interval)

    # ---- weight versions ----------------------------------------------------------------------
    def current_version(self) -> str | None:
        """The newest weight version among healthy workers (router/core/routing.py)."""
        return self.router.current_version()

    def observe_version(self, worker: Worker | None, version: str | None) -> None:
        """A weight version seen in a reply or a control call, served by `worker` when known."""
        if version is None:
            return
        self.router.versions.note(version)
        if worker is not None and worker.weight_version != version:
            worker.weight_version = version

    async def fetch_weight_version(self, worker: Worker) -> None:
        try:
            r = await self.control_client(worker).get(worker.url + "/model_info", timeout=self.config.workers.health_timeout_s)
            if r.status_code == 200:
                self.observe_version(worker, r.json().get("weight_version"))
        except (httpx.HTTPError, ValueError, AttributeError):
            pass  # not an SGLang worker, or not answering: the version stays unknown

    def note_reply(self, ex, outputs: list[ReplySummary]) -> None:
        """Learn from a passthrough /generate reply read whole: the worker's weight version, and (prefix affinity)
        the generated part. An n>1 reply holds several samples: nothing to learn."""
        if ex.status != 200 or ex.worker is None or len(outputs) != 1:
            return
        out = outputs[0]
        if out.meta_info is not None and out.meta_info.weight_version is not None:
            self.observe_version(ex.worker, out.meta_info.weight_version)
        self.router.learn_reply(ex, out)

    def record_served(self, tokens, worker_url: str) -> None:
        """A worker now holds these tokens in its KV cache (prompt + generated)."""
        self.router.record_served(tokens, worker_url)

    # ---- taking a worker for a request ---------------------------------------------------------
    def routable(self, ex, exclude=()) -> list[Worker]:
        """Workers `ex` could go to once a slot frees (the per-worker cap ignored)."""
        with self.pool.only(self.router.eligibility(ex).admits):
            return self.pool.routable(exclude)

    def pickable(self, ex, exclude=()) -> bool:
        """Whether `ex` could go to a worker now."""
        with self.pool.only(self.router.eligibility(ex).admits):
            return self.pool.pick(exclude) is not None

    def _select(self, ex, exclude) -> tuple[Worker | None, str]:
        with self.pool.only(self.router.eligibility(ex).admits):
            w, reason = self.router.select(ex, exclude, now=time.monotonic())
        if w is not None:  # counted once per placed request (a request waiting for a slot asks again)
            if reason == "retry":
                self.metrics.retries.inc()
            elif reason == "affinity_unreadable":
                self.metrics.affinity_unreadable.labels(ex.route.path if ex.route is not None else ex.path).inc()
            self.metrics.selected(reason)
        return w, reason

    def _take(self, ex, exclude) -> tuple[Worker, str, bool] | None:
        worker, reason = self._select(ex, exclude)
        key, ex.sticky_pick = ex.sticky_pick, None
        if worker is None:
            return None
        trial, transition = self.pool.acquire(worker)
        self._transition(transition)
        if key is not None:  # counted against the key's in-flight cap until give_back
            self.router.key_inflight.add(key, worker.url)
            ex.sticky_lease = (key, worker.url)
        return worker, reason, trial

    async def _wait(self, queue: FifoQueue, timeout_s: float, ex, exclude) -> tuple[Worker, str, bool]:
        """Wait in `queue` (FIFO) until `ex` can be placed; QueueTimeout past `timeout_s`, after counting it."""
        try:
            return await queue.acquire(lambda: self._take(ex, exclude), lambda g: self.give_back(g[0], g[2], ex),
                                       timeout_s=timeout_s)
        except QueueTimeout:
            self.metrics.queue_rejected(queue.name, "timeout")
            raise

    async def take(self, ex, exclude=()) -> tuple[Worker | None, str, bool]:
        """Select a worker and count the request on it: (worker, route reason, is breaker trial).

        With `workers.max_inflight_per_worker`, a request that finds every usable worker full waits
        in the FIFO slot queue and is placed (by its route's policy) when a slot frees; a wait past
        `workers.queue_timeout_s` fails the request with 503. A generation request whose workers are all
        paused waits in the hold queue until one resumes (`routing.hold_when_paused`). (None, "none", False)
        when no worker is usable.
        """
        got = self._take(ex, exclude) if not len(self.slot_queue) else None
        if got is not None:
            return got
        if not self.routable(ex, exclude):
            elig = self.router.eligibility(ex)
            with self.pool.only(elig.waits_for):
                waiting_for = self.pool.routable(exclude)
            if waiting_for:  # every worker it may use is paused: wait until one resumes
                timeout = self.config.routing.hold_timeout_s
                try:
                    return await self._wait(self.hold_queue, timeout, ex, exclude)
                except QueueTimeout as e:
                    held = HoldTimeout(e.waited_s, timeout, tuple(w.url for w in waiting_for))
                    raise StageError(503, held.message, held_s=round(e.waited_s, 3)) from None
            return None, "none", False
        if self.pool.max_inflight is None and not len(self.slot_queue):
            return None, "none", False
        timeout = self.config.workers.queue_timeout_s
        try:
            return await self._wait(self.slot_queue, timeout, ex, exclude)
        except QueueTimeout as e:
            raise StageError(503, f"no worker slot freed within workers.queue_timeout_s ({timeout:g}s): every "
                                  f"usable worker has workers.max_inflight_per_worker "
                                  f"({self.pool.max_inflight}) requests in flight", waited_s=round(e.waited_s, 3),
                             ) from None

    def sending(self, worker: Worker) -> Callable[[], None]:
        """Count a request routed to `worker` as unsent until the returned function is called (once it is
        written, or failed: calling it again is a no-op)."""
        worker.unsent += 1
        done = False

        def sent() -> None:
            nonlocal done
            if done:
                return
            done = True
            worker.unsent -= 1
            if not worker.unsent:
                event = self._all_sent.pop(worker.url, None)
                if event is not None:
                    event.set()

        return sent

    async def wait_sent(self, worker: Worker, timeout_s: float) -> bool:
        """Wait at most `timeout_s` until every request already routed to `worker` is written to it (a pause
        that waits for them cannot reach the engine before them). False if some were still unsent."""
        with trio.move_on_after(timeout_s):
            while worker.unsent:
                await self._all_sent.setdefault(worker.url, trio.Event()).wait()
        return not worker.unsent

    def give_back(self, worker: Worker, trial: bool = False, ex=None) -> None:
        self.pool.release(worker, trial)
        lease = None if ex is None else ex.sticky_lease
        if lease is not None and lease[1] == worker.url:
            ex.sticky_lease = None
            self.router.key_inflight.done(*lease)
        if len(self.hold_queue):
            self.hold_queue.wake()
        if len(self.slot_queue):
            self.slot_queue.wake()

    # ---- background and shutdown ------------------------------------------------------------------
    async def sweep_idle_connections(self) -> None:
        """Close idle upstream sockets past their keep-alive even when no traffic comes."""
        while True:
            await trio.sleep(self.config.workers.keepalive_expiry_s)
            self.upstream.sweep_idle()

    async def aclose(self) -> None:
        for scope in self._probers.values():
            scope.cancel()
        self._probers.clear()
        with trio.CancelScope(shield=True):
            await self.upstream.aclose()
            for client in self._control_clients.values():
                await client.aclose()
