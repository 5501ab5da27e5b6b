"""Which durable store a config selects: PostgreSQL (router/net/store_pg.py) when `store.url` is set, else the
embedded SQLite store (router/net/store_sqlite.py) at `store.path`. The router, its startup check and the
`miles-router store` tools all open it here."""

from __future__ import annotations

from router.config import Config, store_path
from router.core.store import StoreOpenError


def open_store(cfg: Config, *, metrics=None):
    """The store the router writes to (a TrajectoryStore, router/core/store.py). Raises StoreOpenError."""
    c = cfg.store
    if c.url is not None:
        from router.net.store_pg import PgStore

        return PgStore(c.url, sync=c.sync, retention_s=c.retention_s, max_bytes=c.max_bytes, metrics=metrics,
                       timeout_s=c.timeout_s, shared=c.shared is not False)
    from router.net.store_sqlite import SqliteStore

    return SqliteStore(store_path(cfg), sync=c.sync, retention_s=c.retention_s, max_bytes=c.max_bytes,
                       metrics=metrics)


def check_openable(cfg: Config) -> str | None:
    """Startup check (before the event loop): raises StoreOpenError (one line naming the store), or returns
    why the store is read-only."""
    if cfg.store.url is not None:
        from router.net.pg_writer import check_openable as check_pg

        return check_pg(cfg.store.url, timeout_s=cfg.store.timeout_s)
    from router.net.store_sqlite import check_openable as check_sqlite

    return check_sqlite(store_path(cfg))


def open_existing(cfg: Config, *, retention: bool = False):
    """An existing store for the offline tools (no writer process); with `retention`, with the config's policy."""
    c = cfg.store
    policy = {"retention_s": c.retention_s, "max_bytes": c.max_bytes} if retention else {}
    if c.url is not None:
        from router.net.store_pg import PgStore

        return PgStore(c.url, timeout_s=c.timeout_s, **policy)
    from router.net.store_sqlite import SqliteStore

    path = store_path(cfg)
    if not path.exists():
        raise StoreOpenError(f"trajectory store {path}: does not exist")
    return SqliteStore(path, **policy)
