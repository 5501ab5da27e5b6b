"""The router's live state and services: workers and their probers, the upstream client,
pipelines per route, the tokenizer and trajectory cache, metrics.

Stages receive this object as `services`. Every background task (one health prober per worker,
the cache cleanup) runs in the root nursery handed to `Runtime`, each prober in its own
cancel scope so removing a worker cancels exactly its prober.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import httpx
import msgspec
import numpy as np
import trio

from router.wire import DECODE_ERRORS
from router.config import Config
from router.core.control import ControlState
from router.core.eligibility import ANY, VERSION_POLICY_HEADER, Eligibility, HoldTimeout, is_generation, parse_version_policy
from router.core.headers import header_value
from router.core.pipeline import PipelineSpec, load_pipeline
from router.core.selection import PrefixIndex, SpillRule, StickyTable, choose, select_by_prefix
from router.core.sticky import KeyInflight, preferred, routing_key
from router.core.store import KeyFilter, StoreError, prefix_heads
from router.core.urls import normalize_worker_url
from router.core.workers import BreakerState, BreakerTransition, Transition, Worker, WorkerPool
from router.core.pipeline import StageError
from router.net.admission import ConcurrencyLimit, FifoQueue, QueueTimeout
from router.net.metrics import Metrics
from router.net.upstream import UpstreamPool
from router.wire.affinity import ids_decoder, openai_prompt_decoder, present, raw_list_decoder, str_decoder, strs_decoder
from router.wire.api import rid_decoder
from router.wire.sglang import ReplySummary

log = logging.getLogger("miles_router")


@dataclass(slots=True)
class RoutePipeline:
    spec: PipelineSpec
    request_stages: list
    forward_stage: object
    response_stages: list
    route: object = None

    @property
    def needs_response(self) -> bool:
        return bool(self.response_stages)


class Runtime:
    def __init__(self, config: Config, nursery: trio.Nursery) -> None:
        self.config = config
        self.nursery = nursery
        w = config.workers
        self.pool = WorkerPool(failure_threshold=w.failure_threshold, success_threshold=w.success_threshold,
                               breaker=config.breaker, max_inflight=w.max_inflight_per_worker)
        self.retry_statuses = frozenset(config.retry.statuses)
        self.upstream = UpstreamPool(keepalive_expiry_s=w.keepalive_expiry_s, connect_timeout_s=w.connect_timeout_s)
        # Control plane (health probes, /model_info, admin fan-out, the RL plane): httpx, one client per worker
        # (`control_client`); the data path uses the h11 pool.
        self._control_clients: dict[str, httpx.AsyncClient] = {}
        self._control_tls = None  # one TLS context for all of them (httpx builds one per client: ~23 ms each)
        self.metrics = Metrics(self)
        # Requests waiting for a worker slot (workers.max_inflight_per_worker), and for admission
        # (server.max_concurrent_requests): one FIFO mechanism, router/net/admission.py.
        self.slot_queue = FifoQueue("worker_slot", self.metrics.queue_waited)
        # Generation requests held while every worker they may use is paused (routing.hold_when_paused).
        self.hold_queue = FifoQueue("pause_hold", self.metrics.queue_waited)
        sv = config.server
        self.admission = ConcurrencyLimit(sv.max_concurrent_requests, sv.queue_size, sv.queue_timeout_s,
                                          self.metrics.queue_waited)
        self._probers: dict[str, trio.CancelScope] = {}
        from router.core.labels import check_labels

        self.config_labels = {normalize_worker_url(u): check_labels(v) for u, v in w.labels.items()}
        self.tokenizer = None
        self.tree_if_loaded = None
        self.store = None  # the durable trajectory store (a TrajectoryStore), when a pipeline persists
        # prefix keys of this process's stored trajectories that it evicted from memory (a KeyFilter, once any was)
        self.evicted_heads = None
        self.session_persister = None  # sessions over the store (router/net/session_persist.py)
        self.pipelines: dict[tuple[str, str], RoutePipeline] = {}
        self.sessions = None  # SessionRegistry when [sessions] enabled
        # The other processes on this port (router/net/siblings.py), told what admin calls change here; None alone.
        self.siblings = None
        self.session_pipeline: RoutePipeline | None = None
        self.session_proxy: RoutePipeline | None = None
        self.passthrough = self._instantiate(load_pipeline("passthrough", config.base_dir), None)
        # weight version -> order first seen; the newest `cache.keep_weight_versions` are current
        self.versions_seen: dict[str, int] = {}
        g = config.routing
        self.spill = SpillRule(g.balance_abs_threshold, g.balance_rel_threshold, g.balance_tokens_per_request)
        self.prefix_index = PrefixIndex(block_tokens=g.prefix_block_tokens, capacity_blocks=g.prefix_capacity_blocks,
                                        owners_per_block=g.prefix_owners_per_block)
        self.sticky = StickyTable(idle_s=g.sticky_idle_s)  # the worker that served each key last (route reasons)
        self.key_inflight = KeyInflight()
        self.key_headers = [h.lower().encode("latin-1") for h in (g.routing_key_headers or [g.sticky_header])]
        self.request_id_headers = [h.lower().encode("latin-1") for h in g.request_id_headers]
        self.version_policy = parse_version_policy(g.version_policy)
        # The index costs ~200 B per 16-token block: only keep one when a route routes by it.
        self.uses_prefix_affinity = "prefix_affinity" in (g.default_policy, *(r.policy for r in config.routes))
        if g.weight_version_gate:
            self.pool.admission_check = self._version_hold

    # ---- pipelines ------------------------------------------------------------------------
    def load_pipelines(self) -> None:
        for r in self.config.routes:
            spec = load_pipeline(r.pipeline, self.config.base_dir)
            self.pipelines[(r.method, r.path)] = self._instantiate(spec, r)
        ss = self.config.sessions
        if ss.enabled:
            from router.config import RouteConfig
            from router.core.sessions.messages import resolve_matcher
            from router.core.sessions.registry import SessionRegistry

            self.sessions = SessionRegistry(max_sessions=ss.max_sessions, max_turns=ss.max_turns_per_session,
                                            idle_timeout_s=ss.idle_timeout_s,
                                            prompt_cache_entries=ss.prompt_cache_entries,
                                            matcher=resolve_matcher(ss.message_matcher))
            # Every session request is routed with the session id as its sticky key.
            route = RouteConfig(path="/sessions", method="POST", pipeline=ss.pipeline, policy="sticky")
            self.session_pipeline = self._instantiate(load_pipeline(ss.pipeline, self.config.base_dir), route)
            self.session_proxy = self._instantiate(load_pipeline("passthrough", self.config.base_dir), route)

    @property
    def session_r3_incremental(self) -> bool:
        """Session turns ask the worker for their new routed-experts rows only (miles' addition R3)."""
        pipe = self.session_pipeline
        return pipe is not None and any(
            getattr(st, "name", "") == "session_generate" and st.options.routed_experts
            and st.options.routed_experts_start_len for st in pipe.request_stages)

    async def session_maintenance(self) -> None:
        """Reclaim sessions idle past `sessions.idle_timeout_s` (checked a few times per timeout)."""
        interval = min(max(self.config.sessions.idle_timeout_s / 4, 0.05), 30.0)
        while True:
            await trio.sleep(interval)
            gone = self.sessions.expire_idle(time.monotonic())
            if self.session_persister is not None:
                for sid in gone:  # in the background: an expired session coming back after a crash is harmless
                    await self.session_persister.deleted(sid, wait=False)
            if gone:
                log.info("reclaimed %d idle session(s)", len(gone))

    def _instantiate(self, spec: PipelineSpec, route) -> RoutePipeline:
        req, fwd, resp = [], None, []
        for s in spec.stages:
            stage = s.cls(s.options, self)
            {"request": req, "response": resp}.get(s.cls.phase, []).append(stage)
            if s.cls.phase == "forward":
                fwd = stage
        for stage in resp:  # a stage that depends on what follows it looks at its pipeline once
            bind = getattr(stage, "bind_pipeline", None)
            if bind is not None:
                bind(resp)
        return RoutePipeline(spec, req, fwd, resp, route)

    def pipeline_for(self, method: str, path: str) -> RoutePipeline:
        return self.pipelines.get((method, path)) or self.passthrough

    def needs_tokenizer(self) -> bool:
        pipes = [*self.pipelines.values(), *([self.session_pipeline] if self.session_pipeline else [])]
        return any(getattr(st, "uses_tokenizer", False)
                   for p in pipes for st in (*p.request_stages, *p.response_stages))

    async def load_tokenizer(self) -> None:
        from router.tokenizer import load_tokenizer

        self.tokenizer = await trio.to_thread.run_sync(load_tokenizer, self.config.tokenizer.path)

    def tree_wanted(self) -> bool:
        return any(getattr(st, "uses_tree", False)
                   for p in self.pipelines.values() for st in (*p.request_stages, *p.response_stages))

    def store_wanted(self) -> bool:
        pipes = [*self.pipelines.values(), *([self.session_pipeline] if self.session_pipeline is not None else [])]
        return self.config.store.enabled and any(
            getattr(st, "uses_store", False) for p in pipes for st in p.response_stages)

    # The durable store's backend: a callable (path, *, sync, retention_s, max_bytes, metrics) -> TrajectoryStore
    # (router/core/store.py). None: the one the config selects (router/net/store_open.py: PostgreSQL for
    # `store.url`, else SQLite). Everything the router does with a store goes through that protocol, so another
    # backend (Valkey) is one class; tests/test_store.py runs the router over an in-memory one.
    store_backend = None

    def open_store(self) -> None:
        """Open the durable store (raises StoreOpenError). Nothing is loaded: records are found by digest in the
        store when the memory cache does not have them, so startup does not grow with the store."""
        from router.config import store_path

        c = self.config.store
        backend = type(self).store_backend  # (read from the class: a plain function must not become a method)
        if backend is None:
            from router.net.store_open import open_store

            self.store = open_store(self.config, metrics=self.metrics)
        else:
            self.store = backend(store_path(self.config), sync=c.sync, retention_s=c.retention_s,
                                 max_bytes=c.max_bytes, metrics=self.metrics)
        if self.sessions is not None:
            from router.net.session_persist import SessionPersister

            self.session_persister = SessionPersister(self.store, self.sessions, wait=c.sync == "commit")
            restored = self.session_persister.restore()
            if restored:
                log.info("%s: %d sessions restored", self.store.name, restored)
        self.store.start()
        st = self.store.stats()
        log.info("%s: %d trajectories (%d unretrieved), %d bytes%s", self.store.name, st.rows, st.unretrieved,
                 st.file_bytes, "" if st.writable else f"; READ-ONLY ({st.write_error}): /generate on persisting "
                 "routes will answer 503")

    async def continue_from_store(self, text: bytes, matched: int) -> bool:
        """Load back into the memory cache the stored trajectories whose visible text is a prefix of `text`
        longer than what the cache matched (a conversation's earlier turns, evicted or stored before a restart),
        oldest first, as they were inserted the first time: the merged loss mask and anchors come out the same.
        True if any was loaded. Texts shorter than one prefix-key block (64 bytes) are not found this way.

        The store is asked only about the prompt's prefix keys (router/core/store.py `prefix_heads`) that may
        name a record the memory cache does not hold: one another process wrote or that was there before this
        one started (`store.may_continue`), or one of this process's own that it evicted (`evicted_heads`).
        Everything else this process stored is still in memory, so the cache's own match already covers it."""
        store = self.store
        if store is None:
            return False
        may_continue, evicted = store.may_continue, self.evicted_heads
        if evicted is None:
            heads = [h for h in prefix_heads(text, matched) if may_continue(h)]
        else:
            heads = [h for h in prefix_heads(text, matched) if may_continue(h) or h in evicted]
        if not heads:
            return False
        from router.core.radix import TrajectoryInput, text_digest
        from router.wire import store as wire

        tree = self.tree
        chosen: dict[int, int] = {}
        try:
            for head in heads:
                for rid, vlen, digest in await store.prefix_candidates(head, len(text)):
                    if (vlen > matched and rid not in chosen and text_digest(text[:vlen]) == digest
                            and tree.peek_exact(text[:vlen]) is None):
                        chosen[rid] = vlen
            if not chosen:
                return False
            order = sorted(chosen)
            records = await store.get_ids(order)
        except StoreError as e:
            # The earlier turns' exact tokens cannot be read now (the store's database is away): fail the request
            # rather than re-tokenize a conversation the engine already spelled.
            raise StageError(503, str(e), store=str(getattr(store, "path", store.name))) from None
        now = time.time()
        for rid, rec in zip(order, records):
            tokens, p = wire.tokens_of(rec), rec.prompt_len
            tree.insert(TrajectoryInput(
                rid=rec.rid, prompt_ids=tokens[:p], output_ids=tokens[p:], output_logprobs=wire.logprobs_of(rec)[p:],
                visible_text=text[:chosen[rid]], weight_version=rec.weight_version, worker=rec.worker,
                finish=rec.finish or "stop", routed_experts=wire.experts_of(rec)), now=now)
        return True

    def _evicted_to_store(self, heads: list[int]) -> None:
        """Remember the prefix keys of stored trajectories that left memory (persist tagged them with their key):
        a later prompt continuing one of them must ask the store for it."""
        if self.evicted_heads is None:
            self.evicted_heads = KeyFilter(26)  # 8 MiB, allocated at the first eviction of a stored trajectory
        for h in heads:
            self.evicted_heads.add(h)

    def stale_versions(self) -> frozenset:
        return frozenset(v for v in self.versions_seen if self._is_stale(v))

    async def store_maintenance(self) -> None:
        while True:
            await trio.sleep(self.config.cache.cleanup_interval_s)
            try:
                plan = await self.store.maintain(now=time.time(), stale_versions=self.stale_versions())
            except StoreError as e:
                log.warning("%s", e)
                continue
            if plan.evicted_unretrieved:
                log.warning("%s over store.max_bytes (%d): deleted %d trajectories nobody retrieved yet",
                            self.store.name, self.config.store.max_bytes, plan.evicted_unretrieved)

    def note_weight_version(self, version: str | None) -> None:
        if version is not None and version not in self.versions_seen:
            self.versions_seen[version] = len(self.versions_seen)

    def _is_stale(self, version: str | None) -> bool:
        if version is None or version not in self.versions_seen:
            return False
        return self.versions_seen[version] < len(self.versions_seen) - self.config.cache.keep_weight_versions

    def evict_cache(self) -> None:
        tree = self.tree_if_loaded
        if tree is None:
            return
        c = self.config.cache
        if tree.nbytes <= c.budget_bytes:
            return
        report = tree.evict(budget_bytes=c.budget_bytes, hard_budget_bytes=c.hard_budget_bytes,
                            stale_versions=self._is_stale)
        if getattr(report, "tags", None):
            self._evicted_to_store(report.tags)
        if getattr(report, "evicted_unretrieved", 0) and self.store is not None:
            # Out of memory, not out of existence: /retrieve_from_text reads them back from the store.
            log.debug("trajectory cache over its hard budget: %d unretrieved trajectories left memory for the "
                      "store", report.evicted_unretrieved)
        elif getattr(report, "evicted_unretrieved", 0):
            log.warning("trajectory cache over its hard budget (%d bytes): evicted %d trajectories nobody "
                        "retrieved yet", c.hard_budget_bytes, report.evicted_unretrieved)

    async def cache_maintenance(self) -> None:
        while True:
            await trio.sleep(self.config.cache.cleanup_interval_s)
            self.evict_cache()

    async def upstream_maintenance(self) -> None:
        """Close idle upstream sockets past their keep-alive even when no traffic comes."""
        while True:
            await trio.sleep(self.config.workers.keepalive_expiry_s)
            self.upstream.sweep_idle()

    @property
    def tree(self):
        if self.tree_if_loaded is None:
            from router.core.radix import RadixTree

            if self.tokenizer is None:
                raise RuntimeError("the trajectory cache needs a tokenizer ([tokenizer] path)")
            self.tree_if_loaded = RadixTree(self.tokenizer.vocab)
        return self.tree_if_loaded

    # ---- workers --------------------------------------------------------------------------
    def add_worker(self, url: str, labels: dict | None = None) -> tuple[Worker, bool]:
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
                self.observe_weight_version(worker, seed)
        if created and url not in self._probers:
            scope = trio.CancelScope()
            self._probers[url] = scope
            self.nursery.start_soon(self._probe_forever, worker, scope, name=f"prober {url}")
            log.info("worker added: %s", url)
            self.slot_queue.wake()
        return worker, created

    def control_client(self, worker: Worker) -> httpx.AsyncClient:
        """The httpx client for `worker`'s control calls. One per worker, not one for all: httpx's pool looks at
        every connection it holds for each request (`_assign_requests_to_connections`, and `is_idle` on each when
        a response closes), so with one shared client a probe cost ~11 µs per registered worker, and 1,000 workers'
        probes alone took more than a core (BENCHMARKS.md §8)."""
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

    def remove_worker(self, url: str) -> Worker | None:
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

    # ---- taking a worker for a request --------------------------------------------------------
    def eligibility(self, ex) -> Eligibility:
        """Which workers may serve `ex` (router/core/eligibility.py): not paused for a generation request, and
        the version policy (the x-smg-version-policy header, else routing.version_policy). 400 for a bad header."""
        got = ex.eligibility
        if got is None:
            policy = self.version_policy
            raw = header_value(ex.headers, VERSION_POLICY_HEADER)
            if raw is not None:
                try:
                    policy = parse_version_policy(raw.decode("latin-1"))
                except ValueError as e:
                    raise StageError(400, f"x-smg-version-policy: {e}") from None
            newest = None
            if policy is not ANY:
                current = self.current_weight_version()
                newest = None if current is None else self.versions_seen[current]
            got = ex.eligibility = Eligibility(
                is_generation(ex.method, ex.path), self.config.routing.hold_when_paused, policy, self.versions_seen,
                newest)
        return got

    def routable(self, ex, exclude=()) -> list[Worker]:
        """Workers `ex` could go to once a slot frees (the per-worker cap ignored)."""
        with self.pool.only(self.eligibility(ex).admits):
            return self.pool.routable(exclude)

    def pickable(self, ex, exclude=()) -> bool:
        """Whether `ex` could go to a worker now."""
        with self.pool.only(self.eligibility(ex).admits):
            return self.pool.pick(exclude) is not None

    def _take(self, ex, exclude) -> tuple[Worker, str, bool] | None:
        with self.pool.only(self.eligibility(ex).admits):
            worker, reason = self.select(ex, exclude)
        key, ex.sticky_pick = ex.sticky_pick, None
        if worker is None:
            return None
        trial, transition = self.pool.acquire(worker)
        self._transition(transition)
        if key is not None:  # counted against the key's in-flight cap until give_back
            self.key_inflight.add(key, worker.url)
            ex.sticky_lease = (key, worker.url)
        return worker, reason, trial

    async def _hold(self, ex, exclude, waiting_for: list[Worker]) -> tuple[Worker, str, bool]:
        """Wait (FIFO) until a worker `ex` may use resumes; 503 past routing.hold_timeout_s."""
        timeout = self.config.routing.hold_timeout_s
        try:
            return await self.hold_queue.acquire(lambda: self._take(ex, exclude),
                                                 lambda g: self.give_back(g[0], g[2], ex), timeout_s=timeout)
        except QueueTimeout as e:
            self.metrics.queue_rejected("pause_hold", "timeout")
            held = HoldTimeout(e.waited_s, timeout, tuple(w.url for w in waiting_for))
            raise StageError(503, held.message, held_s=round(e.waited_s, 3)) from None

    async def take_worker(self, ex, exclude=()) -> tuple[Worker | None, str, bool]:
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
            elig = self.eligibility(ex)
            with self.pool.only(elig.waits_for):
                waiting_for = self.pool.routable(exclude)
            if waiting_for:
                return await self._hold(ex, exclude, waiting_for)
            return None, "none", False
        if self.pool.max_inflight is None and not len(self.slot_queue):
            return None, "none", False
        timeout = self.config.workers.queue_timeout_s
        try:
            return await self.slot_queue.acquire(lambda: self._take(ex, exclude),
                                                 lambda g: self.give_back(g[0], g[2], ex), timeout_s=timeout)
        except QueueTimeout as e:
            self.metrics.queue_rejected("worker_slot", "timeout")
            raise StageError(503, f"no worker slot freed within workers.queue_timeout_s ({timeout:g}s): every "
                                  f"usable worker has workers.max_inflight_per_worker "
                                  f"({self.pool.max_inflight}) requests in flight", waited_s=round(e.waited_s, 3),
                             ) from None

    def give_back(self, worker: Worker, trial: bool = False, ex=None) -> None:
        self.pool.release(worker, trial)
        lease = None if ex is None else ex.sticky_lease
        if lease is not None and lease[1] == worker.url:
            ex.sticky_lease = None
            self.key_inflight.done(*lease)
        if len(self.hold_queue):
            self.hold_queue.wake()
        if len(self.slot_queue):
            self.slot_queue.wake()

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

    # ---- weight versions ------------------------------------------------------------------
    def current_weight_version(self) -> str | None:
        """The newest version (by first sighting) among healthy workers; None if none is known."""
        versions = [w.weight_version for w in self.pool.healthy() if w.weight_version is not None]
        if not versions:
            return None
        for v in versions:
            self.note_weight_version(v)
        return max(versions, key=self.versions_seen.__getitem__)

    def _version_hold(self, worker: Worker) -> str | None:
        current = self.current_weight_version()
        if current is None or worker.weight_version == current:
            return None
        return (f"weight version {worker.weight_version!r} differs from the pool's current {current!r}; "
                f"kept out to avoid off-policy samples")

    def observe_weight_version(self, worker: Worker, version: str | None) -> None:
        if version is not None and worker.weight_version != version:
            worker.weight_version = version
            self.note_weight_version(version)

    async def fetch_weight_version(self, worker: Worker) -> None:
        try:
            r = await self.control_client(worker).get(worker.url + "/model_info",
                                                      timeout=self.config.workers.health_timeout_s)
            if r.status_code == 200:
                self.observe_weight_version(worker, r.json().get("weight_version"))
        except (httpx.HTTPError, ValueError, AttributeError):
            pass  # not an SGLang worker, or not answering: the version stays unknown

    # ---- selection ------------------------------------------------------------------------
    def select(self, ex, exclude=()) -> tuple[Worker | None, str]:
        policy = (ex.route.policy if ex.route is not None else None) or self.config.routing.default_policy
        if exclude:
            w, reason = self.pool.pick(exclude), "retry"
            if w is not None:
                self.metrics.retries.inc()
        elif policy == "prefix_affinity":
            w, reason = self._select_by_prefix(ex)
        elif policy == "sticky":
            w, reason = self._select_sticky(ex)
        else:
            w, reason = self.pool.pick(), "least_inflight"
        if w is not None:
            self.metrics.selected(reason)
        return w, reason

    def _prefix_of(self, ex):
        """Token ids (or text bytes) identifying the request's prompt, or None when it can't be read.

        `/generate`: `input_ids`, else `text`. `/v1/completions`: `prompt` (text or token ids).
        `/v1/chat/completions`: `tools` + `messages`, rendered through the chat template when the
        router has a tokenizer, else as the client's own JSON bytes of each message in order (both
        grow by appending as a conversation goes on, so a next turn finds its history)."""
        prompt = ex.scratch.get("prompt")
        if prompt is not None:
            return prompt.tokens
        if ex.path.endswith(("/v1/completions", "/v1/chat/completions")):
            return self._openai_prefix(ex.body_for_upstream)
        from router.core.generate import generate_request, single_input_ids

        try:
            req = generate_request(ex)
            ids = single_input_ids(req)
        except Exception:
            return None
        if ids is not None:
            return ids
        if isinstance(req.text, str):
            return req.text.encode("utf-8", "surrogatepass")
        return None

    def _openai_prefix(self, body: bytes):
        try:
            f = openai_prompt_decoder.decode(body)
            if present(f.prompt):
                raw = bytes(f.prompt)
                if raw.startswith(b'"'):
                    return str_decoder.decode(raw).encode("utf-8", "surrogatepass")
                try:
                    return np.asarray(ids_decoder.decode(raw), dtype=np.int32)
                except (*DECODE_ERRORS, OverflowError):
                    texts = strs_decoder.decode(raw)  # a batch of one prompt routes by it
                    return texts[0].encode("utf-8", "surrogatepass") if len(texts) == 1 else None
            if not present(f.messages):
                return None
            if self.tokenizer is not None:
                try:
                    messages = msgspec.json.decode(bytes(f.messages))
                    tools = msgspec.json.decode(bytes(f.tools)) if present(f.tools) else None
                    text = self.tokenizer.hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                                                 add_generation_prompt=True)
                    return text.encode("utf-8", "surrogatepass")
                except Exception:  # a template that can't render these messages: route by their bytes
                    pass
            parts = [bytes(f.tools) if present(f.tools) else b"", b"\n"]
            parts += [bytes(m) + b"\n" for m in raw_list_decoder.decode(f.messages)]
            return b"".join(parts)
        except (*DECODE_ERRORS, UnicodeEncodeError):
            return None

    def _select_by_prefix(self, ex) -> tuple[Worker | None, str]:
        seq = self._prefix_of(ex)
        if seq is None or len(seq) == 0:
            # Said out loud: a route meant to keep prompts together that silently doesn't is a bug.
            w = self.pool.pick()
            if w is not None:  # counted once per request (a request waiting for a slot asks again)
                self.metrics.affinity_unreadable.labels(ex.route.path if ex.route is not None else ex.path).inc()
            return w, "affinity_unreadable"
        w, reason = select_by_prefix(self.pool, self.prefix_index, seq, self.spill)
        if w is not None:
            ex.affinity_seq = seq
        return w, reason

    def record_served(self, tokens, worker_url: str) -> None:
        """A worker now holds these tokens in its KV cache (prompt + generated)."""
        if self.uses_prefix_affinity:
            self.prefix_index.record(tokens, worker_url)

    def note_reply(self, ex, outputs: list[ReplySummary]) -> None:
        """Learn from a passthrough /generate reply read whole: the worker's weight version, and
        (prefix affinity) the generated part, so the conversation's next turn finds the worker
        that holds its whole history. An n>1 reply holds several samples: nothing to learn."""
        if ex.status != 200 or ex.worker is None or len(outputs) != 1:
            return
        out = outputs[0]
        if out.meta_info is not None and out.meta_info.weight_version is not None:
            self.observe_weight_version(ex.worker, out.meta_info.weight_version)
        seq = ex.affinity_seq
        if seq is None:
            return
        if isinstance(seq, bytes):
            if out.text:
                self.prefix_index.record(seq + out.text.encode("utf-8", "surrogatepass"), ex.worker.url)
        elif out.output_ids:
            self.prefix_index.record(np.concatenate([seq, np.asarray(out.output_ids, np.int32)]), ex.worker.url)

    def _routing_key(self, ex) -> str | None:
        """The request's sticky key (router/core/sticky.py): the router's own (a session id), the routing-key
        headers in order, the body field, then the request id's lineage (body `rid`, request-id headers)."""
        g = self.config.routing

        def body_field():
            if not g.sticky_body_field:
                return None
            try:
                val = msgspec.json.decode(ex.body).get(g.sticky_body_field)
            except (*DECODE_ERRORS, AttributeError):
                return None  # a body without a usable key simply routes by load
            return None if val is None else str(val)

        def rids():
            if not g.sticky_lineage:
                return
            try:
                rid = rid_decoder.decode(ex.body_for_upstream).rid
            except DECODE_ERRORS:
                rid = None
            if isinstance(rid, str):
                yield rid
            for name in self.request_id_headers:
                yield _header_text(ex.headers, name)

        found = routing_key(ex.routing_key, (_header_text(ex.headers, n) for n in self.key_headers),
                            body_field(), rids())
        return None if found is None else found[0]

    def _select_sticky(self, ex) -> tuple[Worker | None, str]:
        """The key's rendezvous worker among the usable ones (the same from every router), under the key's
        in-flight cap, with the bounded-load spill. Route reasons: `sticky` (the worker that served the key
        last), `sticky_new` (a key new to this router, or one whose worker changed), `sticky_cap`, `spill`."""
        key = self._routing_key(ex)
        if key is None:
            return self.pool.pick(), "least_inflight"
        pool = self.pool
        urls = [w.url for w in pool.active if pool.admits(w)]
        url, moved = preferred(key, urls, lambda u: self.key_inflight.count(key, u),
                               self.config.routing.sticky_inflight_cap)
        w, reason = choose(pool, None if url is None else pool.get(url), self.spill, "sticky")
        if w is None:
            return None, "none"
        ex.sticky_pick = key
        if reason != "sticky":
            return w, reason  # a spill is one request only
        if moved:
            return w, "sticky_cap"
        now = time.monotonic()
        last = self.sticky.get(key, now)
        self.sticky.put(key, w.url, now)
        return w, "sticky" if last == w.url else "sticky_new"

    async def aclose(self) -> None:
        for scope in self._probers.values():
            scope.cancel()
        self._probers.clear()
        with trio.CancelScope(shield=True):
            await self.upstream.aclose()
            for client in self._control_clients.values():
                await client.aclose()
            if self.store is not None:
                await self.store.aclose()


def _header_text(headers, name: bytes) -> str | None:
    v = header_value(headers, name)
    return None if v is None else v.decode("latin-1")
