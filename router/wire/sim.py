"""The simulated SGLang worker's options and fault knobs (also the `[simulate]` config table).

Kept free of heavy imports so the config can reuse them without loading a tokenizer.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

NonNegative = Annotated[float, Meta(ge=0)]


class Faults(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Failure knobs; mutable at runtime through `POST /_sim/faults`."""

    health_status: int = 200  # status of /health and /health_generate (empty body either way)
    generate_status: int | None = None  # force /generate to answer this status with an SGLang error body
    hang: bool = False  # /generate waits until this is cleared or the client disconnects
    drop_after_bytes: int | None = None  # close the connection after this many /generate body bytes
    delay_s: float = 0.0  # extra latency before /generate starts
    echo: bool = False  # /generate answers the raw request body with the request's content-type


class SimOptions(msgspec.Struct, kw_only=True):
    tokenizer: str = "builtin:qwen"
    seed: int = 0
    # Latency (router/sim/scheduler.py). "independent": an item takes prefill_latency_s_per_token per
    # uncached (+ cached_prefill_s_per_token per cached) prompt token, then token_latency_s per generated
    # token, whatever else runs. "batch": continuous batching (router/sim/batch.py): the running batch
    # advances one step at a time; a step costs token_latency_s + batch_step_s_per_request per request in
    # it + batch_step_s_per_context_token per context token of its decoding requests + the prefill
    # costs of the prompt tokens it computes, so a busier worker is slower for everyone on it.
    latency_model: Literal["independent", "batch"] = "independent"
    token_latency_s: NonNegative = 0.0
    prefill_latency_s_per_token: NonNegative = 0.0
    cached_prefill_s_per_token: NonNegative = 0.0
    batch_step_s_per_request: NonNegative = 0.0
    batch_step_s_per_context_token: NonNegative = 0.0
    max_running_requests: Annotated[int, Meta(ge=0)] = 0  # batch: more wait in the queue (0 = no cap)
    chunked_prefill_size: Annotated[int, Meta(ge=0)] = 0  # batch: uncached prompt tokens per step (0 = no cap)
    num_layers: Annotated[int, Meta(ge=1)] = 2
    top_k: Annotated[int, Meta(ge=1)] = 2
    num_experts: int = 64
    enable_routed_experts: bool = True
    # False: ignore `routed_experts_start_len` and return every row, as some SGLang builds do
    honour_routed_experts_start_len: bool = True
    weight_version: str = "default"
    prefix_cache_tokens: int = 1 << 20
    noncanonical_rate: Annotated[float, Meta(ge=0, le=1)] = 0.15
    model_path: str = "sim/qwen"
    name: str = "sim"
    context_length: int = 131072
    chat_replies: bool = True  # a ChatML prompt awaiting an assistant turn gets a chat-model reply (sim/chat.py)
    faults: Faults = msgspec.field(default_factory=Faults)

    def __post_init__(self) -> None:
        if isinstance(self.faults, dict):  # SimOptions(faults={"hang": True}) from tests and configs
            self.faults = msgspec.convert(self.faults, Faults)


# --- errors ---------------------------------------------------------------------------------
