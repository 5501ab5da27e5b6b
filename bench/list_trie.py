"""Baseline for bench_radix.py: the trie a reasonable engineer writes first.

One Python object per token (token id, logprob, loss mask, anchor flag, the token's text piece, a dict of
children keyed by token id, a parent pointer), a dict from visible text to its terminal node. Same semantics as
router.core.radix.RadixTree for the operations the benchmark uses: insert (with "generated wins" and anchors),
match_text (longest anchored text prefix, greedy descent), retrieve (exact visible-text hit, else the longest
token-boundary prefix). No routed experts, no eviction.
"""

from __future__ import annotations

from typing import Callable


class TrieNode:
    __slots__ = ("token", "logprob", "mask", "anchor", "text", "children", "parent")

    def __init__(self, token: int, text: bytes, parent: "TrieNode | None"):
        self.token = token
        self.logprob = 0.0
        self.mask = 0
        self.anchor = False
        self.text = text
        self.children: dict[int, TrieNode] = {}
        self.parent = parent


class ListTrie:
    def __init__(self, token_bytes: Callable):
        self.token_bytes = token_bytes
        self.root = TrieNode(-1, b"", None)
        self.terminals: dict[bytes, tuple[TrieNode, str]] = {}
        self.ntokens = 0

    def insert(self, t, *, now: float = 0.0) -> None:
        prompt = [int(x) for x in t.prompt_ids]
        ids = prompt + [int(x) for x in t.output_ids]
        lps = [float(x) for x in t.output_logprobs]
        P = len(prompt)
        node, i = self.root, 0
        while i < len(ids):  # walk the cached part
            child = node.children.get(ids[i])
            if child is None:
                break
            node = child
            self._merge(node, i, P, lps)
            i += 1
        if i < len(ids):  # text pieces of the new suffix in one tokenizer call
            blob, lens = self.token_bytes(ids[i:])
            off = 0
            for j, n in zip(range(i, len(ids)), lens.tolist()):
                child = TrieNode(ids[j], blob[off:off + n], node)
                off += n
                node.children[ids[j]] = child
                node = child
                self._merge(node, j, P, lps)
                self.ntokens += 1
        self.terminals[bytes(t.visible_text)] = (node, t.rid)

    @staticmethod
    def _merge(node: TrieNode, i: int, P: int, lps: list[float]) -> None:
        if i >= P:  # generated wins
            node.mask = 1
            node.logprob = lps[i - P]
            node.anchor = True
        elif i == P - 1:
            node.anchor = True

    def _walk(self, text: bytes, anchors_only: bool) -> tuple[list[TrieNode], int]:
        node, pos, path, best, best_pos = self.root, 0, [], 0, 0
        while pos < len(text):
            nxt = None
            for child in node.children.values():
                if text.startswith(child.text, pos) and (nxt is None or len(child.text) > len(nxt.text)):
                    nxt = child
            if nxt is None:
                break
            node = nxt
            pos += len(node.text)
            path.append(node)
            if node.anchor or not anchors_only:
                best, best_pos = len(path), pos
        return path[:best], best_pos

    def match_text(self, text: bytes, *, now: float = 0.0, anchors_only: bool = True) -> tuple[list[int], int]:
        path, matched = self._walk(text, anchors_only)
        return [n.token for n in path], matched

    def retrieve(self, text: bytes, *, now: float = 0.0) -> dict:
        hit = self.terminals.get(text)
        if hit is not None:
            path, node = [], hit[0]
            while node is not self.root:
                path.append(node)
                node = node.parent
            path.reverse()
            matched, rid = len(text), hit[1]
        else:
            (path, matched), rid = self._walk(text, anchors_only=False), None
        return dict(exact=hit is not None, tokens=[n.token for n in path], logprobs=[n.logprob for n in path],
                    loss_mask=[n.mask for n in path], matched_bytes=matched, rid=rid)
