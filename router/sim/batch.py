"""Continuous batching, the simulated worker's `latency_model = "batch"`: pure, no clock, no I/O.

A worker serves its requests the way SGLang's scheduler does, one step (one forward pass) at a
time for the whole running batch (router/sim/scheduler.py sleeps each step's `seconds`):

- `Batch.plan` picks what the next step computes. Requests still in prefill (a long prompt cut by
  `chunked_prefill_size`) go on; then waiting requests join the running batch in arrival order, up
  to `max_running_requests`, each looking its prompt up in the prefix cache as it joins. A request
  whose next uncached block another request of the same step is computing waits one step and then
  finds it cached (SGLang's in-batch prefix caching): the 16 identical first prompts of a GRPO
  group cost one prefill on one worker, not sixteen. Every running request past prefill decodes
  one token.
- `StepCost.seconds` prices the step: `token_latency_s` (the pass itself), `batch_step_s_per_request`
  per request in it, `batch_step_s_per_context_token` per context token of its decoding requests
  (KV reads), `prefill_latency_s_per_token` per uncached prompt token computed and
  `cached_prefill_s_per_token` per cached prompt token of the requests it starts. So a decode step
  slows as the batch grows, and prefill competes with decode: every request on the worker waits
  for the prompts the step computes.
- `Batch.finish` applies the step: a request whose prefill completes gets its first token (as
  SGLang's prefill pass samples one) and its prompt enters the prefix cache; decoding requests get
  one token each; a request with all its tokens leaves the batch and its prompt + output enters
  the cache.

With one request at a time and the per-request/context costs at zero this gives the
"independent" model's latency: prefill of the uncached tokens, then `token_latency_s` per token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from router.sim.model import PREFIX_BLOCK_TOKENS, PrefixCache, SimOptions

__all__ = ["Batch", "Seq", "Step", "StepCost"]


@dataclass(frozen=True, slots=True)
class StepCost:
    """Seconds of one step, from what it computes (see the module docstring)."""

    step_s: float = 0.0
    per_request_s: float = 0.0
    per_context_token_s: float = 0.0
    prefill_s_per_token: float = 0.0
    cached_s_per_token: float = 0.0

    @classmethod
    def of(cls, options: SimOptions) -> StepCost:
        return cls(options.token_latency_s, options.batch_step_s_per_request, options.batch_step_s_per_context_token,
                   options.prefill_latency_s_per_token, options.cached_prefill_s_per_token)

    def seconds(self, *, requests: int, context_tokens: int, prefill_tokens: int, cached_tokens: int) -> float:
        """A step over `requests` requests: `context_tokens` of context among its decoding ones,
        `prefill_tokens` uncached prompt tokens computed, `cached_tokens` cached prompt tokens of the
        requests it starts. An empty step costs nothing."""
        if requests == 0:
            return 0.0
        return (self.step_s + self.per_request_s * requests + self.per_context_token_s * context_tokens
                + self.prefill_s_per_token * prefill_tokens + self.cached_s_per_token * cached_tokens)


class Seq:
    """One request in the batch. `handle` is the caller's (the scheduler's item)."""

    __slots__ = ("cached", "finished", "handle", "keys", "output", "prefill_left", "produced", "prompt", "removed",
                 "running")

    def __init__(self, handle: object, prompt: list[int], output: list[int]) -> None:
        self.handle = handle
        self.prompt = prompt
        self.output = output  # the tokens it will produce, in order
        self.keys = PrefixCache.keys(prompt)  # the prompt's block keys (looked up, then inserted)
        self.running = False  # joined the running batch
        self.cached = 0  # prompt tokens found in the prefix cache when it joined
        self.prefill_left = len(prompt)  # prompt tokens still to compute (uncached ones, once running)
        self.produced = 0
        self.finished = False
        self.removed = False

    @property
    def context_tokens(self) -> int:
        return len(self.prompt) + self.produced


@dataclass(slots=True)
class Step:
    """What one step computes: (request, uncached prompt tokens) in prefill, requests decoding,
    requests it starts (their cached tokens are priced), and its price."""

    prefill: list[tuple[Seq, int]] = field(default_factory=list)
    decode: list[Seq] = field(default_factory=list)
    started: list[Seq] = field(default_factory=list)
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Batch:
    """The waiting queue and the running batch of one worker."""

    def __init__(self, cost: StepCost, cache: PrefixCache, *, max_running: int = 0, chunk_tokens: int = 0) -> None:
        self.cost = cost
        self.cache = cache
        self.max_running = max_running  # 0: no cap
        self.chunk_tokens = chunk_tokens  # 0: no cap
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []

    def __bool__(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Seq) -> None:
        """Take `seq` out (aborted, or its client gone): what it computed stays in the prefix cache
        (a prefill cut short leaves nothing). A finished one is out already."""
        if seq.removed or seq.finished:
            return
        seq.removed = True
        if seq.running:
            self.running.remove(seq)
            if seq.prefill_left == 0:
                self.cache.insert(seq.prompt + seq.output[: seq.produced])
        else:
            self.waiting.remove(seq)

    def plan(self) -> Step:
        step = Step()
        budget = self.chunk_tokens or float("inf")
        computing: set[int] = set()  # keys of the blocks this step computes
        for seq in self.running:  # chunked prefills go on first
            if seq.prefill_left > 0 and budget > 0:
                budget -= self._take_prefill(step, seq, budget, computing)
        deferred: list[Seq] = []
        while self.waiting and budget > 0 and (not self.max_running or len(self.running) < self.max_running):
            seq = self.waiting.popleft()
            matchable = seq.keys[: (len(seq.prompt) - 1) // PREFIX_BLOCK_TOKENS]  # the last token is always computed
            cached = self.cache.match_keys(matchable)
            next_block = cached // PREFIX_BLOCK_TOKENS
            if next_block < len(matchable) and matchable[next_block] in computing:
                deferred.append(seq)  # another request computes that block now: it will be cached next step
                continue
            seq.running, seq.cached, seq.prefill_left = True, cached, len(seq.prompt) - cached
            self.running.append(seq)
            step.started.append(seq)
            budget -= self._take_prefill(step, seq, budget, computing)
        self.waiting.extendleft(reversed(deferred))
        in_prefill = {id(seq) for seq, _ in step.prefill}
        step.decode = [s for s in self.running
                       if s.prefill_left == 0 and id(s) not in in_prefill and s.produced < len(s.output)]
        step.seconds = self.cost.seconds(
            requests=len(step.prefill) + len(step.decode),
            context_tokens=sum(s.context_tokens for s in step.decode),
            prefill_tokens=sum(n for _, n in step.prefill),
            cached_tokens=sum(s.cached for s in step.started))
        return step

    @staticmethod
    def _take_prefill(step: Step, seq: Seq, budget: float, computing: set[int]) -> int:
        n = int(min(seq.prefill_left, budget))
        if n > 0:
            done = len(seq.prompt) - seq.prefill_left
            first, last = done // PREFIX_BLOCK_TOKENS, (done + n) // PREFIX_BLOCK_TOKENS
            computing.update(seq.keys[first:last])
            step.prefill.append((seq, n))
        return n

    def finish(self, step: Step) -> list[Seq]:
        """Apply a planned step: the requests that made progress (finished ones included)."""
        progressed = []
        for seq, n in step.prefill:
            if seq.removed:
                continue
            seq.prefill_left -= n
            if seq.prefill_left == 0:
                self.cache.insert_keys(seq.keys)
                if seq.output:
                    seq.produced = 1
                progressed.append(seq)
        for seq in step.decode:
            if not seq.removed:
                seq.produced += 1
                progressed.append(seq)
        for seq in progressed:
            if seq.prefill_left == 0 and seq.produced == len(seq.output):
                seq.finished = True
                self.running.remove(seq)
                self.cache.insert(seq.prompt + seq.output)
        return progressed
