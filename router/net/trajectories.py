"""The trajectory service: the exact trajectory cache (router/core/radix) over the durable store.

- `tree`: the radix-tree cache, built on first use from the tokenizer's vocabulary.
- `store`: the durable store (a router.core.store.TrajectoryStore: SQLite or PostgreSQL, router/net/store_open.py),
  opened when a route's pipeline persists and `[store]` is enabled; None otherwise.
- `continue_from_store`: a prompt continuing a stored text the cache no longer holds (evicted, or stored before
  this process started, or by another router) loads those trajectories back, oldest first, so the continuation's
  tokens are the stored ones.
- `evict`: the cache's byte budget, enforced after each insert (stale weight versions first, then retrieved
  trajectories, unretrieved ones only past the hard budget); a stored trajectory that leaves memory is remembered
  by its prefix key (`evicted_heads`) so a later prompt asks the store for it.
- `cache_maintenance` / `store_maintenance`: the periodic eviction and the store's retention, in the root nursery.
"""

from __future__ import annotations

import logging
import time

import trio

from router.core.pipeline import StageError
from router.core.routing import WeightVersions
from router.core.store import KeyFilter, StoreError, prefix_heads

log = logging.getLogger("miles_router")


class TrajectoryService:
    # The durable store's backend: a callable (path, *, sync, retention_s, max_bytes, metrics) -> TrajectoryStore
    # (router/core/store.py). None: the one the config selects (router/net/store_open.py: PostgreSQL for
    # `store.url`, else SQLite). Everything the router does with a store goes through that protocol, so another
    # backend (Valkey) is one class; tests/test_store.py runs the router over an in-memory one.
    store_backend = None

    def __init__(self, config, versions: WeightVersions, metrics) -> None:
        self.config, self.versions, self.metrics = config, versions, metrics
        self.vocab = None  # the tokenizer's vocabulary table, once loaded (the tree is built from it)
        self.tree_if_loaded = None
        self.store = None
        # prefix keys of this process's stored trajectories that it evicted from memory (a KeyFilter, once any was)
        self.evicted_heads = None

    @property
    def tree(self):
        if self.tree_if_loaded is None:
            from router.core.radix import RadixTree

            if self.vocab is None:
                raise RuntimeError("the trajectory cache needs a tokenizer ([tokenizer] path)")
            self.tree_if_loaded = RadixTree(self.vocab)
        return self.tree_if_loaded

    # ---- the store ------------------------------------------------------------------------------
    def open_store(self):
        """Open the durable store (raises StoreOpenError). Nothing is loaded: records are found by digest in the
        store when the memory cache does not have them, so startup does not grow with the store."""
        from router.config import store_path

        c = self.config.store
        backend = type(self).store_backend  # (read from the class: a plain function must not become a method)
        if backend is None:
            from router.net.store_open import open_store

            self.store = open_store(self.config, metrics=self.metrics)
        else:
            self.store = backend(store_path(self.config), sync=c.sync, retention_s=c.retention_s,
                                 max_bytes=c.max_bytes, metrics=self.metrics)
        return self.store

    def started(self) -> None:
        """Start the store's writer (after anything that reads it at startup) and say what it holds."""
        self.store.start()
        st = self.store.stats()
        log.info("%s: %d trajectories (%d unretrieved), %d bytes%s", self.store.name, st.rows, st.unretrieved,
                 st.file_bytes, "" if st.writable else f"; READ-ONLY ({st.write_error}): /generate on persisting "
                 "routes will answer 503")

    async def continue_from_store(self, text: bytes, matched: int) -> bool:
        """Load back into the memory cache the stored trajectories whose visible text is a prefix of `text`
        longer than what the cache matched (a conversation's earlier turns, evicted or stored before a restart),
        oldest first, as they were inserted the first time: the merged loss mask and anchors come out the same.
        True if any was loaded. Texts shorter than one prefix-key block (64 bytes) are not found this way.

        The store is asked only about the prompt's prefix keys (router/core/store.py `prefix_heads`) that may
        name a record the memory cache does not hold: one another process wrote or that was there before this
        one started (`store.may_continue`), or one of this process's own that it evicted (`evicted_heads`).
        Everything else this process stored is still in memory, so the cache's own match already covers it."""
        store = self.store
        if store is None:
            return False
        may_continue, evicted = store.may_continue, self.evicted_heads
        if evicted is None:
            heads = [h for h in prefix_heads(text, matched) if may_continue(h)]
        else:
            heads = [h for h in prefix_heads(text, matched) if may_continue(h) or h in evicted]
        if not heads:
            return False
        from router.core.radix import TrajectoryInput, text_digest
        from router.wire import store as wire

        tree = self.tree
        chosen: dict[int, int] = {}
        try:
            for rid, vlen, digest in await store.prefix_candidates(heads, len(text)):
                if (vlen > matched and rid not in chosen and text_digest(text[:vlen]) == digest
                        and tree.peek_exact(text[:vlen]) is None):
                    chosen[rid] = vlen
            if not chosen:
                return False
            order = sorted(chosen)
            records = await store.get_ids(order)
        except StoreError as e:
            # The earlier turns' exact tokens cannot be read now (the store's database is away): fail the request
            # rather than re-tokenize a conversation the engine already spelled.
            raise StageError(503, str(e), store=str(getattr(store, "path", store.name))) from None
        now = time.time()
        for rid, rec in zip(order, records):
            tokens, p = wire.tokens_of(rec), rec.prompt_len
            tree.insert(TrajectoryInput(
                rid=rec.rid, prompt_ids=tokens[:p], output_ids=tokens[p:], output_logprobs=wire.logprobs_of(rec)[p:],
                visible_text=text[:chosen[rid]], weight_version=rec.weight_version, worker=rec.worker,
                finish=rec.finish or "stop", routed_experts=wire.experts_of(rec)), now=now)
        return True

    async def store_maintenance(self) -> None:
        while True:
            await trio.sleep(self.config.cache.cleanup_interval_s)
            try:
                plan = await self.store.maintain(now=time.time(), stale_versions=self.versions.stale())
            except StoreError as e:
                log.warning("%s", e)
                continue
            if plan.evicted_unretrieved:
                log.warning("%s over store.max_bytes (%d): deleted %d trajectories nobody retrieved yet",
                            self.store.name, self.config.store.max_bytes, plan.evicted_unretrieved)

    # ---- the memory budget -------------------------------------------------------------------------
    def evict(self) -> None:
        tree = self.tree_if_loaded
        if tree is None:
            return
        c = self.config.cache
        if tree.nbytes <= c.budget_bytes:
            return
        report = tree.evict(budget_bytes=c.budget_bytes, hard_budget_bytes=c.hard_budget_bytes,
                            stale_versions=self.versions.is_stale)
        if report.tags:
            self._evicted_to_store(report.tags)
        if report.evicted_unretrieved and self.store is not None:
            # Out of memory, not out of existence: /retrieve_from_text reads them back from the store.
            log.debug("trajectory cache over its hard budget: %d unretrieved trajectories left memory for the "
                      "store", report.evicted_unretrieved)
        elif report.evicted_unretrieved:
            log.warning("trajectory cache over its hard budget (%d bytes): evicted %d trajectories nobody "
                        "retrieved yet", c.hard_budget_bytes, report.evicted_unretrieved)

    def _evicted_to_store(self, heads: list[int]) -> None:
        """Remember the prefix keys of stored trajectories that left memory (persist tagged them with their key):
        a later prompt continuing one of them must ask the store for it."""
        if self.evicted_heads is None:
            self.evicted_heads = KeyFilter(26)  # 8 MiB, allocated at the first eviction of a stored trajectory
        for h in heads:
            self.evicted_heads.add(h)

    async def cache_maintenance(self) -> None:
        while True:
            await trio.sleep(self.config.cache.cleanup_interval_s)
            self.evict()

    async def aclose(self) -> None:
        if self.store is not None:
            with trio.CancelScope(shield=True):
                await self.store.aclose()
