"""The simulated worker's batch latency model: the pure step planner (router/sim/batch.py), then a
worker with `latency_model = "batch"` over loopback HTTP (router/sim/scheduler.py)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio
from test_sim_worker import StartSim, generate, start_sim, wait_until  # noqa: F401  (start_sim: the fixture)

from router.sim import SimOptions
from router.sim.batch import Batch, Seq, StepCost
from router.sim.model import PrefixCache

COST = StepCost(step_s=0.010, per_request_s=0.001, per_context_token_s=1e-6, prefill_s_per_token=1e-4,
                cached_s_per_token=1e-5)


def seq(prompt: list[int], n_out: int, name: str = "") -> Seq:
    return Seq(name, prompt, list(range(5000, 5000 + n_out)))


def run_to_end(batch: Batch, limit: int = 10_000) -> list[float]:
    """Step until the batch is empty: each step's seconds."""
    out = []
    while batch:
        step = batch.plan()
        assert step, "a non-empty batch always has work"
        batch.finish(step)
        out.append(step.seconds)
        assert len(out) < limit
    return out


def prompt_of(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


# ---- pure: the step price and the planner --------------------------------------------------------


def test_step_cost_prices_each_part():
    assert COST.seconds(requests=0, context_tokens=0, prefill_tokens=0, cached_tokens=0) == 0.0
    got = COST.seconds(requests=4, context_tokens=2000, prefill_tokens=300, cached_tokens=100)
    assert got == pytest.approx(0.010 + 4 * 0.001 + 2000 * 1e-6 + 300 * 1e-4 + 100 * 1e-5)
    assert StepCost.of(SimOptions(token_latency_s=0.5, batch_step_s_per_request=0.25)) == StepCost(0.5, 0.25)


def test_one_request_alone_costs_what_the_independent_model_charges():
    """Per-request and context costs at zero: prefill of the uncached prompt, then token_latency_s per
    token (the first token comes out of the prefill step, as SGLang's prefill pass samples one)."""
    cost = StepCost(step_s=0.005, prefill_s_per_token=1e-4)
    batch = Batch(cost, PrefixCache(1 << 20))
    s = seq(prompt_of(300), 20)
    batch.add(s)
    steps = run_to_end(batch)
    assert len(steps) == 20 and s.finished and s.produced == 20
    assert sum(steps) == pytest.approx(300 * 1e-4 + 20 * 0.005)
    # prompt + output are cached now: the same conversation's next turn finds them
    assert batch.cache.match(s.prompt + s.output + [1, 2, 3]) == (300 + 20) // 16 * 16


def test_a_decode_step_slows_as_the_batch_grows():
    def decode_step(n: int) -> float:
        batch = Batch(COST, PrefixCache(1 << 20))
        for i in range(n):
            batch.add(seq(prompt_of(64, 1000 * i), 10))
        batch.finish(batch.plan())  # the prefill step
        step = batch.plan()
        assert len(step.decode) == n and not step.prefill
        return step.seconds

    one, eight = decode_step(1), decode_step(8)
    # 7 more requests, each with 64 prompt + 1 generated tokens of context
    assert eight - one == pytest.approx(7 * 0.001 + 7 * 65 * 1e-6)


def test_prefill_competes_with_decode():
    """A prompt arriving while others decode lengthens the step every one of them waits for."""
    batch = Batch(COST, PrefixCache(1 << 20))
    first = seq(prompt_of(16), 50)
    batch.add(first)
    batch.finish(batch.plan())
    quiet = batch.plan()
    batch.finish(quiet)
    batch.add(seq(prompt_of(2000, 9000), 5))  # a long uncached prompt joins
    busy = batch.plan()
    assert [s for s, _ in busy.prefill][0].prompt[0] == 9000 and busy.decode == [first]
    assert busy.seconds - quiet.seconds == pytest.approx(0.001 + 2000 * 1e-4 + 1e-6)
    produced = first.produced
    batch.finish(busy)
    assert first.produced == produced + 1  # the decode went on in the same (longer) step


def test_a_group_of_identical_prompts_costs_one_prefill():
    """SGLang's in-batch prefix caching: 16 identical prompts arriving together, one computes the
    shared blocks, the other 15 join a step later and find them cached."""
    batch = Batch(COST, PrefixCache(1 << 20))
    group = [seq(prompt_of(200), 8, f"s{i}") for i in range(16)]
    for s in group:
        batch.add(s)
    first = batch.plan()
    assert [s.handle for s in first.started] == ["s0"] and first.prefill == [(group[0], 200)]
    batch.finish(first)
    second = batch.plan()
    assert [s.handle for s in second.started] == [f"s{i}" for i in range(1, 16)]  # arrival order kept
    assert all(s.cached == 192 for s in group[1:])  # whole blocks of prompt[:-1]
    assert all(n == 8 for _, n in second.prefill)
    run_to_end(batch)
    assert all(s.finished for s in group)


def test_different_prompts_are_not_held_back():
    batch = Batch(COST, PrefixCache(1 << 20))
    a, b = seq(prompt_of(100, 0), 3), seq(prompt_of(100, 500), 3)
    batch.add(a)
    batch.add(b)
    step = batch.plan()
    assert step.started == [a, b]


def test_max_running_requests_queues_the_rest():
    batch = Batch(COST, PrefixCache(1 << 20), max_running=2)
    a, b, c = (seq(prompt_of(20, 100 * i), 3) for i in range(3))
    for s in (a, b, c):
        batch.add(s)
    step = batch.plan()
    assert step.started == [a, b] and list(batch.waiting) == [c]
    for _ in range(3):
        batch.finish(step)
        step = batch.plan()
    assert a.finished and b.finished and step.started == [c]


def test_chunked_prefill_spreads_a_long_prompt_over_steps():
    batch = Batch(COST, PrefixCache(1 << 20), chunk_tokens=100)
    s = seq(prompt_of(250), 2)
    batch.add(s)
    chunks = []
    while s.produced == 0:
        step = batch.plan()
        chunks.append(step.prefill[0][1])
        batch.finish(step)
    assert chunks == [100, 100, 50]
    # a request arriving meanwhile shares the step budget after the running prefill
    batch2 = Batch(COST, PrefixCache(1 << 20), chunk_tokens=100)
    long, short = seq(prompt_of(150), 1), seq(prompt_of(30, 900), 1)
    batch2.add(long)
    batch2.finish(batch2.plan())
    batch2.add(short)
    step = batch2.plan()
    assert step.prefill == [(long, 50), (short, 30)]


def test_cached_tokens_are_cheap_and_priced_once():
    cache = PrefixCache(1 << 20)
    prompt = prompt_of(400)
    cache.insert(prompt)
    batch = Batch(COST, cache)
    s = seq(prompt + [7], 3)
    batch.add(s)
    step = batch.plan()
    assert s.cached == 400 and step.prefill == [(s, 1)]
    assert step.seconds == pytest.approx(0.010 + 0.001 + 1 * 1e-4 + 400 * 1e-5)
    batch.finish(step)
    assert batch.plan().seconds == pytest.approx(0.010 + 0.001 + 402 * 1e-6)  # decode: no prefill price again


def test_remove_keeps_what_was_computed():
    cache = PrefixCache(1 << 20)
    batch = Batch(COST, cache)
    decoding, waiting = seq(prompt_of(64), 40), seq(prompt_of(64, 700), 4)
    batch.add(decoding)
    for _ in range(5):
        batch.finish(batch.plan())
    batch.add(waiting)
    batch.remove(waiting)
    batch.remove(decoding)
    assert not batch and decoding.produced == 5
    assert cache.match(decoding.prompt + decoding.output[:5] + [1]) == 64  # 69 tokens: 4 whole blocks
    assert cache.match(waiting.prompt) == 0
    batch.remove(decoding)  # twice is harmless


# ---- a worker with the batch model, over HTTP --------------------------------------------------------

BATCH = {"latency_model": "batch"}


async def test_an_overloaded_worker_is_slower_for_everyone(start_sim: StartSim) -> None:
    """12 requests in one batch on one worker: each decode step carries 12 requests, so every one of them
    takes several times as long as a request alone. The worker is paused while the 12 arrive, so they start
    together however slowly a loaded host delivers them; times are from the continue to each reply."""
    client, worker = await start_sim(**BATCH, token_latency_s=0.002, batch_step_s_per_request=0.002)
    params = {"max_new_tokens": 15, "ignore_eos": True}
    started = trio.current_time()
    await generate(client, input_ids=prompt_of(40), sampling_params=params)
    alone = trio.current_time() - started
    crowd: list[float] = []

    async def one(i: int) -> None:
        await generate(client, input_ids=prompt_of(40, 1000 * (i + 1)), sampling_params=params)
        crowd.append(trio.current_time() - started)

    await client.post("/pause_generation", json={"mode": "in_place"})
    async with trio.open_nursery() as nursery:
        for i in range(12):
            nursery.start_soon(one, i)
        await wait_until(lambda: len(worker._live) == 12)
        started = trio.current_time()
        await client.post("/continue_generation", json={})
    # modeled: alone 15 x 4 ms = 60 ms; together 15 x (2 + 12 x 2) ms = 390 ms
    assert alone >= 0.06 and min(crowd) >= 0.3 and min(crowd) > 3 * alone
    stats = (await client.get("/_sim/stats")).json()
    assert stats["steps"] >= 30 and stats["busy_s"] >= 0.06 + 0.3


async def test_a_grpo_group_prefills_its_prompt_once(start_sim: StartSim) -> None:
    client, _ = await start_sim(**BATCH, token_latency_s=0.001, prefill_latency_s_per_token=1e-5)
    prompt = prompt_of(300)
    outs: list[Any] = []

    async def one() -> None:
        outs.append(await generate(client, input_ids=prompt, sampling_params={"max_new_tokens": 4, "ignore_eos": True}))

    async with trio.open_nursery() as nursery:
        for _ in range(16):
            nursery.start_soon(one)
    cached = sorted(o["meta_info"]["cached_tokens"] for o in outs)
    assert cached == [0] + [288] * 15


async def test_streaming_abort_pause_and_waiting_queue(start_sim: StartSim) -> None:
    client, worker = await start_sim(**BATCH, token_latency_s=0.01, max_running_requests=1)
    long = {"max_new_tokens": 300, "ignore_eos": True}
    results: dict[str, Any] = {}

    async def run(rid: str) -> None:
        results[rid] = await generate(client, rid=rid, input_ids=[1, 2, 3], sampling_params=long)

    chunks: list[dict] = []

    async def stream() -> None:
        body = {"rid": "s", "input_ids": [4, 5], "stream": True, "sampling_params": {"max_new_tokens": 6,
                                                                                   "ignore_eos": True}}
        async with client.stream("POST", "/generate", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunks.append(msgspec.json.decode(line[6:]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "running")
        await wait_until(lambda: "running" in worker._live and worker._live["running"].running)
        nursery.start_soon(run, "queued")  # max_running_requests = 1: it waits for a place in the batch
        await wait_until(lambda: "queued" in worker._live)
        await client.post("/pause_generation", json={"mode": "retract"})
        await trio.sleep(0.05)
        assert results == {}
        await client.post("/continue_generation", json={})
        await trio.sleep(0.05)
        assert not worker._live["queued"].running
        await client.post("/abort_request", json={"abort_all": True})
    running, queued = results["running"]["meta_info"], results["queued"]["meta_info"]
    assert running["finish_reason"]["type"] == "abort" and 0 < running["completion_tokens"] < 300
    assert running["num_retractions"] == 1
    assert queued["finish_reason"] == {"type": "abort", "message": "Abort in waiting queue"}
    await stream()
    assert [c["meta_info"]["completion_tokens"] for c in chunks] == [1, 2, 3, 4, 5, 6]
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert worker.scheduler.steps > 0


async def test_a_client_that_leaves_frees_its_place(start_sim: StartSim) -> None:
    client, worker = await start_sim(**BATCH, token_latency_s=0.005)
    body = {"rid": "gone", "input_ids": [1], "stream": True, "sampling_params": {"max_new_tokens": 500,
                                                                                  "ignore_eos": True}}
    async with client.stream("POST", "/generate", json=body) as r:
        async for line in r.aiter_lines():
            if line:
                break
    await wait_until(lambda: not worker._live and not worker.scheduler._batch and not worker.scheduler._stepping)
    out = await generate(client, input_ids=[1, 2], sampling_params={"max_new_tokens": 3, "ignore_eos": True})
    assert out["meta_info"]["completion_tokens"] == 3  # a new step loop starts for it


# ---- the [simulate] keys ---------------------------------------------------------------------------


def test_simulate_table_carries_the_batch_model(tmp_path):
    from router.config import ConfigError, load_config

    p = tmp_path / "r.toml"
    p.write_text('[simulate]\nlatency_model = "batch"\nbatch_step_s_per_request = 0.001\nmax_running_requests = 8\n'
                 'chunked_prefill_size = 512\ncached_prefill_s_per_token = 1e-6\n')
    opts = load_config(p).simulate.options_for(0)
    assert (opts.latency_model, opts.batch_step_s_per_request, opts.max_running_requests, opts.chunked_prefill_size,
            opts.cached_prefill_s_per_token) == ("batch", 0.001, 8, 512, 1e-6)
    for body, key in (('latency_model = "fast"', "simulate.latency_model"),
                      ("batch_step_s_per_context_token = -1", "simulate.batch_step_s_per_context_token"),
                      ("max_running_requests = -1", "simulate.max_running_requests")):
        p.write_text(f"[simulate]\n{body}\n")
        with pytest.raises(ConfigError) as ei:
            load_config(p)
        assert str(ei.value).startswith(f"{p}: {key}: ") and "\n" not in str(ei.value)
