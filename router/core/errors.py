"""The router's error vocabulary: every failure a client can be answered with, and its HTTP status.

A `RouterError` carries its status on its class (or, for `StageError`, given where it is raised), a one-line
message, and extra JSON fields; the I/O edge answers every one the same way: that status with
`{"error": message, **extra}` (router/net/app.py `error_reply_for`). The errors the router's parts raise are
subclasses, so what a failure means (404, 410, 422, 503, ...) is declared once, next to its name:

| status | class | raised for |
|---|---|---|
| 400 | `BadRequest` | a body or value the router cannot use; `SessionError` (a bad session request) |
| 404 | `NotFound` | `SessionNotFound` (an id never issued) |
| 409 | `Conflict` | `TurnLimit` (a session at its turn limit), extending a truncated turn |
| 410 | `Gone` | `SessionGone` (an id deleted or expired) |
| 422 | `Unprocessable` | `SampleError` (a session that cannot be assembled into samples) |
| 429 | `TooManyRequests` | `SessionLimit` (`sessions.max_sessions`) |
| 500 | `RouterError` | `MatcherError` (the configured message matcher failed) |
| 502 | `BadGateway` | `BadWorkerReply` (a worker's 200 that is not what was asked for) |
| 503 | `Unavailable` | `StoreError` (the durable store cannot read or write now) |
| any | `StageError` | a pipeline stage's own status (router/core/pipeline.py) |

Upstream transport failures (router/core/upstream_errors.py) are not client errors by themselves: the
`forward` stage decides per attempt whether to retry, and answers 502/503/504 as a StageError.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RouterError(Exception):
    """A failure the client is answered with: `status` and `{"error": message, **extra}`."""

    status: ClassVar[int] = 500

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class BadRequest(RouterError):
    status = 400


class NotFound(RouterError):
    status = 404


class Conflict(RouterError):
    status = 409


class Gone(RouterError):
    status = 410


class Unprocessable(RouterError):
    status = 422


class TooManyRequests(RouterError):
    status = 429


class BadGateway(RouterError):
    status = 502


class Unavailable(RouterError):
    status = 503


class GatewayTimeout(RouterError):
    status = 504
