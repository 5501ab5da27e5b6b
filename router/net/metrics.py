"""Prometheus metrics (prometheus_client), one registry per router so tests can run several.

Per-request counters are cached label children (a dict lookup and an add on the hot path);
pool and cache gauges are read from their owners only when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class _StateCollector:
    def __init__(self, runtime) -> None:
        self.runtime = runtime

    def collect(self):
        pool = self.runtime.pool
        inflight = GaugeMetricFamily("miles_router_worker_inflight_requests", "In-flight requests per worker",
                                     labels=["worker"])
        state = GaugeMetricFamily("miles_router_worker_state", "1 for the worker's current state",
                                  labels=["worker", "state"])
        healthy = GaugeMetricFamily("miles_router_worker_healthy", "1 if the worker receives traffic",
                                    labels=["worker"])
        failures = CounterMetricFamily("miles_router_worker_failures", "Failed health checks and connects",
                                       labels=["worker"])
        quarantines = CounterMetricFamily("miles_router_worker_quarantines", "Times a worker was quarantined",
                                          labels=["worker"])
        for w in pool.all:
            inflight.add_metric([w.url], w.inflight)
            for s in ("healthy", "quarantined", "draining"):
                state.add_metric([w.url, s], 1.0 if w.state.value == s else 0.0)
            healthy.add_metric([w.url], 1.0 if w.selectable else 0.0)
            failures.add_metric([w.url], w.failures_total)
            quarantines.add_metric([w.url], w.quarantines_total)
        breaker = GaugeMetricFamily("miles_router_worker_breaker_state",
                                    "1 for the worker's circuit breaker state (closed/open/half_open)",
                                    labels=["worker", "state"])
        request_failures = CounterMetricFamily("miles_router_worker_request_failures",
                                               "Failed request outcomes (connect failures, timeouts, 5xx, broken replies)",
                                               labels=["worker"])
        for w in pool.all:
            for s in ("closed", "open", "half_open"):
                breaker.add_metric([w.url, s], 1.0 if w.breaker.state.value == s else 0.0)
            request_failures.add_metric([w.url], w.request_failures_total)
        yield from (inflight, state, healthy, failures, quarantines, breaker, request_failures)
        depth = GaugeMetricFamily("miles_router_queue_depth", "Requests waiting in a queue", labels=["queue"])
        depth.add_metric(["admission"], len(self.runtime.admission.queue))
        depth.add_metric(["worker_slot"], len(self.runtime.workers.slot_queue))
        depth.add_metric(["pause_hold"], len(self.runtime.workers.hold_queue))
        yield depth
        yield GaugeMetricFamily("miles_router_admitted_requests",
                                "Proxied requests holding an admission slot (server.max_concurrent_requests)",
                                value=self.runtime.admission.active)
        yield GaugeMetricFamily("miles_router_workers", "Registered workers", value=len(pool))
        tree = self.runtime.trajectories.tree_if_loaded
        if tree is not None:
            st = tree.stats()
            for key, kind in (("nodes", "gauge"), ("tokens", "gauge"), ("bytes", "gauge"), ("trajectories", "gauge"),
                              ("hits", "counter"), ("misses", "counter"), ("evictions", "counter"),
                              ("evicted_unretrieved", "counter"), ("inserts", "counter")):
                if key not in st:
                    continue
                name = f"miles_router_trajectory_cache_{key}"
                fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, f"Trajectory cache {key}")
                fam.add_metric([], st[key])
                yield fam
        sessions = self.runtime.sessions
        if sessions is not None:
            live = sessions.sessions
            for name, kind, value, doc in (
                    ("live", "gauge", len(live), "Live agent sessions"),
                    ("turns", "gauge", sum(len(x.tree) for x in live.values()), "Stored turns of live sessions"),
                    ("inflight_turns", "gauge", sum(x.inflight for x in live.values()),
                     "Session requests waiting for a worker"),
                    ("created", "counter", sessions.created_total, "Sessions created"),
                    ("deleted", "counter", sessions.deleted_total, "Sessions deleted by DELETE /sessions/{id}"),
                    ("expired", "counter", sessions.expired_total, "Sessions reclaimed after sessions.idle_timeout_s"),
                    ("history_reused", "counter", sessions.history_reused_total,
                     "Chat requests that repeated the session's last request byte for byte up to its last "
                     "message, so only the messages from there on were parsed"),
                    ("prompt_cache_hits", "counter", sessions.prompts.hits,
                     "First turns whose prompt tokens another session had already rendered (GRPO groups)")):
                fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(f"miles_router_sessions_{name}", doc)
                fam.add_metric([], value)
                yield fam
        store = self.runtime.trajectories.store
        if store is not None:
            s = store.stats()
            for name, kind, value, doc in (
                    ("bytes", "gauge", s.file_bytes, "Bytes the store occupies on disk (database and WAL)"),
                    ("payload_bytes", "gauge", s.payload_bytes, "Bytes of stored trajectory records"),
                    ("rows", "gauge", s.rows, "Stored trajectories"),
                    ("unretrieved", "gauge", s.unretrieved, "Stored trajectories nobody retrieved yet"),
                    ("pending_writes", "gauge", s.pending_writes, "Trajectories queued for the writer"),
                    ("writable", "gauge", 1.0 if s.writable else 0.0, "1 while writes succeed"),
                    ("commits", "counter", s.commits, "Committed write batches"),
                    ("deleted", "counter", s.deleted, "Trajectories deleted by retention"),
                    ("deleted_unretrieved", "counter", s.deleted_unretrieved,
                     "Trajectories nobody retrieved, deleted because the store was over store.max_bytes")):
                fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(f"miles_router_store_{name}", doc)
                fam.add_metric([], value)
                yield fam


class Metrics:
    def __init__(self, runtime) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("miles_router_requests", "Requests handled, by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("miles_router_request_duration_seconds", "Time to the end of the reply",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.selections = Counter("miles_router_selections", "Worker selections by reason", ["reason"], registry=r)
        self.retries = Counter("miles_router_retries",
                               "Requests sent to another worker after a connect failure or a retryable error reply",
                               registry=r)
        self.abort_retries = Counter("miles_router_abort_retries", "Aborted replies resent to another worker",
                                     registry=r)
        self.stage_errors = Counter("miles_router_stage_errors", "Stage failures", ["stage"], registry=r)
        self.routed_experts_bytes = Counter("miles_router_routed_experts_bytes",
                                            "Bytes of routed_experts relayed to clients", registry=r)
        self.fanout = Counter("miles_router_fanout_requests", "Admin fan-out calls per worker outcome",
                              ["path", "outcome"], registry=r)
        self.store_commit_seconds = Histogram(
            "miles_router_store_commit_seconds", "Trajectory store: time to write and commit one batch",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.store_batch_records = Histogram(
            "miles_router_store_batch_records", "Trajectory store: trajectories per commit (group commit)",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024), registry=r)
        self.store_write_errors = Counter("miles_router_store_write_errors", "Trajectory store: failed commits",
                                          registry=r)
        self.status_retries = Counter("miles_router_status_retries",
                                      "Error replies (retry.statuses) retried on another worker, by status",
                                      ["status"], registry=r)
        self.retries_exhausted = Counter("miles_router_retries_exhausted",
                                         "Requests whose last attempt still got a retryable error reply",
                                         registry=r)
        self.breaker_transitions = Counter("miles_router_worker_breaker_transitions",
                                           "Circuit breaker transitions", ["worker", "from_state", "to_state"],
                                           registry=r)
        self.affinity_unreadable = Counter("miles_router_affinity_unreadable",
                                           "prefix_affinity requests whose prompt could not be read", ["route"],
                                           registry=r)
        self.queue_wait = Histogram("miles_router_queue_wait_seconds", "Time a request waited in a queue",
                                    ["queue"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_rejections = Counter("miles_router_queue_rejections",
                                        "Requests refused by a queue (full -> 429, timeout -> 408/503)",
                                        ["queue", "reason"], registry=r)
        r.register(_StateCollector(runtime))
        self._req_children: dict[tuple[str, int], object] = {}
        self._lat_children: dict[str, object] = {}
        self._sel_children: dict[str, object] = {}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        c = self._req_children.get(key)
        if c is None:
            c = self._req_children[key] = self.requests.labels(route, str(status))
        c.inc()
        h = self._lat_children.get(route)
        if h is None:
            h = self._lat_children[route] = self.latency.labels(route)
        h.observe(seconds)

    def store_commit(self, seconds: float, records: int, failed: bool) -> None:
        """Called on the event loop when the store's writer process answered for a batch."""
        self.store_commit_seconds.observe(seconds)
        self.store_batch_records.observe(records)
        if failed:
            self.store_write_errors.inc()

    def selected(self, reason: str) -> None:
        c = self._sel_children.get(reason)
        if c is None:
            c = self._sel_children[reason] = self.selections.labels(reason)
        c.inc()

    def queue_waited(self, queue: str, seconds: float) -> None:
        self.queue_wait.labels(queue).observe(seconds)

    def queue_rejected(self, queue: str, reason: str) -> None:
        self.queue_rejections.labels(queue, reason).inc()

    def breaker_transition(self, worker: str, old: str, new: str) -> None:
        self.breaker_transitions.labels(worker, old, new).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def merge_expositions(texts: dict[int, bytes]) -> bytes:
    """Several processes' `/metrics` (Prometheus text format, process number -> text) as one: each family once,
    its HELP and TYPE, then every process's samples with a `process="<n>"` label (`--processes N`: a scrape
    of the shared port reaches one process, which answers for all). Sum over processes in queries:
    `sum without (process) (rate(miles_router_requests_total[1m]))`; a restarted process's counters start
    over under its number, which `rate` takes as a counter reset."""
    families: dict[bytes, list] = {}  # name -> [HELP and TYPE lines, sample lines]
    for number in sorted(texts):
        label = b'process="%d"' % number
        current = None
        for line in texts[number].splitlines():
            if line.startswith(b"# HELP ") or line.startswith(b"# TYPE "):
                name = line.split(b" ", 3)[2]
                current = families.setdefault(name, [[], []])
                if line not in current[0]:
                    current[0].append(line)
            elif line and not line.startswith(b"#") and current is not None:
                cut = min(i for i in (line.find(b"{"), line.find(b" ")) if i >= 0)
                if line[cut:cut + 1] == b"{":
                    current[1].append(line[:cut + 1] + label + b"," + line[cut + 1:])
                else:
                    current[1].append(line[:cut] + b"{" + label + b"}" + line[cut:])
    out = []
    for head, samples in families.values():
        out += head
        out += samples
    return b"\n".join(out) + b"\n"
