"""chat_template: the tokens this turn adds, rendering only what the stored history lacks.

Reads `scratch["session_turn"]`. A new root renders the whole request (messages, `tools` as SGLang's chat
endpoint hands them to the template, the effective `chat_template_kwargs`) with the tokenizer's chat
template and tokenizes it; identical first
requests (a GRPO group) share one cached result. A turn that extends a stored one renders only
the appended messages: what a fresh render puts after the stored assistant's end-of-turn token
(`Tokenizer.render_appended`; for ChatML the `\n` after `<|im_end|>`, then the new turns and the
generation prompt). Old turns are never re-rendered or re-tokenized. When the stored output did
not end with the end-of-turn token (a stop string or another stop id ended it), the end-of-turn
text comes first, as a fresh render has it. Writes `scratch["session_prompt"]` (int32 ids) and
`PendingTurn.input_len`.
Swap this stage for another template family's junction rule.

Tokenizing the appended text on its own gives a fresh render's tokens because the junction sits
next to special tokens (`<|im_end|>`, `<|im_start|>`), where byte-level BPE never merges.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from router.core.pipeline import Exchange, Stage, StageError
from router.core.sessions.messages import message_dict
from router.stages._session import PROMPT, TURN
from router.wire.openai import BadTool, sglang_tools

_key_encoder = msgspec.json.Encoder(order="sorted")


class ChatTemplate(Stage):
    name = "chat_template"
    phase = "request"
    requires = frozenset({TURN})
    provides = frozenset({PROMPT})
    uses_tokenizer = True

    async def on_request(self, ex: Exchange) -> None:
        turn = ex.scratch[TURN]
        tok = self.services.tokenizer
        req = turn.request
        kwargs = turn.chat_template_kwargs
        try:
            tools = sglang_tools(req.tools)
        except BadTool as e:
            raise StageError(400, f"invalid chat completions body: {e}") from None
        tree = turn.tree
        new = [message_dict(m) for m in turn.new_messages]
        if turn.parent < 0:
            cache = self.services.sessions.prompts
            key = _key_encoder.encode([new, tools, kwargs])
            ids = cache.get(key)
            if ids is None:
                text = _render(tok.apply_chat_template, new, True, tools=tools, **kwargs)
                ids = cache.put(key, np.asarray(await tok.encode_async(text), dtype=np.int32))
        else:
            parent = tree.turns[turn.parent]
            text = _render(tok.render_appended, new, True, tools=tools, **kwargs)
            if len(parent.output_ids) == 0 or int(parent.output_ids[-1]) != tok.eos_token_id:
                text = tok.text_bytes([tok.eos_token_id]).decode() + text
            ids = np.asarray(await tok.encode_async(text), dtype=np.int32)
        if ids.size == 0:
            raise StageError(400, "the chat template rendered no tokens for these messages")
        ex.scratch[PROMPT] = ids
        turn.input_len = tree.path_length(turn.parent) + int(ids.size)
        return None


def _render(fn, messages: list[dict], add_generation_prompt: bool, **kwargs: Any) -> str:
    try:
        return fn(messages, add_generation_prompt, **kwargs)
    except Exception as e:  # jinja raises anything: TemplateError, TypeError, the template's own raise
        raise StageError(400, f"chat template failed to render the messages: {type(e).__name__}: {e}") from None
