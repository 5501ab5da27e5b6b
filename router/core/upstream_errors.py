"""What the upstream client (router/net/upstream.py) raises: the contract between the I/O edge and
the stages that send requests (router/stages/forward.py), kept here so stages need not import net."""

from __future__ import annotations


class UpstreamError(Exception):
    """Base class for everything that can go wrong talking to a worker."""


class UpstreamConnectError(UpstreamError):
    """Nothing was sent to the worker: connect refused/timed out, or every pooled socket was dead.

    The caller may retry on another worker.
    """


class UpstreamLocalError(UpstreamConnectError):
    """The ROUTER is out of a local resource (file descriptors, buffers, ephemeral ports): not the
    worker's fault, so it must not count against the worker's health, and another worker won't help."""


class UpstreamTimeout(UpstreamError):
    """The worker did not answer (response head) within timeout_s, or stalled between body chunks."""


class UpstreamDisconnect(UpstreamError):
    """The worker closed or broke the connection after the request was (partly) sent, or mid-body.

    `bytes_received` is the number of response body bytes received before the break (0 if the head never
    completed).
    """

    def __init__(self, message: str, *, bytes_received: int = 0) -> None:
        super().__init__(message)
        self.bytes_received = bytes_received
