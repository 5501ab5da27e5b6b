"""The router's live state and services: workers and their probers, the upstream client,
pipelines per route, the tokenizer and trajectory cache, metrics.

Stages receive this object as `services`. Every background task (one health prober per worker,
the cache cleanup) runs in the root nursery handed to `Runtime`, each prober in its own
cancel scope so removing a worker cancels exactly its prober.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import httpx
import trio

from router.config import Config
from router.core.pipeline import PipelineSpec, load_pipeline
from router.core.urls import normalize_worker_url
from router.core.workers import Transition, Worker, WorkerPool
from router.net.metrics import Metrics
from router.net.upstream import UpstreamPool

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
        self.pool = WorkerPool(failure_threshold=w.failure_threshold, success_threshold=w.success_threshold)
        self.upstream = UpstreamPool(keepalive_expiry_s=w.keepalive_expiry_s, connect_timeout_s=w.connect_timeout_s)
        # Control plane (health probes, admin fan-out): httpx; the data path uses the h11 pool.
        self.control = httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(w.health_timeout_s),
                                         limits=httpx.Limits(max_connections=256, keepalive_expiry=w.keepalive_expiry_s))
        self.metrics = Metrics(self)
        self._probers: dict[str, trio.CancelScope] = {}
        self.tokenizer = None
        self.tree_if_loaded = None
        self.pipelines: dict[tuple[str, str], RoutePipeline] = {}
        self.passthrough = self._instantiate(load_pipeline("passthrough", config.base_dir), None)
        self.started_at = time.time()
        # weight version -> order first seen; the newest `cache.keep_weight_versions` are current
        self.versions_seen: dict[str, int] = {}

    # ---- pipelines ------------------------------------------------------------------------
    def load_pipelines(self) -> None:
        for r in self.config.routes:
            spec = load_pipeline(r.pipeline, self.config.base_dir)
            self.pipelines[(r.method, r.path)] = self._instantiate(spec, r)

    def _instantiate(self, spec: PipelineSpec, route) -> RoutePipeline:
        req, fwd, resp = [], None, []
        for s in spec.stages:
            stage = s.cls(s.options, self)
            {"request": req, "response": resp}.get(s.cls.phase, []).append(stage)
            if s.cls.phase == "forward":
                fwd = stage
        return RoutePipeline(spec, req, fwd, resp, route)

    def pipeline_for(self, method: str, path: str) -> RoutePipeline:
        return self.pipelines.get((method, path)) or self.passthrough

    def needs_tokenizer(self) -> bool:
        return any(getattr(st, "uses_tokenizer", False)
                   for p in self.pipelines.values() for st in (*p.request_stages, *p.response_stages))

    async def load_tokenizer(self) -> None:
        from router.tokenizer import load_tokenizer

        self.tokenizer = await trio.to_thread.run_sync(load_tokenizer, self.config.tokenizer.path)

    def tree_wanted(self) -> bool:
        return any(getattr(st, "uses_tree", False)
                   for p in self.pipelines.values() for st in (*p.request_stages, *p.response_stages))

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
        if getattr(report, "evicted_unretrieved", 0):
            log.warning("trajectory cache over its hard budget (%d bytes): evicted %d trajectories nobody "
                        "retrieved yet", c.hard_budget_bytes, report.evicted_unretrieved)

    async def cache_maintenance(self) -> None:
        while True:
            await trio.sleep(self.config.cache.cleanup_interval_s)
            self.evict_cache()

    @property
    def tree(self):
        if self.tree_if_loaded is None:
            from router.core.radix import RadixTree

            if self.tokenizer is None:
                raise RuntimeError("the trajectory cache needs a tokenizer ([tokenizer] path)")
            self.tree_if_loaded = RadixTree(self.tokenizer.token_bytes)
        return self.tree_if_loaded

    # ---- workers --------------------------------------------------------------------------
    def add_worker(self, url: str) -> tuple[Worker, bool]:
        url = normalize_worker_url(url)
        worker, created = self.pool.add(url)
        if created and url not in self._probers:
            scope = trio.CancelScope()
            self._probers[url] = scope
            self.nursery.start_soon(self._probe_forever, worker, scope, name=f"prober {url}")
            log.info("worker added: %s", url)
        return worker, created

    def remove_worker(self, url: str) -> Worker | None:
        url = normalize_worker_url(url)
        worker = self.pool.remove(url)
        if worker is not None:
            scope = self._probers.pop(url, None)
            if scope is not None:
                scope.cancel()
            log.info("worker removed: %s (%d in flight)", url, worker.inflight)
        return worker

    def _transition(self, t: Transition | None) -> None:
        if t is not None:
            lvl = logging.WARNING if t.new.value == "quarantined" else logging.INFO
            log.log(lvl, "worker %s: %s -> %s (%s)", t.worker.url, t.old.value, t.new.value, t.reason)

    def on_worker_error(self, worker: Worker, error: str) -> None:
        self._transition(self.pool.record_failure(worker, error))

    def on_worker_ok(self, worker: Worker) -> None:
        # A served request says nothing about recovery (only probes re-admit), but it does
        # reset the run of consecutive failures for a worker that is still in rotation.
        if worker.selectable:
            worker.consecutive_failures = 0

    async def probe_once(self, worker: Worker) -> tuple[bool, str]:
        timeout = self.config.workers.health_timeout_s
        try:
            r = await self.control.get(worker.url + "/health", timeout=timeout)
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
            while True:
                ok, error = await self.probe_once(worker)
                if ok:
                    self._transition(self.pool.record_success(worker))
                else:
                    self.on_worker_error(worker, error)
                await trio.sleep(interval)

    # ---- selection ------------------------------------------------------------------------
    def select(self, ex, exclude=()) -> tuple[Worker | None, str]:
        w = self.pool.pick(exclude)
        reason = "least_inflight" if not exclude else "retry"
        if w is not None:
            self.metrics.selected(reason)
            if exclude:
                self.metrics.retries.inc()
        return w, reason

    async def aclose(self) -> None:
        for scope in self._probers.values():
            scope.cancel()
        self._probers.clear()
        with trio.CancelScope(shield=True):
            await self.upstream.aclose()
            await self.control.aclose()


INF = math.inf
