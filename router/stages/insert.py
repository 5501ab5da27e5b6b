"""insert: store captured trajectories in the radix trajectory cache.

Reads `scratch["trajectory"]` (from capture). Inserts each record into the cache (shared
prefixes are stored once; the record becomes retrievable by its visible text via
/retrieve_from_text), tells prefix-affinity routing that the serving worker now holds these
tokens, then enforces the cache budget if the insert pushed it over. Runs before the client
sees the end of the reply, so a retrieve right after can't miss. Provides `cached` (the records
are in the cache), which `persist` needs.
"""

from __future__ import annotations

import time

import numpy as np

from router.core.pipeline import Exchange, Stage


class Insert(Stage):
    name = "insert"
    phase = "response"
    requires = frozenset({"trajectory"})
    provides = frozenset({"cached"})
    uses_tokenizer = True
    uses_tree = True

    async def on_response(self, ex: Exchange) -> None:
        records = ex.scratch.get("trajectory") or ()
        tree = self.services.trajectories.tree
        now = time.time()
        for rec in records:
            tree.insert(rec, now=now)
            if rec.worker is not None:
                self.services.workers.record_served(np.concatenate([rec.prompt_ids, rec.output_ids]), rec.worker)
        if records:
            ex.scratch["cached"] = records
            if not self.persist_follows:
                self.services.trajectories.evict()

    persist_follows = False

    def bind_pipeline(self, response_stages: list) -> None:
        # persist reads each record's answer back from the cache, so budget eviction must wait for it
        # (it evicts instead); with a tiny memory budget the new leaf would otherwise be gone already.
        later = response_stages[response_stages.index(self) + 1:]
        self.persist_follows = any(getattr(st, "evicts_cache", False) for st in later)
