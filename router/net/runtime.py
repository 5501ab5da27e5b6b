"""The composition root: builds the router's parts from the config, wires them together and starts their
background tasks in the root nursery. It is the `services` object every stage receives (the `Services`
protocol, router/core/pipeline.py).

The parts, each in its own module:
- `workers` (router/net/workers.py): registration, health probes, the breaker, taking a worker for a request;
  its routing decisions are router/core/routing.py's `Router` (`routing`), pure.
- `trajectories` (router/net/trajectories.py): the exact trajectory cache over the durable store.
- `sessions` / `session_persister`: OpenAI-chat sessions (router/core/sessions/) and their rows in the store
  (router/net/session_persist.py), when `[sessions]` is enabled.
- `pipelines`: one `RoutePipeline` (the route's stages, instantiated) per configured route.
- `upstream` (the data path's h11 pool), `admission` (server.max_concurrent_requests), `metrics`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from router.config import Config
from router.core.pipeline import PipelineSpec, load_pipeline
from router.core.routing import Router, WeightVersions
from router.core.workers import WorkerPool
from router.net.admission import ConcurrencyLimit
from router.net.metrics import Metrics
from router.net.trajectories import TrajectoryService
from router.net.upstream import UpstreamPool
from router.net.workers import WorkerSupervisor

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

    @property
    def stages(self) -> list:
        return [*self.request_stages, *([self.forward_stage] if self.forward_stage else []), *self.response_stages]


class Runtime:
    def __init__(self, config: Config, nursery: trio.Nursery) -> None:
        self.config = config
        self.nursery = nursery
        w, g, sv = config.workers, config.routing, config.server
        self.metrics = Metrics(self)
        self.upstream = UpstreamPool(keepalive_expiry_s=w.keepalive_expiry_s, connect_timeout_s=w.connect_timeout_s)
        self.admission = ConcurrencyLimit(sv.max_concurrent_requests, sv.queue_size, sv.queue_timeout_s,
                                          self.metrics.queue_waited)
        self.pool = WorkerPool(failure_threshold=w.failure_threshold, success_threshold=w.success_threshold,
                               breaker=config.breaker, max_inflight=w.max_inflight_per_worker)
        self.versions = WeightVersions(keep=config.cache.keep_weight_versions)
        self.routing = Router(self.pool, g, self.versions, (r.policy for r in config.routes))
        self.workers = WorkerSupervisor(config, nursery, self.pool, self.routing, self.metrics, self.upstream)
        self.trajectories = TrajectoryService(config, self.versions, self.metrics)
        self.tokenizer = None
        self.sessions = None  # SessionRegistry when [sessions] enabled
        self.session_persister = None  # sessions over the store (router/net/session_persist.py)
        # The other router processes on this port (`--processes N`, router/net/siblings.py); None when alone.
        self.siblings = None
        self.pipelines: dict[tuple[str, str], RoutePipeline] = {}
        self.session_pipeline: RoutePipeline | None = None
        self.session_proxy: RoutePipeline | None = None
        self.passthrough = self._instantiate(load_pipeline("passthrough", config.base_dir), None)

    # ---- startup ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Everything the configured routes need, in order: pipelines, then the tokenizer they use, then the
        store they persist to (sessions restored from it); then the background tasks. Workers come after
        (`workers.add`), from the caller."""
        self.load_pipelines()
        if self.needs_tokenizer():
            await self.load_tokenizer()
        if self.store_wanted():
            self.open_store()
        if self.tree_wanted():
            self.nursery.start_soon(self.trajectories.cache_maintenance)
        if self.trajectories.store is not None:
            self.nursery.start_soon(self.trajectories.store_maintenance)
        self.nursery.start_soon(self.workers.sweep_idle_connections)
        if self.sessions is not None:
            self.nursery.start_soon(self.session_maintenance)

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

    def _all_pipelines(self) -> list[RoutePipeline]:
        return [*self.pipelines.values(), *([self.session_pipeline] if self.session_pipeline is not None else [])]

    # What the loaded stages declare they use (router/core/pipeline.py; default False): only that is built.
    def needs_tokenizer(self) -> bool:
        return any(getattr(st, "uses_tokenizer", False) for p in self._all_pipelines() for st in p.stages)

    def tree_wanted(self) -> bool:
        return any(getattr(st, "uses_tree", False) for p in self.pipelines.values() for st in p.stages)

    def store_wanted(self) -> bool:
        return self.config.store.enabled and any(
            getattr(st, "uses_store", False) for p in self._all_pipelines() for st in p.stages)

    async def load_tokenizer(self) -> None:
        from router.tokenizer import load_tokenizer

        tok = self.tokenizer = await trio.to_thread.run_sync(load_tokenizer, self.config.tokenizer.path)
        self.trajectories.vocab = tok.vocab
        # Prefix affinity reads a chat request as the prompt the template renders.
        self.routing.render_chat = lambda messages, tools: tok.hf.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True)

    def open_store(self) -> None:
        """Open the durable store (raises StoreOpenError) and, with sessions, their persister over it."""
        store = self.trajectories.open_store()
        if self.sessions is not None:
            from router.net.session_persist import SessionPersister

            self.session_persister = SessionPersister(store, self.sessions, wait=self.config.store.sync == "commit")
            self.session_persister.restore()  # the key; sessions are read when a request names them
        self.trajectories.started()

    # ---- sessions -----------------------------------------------------------------------------
    @property
    def session_r3_incremental(self) -> bool:
        """Session turns ask the worker for their new routed-experts rows only (miles' addition R3)."""
        pipe = self.session_pipeline
        return pipe is not None and any(
            getattr(st, "name", "") == "session_generate" and st.options.routed_experts and st.options.routed_experts_start_len
            for st in pipe.request_stages)

    async def session_maintenance(self) -> None:
        """Reclaim sessions idle past `sessions.idle_timeout_s` (checked a few times per timeout)."""
        interval = min(max(self.config.sessions.idle_timeout_s / 4, 0.05), 30.0)
        while True:
            await trio.sleep(interval)
            if self.session_persister is not None:  # idle as the store says: uses on every router count
                await self.session_persister.expire()
                continue
            gone = self.sessions.expire_idle(time.monotonic())
            if gone:
                log.info("reclaimed %d idle session(s)", len(gone))

    # ---- admin changes other processes must see -----------------------------------------------
    def admin_changed(self, worker) -> None:
        """An admin call here registered `worker` or changed its control state: the other processes on the port
        take the same change (a change they sent us is applied without this, so it is not sent back)."""
        if self.siblings is not None:
            self.siblings.worker_changed(worker)

    def admin_removed(self, url: str) -> None:
        if self.siblings is not None:
            self.siblings.worker_removed(url)

    # ---- shutdown -----------------------------------------------------------------------------
    async def aclose(self) -> None:
        await self.workers.aclose()
        await self.trajectories.aclose()
