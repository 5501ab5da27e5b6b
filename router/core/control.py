"""What an engine control call that passes through the router does to the router's view of that engine.

The router sees the trainer's control calls when they go through it (the fan-out paths and the RL plane,
`/v1/rl/...`). From them it keeps, per worker, what SGLang itself would report if asked: whether generation
is paused (`/pause_generation` ... `/continue_generation`), whether the engine released its memory (sleep:
`/release_memory_occupation` ... `/resume_memory_occupation`), and the weight version (`/update_weight_version`,
`/update_weights_from_{disk,tensor,distributed}` with `weight_version`). smg's RL plane M2 keeps the same table
(`(weight_version, control_state)` per engine, smg-project/smg#2529).

Pausing and sleeping take effect *before* the call is sent, so no request is routed to an engine while its pause
is on the wire (and the call waits until the requests routed there before it are written: router/net/rl.py); a
call that fails undoes it (the engine did not pause). Resuming and version changes take effect only once the
engine said yes. Pure: `plan` reads a path and a body, `ControlState` is plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from router.wire import DECODE_ERRORS

# SGLang's release/resume tags that stop generation; no tags (null) means all of them. (`cuda_graph` is not
# tracked: a trainer that releases everything and resumes weights, then kv_cache, has an engine that generates.)
ALL_TAGS = frozenset({"weights", "kv_cache"})
_WEIGHT_UPDATES = ("update_weights_from_disk", "update_weights_from_tensor", "update_weights_from_distributed")


@dataclass(slots=True)
class ControlState:
    """A worker's control state as the router last saw it change."""

    paused: bool = False
    released: frozenset = field(default_factory=frozenset)  # memory tags released (asleep while non-empty)

    @property
    def asleep(self) -> bool:
        return bool(self.released)

    @property
    def name(self) -> str:
        """smg M2's words: running, paused or asleep (asleep wins: a sleeping engine cannot generate at all)."""
        return "asleep" if self.released else "paused" if self.paused else "running"


@dataclass(frozen=True, slots=True)
class Plan:
    """One control call's effect: `before` applies when it is sent (undo with `undo` if it fails), `after`
    once the engine answered 2xx (and, for a weight update, did not say `success: false`)."""

    pause: bool | None = None  # True: paused before the call; False: resumed after it
    release: frozenset | None = None  # tags released before the call
    resume: frozenset | None = None  # tags resumed after it
    version: str | None = None  # the weight version after it

    @property
    def changes_anything(self) -> bool:
        return any(x is not None for x in (self.pause, self.release, self.resume, self.version))


def _json_object(body: bytes) -> dict:
    if not body.strip():
        return {}
    try:
        obj = msgspec.json.decode(body)
    except DECODE_ERRORS:
        return {}
    return obj if isinstance(obj, dict) else {}


def _tags(obj: dict) -> frozenset:
    tags = obj.get("tags")
    if not isinstance(tags, list):
        return ALL_TAGS
    return frozenset(t for t in tags if t in ALL_TAGS)


def plan(path: str, body: bytes) -> Plan:
    """The effect of sending `body` to the engine route `path` (`/pause_generation` or `pause_generation`)."""
    name = path.strip("/")
    if name == "pause_generation":
        return Plan(pause=True)
    if name == "continue_generation":
        return Plan(pause=False)
    if name == "release_memory_occupation":
        return Plan(release=_tags(_json_object(body)))
    if name == "resume_memory_occupation":
        return Plan(resume=_tags(_json_object(body)))
    if name == "update_weight_version":
        v = _json_object(body).get("new_version")
        return Plan(version=None if v is None else str(v))
    if name in _WEIGHT_UPDATES:
        v = _json_object(body).get("weight_version")
        return Plan(version=None if v is None else str(v))
    return Plan()


def before(state: ControlState, p: Plan) -> ControlState:
    """The state while the call is on the wire (returns the state to restore if it fails)."""
    undo = ControlState(state.paused, state.released)
    if p.pause:
        state.paused = True
    if p.release:
        state.released = state.released | p.release
    return undo


def after(state: ControlState, p: Plan, status: int | None, reply: bytes, undo: ControlState) -> str | None:
    """Apply the call's outcome (status None: no reply at all). Returns the new weight version to record, if any."""
    ok = status is not None and 200 <= status < 300
    if ok and p.version is not None and _json_object(reply).get("success") is False:
        ok = False  # SGLang answers some failed weight updates with success: false
    if not ok:
        if p.pause or p.release:
            state.paused, state.released = undo.paused, undo.released
        return None
    if p.pause is False:
        state.paused = False
    if p.resume:
        state.released = state.released - p.resume
    return p.version
