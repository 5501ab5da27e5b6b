"""Which workers may serve a request, beyond health, breaker and load: the engine's control state and its
weight version. Selection (any policy) only ever sees the workers `Eligibility.admits`.

- **Paused or asleep engines** (router/core/control.py) get no generation request while
  `routing.hold_when_paused` is on: such a request waits at the router (`Eligibility.waits_for`) until an engine
  it may use resumes, instead of being sent to an engine that would block it or fail it. Other requests
  (`/model_info`, a weight update sent through the proxy) still go to paused engines, which answer them.
- **Weight versions** (`routing.version_policy`, or per request the `x-smg-version-policy` header, smg M2's
  name): `any`; `latest-only`, only workers serving the newest version; `max-staleness:K`, at most K versions
  behind it. Versions are ordered by when the router first saw them, and the newest is the newest any healthy
  worker serves (paused ones included, so a half-finished update holds requests for the updated engines rather
  than serving the old weights). A worker whose version is unknown is eligible only while no version is known.

Pure: the routing policies (router/core/routing.py) build one `Eligibility` per request from the pool's state and asks it about workers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from router.core.workers import Worker

VERSION_POLICY_HEADER = b"x-smg-version-policy"
# Requests that make an engine generate: the ones a pause must not reach.
GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
_STALENESS = re.compile(r"max-staleness:(\d{1,9})")


class VersionPolicy(NamedTuple):
    max_staleness: int | None  # None: any version; 0: the newest only

    @property
    def text(self) -> str:
        if self.max_staleness is None:
            return "any"
        return "latest-only" if self.max_staleness == 0 else f"max-staleness:{self.max_staleness}"


ANY = VersionPolicy(None)


def parse_version_policy(text: str) -> VersionPolicy:
    """`any`, `latest-only` or `max-staleness:K` (K >= 0), or ValueError saying what is accepted."""
    t = text.strip().lower()
    if t == "any":
        return ANY
    if t == "latest-only":
        return VersionPolicy(0)
    m = _STALENESS.fullmatch(t)
    if m is None:
        raise ValueError(f"version policy {text!r}: must be any, latest-only or max-staleness:K (K >= 0)")
    return VersionPolicy(int(m.group(1)))


def is_generation(method: str, path: str) -> bool:
    return method == "POST" and path in GENERATION_PATHS


@dataclass(frozen=True, slots=True)
class Eligibility:
    generation: bool  # the request makes an engine generate
    hold_when_paused: bool
    policy: VersionPolicy = ANY
    order: Mapping[str, int] | None = None  # weight version -> order first seen
    newest: int | None = None  # order of the newest version a healthy worker serves; None: none known

    def version_ok(self, w: Worker) -> bool:
        if not self.generation or self.policy.max_staleness is None or self.newest is None:
            return True  # (a weight update sent through the proxy must reach a stale worker)
        seen = None if w.weight_version is None else self.order.get(w.weight_version)
        return seen is not None and seen >= self.newest - self.policy.max_staleness

    def _stopped(self, w: Worker) -> bool:
        c = w.control
        return self.generation and self.hold_when_paused and (c.paused or bool(c.released))

    def admits(self, w: Worker) -> bool:
        """May serve this request now."""
        return self.version_ok(w) and not self._stopped(w)

    def waits_for(self, w: Worker) -> bool:
        """Would serve this request once it resumes (the request waits for it instead of failing)."""
        return self.version_ok(w) and self._stopped(w)


@dataclass(frozen=True, slots=True)
class HoldTimeout:
    """What a request held past `routing.hold_timeout_s` is told."""

    waited_s: float
    timeout_s: float
    workers: tuple[str, ...]  # the paused/asleep workers it waited for

    @property
    def message(self) -> str:
        names = ", ".join(self.workers[:4]) + (f" and {len(self.workers) - 4} more" if len(self.workers) > 4 else "")
        return (f"held {self.waited_s:.3g}s at the router while every worker this request may use was paused or "
                f"asleep ({names}); no continue_generation / resume_memory_occupation came within "
                f"routing.hold_timeout_s ({self.timeout_s:g}s)")
