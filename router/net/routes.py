"""Every route the router answers itself, in one table (`build_routes`); any other path is proxied.

A `Route` is one path (exact, or a prefix for paths with an id in them), the methods it takes, whether it needs
the admin key, and its handler: `async handler(scope, body) -> Reply`, or for a `streaming` route
`async handler(scope, receive, send, body) -> status`, which answers (and may proxy) itself. The app
(router/net/app.py) reads the body once and dispatches through `RouteTable.match`: an exact path first, then the
longest prefix. `miles-router check` prints the table for a config.

The rows come from the modules that own them, each listing its routes where its handlers are: the router's own
(app.py: worker registration, health, metrics), the SGLang gateway's API (gateway.py), admin fan-out
(fanout.py), retrieval (endpoints.py), the RL plane (rl.py) and the session API (sessions.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ANY_METHOD = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")


@dataclass(frozen=True, slots=True)
class Route:
    methods: tuple[str, ...]
    path: str  # an exact path, or with `prefix` every path that starts with it
    handler: Callable
    doc: str
    admin: bool = False
    prefix: bool = False
    streaming: bool = False  # handler(scope, receive, send, body) -> status
    owner: str = ""
    metrics_label: str = ""

    @property
    def label(self) -> str:
        """The metrics label: the path; one label for all the ids under a prefix (`/workers/{id}`)."""
        return self.metrics_label or (self.path + "{id}" if self.prefix else self.path)


class RouteTable:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self._exact: dict[tuple[str, str], Route] = {}
        self._prefixes: list[tuple[str, str, Route]] = []
        for r in routes:
            for m in r.methods:
                if r.prefix:
                    self._prefixes.append((m, r.path, r))
                elif (m, r.path) in self._exact:
                    raise ValueError(f"route {m} {r.path} is defined twice")
                else:
                    self._exact[(m, r.path)] = r
        self._prefixes.sort(key=lambda e: -len(e[1]))  # the longest prefix wins

    def match(self, method: str, path: str) -> Route | None:
        r = self._exact.get((method, path))
        if r is not None:
            return r
        for m, prefix, r in self._prefixes:
            if m == method and path.startswith(prefix):
                return r
        return None

    def rows(self) -> list[dict]:
        return [{"methods": list(r.methods), "path": r.path + "*" if r.prefix else r.path, "admin": r.admin,
                 "owner": r.owner, "doc": r.doc} for r in self.routes]


def build_routes(app, runtime) -> RouteTable:
    """The table for this router's config (fan-out paths, the RL plane and sessions follow it)."""
    from router.net import endpoints, fanout, gateway, rl, sessions

    groups = [("router", app.own_routes()), ("gateway", gateway.routes(runtime)),
              ("fan-out", fanout.routes(runtime)), ("retrieval", endpoints.routes(runtime)),
              ("rl", rl.routes(runtime)), ("sessions", sessions.routes(app, runtime))]
    out = []
    for owner, rows in groups:
        out.extend(Route(r.methods, r.path, r.handler, r.doc, r.admin, r.prefix, r.streaming, owner, r.metrics_label)
                   for r in rows)
    return RouteTable(out)
