import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.slow` soaks run only when asked for (`-m slow`), never in the default run."""
    import pytest

    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow soak: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
