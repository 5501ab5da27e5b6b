"""The library code the router's server fixes were reviewed against, and the check that it still is.

router/http/hypercorn_fixes.py, trio_accept.py and trio_recv.py replace methods of hypercorn, h11
and trio for the router's own connections, or depend on how those methods work. Each fix lists the
library functions it replaces or relies on, with a hash of their source as reviewed
(`inspect.getsource`, sha256, first 16 hex digits). pyproject.toml pins those libraries to the minor
versions reviewed; within a pin a release could still change one of these functions, so the server
refuses to start (`check()`, called by `serve_asgi`) with one line naming what changed. To move a
pin: read the new source of each function named, update the fix if needed, and record the new hash
(`python -m router.http.reviewed` prints them).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass

REVIEWED_VERSIONS = {"trio": "0.35", "hypercorn": "0.18", "h11": "0.16"}


@dataclass(frozen=True)
class Fix:
    name: str
    where: str  # the router's module that holds it
    sources: dict[str, str]  # "module:qualified.name" -> hash of its source as reviewed


FIXES = (
    Fix("trio: accept every queued connection per wakeup", "router/http/trio_accept.py", {
        "trio._highlevel_socket:SocketListener.accept": "3e22288b63fa6606",
    }),
    Fix("trio: receive into one reused buffer", "router/http/trio_recv.py", {
        "trio._highlevel_socket:SocketStream.receive_some": "94a55ee3c587ffa7",
    }),
    Fix("hypercorn 1: closed connections released at once", "router/http/hypercorn_fixes.py", {
        "hypercorn.trio.tcp_server:TCPServer._read_data": "7ca747d922c65cf1",
    }),
    Fix("hypercorn 2: the keep-alive timer as one deadline", "router/http/hypercorn_fixes.py", {
        "hypercorn.trio.tcp_server:TCPServer.__init__": "4c1d42457bc197b2",
        "hypercorn.trio.tcp_server:TCPServer.run": "fd34b021d1a86c98",
        "hypercorn.trio.tcp_server:TCPServer._idle_timeout": "210ce1014d98e1cb",
        "hypercorn.trio.tcp_server:TCPServer._initiate_server_close": "7c1b548a65adc8b1",
        "hypercorn.trio.worker_context:TrioSingleTask": "aa59316c028b876a",
        "hypercorn.trio.task_group:TaskGroup.__init__": "ecd9faf5832ee0e8",
    }),
    Fix("hypercorn 3: direct socket writes", "router/http/hypercorn_fixes.py", {
        "hypercorn.trio.tcp_server:TCPServer.protocol_send": "225856426bff7be0",
    }),
    Fix("hypercorn 4: JSON bodies on hypercorn's own error replies", "router/http/hypercorn_fixes.py", {
        "hypercorn.protocol.h11:H11Protocol._send_error_response": "58c2b47ae295d000",
    }),
    Fix("hypercorn 5: a Content-Length head written with its body", "router/http/hypercorn_fixes.py", {
        "hypercorn.protocol.h11:H11Protocol._send_h11_event": "5e40283daa303ec7",
    }),
    Fix("hypercorn 6: streamed chunks framed directly", "router/http/hypercorn_fixes.py", {
        "hypercorn.protocol.h11:H11Protocol.stream_send": "56a36254a368d71a",
        "h11._writers:ChunkedWriter.send_data": "0fbc8fb565f7029f",
    }),
    Fix("serving with the router's classes", "router/http/serve.py", {
        "hypercorn.trio.run:worker_serve": "8dc8347a9fc357ca",
        "hypercorn.protocol:ProtocolWrapper.__init__": "df25e181b9e2e64d",
    }),
)


class LibraryChanged(RuntimeError):
    """A function a fix was reviewed against is not the reviewed source any more (a one-line message)."""


def _resolve(target: str):
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def source_hash(target: str) -> str:
    return _hash_of(_resolve(target))


@functools.lru_cache(maxsize=None)
def _hash_of(obj) -> str:
    """By the object itself: each server start checks again, but reads a function's source once (a
    function put in place of another, as by a new release, is a new object)."""
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def check() -> None:
    """Raise LibraryChanged, naming the first function whose source is not the one reviewed."""
    for fix in FIXES:
        for target, reviewed in fix.sources.items():
            try:
                now = source_hash(target)
                state = "differs from the reviewed source"
            except (ImportError, AttributeError):
                now, state = None, "is gone"
            except (OSError, TypeError):  # no source file to read
                now, state = None, "has no source to compare with the reviewed one"
            if now != reviewed:
                lib = target.partition(".")[0].partition(":")[0]
                version = importlib.metadata.version(lib)
                raise LibraryChanged(
                    f"{lib} {version}: {target} {state} ({fix.name}, reviewed against {lib} "
                    f"{REVIEWED_VERSIONS[lib]}); review {fix.where} (docs/upstream-fixes.md) before serving with it")


if __name__ == "__main__":
    for fix in FIXES:
        print(f"# {fix.name}")
        for target in fix.sources:
            print(f'        "{target}": "{source_hash(target)}",')
