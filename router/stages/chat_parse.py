"""chat_parse: read the model's reply text as an assistant message (Qwen3/Hermes format).

Reads the worker's /generate reply (`ex.response_body`) for `scratch["session_turn"]`: output ids,
logprobs, finish reason, weight version and, when captured, routed-experts rows. Splits the text
into `content`, `reasoning_content` (a `<think>` block) and `tool_calls` (`<tool_call>{json}
</tool_call>` blocks) with router/core/chat_output.py. Writes `scratch["worker_output"]` (a WorkerOutput)
and `scratch["assistant"]` (an AssistantOutput). A worker's non-200 reply is left untouched (it passes through, unrecorded);
a 200 reply missing what a turn needs becomes a 502. Swap this stage to parse another format.
"""

from __future__ import annotations

from router.core.chat_output import parse_assistant_output
from router.core.pipeline import Exchange, Stage
from router.stages._session import ASSISTANT, OUTPUT, TURN, BadWorkerReply, decode_worker_output
from router.stages.session_reply import fail


class ChatParse(Stage):
    name = "chat_parse"
    phase = "response"
    requires = frozenset({TURN, "response"})
    provides = frozenset({OUTPUT, ASSISTANT})

    async def on_response(self, ex: Exchange) -> None:
        turn = ex.scratch[TURN]
        if ex.status != 200 or ex.response_body is None:
            return
        try:
            # Only this turn's new positions keep routed-experts rows; earlier ones belong to earlier turns.
            skip = max(turn.tree.path_length(turn.parent) - 1, 0) - turn.r3_start
            out = ex.scratch[OUTPUT] = decode_worker_output(ex.response_body, turn.r3_shape, skip)
        except BadWorkerReply as e:
            fail(ex, 502, str(e))
            return
        # Ids seeded by the session and the request's position: a replayed turn gets the same ids.
        ex.scratch[ASSISTANT] = parse_assistant_output(out.text, tools_enabled=bool(turn.request.tools),
                                                       id_seed=f"{turn.session.id}:{turn.request_seq}")
