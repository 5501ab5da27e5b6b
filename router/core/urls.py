"""Worker URL checks: one canonical spelling per worker, and no way to aim the router elsewhere."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


class WorkerUrlError(ValueError):
    pass


def normalize_worker_url(url: str) -> str:
    """Return `scheme://host:port` (no path, no trailing slash) or raise WorkerUrlError."""
    if not isinstance(url, str) or not url:
        raise WorkerUrlError("worker url is empty")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise WorkerUrlError("worker url contains whitespace or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WorkerUrlError(f"worker url must be http:// or https://, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise WorkerUrlError("worker url must not carry credentials")
    if not parts.hostname:
        raise WorkerUrlError(f"worker url has no host: {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise WorkerUrlError(f"worker url must be scheme://host:port only, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise WorkerUrlError(f"worker url has an invalid port: {url!r}") from None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    host = parts.hostname.lower()
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}:{port}"


def host_allowed(url: str, allowed: list[str]) -> bool:
    """True when `allowed` is empty or the url's host matches a name or lies in a CIDR of it."""
    if not allowed:
        return True
    host = (urlsplit(url).hostname or "").lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in allowed:
        entry = entry.strip().lower()
        if ip is not None and "/" in entry:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        elif host == entry:
            return True
    return False
