"""Header hygiene for a proxy: end-to-end headers pass, hop-by-hop headers never do.

The request's Content-Length is always recomputed from the bytes actually sent (a stale one
crashed miles, #851); the response's is kept because the body is relayed unchanged.
"""

from __future__ import annotations

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the upstream client from the real target and body.
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server"}


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    names: set[bytes] = set()
    for k, v in headers:
        if k == b"connection":
            names.update(t.strip().lower() for t in v.split(b","))
    return names


def request_headers_for_upstream(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Client request headers minus hop-by-hop ones, host and content-length (lower-case names)."""
    extra = _connection_tokens(headers)
    return [(k, v) for k, v in headers if k not in _REQUEST_DROP and k not in extra]


def response_headers_for_client(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Upstream response headers minus hop-by-hop ones (and date/server, which our server sets)."""
    extra = _connection_tokens(headers)
    return [(k, v) for k, v in headers if k not in _RESPONSE_DROP and k not in extra]


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None
