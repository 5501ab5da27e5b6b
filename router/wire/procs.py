"""What the supervisor of `--processes N` and its router processes tell each other (router/net/supervisor.py,
router/net/siblings.py): one JSON object per line over a socketpair per process.

A router process reports every change an admin call made to its worker set and its view of an engine (a
worker registered or removed, paused, asleep, a new weight version) as the whole `WorkerView` of that worker,
or `WorkerGone`; the supervisor keeps the latest of each and sends it on to every other process, and to a
new process (a restart) before it serves, ending with `Synced`. `Drain` and `Stop` are the supervisor's
first and second signal. `/metrics` on one process answers for all: it sends `MetricsAsk`, the supervisor
asks the others, each answers `MetricsText`, and the asker gets them back in one `MetricsAll`.
"""

from __future__ import annotations

import msgspec


class WorkerView(msgspec.Struct, tag="worker", kw_only=True):
    """A worker as admin calls left it: registered with these labels, and its control state."""

    url: str
    labels: dict[str, str] = {}
    bootstrap_port: int | None = None
    paused: bool = False
    released: list[str] = []  # memory tags released (asleep while non-empty)
    weight_version: str | None = None


class WorkerGone(msgspec.Struct, tag="worker_gone"):
    url: str


class Ready(msgspec.Struct, tag="ready"):
    """A router process serves (it listens on the shared port)."""

    pid: int


class Synced(msgspec.Struct, tag="synced"):
    """The end of the state a new process is sent before it serves."""


class Drain(msgspec.Struct, tag="drain"):
    """Stop accepting, finish in-flight requests (`server.drain_timeout_s`), exit."""


class Stop(msgspec.Struct, tag="stop"):
    """Exit now."""


class MetricsAsk(msgspec.Struct, tag="metrics_ask"):
    ask: int  # the asker's number for this question (to it) or the supervisor's (to the others)


class MetricsText(msgspec.Struct, tag="metrics_text"):
    ask: int
    process: int  # 1..N
    text: str  # the Prometheus exposition


class MetricsAll(msgspec.Struct, tag="metrics_all"):
    ask: int
    texts: list[MetricsText]  # the other processes' that answered in time


Message = WorkerView | WorkerGone | Ready | Synced | Drain | Stop | MetricsAsk | MetricsText | MetricsAll

encoder = msgspec.json.Encoder()
decoder = msgspec.json.Decoder(Message)


def encode_line(msg: Message) -> bytes:
    return encoder.encode(msg) + b"\n"
