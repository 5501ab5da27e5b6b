"""Pipelines: ordered stages declared in TOML, checked before the router starts.

A pipeline file names its stages in order and gives each optional options:

    stages = ["tokenize", "radix_lookup", "forward", "capture", "insert"]
    [options.capture]
    routed_experts = true

A stage is a class with:
  * `name`      the TOML name (built-ins) — custom stages are named by import path `pkg.mod:Class`;
  * `phase`     "request" (before the worker is called; may answer the request itself),
                "forward" (exactly one: calls a worker and relays its reply), or
                "response" (after the worker answered, before the client sees the end of the reply);
  * `requires` / `optional` / `provides`: what it reads (`requires`: an earlier stage must provide it;
                `optional`: used when an earlier stage did) and what it writes. A name is an
                `Exchange.scratch` key, or one of the Exchange artifacts in `EXCHANGE_ARTIFACTS`
                (`upstream_body`, `response`). So an order that cannot work (insert before capture,
                persist_session before session_reply) is refused at startup; tests/test_pipeline_assembly.py
                checks every built-in stage's code uses exactly the scratch keys it declares;
  * `Options`   a msgspec Struct (unknown keys are errors) built from `[options.<name>]`;
  * `__init__(self, options, services)` (`services`: the `Services` the router gives every stage) and
    `async on_request(ex) -> Reply | None`, `async forward(ex, client: ClientSink) -> None` or
    `async on_response(ex) -> None`;
  * loading hooks (class attributes, default False): `uses_tokenizer` (the router loads the tokenizer),
    `uses_tree` (the trajectory cache), `uses_store` (the durable store is opened), `evicts_cache` (it
    enforces the cache's memory budget, so an earlier stage need not); and `bind_pipeline(response_stages)`,
    called once with the route's response stages (a stage that depends on what follows it looks once).

Assembly here is pure (imports and validation only); the I/O edge instantiates the stages.
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import msgspec

from router.core.errors import RouterError
from router.wire.errors import validation_error_text, validation_problem

BUILTIN_STAGES = {
    "tokenize": "router.stages.tokenize:Tokenize",
    "radix_lookup": "router.stages.radix_lookup:RadixLookup",
    "forward": "router.stages.forward:Forward",
    "capture": "router.stages.capture:Capture",
    "r3_prefix": "router.stages.r3_prefix:R3Prefix",
    "insert": "router.stages.insert:Insert",
    "set_fields": "router.stages.set_fields:SetFields",
    "persist": "router.stages.persist:Persist",
    "persist_session": "router.stages.persist_session:PersistSession",
    "session_request": "router.stages.session_request:SessionRequest",
    "chat_template": "router.stages.chat_template:ChatTemplate",
    "session_generate": "router.stages.session_generate:SessionGenerate",
    "chat_parse": "router.stages.chat_parse:ChatParse",
    "session_reply": "router.stages.session_reply:SessionReply",
}
PHASES = ("request", "forward", "response")


class PipelineError(Exception):
    """One line: pipeline file, stage index and the problem."""


class StageError(RouterError):
    """Raised by a stage to fail the request with `status` and a JSON error naming the stage."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.status = status


class CommitError(StageError):
    """Raised by a response stage when the reply must not reach the client as a success, because what it
    promises could not be made true (e.g. its trajectory could not be made durable). Unlike any other response
    stage failure this costs the client the worker's reply: before the reply started the client gets this
    status and error instead; once a stream has started it is broken off, never completed."""


@dataclass(slots=True)
class Reply:
    """A complete answer produced by the router itself (short-circuit or error)."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=lambda: [(b"content-type", b"application/json")])


class NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    pass


# Exchange fields a stage may name in requires/provides: set by one stage, read by later ones.
EXCHANGE_ARTIFACTS = {
    "upstream_body": "Exchange.upstream_body: the request body sent to the worker instead of the client's",
    "response": "Exchange.status, response_headers and response_body (or final_event for a stream): "
                "the worker's reply, set by the forward stage",
}


class ClientSink(Protocol):
    """Where the forward stage writes the client's reply (router/net/app.py ClientStream)."""

    pipeline_needs_response: bool  # response stages follow: hold back the end of the reply until they ran
    started: bool  # the reply's head went out: an error can no longer be a clean status

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    async def send(self, chunk: bytes) -> None: ...

    def defer(self, data: bytes) -> None:
        """Hold back the end of the reply until the response stages ran."""

    async def reply(self, reply: Reply) -> None:
        """A complete reply of the router's own (before anything started)."""


class WorkerAccess(Protocol):
    """The forward stage's worker lifecycle, and what replies teach the router (router/net/workers.py)."""

    pool: Any  # router.core.workers.WorkerPool
    retry_statuses: frozenset[int]

    async def take(self, ex: Exchange, exclude: Any = ()) -> tuple[Any, str, bool]: ...
    def give_back(self, worker: Any, trial: bool = False, ex: Exchange | None = None) -> None: ...
    def sending(self, worker: Any) -> Callable[[], None]: ...
    def routable(self, ex: Exchange, exclude: Any = ()) -> list: ...
    def pickable(self, ex: Exchange, exclude: Any = ()) -> bool: ...
    def on_outcome(self, worker: Any, failed: bool, reason: str = "", trial: bool = False) -> None: ...
    def on_worker_error(self, worker: Any, error: str) -> None: ...
    def note_reply(self, ex: Exchange, outputs: list) -> None: ...
    def record_served(self, tokens: Any, worker_url: str) -> None: ...
    def observe_version(self, worker: Any, version: str | None) -> None: ...
    def current_version(self) -> str | None: ...


class TrajectoryAccess(Protocol):
    """The exact trajectory cache over the durable store (router/net/trajectories.py)."""

    tree: Any  # router.core.radix.RadixTree (stages with uses_tree)
    store: Any  # a router.core.store.TrajectoryStore (stages with uses_store), or None when [store] is off

    def evict(self) -> None: ...
    async def continue_from_store(self, text: bytes, matched: int) -> bool: ...


class Services(Protocol):
    """Everything a stage may use of the router: the object every stage receives as `services` (the router's
    Runtime, router/net/runtime.py, implements it; tests/test_pipeline_assembly.py checks it does, and that the
    built-in stages use nothing else). Attributes are None when the route's pipelines do not need them."""

    config: Any  # router.config.Config
    metrics: Any  # router/net/metrics.py
    upstream: Any  # the worker connection pool (router/net/upstream.py): the forward stage's
    tokenizer: Any  # router.tokenizer.Tokenizer (stages with uses_tokenizer)
    workers: WorkerAccess
    trajectories: TrajectoryAccess
    sessions: Any  # router.core.sessions.registry.SessionRegistry
    session_persister: Any  # router/net/session_persist.py, or None without a store


class Stage:
    """Base class for stages (subclassing is optional; the attributes are the contract: see the module docstring)."""

    name: ClassVar[str] = ""
    phase: ClassVar[str] = "request"
    requires: ClassVar[frozenset[str]] = frozenset()
    optional: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    Options: ClassVar[type[msgspec.Struct]] = NoOptions
    uses_tokenizer: ClassVar[bool] = False
    uses_tree: ClassVar[bool] = False
    uses_store: ClassVar[bool] = False
    evicts_cache: ClassVar[bool] = False

    def __init__(self, options: Any, services: Services) -> None:
        self.options = options
        self.services = services


@dataclass(slots=True)
class Exchange:
    """Everything one request carries through its pipeline."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes  # the client's bytes, never modified
    route: Any = None  # the RouteConfig, when the route is configured
    upstream_body: bytes | None = None  # set by a stage that rewrites the request
    scratch: dict[str, Any] = field(default_factory=dict)  # stage-to-stage values (declared by the stages)
    # Set by the router itself, for every stage to read:
    session: Any = None  # the Session of a /sessions/{id}/... request (router/core/sessions/registry.py)
    routing_key: str | None = None  # a sticky key the router chose (a session id), before any the client sent
    parsed_request: Any = None  # the body decoded as a /generate request, once (router/core/generate.py)
    affinity_seq: Any = None  # the prompt prefix-affinity routed by, to learn the reply's continuation
    eligibility: Any = None  # which workers may serve it (pause, version policy: router/core/eligibility.py)
    sticky_pick: str | None = None  # the sticky key a selection just placed (counted once the worker is taken)
    sticky_lease: tuple[str, str] | None = None  # (key, worker url) counted in flight until the worker is given back
    # the reply's head while response stages run (set by forward, added to by capture / session_reply)
    client_headers: list[tuple[bytes, bytes]] | None = None
    worker: Any = None  # the Worker that served the request
    route_reason: str = ""
    status: int | None = None  # the worker's status
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    response_body: bytes | None = None  # whole body (non-stream) when a response stage needs it
    final_event: bytes | None = None  # last SSE `data:` payload before [DONE] (stream)
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # added to the client reply
    stage_errors: list[str] = field(default_factory=list)

    @property
    def body_for_upstream(self) -> bytes:
        return self.body if self.upstream_body is None else self.upstream_body


@dataclass(frozen=True, slots=True)
class StageSpec:
    index: int
    ref: str  # as written in TOML
    cls: type
    options: Any


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    name: str
    source: str  # file path or "(builtin passthrough)"
    stages: tuple[StageSpec, ...]

    @property
    def needs_response(self) -> bool:
        return any(s.cls.phase == "response" for s in self.stages)

    def describe(self) -> list[dict]:
        return [{"stage": s.ref, "phase": s.cls.phase, "options": msgspec.to_builtins(s.options)}
                for s in self.stages]


class _PipelineFile(msgspec.Struct, forbid_unknown_fields=True):
    stages: list[str]
    description: str = ""
    options: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)


def resolve_stage(ref: str) -> type:
    """`tokenize` (built-in) or `package.module:ClassName` -> the class."""
    target = BUILTIN_STAGES.get(ref, ref)
    if ":" not in target:
        raise ValueError(f"unknown stage {ref!r} (built-ins: {', '.join(BUILTIN_STAGES)}; custom: 'pkg.module:Class')")
    mod_name, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import stage module {mod_name!r}: {e}") from None
    cls = getattr(mod, attr, None)
    if cls is None:
        raise ValueError(f"module {mod_name!r} has no stage {attr!r}")
    phase = getattr(cls, "phase", None)
    if phase not in PHASES:
        raise ValueError(f"stage {ref!r} has phase {phase!r}; expected one of {', '.join(PHASES)}")
    method = {"request": "on_request", "forward": "forward", "response": "on_response"}[phase]
    if not callable(getattr(cls, method, None)):
        raise ValueError(f"stage {ref!r} (phase {phase}) must define {method}()")
    return cls


def build_pipeline(name: str, source: str, refs: list[str], options: dict[str, dict[str, Any]]) -> PipelineSpec:
    """Resolve and validate a stage list; raise PipelineError naming source, stage index and problem."""
    specs: list[StageSpec] = []
    provided: set[str] = set()
    phase_rank = {p: i for i, p in enumerate(PHASES)}
    last_rank = 0
    forwards = 0
    unused_options = set(options)
    for i, ref in enumerate(refs):
        where = f"{source}: stages[{i}] ({ref})"
        try:
            cls = resolve_stage(ref)
        except ValueError as e:
            raise PipelineError(f"{where}: {e}") from None
        rank = phase_rank[cls.phase]
        if rank < last_rank:
            raise PipelineError(f"{where}: a {cls.phase}-phase stage cannot come after a {PHASES[last_rank]}-phase stage")
        last_rank = rank
        forwards += cls.phase == "forward"
        missing = set(getattr(cls, "requires", ())) - provided
        if missing:
            raise PipelineError(
                f"{where}: requires {', '.join(sorted(missing))}, which no earlier stage provides")
        provided |= set(getattr(cls, "provides", ()))
        key = ref if ref in options else getattr(cls, "name", ref)
        unused_options.discard(key)
        opts_cls = getattr(cls, "Options", NoOptions)
        try:
            opts = msgspec.convert(options.get(key, {}), opts_cls)
        except msgspec.ValidationError as e:
            raise PipelineError(f"{where}: bad option: {_option_problem(e)}") from None
        specs.append(StageSpec(i, ref, cls, opts))
    if forwards != 1:
        raise PipelineError(f"{source}: a pipeline needs exactly one forward-phase stage (found {forwards})")
    if unused_options:
        raise PipelineError(f"{source}: options.{sorted(unused_options)[0]}: no stage of that name in this pipeline")
    return PipelineSpec(name, source, tuple(specs))


def _option_problem(err: Exception) -> str:
    """`unknown field 'bogus'` / `expected an integer, got a string at options.max_new_tokens`."""
    path, reason = validation_problem(err)
    return f"{reason} at options{path.removeprefix('$')}" if path and path != "$" else reason


PASSTHROUGH = "passthrough"
SESSION_CHAT = "session-chat"
# The session chat pipeline when `[sessions] pipeline` names no file (pipelines/session-chat.toml is the same).
SESSION_CHAT_STAGES = ["session_request", "chat_template", "session_generate", "forward", "chat_parse", "session_reply",
                       "persist_session"]


def load_pipeline(ref: str, base_dir: str | Path) -> PipelineSpec:
    """`passthrough` / `session-chat` (built-in) or a TOML file path (relative to the config's folder)."""
    if ref == PASSTHROUGH:
        return build_pipeline(PASSTHROUGH, "(builtin passthrough)", ["forward"], {})
    if ref == SESSION_CHAT:
        return build_pipeline(SESSION_CHAT, "(builtin session-chat)", SESSION_CHAT_STAGES, {})
    path = Path(ref)
    if not path.is_absolute():
        path = Path(base_dir) / path
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as e:
        raise PipelineError(f"{path}: cannot read pipeline file: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: invalid TOML: {e}") from None
    try:
        pf = msgspec.convert(data, _PipelineFile)
    except msgspec.ValidationError as e:
        raise PipelineError(f"{path}: {validation_error_text(e)}") from None
    return build_pipeline(path.stem, str(path), pf.stages, pf.options)
