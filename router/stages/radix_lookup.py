"""radix_lookup: find the longest cached prefix of a text prompt that ends on an anchor.

Reads the request's single `text` prompt. Writes `scratch["prefix"]` = (token ids, matched bytes)
from the trajectory cache: the exact tokens the engine saw and produced for that prefix, ending
where reuse is safe (after a generated token, a prompt's end, a finished trajectory, or a split
token such as <|im_start|> in a prompt the router tokenized itself: router/core/radix). The
match never ends inside a UTF-8 character, so the remainder can be tokenized as text. With the durable
store, earlier turns the prompt continues that are no longer in memory (evicted, or stored before a
restart) are loaded back into the cache first, so the next turn reuses their exact tokens; the store is
asked only when the prompt may continue such a turn (router/net/trajectories.py `continue_from_store`).
Requests with `input_ids`, batches and n>1 prompts built from lists are left alone.
"""

from __future__ import annotations

import time

import msgspec

from router.core.pipeline import Exchange, Stage
from router.core.generate import generate_request


class Options(msgspec.Struct, forbid_unknown_fields=True):
    # Reuse any token boundary, not only anchors (may hand the engine a non-canonical split of a fresh prompt).
    any_boundary: bool = False


class RadixLookup(Stage):
    name = "radix_lookup"
    phase = "request"
    provides = frozenset({"prefix"})
    Options = Options
    uses_tokenizer = True
    uses_tree = True

    async def on_request(self, ex: Exchange) -> None:
        req = generate_request(ex)
        if not isinstance(req.text, str) or req.has_input_ids:
            return None
        text = req.text.encode("utf-8", "surrogatepass")
        m, cut = self._match(text)
        if cut < len(text) and await self.services.trajectories.continue_from_store(text, cut):
            m, cut = self._match(text)  # earlier turns this text continues came back from the durable store
        ex.scratch["prefix"] = (m.tokens, cut)
        return None

    def _match(self, text: bytes):
        tree = self.services.trajectories.tree
        limit = len(text)
        while True:
            m = tree.match_text(text[:limit], now=time.time(), anchors_only=not self.options.any_boundary)
            cut = m.matched_bytes
            # Back off to a character boundary: the remainder must be decodable text.
            if cut == 0 or cut == len(text) or (text[cut] & 0xC0) != 0x80:
                return m, cut
            limit = cut - 1
            while limit > 0 and (text[limit] & 0xC0) == 0x80:
                limit -= 1
