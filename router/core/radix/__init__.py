"""Exact text -> token trajectory cache: a token-keyed radix tree with a text index.

RL rollout code that speaks TEXT needs, at training time, the EXACT token ids the engine saw and produced, their
logprobs and a loss mask (`/retrieve_from_text {"text": P+R}`). miles and slime once shipped a radix tree keyed by
TEXT for this (a router middleware, since removed from both projects); it got four things wrong, which this module
is built to avoid:

1. no node splitting: a branch diverging inside a node was stored again as a sibling, and a query ending inside a
   node matched nothing;
2. token/text misalignment: on a partial hit the leftover text was re-tokenized on its own and glued on, so BPE
   merges across the cut differed from what the engine saw (and got logprob 0 / mask 0);
3. unstable keys: the key was `decode(ids)` as str, which does not round-trip (special tokens, partial UTF-8);
4. the rewrite never reached the worker (a pipeline problem, handled by the stages that call this module).

This module is the pure data structure (no I/O, no clock, no tokenizer import). Its answers:

* The tree is keyed by TOKENS (a compressed trie over token ids, split on divergence like SGLang's RadixCache), so
  every cached sequence is exactly what an engine produced; text is only an index. Each node holds its run of
  tokens in ONE int32 array `data` [2, n]: row 0 the token ids with three flag bits on top (bit 28 = loss mask,
  bit 29 = "anchor after this token": a generation boundary, bit 30 = "split after this token": a prompt token the
  router tokenized from text, after which its tokenizer splits any text), row 1 the float32 logprobs (bit for
  bit). That is 8 bytes per token, the information itself. The run's text is not stored: it is derived from the
  tokens through the tokenizer's vocabulary table (`VocabBytes`, one per tokenizer, shared by every node). A node
  keeps only its text's length and a keyed hash of it. Optional routed-expert rows `r3` [n, L*K] are stored at
  the width the expert ids need (uint8 for <= 256 experts, uint16, else int32; the tree widens every node the
  first time a larger id arrives, never truncating), with `r3_known` marking rows not reported yet (None once
  every row is known).
* Text walk: each node indexes its children by the exact bytes of their first token, so only children whose first
  token matches are visited (several only where different tokenizations spell the same bytes: then all are
  explored and the longest match wins, ties to the most recently used). A child whose whole text fits is checked
  with one hash of the query's slice against the node's hash (Python's SipHash, keyed per process: 64 bits, ~4 GB/s,
  no text stored); otherwise only the bytes the query can still match are rebuilt from the vocabulary (one numpy
  gather) and compared with memcmp, and bytes map to whole tokens with `searchsorted` over the token lengths, so a
  query ending inside a token or a node matches up to the last whole-token boundary.
* Anchors: a text-keyed request may reuse cached tokens only up to a boundary the ENGINE produced: after each
  generated token, at the end of each trajectory's prompt, at terminals. A boundary inside someone else's prompt
  is not one: reusing half of another prompt's tokenization would hand the engine a non-canonical tokenization.
* Terminals: inserting a trajectory splits nodes so its end is a node end and records a `Terminal` there, indexed
  by a 128-bit keyed identity of its visible text (`text_key`: two SipHash values of independent inputs, keyed
  per process; ~5x cheaper than blake2b, and a forged collision needs the process's hash key). The engine strips
  the stop token's text (and may trim stop strings) from the text it returns, so the client's P+R is usually a
  strict prefix of the token text: the key makes the exact lookup O(len) and uniform, and `retrieve(P+R)` returns
  prompt + output INCLUDING the eos whose text R lacks.
* Same text, several spellings: two trajectories may have the same visible text with different tokens (a GRPO
  group where one sample generated "H"+"ello" and another "Hello"). The key indexes a group with one Terminal
  per distinct token path; `retrieve` answers exactly only when the spelling is determined (one spelling, a `rid`,
  or a batch hand-out), otherwise `ambiguous` with the number of `alternatives`. Trajectories with the same text
  AND the same tokens share one Terminal that keeps each one's rid.
* Merge rule when paths overlap: "generated wins" (a later trajectory never turns generated tokens back into prompt
  tokens; its own generated range is written with its logprobs); the newest trajectory's routed-expert rows
  overwrite the path's rows where it has them, and a node remembers the weight version its rows were recorded
  under (or that they mix versions), which incremental R3 (`routed_experts_prefix`) needs;
  version/worker/last_access are updated along the whole path.
* Eviction removes leaves only, least recently used first, in three phases (stale weight version; fully retrieved
  or terminal-less; anything, past the hard budget), using lazily invalidated heaps: O(k log n) for k evictions.
  A lookup only stamps `last_access`; an entry popped with an older stamp is pushed again with the new one.

Where each part lives (read this docstring first, then tree.py):

* `tree.py`: `RadixTree` (insert, `match_text`/`match_tokens`, `retrieve`, `evict`, `peek_exact`,
  `stats`) and its records (`TrajectoryInput`, `InsertResult`, `PrefixMatch`, `Retrieved`,
  `EvictionReport`);
* `node.py`: `Node` and `Terminal`, the flag bits of a node's token codes, the byte-size estimates;
* `keys.py`: `text_key` (the cache's keyed identity of a text) and `text_digest` (the store's);
* `heaps.py`: `LeafHeaps`, the eviction order;
* the vocabulary table (`VocabBytes`) is router/core/vocab.py, shared with the tokenizer.
"""

from router.core.radix.keys import text_digest, text_key
from router.core.radix.node import (ALIAS_OVERHEAD, ANCHOR, MASK, MAX_ALIASES, NODE_OVERHEAD, SPLIT, TERMINAL_OVERHEAD,
                                    Node, Terminal)
from router.core.radix.tree import (EvictionReport, InsertResult, PrefixMatch, RadixTree, Retrieved,
                                    TrajectoryInput)

__all__ = ["ALIAS_OVERHEAD", "ANCHOR", "MASK", "MAX_ALIASES", "NODE_OVERHEAD", "SPLIT", "TERMINAL_OVERHEAD",
           "EvictionReport", "InsertResult", "Node", "PrefixMatch", "RadixTree", "Retrieved", "Terminal",
           "TrajectoryInput", "text_digest", "text_key"]
