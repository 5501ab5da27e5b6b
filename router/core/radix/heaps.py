"""The eviction order: the tree's leaves in one heap per (weight version, reclaimable) group, least
recently used first, lazily invalidated.

A leaf is pushed when it becomes one (an insert, its last child evicted) or changes group (its
trajectory retrieved); an entry is stale once its node was pushed again (`hseq`), grew a child or
was evicted, and is dropped when it reaches the top. A lookup only stamps `last_access`: an entry
popped with an older stamp is pushed again with the new one. So picking k victims costs O(k log n),
and the heaps are rebuilt only when stale entries outnumber live nodes.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from router.core.radix.node import Node


class LeafHeaps:
    def __init__(self) -> None:
        self._heaps: dict[tuple, list] = {}  # (version, reclaimable) -> [(last_access, seq, node)]
        self.entries = 0  # live and stale
        self._seq = 0

    def push(self, node: Node, live_nodes: int, root: Node) -> None:
        """(Re)register `node` if it is a leaf; its older entries go stale. `live_nodes` and `root` are
        the tree's, for rebuilding once stale entries pile up."""
        if node.by_first or node.parent is None:  # not a leaf, evicted, or the root
            return
        self._seq += 1
        node.hseq = self._seq
        heapq.heappush(self._heaps.setdefault((node.version, node.reclaimable()), []),
                       (node.last_access, self._seq, node))
        self.entries += 1
        if self.entries > 2 * live_nodes + 1024:
            self._rebuild(root)

    def _rebuild(self, root: Node) -> None:
        self._heaps, self.entries = {}, 0
        stack = root.kids()
        while stack:
            nd = stack.pop()
            if nd.by_first:
                stack.extend(nd.kids())
            else:
                self._seq += 1
                nd.hseq = self._seq
                self._heaps.setdefault((nd.version, nd.reclaimable()), []).append((nd.last_access, nd.hseq, nd))
                self.entries += 1
        for h in self._heaps.values():
            heapq.heapify(h)

    def pop_oldest(self, eligible: Callable[[tuple], bool]) -> Node | None:
        """Take out the least recently used leaf among the groups `eligible((version, reclaimable))`
        accepts, or None when there is none."""
        best_key = best = None
        for key in list(self._heaps):  # one heap per (version, reclaimable): few groups
            h = self._heaps[key]
            while h:
                stamp, seq, nd = h[0]
                if nd.hseq != seq or nd.by_first or nd.parent is None:
                    heapq.heappop(h)  # stale entry
                    self.entries -= 1
                elif stamp != nd.last_access:  # used since it was pushed: take its place by the new stamp
                    heapq.heapreplace(h, (nd.last_access, seq, nd))
                else:
                    break
            if not h:
                del self._heaps[key]
            elif eligible(key) and (best is None or h[0] < best):
                best_key, best = key, h[0]
        if best is None:
            return None
        heapq.heappop(self._heaps[best_key])
        self.entries -= 1
        return best[2]
