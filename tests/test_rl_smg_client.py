"""smg's own RL client (`smg.rl`, from the `smg` wheel, 1.13.0) against the router, unchanged.

smg is not a dependency of the router (its wheel carries a 106 MB binary), so this skips where it is not
installed: `pip install --no-deps smg==1.13.0` runs it (smg.rl uses only the standard library). CI installs it
and sets MILES_ROUTER_REQUIRE_SMG=1, which turns the skip into a failure."""

from __future__ import annotations

import os

import pytest
import trio

from tests.harness import start_router, start_sim, wait_until

if os.environ.get("MILES_ROUTER_REQUIRE_SMG") == "1":
    import smg.rl as smg_rl  # CI: a missing smg is a failure, not a skip
else:
    smg_rl = pytest.importorskip("smg.rl")


async def test_smg_client_drives_the_router(nursery):
    sims = [await start_sim(nursery, seed=i) for i in range(2)]
    router = await start_router(nursery, workers={"urls": [s.url for s in sims], "health_interval_s": 30,
                                                  "labels": {sims[0].url: {"pool": "train"}}})
    await wait_until(lambda: all(w.weight_version is not None for w in router.runtime.pool.all))

    def drive() -> dict:
        rl = smg_rl.RL(router.url)
        workers = rl.workers()
        train = next(w for w in workers if w.labels.get("pool") == "train")
        got = {"workers": workers, "one": rl.worker(train.id),
               "call": rl.call(train.id, "update_weights_from_disk", {"model_path": "/ckpt", "weight_version": "7"})}
        with smg_rl.paused(rl, "pool=train", mode="retract") as res:
            got["paused"] = res
            got["paused_flags"] = [s.worker.paused for s in sims]
        got["resumed_flags"] = [s.worker.paused for s in sims]
        try:
            rl.fanout("pause_generation", {"mode": "bogus"}, selector="engine=sglang")
        except smg_rl.FanoutError as e:
            got["partial"] = e
        try:
            rl.worker("nope")
        except smg_rl.RlError as e:
            got["missing"] = e
        return got

    got = await trio.to_thread.run_sync(drive)
    assert {w.url for w in got["workers"]} == {s.url for s in sims}
    assert all(w.engine == "sglang" and w.health == "ready" for w in got["workers"])
    assert got["one"].labels["pool"] == "train"
    assert got["call"].status == 200 and got["call"].body["success"] is True
    assert got["paused"].total == 1 and got["paused"].succeeded == 1
    assert got["paused_flags"] == [True, False] and got["resumed_flags"] == [False, False]
    assert got["partial"].result.succeeded == 0 and {f.error for f in got["partial"].result.failed} == {"upstream_error"}
    assert got["missing"].status == 404 and got["missing"].code == "worker_not_found"
    assert router.runtime.pool.get(sims[0].url).weight_version == "7"
