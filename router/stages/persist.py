"""persist: make the reply's trajectories durable before the client sees the end of the reply.

Reads `scratch["cached"]` (the records `insert` just put in the memory cache) and, for each, the cache's own
answer for its visible text (`RadixTree.peek_exact`: tokens, logprobs, loss mask, routed experts, weight
versions, exactly what /retrieve_from_text answers). Writes them to the durable store (`[store]`) under the
text's digest and its prefix key (so a later turn that continues the text finds it after a restart), tags each
in the cache with that key (an eviction reports it, and the router then knows to ask the store for it), then
enforces the memory budget (eviction now only moves trajectories out of memory).

With `store.sync = "commit"` the end of the reply waits for the commit (group commit: concurrent replies share
one). If the store cannot write (disk full, read-only file, I/O error) the request fails with 503 naming the
store (a stream is broken off instead of completed): the client never holds a reply whose trajectory is not on
disk. Does nothing when the store is disabled (`store.enabled = false`).
"""

from __future__ import annotations

import time

from router.core.pipeline import CommitError, Exchange, Stage
from router.core.radix import text_digest
from router.core.store import Keyed, StoreWriteError, text_head
from router.wire import store as wire


class Persist(Stage):
    name = "persist"
    phase = "response"
    requires = frozenset({"cached"})
    uses_tree = True
    uses_store = True
    evicts_cache = True

    async def on_response(self, ex: Exchange) -> None:
        records = ex.scratch.get("cached") or ()
        svc = self.services
        trajectories = svc.trajectories
        store = trajectories.store
        if store is None or not records:
            trajectories.evict()
            return
        tree = trajectories.tree
        now = time.time()
        items = []
        for rec in records:
            head = text_head(rec.visible_text)
            # tagged with its prefix key: if it is evicted, the router remembers to ask the store for it
            ans = tree.peek_exact(rec.visible_text, rec.rid, tag=head)
            if ans is None:  # evicted already, or its rid no longer kept (router/core/radix/node.py MAX_ALIASES)
                continue
            items.append(Keyed(text_digest(rec.visible_text), wire.pack(
                rid=rec.rid, created=now, prompt_len=len(rec.prompt_ids), finish=ans.finish, worker=rec.worker,
                weight_version=ans.version, versions=ans.versions, tokens=ans.tokens, logprobs=ans.logprobs,
                loss_mask=ans.loss_mask, experts=ans.routed_experts), head, len(rec.visible_text)))
        trajectories.evict()
        try:
            await store.put(items, wait=svc.config.store.sync == "commit")
        except StoreWriteError as e:
            raise CommitError(503, str(e), store=str(getattr(store, "path", store.name))) from None
