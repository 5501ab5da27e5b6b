import os

import pytest
from hypothesis import settings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Hypothesis' per-example deadline (200 ms) measures the machine, not the code: on CI's 2 shared cores an example of
# test_join_path_ids_is_the_path_tokens took 257 ms once and failed the run as "flaky". Properties are checked here;
# speed is the benchmarks' (bench/). Tests keep their own max_examples.
settings.register_profile("miles-router", deadline=None)
settings.load_profile("miles-router")


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.slow` soaks run only when asked for (`-m slow`), never in the default run."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow soak: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------- a real PostgreSQL
def _pg_unavailable():
    """Skip a PostgreSQL test when no server can be started here, except in CI (MILES_ROUTER_REQUIRE_PG=1), where
    that is a failure: the PostgreSQL store must never pass CI by being skipped."""
    import pg

    reason = pg.missing_reason()
    if reason is None:
        return
    if os.environ.get(pg.REQUIRE_ENV) == "1":
        pytest.fail(f"{pg.REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _cluster():
    import pg

    _pg_unavailable()
    cluster = pg.TempCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg_cluster():
    """One throwaway PostgreSQL server (tests/pg.py) for the whole test session."""
    yield from _cluster()


@pytest.fixture
def own_pg_cluster():
    """A throwaway PostgreSQL server of the test's own, which it may stop and start (database outages)."""
    yield from _cluster()


@pytest.fixture
def pg_url(pg_cluster):
    """The URL of a new, empty database on the session's server."""
    return pg_cluster.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_at(request, tmp_path):
    """A durable store's location, once for each backend: an SQLite file, and a new PostgreSQL database."""
    from harness import StoreAt

    if request.param == "sqlite":
        return StoreAt("sqlite", str(tmp_path / "store.db"))
    return StoreAt("postgresql", request.getfixturevalue("pg_url"))
