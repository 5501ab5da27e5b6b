"""The router's TOML configuration, decoded straight into msgspec Structs.

Every table forbids unknown keys, so a typo fails at startup instead of being ignored.
`load_config` turns any problem into a `ConfigError` whose message is one line:
``<file>: <key path>: <reason>``.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from router.wire.sim import SimOptions
from router.wire.errors import validation_problem


class ConfigError(Exception):
    """A configuration problem, already formatted as one line: file, key path, reason."""


class _Table(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Table):
    host: str = "127.0.0.1"
    port: int = 30000
    max_body_bytes: int = 512 * 1024 * 1024
    request_timeout_s: float = 1800.0
    drain_timeout_s: float = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Optional shared secret for the admin surface (add/remove workers, fan-out);
    # the env var MILES_ROUTER_ADMIN_KEY overrides it.
    admin_api_key: str | None = None
    # Admission control for proxied requests (router-owned endpoints are never queued): past
    # `max_concurrent_requests` (0 = no limit) requests wait in a FIFO queue of `queue_size`
    # (full -> 429) for up to `queue_timeout_s` (-> 408).
    max_concurrent_requests: int = 0
    queue_size: int = 100
    queue_timeout_s: float = 60.0


class WorkersConfig(_Table):
    urls: list[str] = msgspec.field(default_factory=list)
    health_interval_s: float = 5.0
    # SGLang's /health runs a 1-token generation and answers after >= 1 s.
    health_timeout_s: float = 5.0
    failure_threshold: int = 3
    success_threshold: int = 2
    connect_timeout_s: float = 3.0
    # Below uvicorn's 5 s keep-alive, so we never reuse a socket the worker is closing.
    keepalive_expiry_s: float = 4.0
    # Hosts or CIDRs that /add_worker accepts; empty = any host.
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    # Per-worker cap on in-flight proxied requests (None = no cap). Requests beyond it wait in a
    # FIFO queue and are placed when a slot frees, for up to `queue_timeout_s` (-> 503).
    max_inflight_per_worker: int | None = None
    queue_timeout_s: float = 60.0


class BreakerConfig(_Table):
    """Per-worker circuit breaker fed by request outcomes (connect failures, timeouts, 5xx)."""

    enabled: bool = True
    failures: int = 5
    window_s: float = 60.0
    failure_rate: float = 0.5
    min_requests: int = 20
    cooldown_s: float = 30.0
    admit_when_all_open: bool = True


class RetryConfig(_Table):
    """Error replies (these statuses) are retried at once on another worker, before anything
    reached the client; `max_attempts` counts the first one (1 = no retries)."""

    max_attempts: int = 3
    statuses: list[int] = msgspec.field(default_factory=lambda: [429, 500, 502, 503, 504])


class SimulateConfig(SimOptions, forbid_unknown_fields=True, kw_only=True):
    """Embedded simulated SGLang workers, started when `workers > 0`; every other key is a
    simulator option (router/wire/sim.py), applied to each of them."""

    workers: int = 0
    host: str = "127.0.0.1"
    base_port: int = 0  # 0: pick free ports

    def options_for(self, index: int) -> SimOptions:
        shared = {f: getattr(self, f) for f in SimOptions.__struct_fields__}
        return SimOptions(**{**shared, "name": f"{self.name}-{index}"})


class TokenizerConfig(_Table):
    # A Hugging Face tokenizer folder, or "builtin:qwen" / "builtin:tiny" (built offline).
    path: str = "builtin:qwen"


class CacheConfig(_Table):
    budget_bytes: int = 1 << 30
    # Past this, even trajectories nobody retrieved yet are evicted (with a warning).
    hard_budget_bytes: int = 2 << 30
    cleanup_interval_s: float = 5.0
    # Weight versions older than the newest N seen are evicted first.
    keep_weight_versions: int = 2


class StoreConfig(_Table):
    """The durable trajectory store: SQLite (router/net/store_sqlite.py) at `path`, or PostgreSQL
    (router/net/store_pg.py) when `url` is set. Opened only when a route's pipeline has the `persist` stage;
    `enabled = false` keeps everything in memory (as before the store existed)."""

    enabled: bool = True
    path: str = "miles-router-store.db"  # relative paths resolve against the config file's folder
    # "postgresql://user[:password]@host[:port]/database[?param=value]": the PostgreSQL store instead of SQLite
    url: str | None = None
    # PostgreSQL: the longest a connection, a read or a write waits for the database before the request gets 503
    timeout_s: float = 5.0
    # "commit": the end of a /generate reply waits until its trajectory is committed (fsynced);
    # "off": written in the background, a crash may lose the last few ms.
    sync: Literal["commit", "off"] = "commit"
    # Retrieved (or stale-weight-version) trajectories older than this are deleted; 0 keeps them.
    retention_s: float = 86400.0
    # Past this many bytes of records the oldest retrieved go first, then (with a warning) unretrieved; 0 = no cap.
    max_bytes: int = 0


FANOUT_PATHS = ["/abort_request", "/pause_generation", "/continue_generation", "/update_weight_version",
                "/flush_cache"]


class RoutingConfig(_Table):
    # Spill from the preferred (affinity/sticky) worker when it is both this many requests
    # and this many times busier than the least-loaded healthy worker.
    balance_abs_threshold: int = 8
    balance_rel_threshold: float = 1.5
    prefix_block_tokens: int = 16
    prefix_capacity_blocks: int = 1 << 20
    prefix_owners_per_block: int = 4
    sticky_header: str = "x-smg-routing-key"
    sticky_body_field: str | None = None  # e.g. "session_id"; used when the header is absent
    sticky_idle_s: float = 600.0
    # Re-admit a recovered worker only when its weight version is the pool's current one.
    weight_version_gate: bool = True
    # Admin calls sent to every healthy worker; remove a path to proxy it to one worker instead.
    fanout_paths: list[str] = msgspec.field(default_factory=lambda: list(FANOUT_PATHS))
    # The policy of every proxied path whose [[routes]] entry names none (or that has no entry),
    # like the gateway's --policy.
    default_policy: Literal["least_inflight", "prefix_affinity", "sticky"] = "least_inflight"


class SessionsConfig(_Table):
    """Agent sessions (`/sessions/...`): OpenAI chat with exact token-in/token-out trajectories."""

    enabled: bool = True
    # `session-chat` (built-in) or a pipeline TOML (relative to the config), e.g. pipelines/session-chat.toml
    pipeline: str = "session-chat"
    idle_timeout_s: float = 3600.0  # a session unused this long is reclaimed (then 410, like a deleted one)
    max_sessions: int = 100_000  # live sessions; POST /sessions beyond it gets 429
    max_turns_per_session: int = 1024  # stored turns (tree nodes) per session; one more gets 409
    prompt_cache_entries: int = 4096  # distinct first prompts kept tokenized (GRPO groups share one)
    # miles' session server as the tracer expects it (`--use-session-server v1|v2`): v2 answers /samples with one
    # sample per kept leaf (and `reward`), v1 with one sample of the active line.
    variant: Literal["v1", "v2"] = "v2"
    # Launch-default chat template kwargs (miles' --apply-chat-template-kwargs); a request's own win per key.
    chat_template_kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    # Sent as `lora_path` with every turn's /generate (miles sets "miles_lora" when LoRA is on); None: not sent.
    lora_path: str | None = None
    # lenient | strict | loose_tool_call | role_content_only | "package.module:function" (miles' selectors)
    message_matcher: str = "lenient"
    # miles' --save-debug-trajectory-data: the last turn's messages in each sample's metadata
    save_debug_trajectory_data: bool = False


class RouteConfig(_Table):
    path: str
    method: str = "POST"
    pipeline: str = "passthrough"
    policy: Literal["least_inflight", "prefix_affinity", "sticky"] | None = None  # None: routing.default_policy


class Config(_Table):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    workers: WorkersConfig = msgspec.field(default_factory=WorkersConfig)
    simulate: SimulateConfig = msgspec.field(default_factory=SimulateConfig)
    tokenizer: TokenizerConfig = msgspec.field(default_factory=TokenizerConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    sessions: SessionsConfig = msgspec.field(default_factory=SessionsConfig)
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    routes: list[RouteConfig] = msgspec.field(default_factory=list)
    # Folder the config came from; relative pipeline paths resolve against it.
    base_dir: str = "."


def format_validation_error(file: str | Path, err: Exception) -> str:
    """A msgspec.ValidationError as `FILE: server.port: expected an integer, got a string`
    (the router's words, router/wire/errors.py; never msgspec's, which change between releases)."""
    path, reason = validation_problem(err)
    path = path.removeprefix("$").lstrip(".")
    if reason.startswith("unknown field "):
        key = json.loads(reason.removeprefix("unknown field "))
        path = f"{path}.{key}" if path else key
        reason = "unknown key"
    return f"{file}: {path or '(top level)'}: {reason}"


def _check_values(cfg: Config) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []

    def need(cond: bool, key: str, reason: str) -> None:
        if not cond:
            problems.append((key, reason))

    need(0 <= cfg.server.port <= 65535, "server.port", "must be in 0..65535")
    need(cfg.server.max_body_bytes > 0, "server.max_body_bytes", "must be > 0")
    need(cfg.server.request_timeout_s > 0, "server.request_timeout_s", "must be > 0")
    need(cfg.server.drain_timeout_s >= 0, "server.drain_timeout_s", "must be >= 0")
    w = cfg.workers
    need(w.health_interval_s > 0, "workers.health_interval_s", "must be > 0")
    need(w.health_timeout_s > 0, "workers.health_timeout_s", "must be > 0")
    need(w.failure_threshold >= 1, "workers.failure_threshold", "must be >= 1")
    need(w.success_threshold >= 1, "workers.success_threshold", "must be >= 1")
    need(w.connect_timeout_s > 0, "workers.connect_timeout_s", "must be > 0")
    need(w.keepalive_expiry_s > 0, "workers.keepalive_expiry_s", "must be > 0")
    need(w.max_inflight_per_worker is None or w.max_inflight_per_worker >= 1, "workers.max_inflight_per_worker",
         "must be >= 1 (leave it out for no cap)")
    need(w.queue_timeout_s > 0, "workers.queue_timeout_s", "must be > 0")
    sv = cfg.server
    need(sv.max_concurrent_requests >= 0, "server.max_concurrent_requests", "must be >= 0 (0 = no limit)")
    need(sv.queue_size >= 0, "server.queue_size", "must be >= 0")
    need(sv.queue_timeout_s > 0, "server.queue_timeout_s", "must be > 0")
    b = cfg.breaker
    need(b.failures >= 1, "breaker.failures", "must be >= 1")
    need(b.window_s > 0, "breaker.window_s", "must be > 0")
    need(0 < b.failure_rate <= 1, "breaker.failure_rate", "must be in (0, 1]")
    need(b.min_requests >= 1, "breaker.min_requests", "must be >= 1")
    need(b.cooldown_s > 0, "breaker.cooldown_s", "must be > 0")
    need(cfg.retry.max_attempts >= 1, "retry.max_attempts", "must be >= 1 (1 = no retries)")
    for i, st in enumerate(cfg.retry.statuses):
        need(400 <= st <= 599, f"retry.statuses[{i}]", "must be an HTTP error status (400..599)")
    from router.core.urls import WorkerUrlError, normalize_worker_url

    for i, url in enumerate(w.urls):
        try:
            normalize_worker_url(url)
        except WorkerUrlError as e:
            problems.append((f"workers.urls[{i}]", str(e)))
    s = cfg.simulate
    need(0 <= s.workers <= 64, "simulate.workers", "must be in 0..64")
    need(0 <= s.base_port <= 65535, "simulate.base_port", "must be in 0..65535")
    need(s.token_latency_s >= 0, "simulate.token_latency_s", "must be >= 0")
    need(0.0 <= s.noncanonical_rate <= 1.0, "simulate.noncanonical_rate", "must be in [0, 1]")
    need(s.num_layers >= 1 and s.top_k >= 1, "simulate.num_layers", "num_layers and top_k must be >= 1")
    c = cfg.cache
    need(c.budget_bytes > 0, "cache.budget_bytes", "must be > 0")
    need(c.hard_budget_bytes >= c.budget_bytes, "cache.hard_budget_bytes", "must be >= cache.budget_bytes")
    need(c.cleanup_interval_s > 0, "cache.cleanup_interval_s", "must be > 0")
    need(c.keep_weight_versions >= 1, "cache.keep_weight_versions", "must be >= 1")
    st = cfg.store
    need(bool(st.path.strip()), "store.path", "must not be empty")
    url_problem = None if st.url is None else _postgres_url_problem(st.url)
    need(url_problem is None, "store.url", url_problem or "")
    need(st.timeout_s > 0, "store.timeout_s", "must be > 0")
    need(st.retention_s >= 0, "store.retention_s", "must be >= 0 (0 keeps everything)")
    need(st.max_bytes >= 0, "store.max_bytes", "must be >= 0 (0 = no cap)")
    g = cfg.routing
    need(g.balance_abs_threshold >= 0, "routing.balance_abs_threshold", "must be >= 0")
    need(g.balance_rel_threshold >= 1.0, "routing.balance_rel_threshold", "must be >= 1.0")
    need(g.prefix_block_tokens >= 1, "routing.prefix_block_tokens", "must be >= 1")
    need(g.prefix_capacity_blocks >= 1, "routing.prefix_capacity_blocks", "must be >= 1")
    need(g.prefix_owners_per_block >= 1, "routing.prefix_owners_per_block", "must be >= 1")
    need(g.sticky_idle_s > 0, "routing.sticky_idle_s", "must be > 0")
    g.sticky_header = g.sticky_header.lower()
    for i, fp in enumerate(g.fanout_paths):
        need(fp in FANOUT_PATHS, f"routing.fanout_paths[{i}]", f"must be one of {', '.join(FANOUT_PATHS)}")
    ss = cfg.sessions
    need(ss.idle_timeout_s > 0, "sessions.idle_timeout_s", "must be > 0")
    need(ss.max_sessions >= 1, "sessions.max_sessions", "must be >= 1")
    need(ss.max_turns_per_session >= 1, "sessions.max_turns_per_session", "must be >= 1")
    need(ss.prompt_cache_entries >= 0, "sessions.prompt_cache_entries", "must be >= 0")
    from router.core.sessions.messages import resolve_matcher

    try:
        resolve_matcher(ss.message_matcher)
    except ValueError as e:
        problems.append(("sessions.message_matcher", str(e)))
    seen: set[tuple[str, str]] = set()
    for i, r in enumerate(cfg.routes):
        need(r.path.startswith("/"), f"routes[{i}].path", "must start with '/'")
        r.method = r.method.upper()
        need(
            r.method in {"GET", "POST", "PUT", "DELETE", "PATCH"},
            f"routes[{i}].method",
            "must be one of GET, POST, PUT, DELETE, PATCH",
        )
        need((r.method, r.path) not in seen, f"routes[{i}]", f"duplicate route {r.method} {r.path}")
        seen.add((r.method, r.path))
    return problems


def _postgres_url_problem(url: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as e:
        return f"not a valid URL: {e}"
    if parts.scheme not in ("postgresql", "postgres"):
        return "must be a postgresql:// URL (or leave it out for the SQLite store at store.path)"
    return None


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError with a one-line message."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: (file): cannot read: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: (file): not UTF-8: {e.reason}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: (syntax): invalid TOML: {e}") from None
    if "base_dir" in data:
        raise ConfigError(f"{p}: base_dir: unknown key")
    data["base_dir"] = str(p.resolve().parent)
    try:
        cfg = msgspec.convert(data, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(format_validation_error(p, e)) from None
    problems = _check_values(cfg)
    if cfg.store.url is not None and "path" in (data.get("store") or {}):
        problems.insert(0, ("store.url", "set store.url (PostgreSQL) or store.path (SQLite), not both"))
    if problems:
        key, reason = problems[0]
        raise ConfigError(f"{p}: {key}: {reason}")
    return cfg


def default_config() -> Config:
    # No config file: nothing to put a store file next to, so trajectories stay in memory.
    cfg = Config()
    cfg.store.enabled = False
    return cfg


def store_path(cfg: Config) -> Path:
    """The store file: `store.path`, relative to the config file's folder."""
    p = Path(cfg.store.path)
    return p if p.is_absolute() else Path(cfg.base_dir) / p


def to_builtins(cfg: Config) -> dict:
    return msgspec.to_builtins(cfg)
