"""Worker URL checks: one canonical spelling per worker, and no way to aim the router elsewhere."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote, urlsplit


class WorkerUrlError(ValueError):
    pass


def normalize_worker_url(url: str) -> str:
    """Return `scheme://host:port` (no path, no trailing slash) or raise WorkerUrlError."""
    if not isinstance(url, str) or not url:
        raise WorkerUrlError("worker url is empty")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise WorkerUrlError("worker url contains whitespace or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as e:  # e.g. "http://[::1" (unbalanced bracket): a 400, not a crash (tests/test_bad_input.py)
        raise WorkerUrlError(f"worker url is malformed: {e}") from None
    if parts.scheme == "https":
        # Refused up front: accepting it would pass health probes (httpx speaks TLS) and then fail
        # every data request (the h11 pool speaks plain HTTP/1.1), churning quarantine.
        raise WorkerUrlError(f"https:// workers are not supported (the data path is plain HTTP/1.1), got {url!r}")
    if parts.scheme != "http":
        raise WorkerUrlError(f"worker url must be http://host:port, got {url!r}")
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
    if port == 0:
        raise WorkerUrlError(f"worker url has an invalid port: {url!r}")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    # Only an ASCII host name or an IP literal, and nothing else in the authority. A non-ASCII
    # host used to be accepted and then crash every request routed to it (the upstream pool
    # sends the host as an ASCII Host header: 500 "UnicodeEncodeError"); "http://[::1]x:80" was
    # silently read as [::1]; "http://a\b" parses differently in different URL parsers.
    # (tests/test_bad_input.py::test_add_worker_refuses_ssrf_and_odd_urls)
    if not _AUTHORITY.fullmatch(parts.netloc):
        raise WorkerUrlError(f"worker url host must be an ASCII host name or an IP literal: {url!r} "
                             f"(use the xn-- form for international names)")
    host = parts.hostname.lower()
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise WorkerUrlError(f"worker url has an invalid IPv6 literal: {url!r}") from None
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}:{port}"


# host[:port] where host is a DNS-style name or a bracketed IPv6 literal (zone id allowed).
_AUTHORITY = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?|\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9_.~-]+)?\])"
                        r"(?::[0-9]{1,5})?")


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
        if ip is not None:
            # A CIDR, or a single address compared as an address ("::1" also allows "0:0::1").
            try:
                if ip in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
            except ValueError:
                pass
        if host == entry:
            return True
    return False


class TargetError(ValueError):
    """A request target the router will not forward (answered 400)."""


def origin_form(method: str, raw_path: bytes) -> tuple[bytes, str]:
    """The request target as (raw origin-form path, decoded path), or raise TargetError.

    The worker's address is the router's choice, never the client's:
      * absolute-form (`GET http://evil/x HTTP/1.1`) keeps only its path: hypercorn hands it to
        the app verbatim, and forwarding it would let a worker (or a proxy in front of one) see
        or follow another host;
      * any other target must be an absolute path (`*` only for OPTIONS);
      * dot-segments (`/../`, `%2e%2e/`, `..%2F`, `\\..\\`) are refused rather than forwarded, so
        a worker (or a path-normalizing proxy in front of it) can't resolve them to a path the
        router would have treated differently (e.g. an admin endpoint).
    (tests/test_bad_input.py::test_path_tricks_never_leave_the_worker)
    """
    low = raw_path[:8].lower()
    if low.startswith(b"http://") or low.startswith(b"https://"):
        rest = raw_path[raw_path.index(b"//") + 2:]
        slash = rest.find(b"/")
        raw_path = rest[slash:] if slash >= 0 else b"/"
    if raw_path == b"*" and method == "OPTIONS":
        return raw_path, "*"
    if not raw_path.startswith(b"/"):
        raise TargetError(f"request target must be an absolute path starting with '/', got {raw_path[:200]!r}")
    path = unquote(raw_path.decode("latin-1"))  # as hypercorn decodes scope["path"]
    if any(seg in (".", "..") for seg in re.split(r"[/\\]", path)):
        raise TargetError(f"request path must not contain '.' or '..' segments: {path[:200]!r}")
    return raw_path, path
