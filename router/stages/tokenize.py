"""tokenize: turn a text prompt into the token ids the worker receives.

Reads the request's single `text` prompt and, when radix_lookup ran first, `scratch["prefix"]`:
only the text after the cached prefix is tokenized (off the event loop when long), so turn 10
of a conversation costs about what turn 1 costs. Writes `scratch["prompt"]` (a Prompt) and
`ex.upstream_body`: the same JSON with `text` replaced by `input_ids` (every other field kept),
so the rewrite really reaches the worker. Adds `x-miles-router-cached-prompt-tokens` /
`-fresh-prompt-tokens` headers to the reply. `input_ids` requests pass unchanged (their prompt
is still recorded); batch requests pass unchanged and are not recorded.
"""

from __future__ import annotations

import msgspec
import numpy as np

from router.wire import DECODE_ERRORS, decode_error_text
from router.core.pipeline import Exchange, Stage, StageError
from router.core.generate import Prompt, generate_request, single_input_ids


class Options(msgspec.Struct, forbid_unknown_fields=True):
    # Ask the worker for logprobs on rewritten requests: a trajectory without them can't be trained on.
    force_return_logprob: bool = True


class Tokenize(Stage):
    name = "tokenize"
    phase = "request"
    optional = frozenset({"prefix"})
    provides = frozenset({"prompt", "upstream_body"})
    Options = Options
    uses_tokenizer = True

    async def on_request(self, ex: Exchange) -> None:
        req = generate_request(ex)
        ids = single_input_ids(req)
        if ids is not None:
            if ids.size == 0:
                raise StageError(400, "input_ids cannot be empty")
            ex.scratch["prompt"] = Prompt(tokens=ids, text=None)
            return None
        if not isinstance(req.text, str) or req.has_input_ids:
            return None  # batch: forwarded as is
        tok = self.services.tokenizer
        text = req.text.encode("utf-8", "surrogatepass")
        prefix_tokens, matched = ex.scratch.get("prefix", (np.zeros(0, np.int32), 0))
        remainder = text[matched:].decode("utf-8", "surrogatepass")
        fresh = np.asarray(await tok.encode_async(remainder), dtype=np.int32) if remainder else np.zeros(0, np.int32)
        tokens = np.concatenate([prefix_tokens.astype(np.int32, copy=False), fresh])
        if tokens.size == 0:
            raise StageError(400, "text is empty")
        ex.scratch["prompt"] = Prompt(tokens=tokens, text=text, cached_tokens=int(prefix_tokens.size),
                                      matched_bytes=matched)
        try:
            body = msgspec.json.decode(ex.body_for_upstream)
        except DECODE_ERRORS as e:
            # The routing-fields decode skips unknown fields without checking their UTF-8, so
            # `{"text": "hi", "x": "<invalid UTF-8>"}` only fails here: a 400, not a 500
            # (tests/test_bad_input.py::test_invalid_utf8_in_json_is_400).
            raise StageError(400, f"invalid /generate body: {decode_error_text(e, ex.body_for_upstream)}") from None
        body.pop("text", None)
        body["input_ids"] = tokens.tolist()
        if self.options.force_return_logprob and not body.get("return_logprob"):
            body["return_logprob"] = True
        ex.upstream_body = msgspec.json.encode(body)
        ex.extra_headers.append((b"x-miles-router-cached-prompt-tokens", str(prefix_tokens.size).encode()))
        ex.extra_headers.append((b"x-miles-router-fresh-prompt-tokens", str(fresh.size).encode()))
        return None
