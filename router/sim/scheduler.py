"""The simulated worker's scheduler: its requests in time.

`Scheduler` holds every /generate item the worker knows about (`live`: waiting or running) and
decides when each one runs: the waiting queue (fault delay, hang, pause), then prefill of the
uncached prompt tokens and decode, with the prefix cache looked up before prefill and filled
after. It keeps the pause/abort bookkeeping SGLang's endpoints act on (`/pause_generation`
modes, `/continue_generation`, `/abort_request`). Replies are built by `router.sim.app`, which
calls `admit` then `execute` for each item and `forget` when the item is gone.

Two latency models (`SimOptions.latency_model`):

- "independent": each item sleeps its own prefill and decode time, whatever else runs (cheap;
  the test suite's default).
- "batch": continuous batching (`router.sim.batch`). One step loop per worker, running only
  while the worker has items, advances the whole running batch a step at a time and sleeps each
  step's modeled seconds on an absolute schedule: a loop that wakes late (a busy CPU) catches up
  by up to `_MAX_CATCH_UP_S`, so the worker's throughput is the model's, not the host's; the
  lateness is counted (`late_s`, summed over steps, and `late_max_s` in `/_sim/stats`). Items
  wait for their tokens.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio

from router.sim.batch import Batch, Seq, StepCost
from router.sim.model import Faults, PrefixCache, SimOptions

__all__ = ["Live", "Scheduler"]

_HANG_POLL_S = 0.05  # notices `worker.faults.hang = False` set directly, without set_faults()
_MAX_CATCH_UP_S = 0.25  # batch model: the most step time a late loop makes up by not sleeping


class Live:
    """A /generate item the worker knows about: waiting (queued) or running."""

    __slots__ = ("aborted", "cached", "done", "num_retractions", "prompt_tokens", "retracted_in", "rid", "running",
                 "wake")

    def __init__(self, rid: str, prompt_tokens: int) -> None:
        self.rid = rid
        self.prompt_tokens = prompt_tokens
        self.running = False
        self.aborted = False
        self.cached = 0  # prompt tokens found in the prefix cache (known once running)
        self.wake = trio.Event()  # set on abort / pause / continue / fault change
        self.done = trio.Event()
        self.num_retractions = 0
        self.retracted_in = -1  # pause epoch of the last retraction

    def abort(self) -> None:
        self.aborted = True
        self.wake.set()


class Scheduler:
    """Waiting queue, prefill and decode of one worker's items; pause and abort bookkeeping."""

    def __init__(self, options: SimOptions, prefix_cache: PrefixCache, faults: Callable[[], Faults]) -> None:
        self.options = options
        self.prefix_cache = prefix_cache
        self._faults = faults  # the worker's current fault knobs (replaced wholesale by set_faults)
        self.live: dict[str, Live] = {}
        self.paused = False
        self.pause_mode = "abort"
        self._pause_epoch = 0
        self._batch = (Batch(StepCost.of(options), prefix_cache, max_running=options.max_running_requests,
                             chunk_tokens=options.chunked_prefill_size)
                       if options.latency_model == "batch" else None)
        self._stepping = False  # the step loop runs
        self._unpaused = trio.Event()
        self._unpaused.set()
        # batch model, cumulative: modeled seconds the worker computed, steps, and how late the loop
        # woke (summed over steps, and the worst)
        self.busy_s = 0.0
        self.steps = 0
        self.late_s = 0.0
        self.late_max_s = 0.0

    # ---- bookkeeping

    def add(self, live: Live) -> None:
        self.live[live.rid] = live

    def forget(self, live: Live) -> None:
        if self.live.get(live.rid) is live:
            del self.live[live.rid]
        live.done.set()

    def count(self, *, running: bool) -> int:
        return sum(live.running == running for live in self.live.values())

    def abort(self, rid: str = "", abort_all: bool = False) -> int:
        """`/abort_request`: abort_all, or every live rid starting with `rid` if `rid` itself is live."""
        if abort_all:
            victims = list(self.live.values())
        elif rid in self.live:
            victims = [live for live in self.live.values() if live.rid.startswith(rid)]
        else:
            victims = []
        for live in victims:
            live.abort()
        return len(victims)

    def pause(self, mode: str = "abort") -> list[Live]:
        if not self.paused:
            self._unpaused = trio.Event()
        self.paused, self.pause_mode = True, mode
        self._pause_epoch += 1
        victims = list(self.live.values()) if mode == "abort" else []
        for live in victims:
            live.abort()
        self.wake_all()
        return victims

    def resume(self) -> None:
        self.paused = False
        self._unpaused.set()
        self.wake_all()

    def reset_counters(self) -> None:
        self.busy_s, self.steps, self.late_s, self.late_max_s = 0.0, 0, 0.0, 0.0

    def wake_all(self) -> None:
        for live in self.live.values():
            live.wake.set()

    # ---- one item through queue, prefill and decode

    async def _wait_wake(self, live: Live, timeout: float = math.inf) -> bool:
        """Sleep until `live` is woken (True) or `timeout` passes (False)."""
        with trio.move_on_after(timeout):
            await live.wake.wait()
        if live.wake.is_set():
            live.wake = trio.Event()
            return True
        return False

    async def admit(self, live: Live) -> bool:
        """The waiting queue: fault delay, pauses, hangs. False if aborted while waiting."""
        delay = self._faults().delay_s
        deadline = trio.current_time() + delay
        while delay > 0 and not live.aborted and trio.current_time() < deadline:
            await self._wait_wake(live, deadline - trio.current_time())
        while not live.aborted:
            if self._faults().hang:
                await self._wait_wake(live, _HANG_POLL_S)
            elif self.paused:
                await self._wait_wake(live)
            else:
                return True
        return False

    async def _run_for(self, live: Live, duration: float) -> float:
        """Spend `duration` s of running time (pauses excluded); less is returned iff aborted."""
        spent = 0.0
        while True:
            if live.aborted:
                return spent
            if self.paused and self.pause_mode != "abort":
                if self.pause_mode == "retract" and live.retracted_in != self._pause_epoch:
                    live.retracted_in = self._pause_epoch
                    live.num_retractions += 1
                await self._wait_wake(live)
                continue
            if spent >= duration:
                return duration
            started = trio.current_time()
            woken = await self._wait_wake(live, duration - spent)
            spent += trio.current_time() - started
            if not woken:
                return duration

    async def execute(
        self,
        live: Live,
        prompt_ids: list[int],
        output_ids: list[int],
        on_token: Callable[[int], Awaitable[None]] | None = None,
    ) -> int:
        """Prefill and decode an admitted item: the tokens produced (all of `output_ids` unless
        aborted). `on_token(produced)` is awaited after each token but the last (streaming);
        `live.cached` is set before the first call. With the batch model an item aborted before it
        joined the running batch returns with `live.running` still False."""
        if self._batch is not None:
            return await self._execute_batched(live, prompt_ids, output_ids, on_token)
        opts = self.options
        live.running = True
        live.cached = cached = self.prefix_cache.match(prompt_ids)
        total = len(output_ids)
        produced = 0
        await self._run_for(live, opts.prefill_latency_s_per_token * (len(prompt_ids) - cached)
                            + opts.cached_prefill_s_per_token * cached)
        if not live.aborted:
            if on_token is None:
                latency = opts.token_latency_s
                spent = await self._run_for(live, latency * total)
                produced = total if not live.aborted else min(total, int(spent / latency + 1e-9) if latency else 0)
            else:
                while produced < total:
                    await self._run_for(live, opts.token_latency_s)
                    if live.aborted:
                        break
                    produced += 1
                    if produced < total:
                        await on_token(produced)
        self.prefix_cache.insert(prompt_ids + output_ids[:produced])
        return produced

    # ---- the batch model

    async def _execute_batched(
        self,
        live: Live,
        prompt_ids: list[int],
        output_ids: list[int],
        on_token: Callable[[int], Awaitable[None]] | None,
    ) -> int:
        seq = Seq(live, prompt_ids, output_ids)
        self._batch.add(seq)
        if not self._stepping:
            self._stepping = True
            # Not a task of any request: the loop outlives the item that started it, and ends when
            # the worker has nothing left (a system task is cancelled with the run).
            trio.lowlevel.spawn_system_task(self._step_loop, name=f"sim {self.options.name}: step loop")
        emitted = 0
        try:
            while not seq.finished:
                await live.wake.wait()
                live.wake = trio.Event()  # before awaiting anything else: a later step sets the new one
                if live.aborted:
                    break
                if on_token is not None:
                    last = min(seq.produced, len(output_ids) - 1)
                    while emitted < last and not live.aborted:
                        emitted += 1
                        await on_token(emitted)
        finally:
            self._batch.remove(seq)  # aborted or cancelled (a finished one is out already)
        return seq.produced

    async def _step_loop(self) -> None:
        batch = self._batch
        try:
            deadline = trio.current_time()
            while batch:
                if self.paused and self.pause_mode != "abort":
                    for seq in batch.running:  # retract mode: each running item is retracted once per pause
                        live = seq.handle
                        if self.pause_mode == "retract" and live.retracted_in != self._pause_epoch:
                            live.retracted_in = self._pause_epoch
                            live.num_retractions += 1
                    await self._unpaused.wait()
                    deadline = trio.current_time()
                    continue
                step = batch.plan()
                for seq in step.started:
                    seq.handle.running, seq.handle.cached = True, seq.cached
                now = trio.current_time()
                if now > deadline:
                    self.late_s += now - deadline
                    self.late_max_s = max(self.late_max_s, now - deadline)
                    deadline = max(deadline, now - _MAX_CATCH_UP_S)
                deadline += step.seconds
                await trio.sleep_until(deadline)
                self.busy_s += step.seconds
                self.steps += 1
                for seq in batch.finish(step):
                    seq.handle.wake.set()
        finally:
            self._stepping = False
