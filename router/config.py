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
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect
from msgspec import Meta

from router.core.workers import BreakerPolicy
from router.wire.sim import SimOptions
from router.wire.errors import validation_problem


class ConfigError(Exception):
    """A configuration problem, already formatted as one line: file, key path, reason."""


class _Table(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# Value constraints are declared on the fields (msgspec checks them while decoding); a violation is
# reported in the router's words from the declaration itself (`must be > 0`, `format_validation_error`),
# with the Meta's `extra={"hint": ...}` in parentheses.
Positive = Annotated[float, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]
AtLeastOne = Annotated[int, Meta(ge=1)]
Port = Annotated[int, Meta(ge=0, le=65535)]


class ServerConfig(_Table):
    host: str = "127.0.0.1"
    port: Port = 30000
    max_body_bytes: AtLeastOne = 512 * 1024 * 1024
    request_timeout_s: Positive = 1800.0
    drain_timeout_s: NonNegative = 30.0
    # Router processes sharing `port` (SO_REUSEPORT) under one supervisor (router/net/supervisor.py); > 1
    # needs every process to see the same trajectories and sessions: the PostgreSQL store (`[store] url`).
    processes: Annotated[int, Meta(ge=1, le=256)] = 1
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Optional shared secret for the admin surface (add/remove workers, fan-out);
    # the env var MILES_ROUTER_ADMIN_KEY overrides it.
    admin_api_key: str | None = None
    # Admission control for proxied requests (router-owned endpoints are never queued): past
    # `max_concurrent_requests` (0 = no limit) requests wait in a FIFO queue of `queue_size`
    # (full -> 429) for up to `queue_timeout_s` (-> 408).
    max_concurrent_requests: Annotated[int, Meta(ge=0, extra={"hint": "0 = no limit"})] = 0
    queue_size: Annotated[int, Meta(ge=0)] = 100
    queue_timeout_s: Positive = 60.0


class WorkersConfig(_Table):
    urls: list[str] = msgspec.field(default_factory=list)
    health_interval_s: Positive = 5.0
    # SGLang's /health runs a 1-token generation and answers after >= 1 s.
    health_timeout_s: Positive = 5.0
    failure_threshold: AtLeastOne = 3
    success_threshold: AtLeastOne = 2
    connect_timeout_s: Positive = 3.0
    # Below uvicorn's 5 s keep-alive, so we never reuse a socket the worker is closing.
    keepalive_expiry_s: Positive = 4.0
    # Hosts or CIDRs that /add_worker accepts; empty = any host.
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    # Per-worker cap on in-flight proxied requests (None = no cap). Requests beyond it wait in a
    # FIFO queue and are placed when a slot frees, for up to `queue_timeout_s` (-> 503).
    max_inflight_per_worker: Annotated[int, Meta(ge=1, extra={"hint": "leave it out for no cap"})] | None = None
    queue_timeout_s: Positive = 60.0
    # Worker URL -> labels for the RL plane's selectors (`[workers.labels."http://h:p"] pool = "a"`); applied when
    # that URL registers (from `urls`, /add_worker or POST /workers, whose own labels win per key).
    labels: dict[str, dict[str, str | int | float | bool]] = msgspec.field(default_factory=dict)


class RetryConfig(_Table):
    """Error replies (these statuses) are retried at once on another worker, before anything
    reached the client; `max_attempts` counts the first one (1 = no retries)."""

    max_attempts: Annotated[int, Meta(ge=1, extra={"hint": "1 = no retries"})] = 3
    statuses: list[Annotated[int, Meta(ge=400, le=599, extra={"hint": "an HTTP error status"})]] = msgspec.field(
        default_factory=lambda: [429, 500, 502, 503, 504])


class SimulateConfig(SimOptions, forbid_unknown_fields=True, kw_only=True):
    """Embedded simulated SGLang workers, started when `workers > 0`; every other key is a
    simulator option (router/wire/sim.py), applied to each of them."""

    workers: Annotated[int, Meta(ge=0, le=64)] = 0
    host: str = "127.0.0.1"
    base_port: Port = 0  # 0: pick free ports

    def options_for(self, index: int) -> SimOptions:
        shared = {f: getattr(self, f) for f in SimOptions.__struct_fields__}
        return SimOptions(**{**shared, "name": f"{self.name}-{index}"})


class TokenizerConfig(_Table):
    # A Hugging Face tokenizer folder, or "builtin:qwen" / "builtin:tiny" (built offline).
    path: str = "builtin:qwen"


class CacheConfig(_Table):
    budget_bytes: AtLeastOne = 1 << 30
    # Past this, even trajectories nobody retrieved yet are evicted (with a warning).
    hard_budget_bytes: int = 2 << 30
    cleanup_interval_s: Positive = 5.0
    # Weight versions older than the newest N seen are evicted first.
    keep_weight_versions: AtLeastOne = 2


class StoreConfig(_Table):
    """The durable trajectory store: SQLite (router/net/store_sqlite.py) at `path`, or PostgreSQL
    (router/net/store_pg.py) when `url` is set. Opened only when a route's pipeline has the `persist` stage;
    `enabled = false` keeps everything in memory (as before the store existed)."""

    enabled: bool = True
    # relative paths resolve against the config file's folder
    path: Annotated[str, Meta(pattern=r"\S", extra={"reason": "must not be empty"})] = "miles-router-store.db"
    # "postgresql://user[:password]@host[:port]/database[?param=value]": the PostgreSQL store instead of SQLite
    url: str | None = None
    # PostgreSQL: the longest a connection, a read or a write waits for the database before the request gets 503
    timeout_s: Positive = 5.0
    # Other routers write the same store (a fleet): sessions and prefix keys are re-read from it (default: true
    # with `url`; false means this router is the database's only writer). SQLite is always one router's.
    shared: bool | None = None
    # "commit": the end of a /generate reply waits until its trajectory is committed (fsynced);
    # "off": written in the background, a crash may lose the last few ms.
    sync: Literal["commit", "off"] = "commit"
    # Retrieved (or stale-weight-version) trajectories older than this are deleted; 0 keeps them.
    retention_s: Annotated[float, Meta(ge=0, extra={"hint": "0 keeps everything"})] = 86400.0
    # Past this many bytes of records the oldest retrieved go first, then (with a warning) unretrieved; 0 = no cap.
    max_bytes: Annotated[int, Meta(ge=0, extra={"hint": "0 = no cap"})] = 0


FANOUT_PATHS = ["/abort_request", "/pause_generation", "/continue_generation", "/update_weight_version",
                "/flush_cache"]
FanoutPath = Literal[tuple(FANOUT_PATHS)]


class RoutingConfig(_Table):
    # Spill from the preferred (affinity/sticky) worker when it is both this many requests
    # and this many times busier than the least-loaded healthy worker.
    balance_abs_threshold: Annotated[int, Meta(ge=0)] = 8
    balance_rel_threshold: Annotated[float, Meta(ge=1.0)] = 1.5
    # prefix_affinity: each this many prompt tokens the least-loaded worker would prefill again allow
    # the preferred worker one more request in flight than it (router/core/selection.py; 0 = off).
    balance_tokens_per_request: Annotated[int, Meta(ge=0, extra={"hint": "0 = off"})] = 32
    prefix_block_tokens: AtLeastOne = 16
    prefix_capacity_blocks: AtLeastOne = 1 << 20
    prefix_owners_per_block: AtLeastOne = 4
    sticky_header: str = "x-smg-routing-key"
    # Ordered routing-key headers, the first present with a usable value wins (smg's --routing-key-headers);
    # unset: [sticky_header].
    routing_key_headers: list[str] | None = None
    sticky_body_field: str | None = None  # e.g. "session_id"; used when the headers are absent
    # Without a key: the request id's lineage (conv_t2_r1 -> conv), from the body's rid or these headers.
    sticky_lineage: bool = True
    request_id_headers: list[str] = msgspec.field(
        default_factory=lambda: ["x-request-id", "x-correlation-id", "x-trace-id", "request-id"])
    # A key with this many requests in flight on its worker sends the next to its next worker (0 = no cap).
    sticky_inflight_cap: Annotated[int, Meta(ge=0, extra={"hint": "0 = no cap"})] = 2
    sticky_idle_s: Positive = 600.0
    # Re-admit a recovered worker only when its weight version is the pool's current one.
    weight_version_gate: bool = True
    # Admin calls sent to every healthy worker; remove a path to proxy it to one worker instead.
    fanout_paths: list[FanoutPath] = msgspec.field(default_factory=lambda: list(FANOUT_PATHS))
    # The policy of every proxied path whose [[routes]] entry names none (or that has no entry),
    # like the gateway's --policy.
    default_policy: Literal["least_inflight", "prefix_affinity", "sticky"] = "least_inflight"
    # Generation requests wait at the router (up to hold_timeout_s, then 503) while every worker they may use
    # was paused (or put to sleep) through the router, instead of going to an engine that would block them.
    hold_when_paused: bool = True
    hold_timeout_s: Positive = 300.0
    # Which weight versions may serve generation requests: any | latest-only | max-staleness:K
    # (per request: the x-smg-version-policy header).
    version_policy: str = "any"


class RlConfig(_Table):
    """The SGLang Model Gateway's RL control plane (`/v1/rl/...`, smg 1.13's `--enable-rl`): worker discovery,
    one engine route on one worker, and a fan-out to the workers a label selector matches (router/net/rl.py)."""

    enabled: bool = True
    # the longest one engine call through /v1/rl may take (smg's --rl-control-timeout-secs)
    control_timeout_s: Positive = 600.0
    # engine calls in flight at once in one fan-out (smg's --rl-fanout-concurrency)
    fanout_concurrency: AtLeastOne = 32


class SessionsConfig(_Table):
    """Agent sessions (`/sessions/...`): OpenAI chat with exact token-in/token-out trajectories."""

    enabled: bool = True
    # `session-chat` (built-in) or a pipeline TOML (relative to the config), e.g. pipelines/session-chat.toml
    pipeline: str = "session-chat"
    idle_timeout_s: Positive = 3600.0  # a session unused this long is reclaimed (then 410, like a deleted one)
    max_sessions: AtLeastOne = 100_000  # live sessions; POST /sessions beyond it gets 429
    max_turns_per_session: AtLeastOne = 1024  # stored turns (tree nodes) per session; one more gets 409
    prompt_cache_entries: Annotated[int, Meta(ge=0)] = 4096  # distinct first prompts kept tokenized (GRPO groups share one)
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
    path: Annotated[str, Meta(pattern="^/", extra={"reason": "must start with '/'"})]
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
    rl: RlConfig = msgspec.field(default_factory=RlConfig)
    # per-worker circuit breaker fed by request outcomes (router/core/workers.py)
    breaker: BreakerPolicy = msgspec.field(default_factory=BreakerPolicy)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    routes: list[RouteConfig] = msgspec.field(default_factory=list)
    # Folder the config came from; relative pipeline paths resolve against it.
    base_dir: str = "."


def format_validation_error(file: str | Path, err: Exception) -> str:
    """A msgspec.ValidationError as `FILE: server.port: expected an integer, got a string`
    (the router's words, router/wire/errors.py; never msgspec's, which change between releases). A
    value outside a field's declared constraint is said from the declaration: `FILE: workers.failure_threshold:
    must be >= 1`."""
    path, reason = validation_problem(err)
    field = _field_info(Config, path)
    key = path.removeprefix("$").lstrip(".")
    if reason.startswith("unknown field "):
        name = json.loads(reason.removeprefix("unknown field "))
        key = f"{key}.{name}" if key else name
        reason = "unknown key"
    elif field is not None and ", got " not in reason:  # the type was right: a declared constraint failed
        reason = _constraint_words(*field, reason)
    return f"{file}: {key or '(top level)'}: {reason}"


def _field_info(root: type, path: str) -> tuple[object, dict] | None:
    """(msgspec.inspect type, the Meta `extra` along the way) of the field at a JSON path like
    `$.retry.statuses[0]`, or None when the path leads nowhere."""
    t, extra = msgspec.inspect.type_info(root), {}
    for name, _index in re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]", path):
        t = _unwrap(t, extra)
        if name:
            fields = getattr(t, "fields", ())
            t = next((f.type for f in fields if f.encode_name == name), None)
        else:
            t = getattr(t, "item_type", None)
        if t is None:
            return None
    return _unwrap(t, extra), extra


def _unwrap(t, extra: dict):
    """The type inside Meta annotations and `| None`, collecting the Metas' `extra`."""
    while True:
        if isinstance(t, msgspec.inspect.Metadata):
            extra.update(t.extra or {})
            t = t.type
        elif isinstance(t, msgspec.inspect.UnionType):
            rest = [u for u in t.types if not isinstance(u, msgspec.inspect.NoneType)]
            if len(rest) != 1:
                return t
            t = rest[0]
        else:
            return t


def _constraint_words(t, extra: dict, reason: str) -> str:
    """`must be >= 1`, `must be in (0, 1]`, ... from a field's declared constraints (else `reason`)."""
    if "reason" in extra:
        words = extra["reason"]
    elif isinstance(t, msgspec.inspect.LiteralType):
        words = f"{reason}: must be one of {', '.join(map(str, t.values))}"
    else:
        low = (">", t.gt) if getattr(t, "gt", None) is not None else (">=", getattr(t, "ge", None))
        high = ("<", t.lt) if getattr(t, "lt", None) is not None else ("<=", getattr(t, "le", None))
        if low[1] is None and high[1] is None:
            return reason
        if low[1] is None:
            words = f"must be {high[0]} {high[1]:g}"
        elif high[1] is None:
            words = f"must be {low[0]} {low[1]:g}"
        elif isinstance(t, msgspec.inspect.IntType):
            words = f"must be in {low[1]:g}..{high[1]:g}"
        else:
            words = f"must be in {'(' if low[0] == '>' else '['}{low[1]:g}, {high[1]:g}{']' if high[0] == '<=' else ')'}"
    hint = extra.get("hint")
    return f"{words} ({hint})" if hint else words


def _check_values(cfg: Config) -> list[tuple[str, str]]:
    """What the fields' declared constraints cannot say: rules across fields and items, and URLs."""
    problems: list[tuple[str, str]] = []

    def need(cond: bool, key: str, reason: str) -> None:
        if not cond:
            problems.append((key, reason))

    from router.core.urls import WorkerUrlError, normalize_worker_url

    for i, url in enumerate(cfg.workers.urls):
        try:
            normalize_worker_url(url)
        except WorkerUrlError as e:
            problems.append((f"workers.urls[{i}]", str(e)))
    from router.core.labels import check_labels

    for url, labels in cfg.workers.labels.items():
        try:
            normalize_worker_url(url)
            check_labels(labels, f"workers.labels.{json.dumps(url)}")
        except WorkerUrlError as e:
            problems.append((f"workers.labels.{json.dumps(url)}", str(e)))
        except ValueError as e:
            key, _, reason = str(e).partition(": ")
            problems.append((key, reason))
    c = cfg.cache
    need(c.hard_budget_bytes >= c.budget_bytes, "cache.hard_budget_bytes", "must be >= cache.budget_bytes")
    url_problem = None if cfg.store.url is None else _postgres_url_problem(cfg.store.url)
    need(url_problem is None, "store.url", url_problem or "")
    need(not (cfg.store.shared and cfg.store.url is None), "store.shared",
         "only a PostgreSQL store (store.url) can be shared by several routers")
    cfg.routing.sticky_header = cfg.routing.sticky_header.lower()
    from router.core.eligibility import parse_version_policy

    try:
        parse_version_policy(cfg.routing.version_policy)
    except ValueError as e:
        problems.append(("routing.version_policy", str(e).partition(": ")[2]))
    from router.core.sessions.messages import resolve_matcher

    try:
        resolve_matcher(cfg.sessions.message_matcher)
    except ValueError as e:
        problems.append(("sessions.message_matcher", str(e)))
    seen: set[tuple[str, str]] = set()
    for i, r in enumerate(cfg.routes):
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
