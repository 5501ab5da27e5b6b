"""Exactness tests for router.core.radix (the text -> token trajectory cache; router/core/radix/).

The fake tokenizer has every single byte as a token plus multi-byte pieces, so most texts have several token
spellings (non-canonical tokenizations exist), "你" (3 bytes) is split 2+1 and 🙂 (4 bytes) 1+3 across tokens,
and <|im_end|> is the eos.
"""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from router.core.radix import (
    ALIAS_OVERHEAD,
    ANCHOR,
    MAX_ALIASES,
    MASK,
    NODE_OVERHEAD,
    TERMINAL_OVERHEAD,
    SPLIT,
    RadixTree,
    TrajectoryInput,
    text_key,
)
from router.core.vocab import VocabBytes

EXTRA = [b"ab", b"abc", b"bc", b"the", b" the", b"hello", b" world", b" wor", b"ld", b" answer", b"user",
         b"assistant", b"<|im_start|>", b"<|im_end|>", "好".encode(), "你".encode()[:2], "🙂".encode()[1:],
         b"\n\n", b"STOP", b"ab"]  # the second b"ab": two token ids with the same bytes (like some real vocabs)
VOCAB = [bytes([i]) for i in range(256)] + EXTRA
ID = {p: i for i, p in reversed(list(enumerate(VOCAB)))}  # enc() uses the first id of a duplicate
AB2 = len(VOCAB) - 1
EOS = ID[b"<|im_end|>"]
MAXLEN = max(map(len, VOCAB))
token_bytes = VocabBytes(VOCAB)
# The same vocabulary with a tokenizer that splits text after <|im_start|> and <|im_end|> (like Qwen's).
SPLIT_IDS = frozenset((ID[b"<|im_start|>"], EOS))
split_vocab = VocabBytes(VOCAB)
split_vocab.set_split_after(sorted(SPLIT_IDS))


def enc(text: bytes) -> list[int]:
    """Greedy longest match: the 'canonical' tokenization of this fake tokenizer."""
    out, i = [], 0
    while i < len(text):
        for n in range(min(MAXLEN, len(text) - i), 0, -1):
            if text[i:i + n] in ID:
                out.append(ID[text[i:i + n]])
                i += n
                break
    return out


def dec(ids) -> bytes:
    return b"".join(VOCAB[int(i)] for i in ids)


def traj(rid, prompt, output, lps=None, visible=None, version="1", worker="w0", finish="stop", r3=None):
    if lps is None:
        lps = -np.arange(1, len(output) + 1, dtype=np.float32) / 7
    if visible is None:
        out = output[:-1] if output and output[-1] == EOS else output
        visible = dec(prompt) + dec(out)
    return TrajectoryInput(rid=rid, prompt_ids=np.asarray(prompt, np.int32), output_ids=np.asarray(output, np.int32),
                           output_logprobs=np.asarray(lps, np.float32), visible_text=visible, weight_version=version,
                           worker=worker, finish=finish, routed_experts=r3)


P1 = b"<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"


def walk(tree):
    stack = list(tree.root.children.values())
    while stack:
        nd = stack.pop()
        yield nd
        stack.extend(nd.children.values())


def check_child_index(nd) -> None:
    """by_first keyed by the first token's bytes (a list only for several children with the same bytes);
    first_lens = the key lengths; every child's parent is nd."""
    kids = nd.kids()
    assert len({int(ch.tokens[0]) for ch in kids}) == len(kids)  # one child per first token id
    for key, v in nd.by_first.items():
        lst = v if isinstance(v, list) else [v]
        assert (len(lst) > 1) == isinstance(v, list)
        assert all(VOCAB[int(ch.tokens[0])] == key and ch.parent is nd for ch in lst)
    assert nd.first_lens == tuple(sorted({len(k) for k in nd.by_first}))


def check_invariants(tree: RadixTree) -> None:
    check_child_index(tree.root)
    total, nodes, tokens, terms = 0, 0, 0, 0
    for nd in walk(tree):
        n = nd.size
        assert n > 0 and nd.parent is not None
        assert nd.data.dtype == np.int32 and nd.data.shape == (2, n) and nd.data.flags.c_contiguous
        assert nd.r3 is None or (nd.r3.dtype == tree.routed_experts_dtype and nd.r3.shape[0] == n)
        assert nd.r3_known is None or (nd.r3 is not None and nd.r3_known.shape == (n,) and not nd.r3_known.all())
        # the node's text is derived from its tokens; only its length and keyed hash are kept
        assert nd.tlen == len(dec(nd.tokens)) and nd.thash == hash(dec(nd.tokens)) == hash(tree.node_text(nd))
        assert not np.any(nd.flags & ~np.uint8(MASK | ANCHOR | SPLIT))
        split = (nd.flags & SPLIT) != 0  # only after split tokens, only where the tree's tokenizer has them
        assert not split.any() or (tree._split_after is not None and tree._split_after[nd.tokens[split]].all())
        assert np.all(nd.logprobs[(nd.flags & MASK) == 0] == 0)
        assert bool(nd.kids()) == bool(nd.by_first)
        check_child_index(nd)
        for tm in nd.terminals:
            assert tm.node is nd and tm in tree._by_key[tm.key]
            assert len(tm.rids()) == len(set(tm.rids())) <= MAX_ALIASES
        terms += len(nd.terminals)
        nodes, tokens = nodes + 1, tokens + n
        total += (nd.data.nbytes + (nd.r3.nbytes if nd.r3 is not None else 0)
                  + (nd.r3_known.nbytes if nd.r3_known is not None else 0)
                  + NODE_OVERHEAD + TERMINAL_OVERHEAD * len(nd.terminals)
                  + ALIAS_OVERHEAD * sum(len(tm.rids()) - 1 for tm in nd.terminals))
    groups = list(tree._by_key.values())
    assert terms == sum(map(len, groups)) and all(groups)
    for g in groups:  # one Terminal per distinct token path of a text
        assert len({id(tm.node) for tm in g}) == len(g) and len({tm.key for tm in g}) == 1
    assert all(tm.node.parent is not None for g in groups for tm in g)
    for key, g in tree._by_key.items():
        assert all(tm.key == key for tm in g)
    s = tree.stats()
    assert (s["nodes"], s["tokens"], s["trajectories"]) == (nodes, tokens, terms)
    assert tree.nbytes == total == s["bytes"]


# ------------------------------------------------------------------------------------------------ fixed cases
def test_vocab_bytes_matches_join():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(VOCAB), 500)
    blob, lens = token_bytes(ids)
    assert blob == dec(ids) and lens.tolist() == [len(VOCAB[i]) for i in ids]
    assert token_bytes(np.zeros(0, np.int32))[0] == b""


def test_retrieve_prompt_plus_response_includes_eos():
    tree = RadixTree(token_bytes)
    p, o = enc(P1), enc(b" the answer") + [EOS]
    lps = np.array([-0.5, -0.25, -1.5, -0.125][:len(o)], np.float32)
    tree.insert(traj("r1", p, o, lps), now=1)
    r = tree.retrieve(P1 + b" the answer", now=2)  # R lacks the eos text
    assert r.exact and r.rid == "r1" and r.finish == "stop"
    assert r.tokens.tolist() == p + o and r.tokens[-1] == EOS
    assert r.logprobs.dtype == np.float32 and r.logprobs.tolist() == [0.0] * len(p) + lps.tolist()
    assert r.loss_mask.tolist() == [0] * len(p) + [1] * len(o)
    assert r.matched_bytes == len(P1 + b" the answer") and r.versions == ["1"]
    assert r.routed_experts is None
    check_invariants(tree)


def test_multi_turn_consumes_eos_once_and_keeps_segments():
    tree = RadixTree(token_bytes)
    p, o = enc(P1), enc(b" the answer") + [EOS]
    tree.insert(traj("t1", p, o, version="1"), now=1)
    c = b"\n<|im_start|>user\nhello again<|im_end|>\n<|im_start|>assistant\n"
    turn2 = P1 + b" the answer" + b"<|im_end|>" + c
    m = tree.match_text(turn2, now=2)
    assert m.tokens.tolist() == p + o and m.matched_bytes == len(turn2) - len(c) and m.worker == "w0"
    assert turn2[m.matched_bytes:] == c  # only C is left to tokenize
    p2, o2 = m.tokens.tolist() + enc(turn2[m.matched_bytes:]), enc(b"hello world") + [EOS]
    lps2 = np.linspace(-2, -0.1, len(o2)).astype(np.float32)
    res = tree.insert(traj("t2", p2, o2, lps2, version="2", worker="w1"), now=3)
    assert res.shared_tokens == len(p) + len(o) and res.splits == 0
    r = tree.retrieve(turn2 + b"hello world", now=4)
    assert r.exact and r.rid == "t2" and r.tokens.tolist() == p2 + o2
    nc = len(p2) - len(p) - len(o)
    assert r.loss_mask.tolist() == [0] * len(p) + [1] * len(o) + [0] * nc + [1] * len(o2)
    t1 = tree.retrieve(P1 + b" the answer", now=5)
    assert t1.exact and t1.rid == "t1" and t1.tokens.tolist() == p + o
    assert r.logprobs[:len(p) + len(o)].tolist() == t1.logprobs.tolist()
    assert r.logprobs[len(p) + len(o):len(p2)].tolist() == [0.0] * nc
    assert r.logprobs[len(p2):].tolist() == lps2.tolist()
    assert r.versions == ["1", "2"] and t1.versions == ["1"]
    assert tree.match_tokens(np.array(p2 + o2 + [5]), now=6).worker == "w1"
    check_invariants(tree)


def test_grpo_samples_share_the_prompt_node():
    tree = RadixTree(token_bytes)
    p = enc(P1)
    outs = [[ID[b"a"] + i] + enc(b" the answer" * (i + 1)) + [EOS] for i in range(8)]
    for i, o in enumerate(outs):
        tree.insert(traj(f"s{i}", p, o), now=i)
    s = tree.stats()
    assert s["nodes"] == 9 and s["tokens"] == len(p) + sum(map(len, outs)) and s["trajectories"] == 8
    assert len(tree.root.children) == 1 and len(next(iter(tree.root.children.values())).children) == 8
    for i, o in enumerate(outs):
        r = tree.retrieve(dec(p) + dec(o[:-1]), now=10)
        assert r.exact and r.rid == f"s{i}" and r.tokens.tolist() == p + o
        assert r.loss_mask.tolist() == [0] * len(p) + [1] * len(o)
    check_invariants(tree)


def test_unicode_split_across_tokens_and_mid_token_queries():
    tree = RadixTree(token_bytes)
    text = "你好🙂你".encode()
    o = enc(text) + [EOS]
    assert [VOCAB[i] for i in o[:4]] == ["你".encode()[:2], "你".encode()[2:], "好".encode(), b"\xf0"]
    p = enc(P1)
    tree.insert(traj("u", p, o), now=1)
    r = tree.retrieve(P1 + text, now=2)
    assert r.exact and dec(r.tokens) == P1 + text + b"<|im_end|>"
    assert r.tokens.tolist() == p + o
    for cut, ntok in [(1, 0), (2, 1), (3, 2), (5, 2), (6, 3), (7, 4), (8, 4), (10, 5)]:
        m = tree.match_text(P1 + text[:cut], now=3)
        assert m.tokens.tolist() == p + o[:ntok], cut
        assert m.matched_bytes == len(P1) + len(dec(o[:ntok]))
        part = tree.retrieve(P1 + text[:cut], now=3)
        assert not part.exact and part.tokens.tolist() == p + o[:ntok]
    check_invariants(tree)


def test_no_anchor_means_no_match_and_partial_retrieve():
    tree = RadixTree(token_bytes)
    p, o = enc(P1), enc(b" the answer") + [EOS]
    tree.insert(traj("r", p, o), now=1)
    inside_prompt = P1[:20]
    assert tree.match_text(inside_prompt, now=2).tokens.size == 0
    assert tree.match_text(inside_prompt, now=2).matched_bytes == 0
    assert tree.match_text(b"unrelated", now=2).tokens.size == 0
    # a different continuation of the same prompt matches the prompt end (an anchor), not further
    m = tree.match_text(P1 + b" another", now=2)
    assert m.tokens.tolist() == p and m.matched_bytes == len(P1)
    # a prompt sharing a prefix with the stored prompt: anchors_only refuses, any-boundary accepts (up to the
    # last whole token: "assistant" is one token and the query ends inside it)
    other = P1[:-3] + b"xyz"
    assert tree.match_text(other, now=2).tokens.size == 0
    loose = tree.match_text(other, now=2, anchors_only=False)
    assert dec(loose.tokens) == other[:loose.matched_bytes] and loose.matched_bytes == len(P1) - len(b"assistant\n")
    r = tree.retrieve(P1 + b" the ans", now=3)
    assert not r.exact and r.rid is None and r.matched_bytes == len(P1 + b" the")
    assert r.tokens.tolist() == p + o[:1] and r.loss_mask.tolist() == [0] * len(p) + [1]
    empty = tree.retrieve(b"nothing", now=3)
    assert not empty.exact and empty.tokens.size == 0 and empty.matched_bytes == 0
    check_invariants(tree)


def test_a_text_prompt_cuts_after_a_split_token_of_a_prompt_the_router_tokenized():
    """RL prompts share a long system prompt. A new prompt may cut after the last split token (<|im_start|> of the
    user turn) it shares with a prompt whose text the router tokenized itself (`tokenized_from`): a tokenizer
    splits text there, so those tokens are what tokenizing the new prompt would give. Never inside a prompt that
    came as ids, nor in the part of one that came from the cache; retrieve still calls such a cut inside a prompt."""
    head = b"<|im_start|>system\nthe answer<|im_end|>\n<|im_start|>"
    p1 = head + b"user\nhello<|im_end|>\n<|im_start|>assistant\n"
    p2 = head + b"user\nworld<|im_end|>\n<|im_start|>assistant\n"
    ids1, out = enc(p1), enc(b"the") + [EOS]
    after_end = ids1.index(EOS) + 1  # the first <|im_end|>: a cut there only takes "<|im_start|>" less
    for vocab, tokenized_from, expect in ((split_vocab, 0, len(head)), (split_vocab, after_end, len(head)),
                                          (split_vocab, len(enc(head)), 0), (split_vocab, None, 0),
                                          (token_bytes, 0, 0)):
        tree = RadixTree(vocab)
        tree.insert(TrajectoryInput(rid="r1", prompt_ids=ids1, output_ids=out, output_logprobs=[0.0] * len(out),
                                    visible_text=p1 + b"the", tokenized_from=tokenized_from), now=1)
        m = tree.match_text(p2, now=2)
        assert m.matched_bytes == expect, (tokenized_from, vocab is split_vocab)
        assert m.tokens.tolist() == ids1[:len(enc(head))][:len(m.tokens)] and dec(m.tokens) == p2[:expect]
        r = tree.retrieve(head, now=3)
        assert r.matched_bytes == len(head) and not r.anchored  # a cut inside r1's prompt: not exact
        check_invariants(tree)


def test_non_canonical_engine_tokenization_is_preserved():
    tree = RadixTree(token_bytes)
    p = enc(P1)
    o = [ID[b"a"], ID[b"b"], ID[b"c"], ID[b" "], ID[b"t"], ID[b"h"], ID[b"e"], EOS]
    assert enc(dec(o)) != o  # greedy would give [abc, ' the', eos]
    tree.insert(traj("nc", p, o), now=1)
    r = tree.retrieve(P1 + b"abc the", now=2)
    assert r.exact and r.tokens.tolist() == p + o
    m = tree.match_text(P1 + b"abc the<|im_end|>\nnext", now=3)
    assert m.tokens.tolist() == p + o
    # the same text generated canonically by a later sample: both spellings cached, the newer wins ties, and a
    # retrieve without a rid says it is ambiguous instead of answering one of them as exact
    canon = enc(b"abc the") + [EOS]
    tree.insert(traj("canon", p, canon), now=4)
    amb = tree.retrieve(P1 + b"abc the", now=5)
    assert amb.ambiguous and not amb.exact and amb.alternatives == 2 and amb.rid is None
    assert amb.tokens.tolist() == p + canon
    for rid, want in (("nc", o), ("canon", canon)):
        r = tree.retrieve(P1 + b"abc the", now=5, rid=rid)
        assert r.exact and not r.ambiguous and r.rid == rid and r.tokens.tolist() == p + want
    assert not tree.retrieve(P1 + b"abc the", now=5, rid="other").exact
    given: set = set()
    for want in (o, canon):  # a batch hands out each spelling once, oldest first
        r = tree.retrieve(P1 + b"abc the", now=5, handed_out=given)
        assert r.exact and r.tokens.tolist() == p + want
        given.add(r.rid)
    assert tree.retrieve(P1 + b"abc the", now=5, handed_out=given).ambiguous
    assert tree.match_text(P1 + b"abc the<|im_end|>", now=6).tokens.tolist() == p + canon
    assert tree.stats()["trajectories"] == 2
    # two token ids with the same bytes: both branches are explored, the longer match wins
    tree.insert(traj("dup1", p, [ID[b"ab"], ID[b"c"]], finish="length"), now=7)
    tree.insert(traj("dup2", p, [AB2, ID[b"c"], ID[b"d"], ID[b"e"], EOS]), now=8)
    tree.match_tokens(np.array(p + [ID[b"ab"]]), now=9)  # make dup1's branch the most recently used
    m = tree.match_text(P1 + b"abcde<|im_end|>", now=10)
    assert m.tokens.tolist() == p + [AB2, ID[b"c"], ID[b"d"], ID[b"e"], EOS]
    check_invariants(tree)


def test_stop_string_trimming_mid_token():
    tree = RadixTree(token_bytes)
    p = enc(P1)
    o = [ID[b"hello"], ID[b" wor"], ID[b"ld"], ID[b"STOP"]]
    tree.insert(traj("s", p, o, visible=P1 + b"hello wo"), now=1)  # visible text ends inside " wor"
    r = tree.retrieve(P1 + b"hello wo", now=2)
    assert r.exact and r.tokens.tolist() == p + o and r.loss_mask.sum() == 4
    assert not tree.retrieve(P1 + b"hello wor", now=2).exact
    check_invariants(tree)


def test_text_recovered_only_by_a_later_prompt_is_not_anchored():
    """RELIABILITY.md open item 2: turn 1 stopped inside a UTF-8 character, so its visible text shows U+FFFD
    and turn 2's prompt leaves turn 1's path there (fresh bytes EF BF BD). After turn 1 is evicted, its text
    is still covered -- by turn 2's prompt tokens, cut where no generation started or ended: `anchored` is
    False (the endpoint reports exact: false). A spelling of the same text that ends on an anchor wins."""
    tree = RadixTree(token_bytes)
    p = enc(P1)
    o1 = [ID[b"hello"], ID["你".encode()[:2]]]  # finish=length inside "你"
    t1 = P1 + b"hello\xef\xbf\xbd"  # what the detokenizer shows
    tree.insert(traj("t1", p, o1, visible=t1, finish="length"), now=1)
    assert tree.retrieve(t1, now=2).exact
    p2 = p + [ID[b"hello"]] + enc(b"\xef\xbf\xbd<|im_end|>\n<|im_start|>user\nmore")
    tree.insert(traj("t2", p2, enc(b"abc") + [EOS]), now=4)
    rep = tree.evict(budget_bytes=0, hard_budget_bytes=10**9)  # only t1 was retrieved
    assert rep.rids == ["t1"]
    r = tree.retrieve(t1, now=5)
    assert not r.exact and r.matched_bytes == len(t1)  # fully covered...
    assert r.tokens.tolist() == p2[:len(p) + 4] and r.loss_mask.tolist() == [0] * len(p) + [1, 0, 0, 0]
    assert not r.anchored  # ...but inside turn 2's prompt
    assert tree.retrieve(dec(p2), now=5).anchored  # turn 2's whole prompt: a generation started there
    assert tree.retrieve(P1 + b"hello", now=5).anchored  # after turn 1's generated token (still cached)
    assert not tree.retrieve(P1 + b"hello\xef", now=5).anchored
    # another spelling of turn 1's text ending on an anchor (a prompt that is exactly that text; less recently
    # used than turn 2's path, so the any-boundary walk alone would pick turn 2's)
    p3 = p + enc(b"hel") + [ID[b"l"], ID[b"o"], 0xEF, 0xBF, 0xBD]
    assert dec(p3) == t1
    tree.insert(traj("t3", p3, [ID[b"a"]], finish="length"), now=3)
    r = tree.retrieve(t1, now=6)
    assert not r.exact and r.anchored and r.tokens.tolist() == p3 and r.matched_bytes == len(t1)
    check_invariants(tree)


def test_routed_experts_rows_and_stitching():
    L, K = 3, 2
    rng = np.random.default_rng(1)
    tree = RadixTree(token_bytes)
    p, o = enc(P1), enc(b" the answer") + [EOS]
    n1 = len(p) + len(o)
    a = rng.integers(0, 64, (n1 - 1, L, K)).astype(np.int32)
    tree.insert(traj("t1", p, o, r3=a), now=1)
    r = tree.retrieve(P1 + b" the answer", now=2)
    assert r.routed_experts.shape == (n1 - 1, L, K) and np.array_equal(r.routed_experts, a)
    # turn 2 reports only its new rows ("addition R3"): unknown rows are -1 and must not overwrite turn 1's
    c = b"\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"
    p2, o2 = p + o + enc(c), enc(b"hello") + [EOS]
    n2 = len(p2) + len(o2)
    b = rng.integers(0, 64, (n2 - 1, L, K)).astype(np.int32)
    b[:n1 - 1] = -1
    v2 = P1 + b" the answer<|im_end|>" + c + b"hello"
    tree.insert(traj("t2", p2, o2, r3=b), now=3)
    r2 = tree.retrieve(v2, now=4)
    want = np.concatenate([a, b[n1 - 1:]])
    assert np.array_equal(r2.routed_experts, want)
    assert np.array_equal(tree.retrieve(P1 + b" the answer", now=4).routed_experts, a)
    # turn 3 without rows: its new tokens' rows are unknown -> None; earlier turns unaffected
    p3, o3 = p2 + o2, enc(b"ab") + [EOS]
    tree.insert(traj("t3", p3, o3), now=5)
    assert tree.retrieve(v2 + b"<|im_end|>ab", now=6).routed_experts is None
    assert np.array_equal(tree.retrieve(v2, now=6).routed_experts, want)
    # a newer trajectory's rows overwrite where it has them (GRPO sibling sharing the prompt)
    o4 = enc(b"hello") + [EOS]
    d = rng.integers(0, 64, (len(p) + len(o4) - 1, L, K)).astype(np.int32)
    tree.insert(traj("t4", p, o4, r3=d), now=7)
    assert np.array_equal(tree.retrieve(P1 + b"hello", now=8).routed_experts, d)
    assert np.array_equal(tree.retrieve(P1 + b" the answer", now=8).routed_experts[:len(p)], d[:len(p)])
    with pytest.raises(ValueError):
        tree.insert(traj("bad", p, o, r3=np.zeros((n1 - 1, L + 1, K), np.int32)), now=9)
    check_invariants(tree)


def _leafy_tree():
    """Five independent single-node trajectories with known version / retrieval / recency."""
    tree = RadixTree(token_bytes)
    spec = [("A", "1", False, 1), ("B", "2", True, 2), ("C", "2", False, 3), ("D", "2", True, 4), ("E", "1", False, 5)]
    nodes = {}
    for rid, ver, _, t in spec:
        p = enc(f"<|im_start|>{rid}{rid}\n".encode())
        tree.insert(traj(rid, p, enc(b"abc") + [EOS], version=ver), now=t)
        nodes[rid] = tree._by_key[text_key(dec(p) + b"abc")][0].node
    for rid, _, retrieved, _ in spec:
        if retrieved:
            assert tree.retrieve(f"<|im_start|>{rid}{rid}\nabc".encode(), now=100).exact
    return tree, nodes


def test_eviction_order_and_budgets():
    tree, nodes = _leafy_tree()
    size = {k: nd.nbytes() for k, nd in nodes.items()}
    stale = lambda v: v == "1"  # noqa: E731
    start = tree.nbytes
    rep = tree.evict(budget_bytes=start - 1, hard_budget_bytes=10**9, stale_versions=stale)
    assert rep.rids == ["A"] and rep.evicted_stale == 1 and rep.freed_bytes == size["A"]
    rep = tree.evict(budget_bytes=tree.nbytes - size["E"] - 1, hard_budget_bytes=10**9, stale_versions=stale)
    assert rep.rids == ["E", "B"] and rep.evicted_stale == 1 and rep.evicted_retrieved == 1
    rep = tree.evict(budget_bytes=0, hard_budget_bytes=10**9, stale_versions=stale)
    assert rep.rids == ["D"] and rep.evicted_unretrieved == 0  # C is unretrieved: kept below the hard budget
    assert tree.retrieve(b"<|im_start|>CC\nabc", now=101).exact  # and now it is retrieved
    tree2, _ = _leafy_tree()
    rep = tree2.evict(budget_bytes=0, hard_budget_bytes=0)
    assert rep.rids == ["B", "D", "A", "C", "E"]  # no stale predicate: retrieved LRU, then unretrieved LRU
    assert rep.evicted_unretrieved == 3 and tree2.stats()["evicted_unretrieved"] == 3
    assert tree2.nbytes == 0 and tree2.stats()["nodes"] == 0 and tree2.stats()["trajectories"] == 0
    check_invariants(tree2)


def test_eviction_recency_parents_and_nbytes_to_zero():
    tree = RadixTree(token_bytes)
    p = enc(P1)
    for i in range(4):
        tree.insert(traj(f"g{i}", p, [ID[b"a"] + i, EOS]), now=i)
    tree.match_text(P1 + b"a<|im_end|>", now=50)  # g0 is now the most recently used
    for i in range(4):
        tree.retrieve(P1 + bytes([ord("a") + i]), now=60)
    start = tree.nbytes
    rep = tree.evict(budget_bytes=start - 1, hard_budget_bytes=start)
    assert rep.rids == ["g1"]
    rep = tree.evict(budget_bytes=0, hard_budget_bytes=0)
    assert rep.rids == ["g2", "g3", "g0"] and rep.nodes == 4  # the prompt node went last, after its children
    assert tree.nbytes == 0 and not tree.root.children and not tree._by_key
    check_invariants(tree)


def test_a_stale_parent_exposed_by_evicting_its_retrieved_child_goes_too():
    """Found by the state machine below: a stale (old weight version) turn whose only child, a retrieved
    next turn, is evicted becomes a leaf after the stale phase ran; it must still go before anything is kept
    over the budget (phases 1-2 repeat until neither evicts more)."""
    tree = RadixTree(token_bytes)
    p = enc(P1)
    turn1 = traj("t1", p, [ID[b"a"], EOS], version="2")
    tree.insert(turn1, now=1)
    # the next turn, answered by a worker still on an older version: turn 1's node keeps the newer one
    tree.insert(traj("t2", p + [ID[b"a"], EOS] + enc(b"\n<|im_start|>b"), [ID[b"c"], EOS], version="1"), now=2)
    assert tree.retrieve(P1 + b"a<|im_end|>\n<|im_start|>bc", now=3).exact
    rep = tree.evict(budget_bytes=0, hard_budget_bytes=10**9, stale_versions=lambda v: v == "2")
    assert rep.rids == ["t2", "t1"] and tree.nbytes == 0 and rep.evicted_stale == 1 and rep.evicted_retrieved == 1
    check_invariants(tree)


def test_superseded_and_retouched_terminals_keep_heaps_consistent():
    tree = RadixTree(token_bytes)
    p = enc(P1)
    for i in range(300):  # many touches of the same leaves -> heap compaction path
        tree.insert(traj(f"x{i}", p, [ID[b"a"] + i % 3, EOS], version=str(i // 100)), now=i)
        tree.match_tokens(np.array(p + [ID[b"a"]]), now=i)
    assert tree.stats()["trajectories"] == 3 and tree._leaves.entries <= 4 * tree.stats()["nodes"] + 1024
    rep = tree.evict(budget_bytes=0, hard_budget_bytes=0, stale_versions=lambda v: v != "2")
    assert rep.nodes == 4 and tree.nbytes == 0
    check_invariants(tree)


@pytest.mark.parametrize("shape", ["grpo", "tiny_nodes", "multi_turn_r3"])
def test_nbytes_tracks_real_memory(shape):
    """nbytes (numpy data + fixed per-node/terminal estimates) within 30% of what tracemalloc sees."""
    rng = np.random.default_rng(2)
    system = rng.integers(300, 5000, 120).tolist()
    big = VocabBytes([b"tok%d" % i for i in range(5000)])
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tree = RadixTree(big)
    for i in range(30 if shape == "multi_turn_r3" else 100):
        prompt = system + rng.integers(300, 5000, int(rng.integers(50, 300))).tolist()
        for s in range(8):
            p = prompt
            for turn in range(3 if shape == "multi_turn_r3" else 1):
                n = int(rng.integers(1, 5)) if shape == "tiny_nodes" else int(rng.integers(20, 200))
                out = rng.integers(300, 5000, n).tolist()
                r3 = rng.integers(0, 64, (len(p) + n - 1, 2, 4)) if shape == "multi_turn_r3" else None
                visible = big(np.array(p + out[:-1]))[0] if s % 2 else b"%d.%d.%d" % (i, s, turn)
                tree.insert(TrajectoryInput(rid=f"{i}.{s}", prompt_ids=p, output_ids=out, routed_experts=r3,
                                            output_logprobs=np.zeros(n, np.float32), visible_text=visible), now=i)
                p = p + out + rng.integers(300, 5000, 30).tolist()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert 0.7 < tree.nbytes / used < 1.3, (tree.nbytes, used)
    tree.evict(budget_bytes=0, hard_budget_bytes=0)
    assert tree.nbytes == 0 and tree.stats()["nodes"] == 0


def test_version_is_newest_not_last_written():
    tree = RadixTree(token_bytes)
    p = enc(P1)
    tree.insert(traj("new", p, enc(b"ab") + [EOS], version="7"), now=1)
    tree.insert(traj("straggler", p, enc(b"bc") + [EOS], version="6"), now=2)  # older weights, finished later
    prompt_node = next(iter(tree.root.children.values()))
    assert prompt_node.version == "7"
    rep = tree.evict(budget_bytes=0, hard_budget_bytes=10**9, stale_versions=lambda v: v == "6")
    assert rep.rids == ["straggler"] and rep.evicted_stale == 1  # the shared prompt node is not stale
    assert tree.retrieve(P1 + b"ab", now=3).exact


def test_visible_text_not_spelled_by_tokens_is_retrieved_by_its_key():
    tree = RadixTree(token_bytes)
    p, o = enc(P1), enc(b"hello") + [EOS]
    tree.insert(traj("odd", p, o, visible=P1 + b"hell\xef\xbf\xbd"), now=1)  # detokenizer output differs
    tree.insert(traj("ok", p, enc(b"abc") + [EOS]), now=2)
    r = tree.retrieve(P1 + b"hell\xef\xbf\xbd", now=3)
    assert r.exact and r.rid == "odd" and r.tokens.tolist() == p + o
    r = tree.retrieve(P1 + b"hel", now=4)
    assert not r.exact and r.tokens.tolist() == p  # "hello" is one token: "hel" stops at the prompt
    assert tree.retrieve(P1 + b"abc", now=5).rid == "ok"


def test_text_key_halves_are_independent_keyed_hashes():
    """The two 64-bit halves of a text's key come from different inputs: neither is a function of the other's
    value, and texts differing anywhere (or only in length) get different keys."""
    texts = [b"", b"\x00", b"a", b"a\x00", P1, P1 + b"x", b"x" + P1]
    keys = [text_key(t) for t in texts]
    assert len(set(keys)) == len(texts)
    assert len({k >> 64 for k in keys}) == len(texts) and len({k & ((1 << 64) - 1) for k in keys}) == len(texts)
    assert all(k >> 64 != k & ((1 << 64) - 1) for k in keys)


def test_eviction_pops_only_what_it_evicts(monkeypatch):
    import router.core.radix.heaps as radix

    tree = RadixTree(token_bytes)
    for i in range(2000):
        tree.insert(traj(f"x{i}", enc(b"<|im_start|>%d\n" % i), [ID[b"a"], EOS]), now=i)
    pops = []
    real = radix.heapq.heappop
    monkeypatch.setattr(radix.heapq, "heappop", lambda h: pops.append(1) or real(h))
    monkeypatch.setattr(radix.heapq, "heapify", lambda h: pytest.fail("no re-sort on evict"))
    rep = tree.evict(budget_bytes=tree.nbytes - 1, hard_budget_bytes=tree.nbytes - 1)
    assert rep.rids == ["x0"] and rep.evicted_unretrieved == 1 and len(pops) == 1
    pops.clear()
    five = sum(tree._by_key[text_key(b"<|im_start|>%d\na" % i)][0].node.nbytes() for i in range(1, 6))
    rep = tree.evict(budget_bytes=0, hard_budget_bytes=tree.nbytes - five)
    assert len(pops) == rep.nodes and rep.rids == ["x1", "x2", "x3", "x4", "x5"]


def test_rejects_malformed_trajectories():
    tree = RadixTree(token_bytes)
    with pytest.raises(ValueError):
        tree.insert(traj("e", [], [], lps=[]), now=0)
    with pytest.raises(ValueError):
        tree.insert(traj("l", [1, 2], [3], lps=[0.0, 0.0]), now=0)
    assert tree.nbytes == 0


# ------------------------------------------------------------------------------------------------ stateful
SMALL = [ID[x] for x in (b"a", b"b", b"c", b"ab", b"abc", b"bc", "你".encode()[:2], b"\xa0", b"\xf0",
                         "🙂".encode()[1:], b"\n", b"<|im_start|>")] + [AB2]
TOK = st.sampled_from(SMALL)
SEQ = st.lists(TOK, min_size=0, max_size=6)


class Rec:
    def __init__(self, idx, rid, toks, P, lps, r3, visible, version, split_from=None):
        self.idx, self.rid, self.toks, self.P, self.lps, self.r3 = idx, rid, toks, P, lps, r3
        self.visible, self.version, self.split_from = visible, version, split_from
        self.alive_len, self.term_alive = len(toks), True

    def cut_after(self, b: int) -> bool:
        """A text prompt may cut after this trajectory's first b tokens: a generation boundary, or a split token
        in the part of the prompt the router tokenized itself."""
        return b >= self.P or (self.split_from is not None and self.split_from < b
                               and self.toks[b - 1] in SPLIT_IDS)


def cached_prefix_len(tree, toks) -> int:
    """Length of the longest cached prefix, walking the tree without touching it."""
    node, pos = tree.root, 0
    while pos < len(toks):
        ch = node.children.get(toks[pos])
        if ch is None:
            return pos
        k = 0
        while k < ch.tokens.size and pos + k < len(toks) and int(ch.tokens[k]) == toks[pos + k]:
            k += 1
        pos += k
        if k < ch.tokens.size:
            return pos
        node = ch
    return pos


class RadixMachine(RuleBasedStateMachine):
    """Random insert / match_text / match_tokens / retrieve / evict against a list-of-trajectories model."""

    @initialize()
    def setup(self):
        self.tree = RadixTree(split_vocab)
        self.recs: list[Rec] = []
        self.now = 0.0
        self.r3_seen = False

    def tick(self):
        self.now += 1.0
        return self.now

    def contributors(self, S, j):
        return [r for r in self.recs if r.alive_len > j and len(r.toks) > j and r.toks[:j + 1] == S[:j + 1]]

    def expected_arrays(self, S):
        mask, lps, rows = [], [], []
        for j in range(len(S)):
            gen = [r for r in self.contributors(S, j) if j >= r.P]
            mask.append(1 if gen else 0)
            g = max(gen, key=lambda r: r.idx) if gen else None
            lps.append(float(g.lps[j - g.P]) if g else 0.0)
            if j < len(S) - 1:
                have = [r for r in self.contributors(S, j) if r.r3 is not None and j < len(r.toks) - 1
                        and r.r3[j, 0, 0] >= 0]
                rows.append(max(have, key=lambda r: r.idx).r3[j] if have else None)
        if not self.r3_seen:
            r3 = None
        elif any(x is None for x in rows):
            r3 = None
        else:
            r3 = np.array(rows, np.int32).reshape(len(rows), 2, 2)
        return mask, lps, r3

    def prefixes(self):
        """tuple(token prefix) -> anchored?, over everything still cached."""
        out: dict[tuple, bool] = {}
        for r in self.recs:
            for b in range(1, r.alive_len + 1):
                key = tuple(r.toks[:b])
                out[key] = out.get(key, False) or b >= r.P
        return out

    def cuts(self):
        """tuple(token prefix) -> may a text prompt cut after it?, over everything still cached."""
        out: dict[tuple, bool] = {}
        for r in self.recs:
            for b in range(1, r.alive_len + 1):
                key = tuple(r.toks[:b])
                out[key] = out.get(key, False) or r.cut_after(b)
        return out

    def best_text_match(self, text, anchors_only):
        best = 0
        for key, cut in (self.cuts() if anchors_only else self.prefixes()).items():
            t = dec(key)
            if (cut or not anchors_only) and text.startswith(t):
                best = max(best, len(t))
        return best

    # -------------------------------------------------------------------------------------------- rules
    @rule(data=st.data(), extend=st.booleans(), version=st.sampled_from(["1", "2", "3"]),
          vis=st.sampled_from(["full", "strip", "trim", "differ"]), with_r3=st.sampled_from(["none", "full", "partial"]))
    def insert(self, data, extend, version, vis, with_r3):
        base = []
        if extend and self.recs:
            base = list(data.draw(st.sampled_from(self.recs)).toks)
        prompt = base + data.draw(SEQ)
        output = data.draw(SEQ) + data.draw(st.sampled_from([[], [EOS]]))
        if not prompt + output:
            output = [EOS]
        toks = prompt + output
        text = dec(toks)
        if vis == "strip" and output and output[-1] == EOS:
            visible = text[:-len(b"<|im_end|>")]
        elif vis == "trim":
            visible = text[:len(text) - data.draw(st.integers(0, min(3, len(text))))]
        elif vis == "differ":  # not a prefix of the token text (e.g. detokenizer replaced a byte)
            visible = text[:data.draw(st.integers(0, len(text)))] + data.draw(st.sampled_from([b"?", b"\xef\xbf\xbd"]))
        else:
            visible = text
        lps = np.array(data.draw(st.lists(st.integers(-1000, 0), min_size=len(output), max_size=len(output))),
                       np.float32) / 64
        r3 = None
        if with_r3 != "none" and len(toks) > 1:
            r3 = np.array(data.draw(st.lists(st.integers(0, 7), min_size=4 * (len(toks) - 1),
                                             max_size=4 * (len(toks) - 1))), np.int32).reshape(-1, 2, 2)
            if with_r3 == "partial":
                r3[:data.draw(st.integers(0, len(toks) - 1))] = -1
            self.r3_seen = True
        idx = len(self.recs)
        shared = max([0] + [_lcp(r.toks[:r.alive_len], toks) for r in self.recs])
        split_from = data.draw(st.one_of(st.none(), st.integers(0, len(prompt))))  # None: the prompt came as ids
        rec = Rec(idx, f"r{idx}", toks, len(prompt), lps, r3, visible, version, split_from)
        res = self.tree.insert(TrajectoryInput(rid=rec.rid, prompt_ids=prompt, output_ids=output, output_logprobs=lps,
                                               visible_text=visible, weight_version=version, worker=f"w{idx % 3}",
                                               routed_experts=r3, tokenized_from=split_from), now=self.tick())
        assert res.replaced_rid is None  # other spellings never replace each other; aliases stay under MAX_ALIASES
        assert res.shared_tokens == shared and res.new_tokens == len(toks) - shared
        same = any(r.term_alive and r.visible == visible and r.toks == toks for r in self.recs)
        event(f"insert splits={min(res.splits, 2)} shared={res.shared_tokens > 0} same_spelling={same}")
        self.recs.append(rec)

    @rule(data=st.data(), anchors_only=st.booleans())
    def match_text(self, data, anchors_only):
        text = self.draw_text(data)
        m = self.tree.match_text(text, now=self.tick(), anchors_only=anchors_only)
        assert m.matched_bytes == self.best_text_match(text, anchors_only)
        event(f"match_text anchors_only={anchors_only} hit={m.matched_bytes > 0}")
        toks = tuple(m.tokens.tolist())
        assert dec(toks) == text[:m.matched_bytes]
        if toks:
            assert self.cuts()[toks] or not anchors_only

    @rule(data=st.data())
    def match_tokens(self, data):
        q = self.draw_tokens(data)
        m = self.tree.match_tokens(np.array(q, np.int32), now=self.tick())
        want = max([0] + [_lcp(r.toks[:r.alive_len], q) for r in self.recs])
        assert m.tokens.tolist() == q[:want] and m.matched_bytes == len(dec(q[:want]))

    def terminals(self) -> list[tuple[Rec, Rec]]:
        """(first, latest) alive record per (visible text, tokens): the tree's Terminals, in creation order."""
        groups: dict = {}
        for r in self.recs:
            if r.term_alive:
                first, _ = groups.get((r.visible, tuple(r.toks)), (r, r))
                groups[(r.visible, tuple(r.toks))] = (first, r)
        return list(groups.values())

    def versions_before(self, S, *, strict: bool) -> list:
        prev = sorted((t for t in self.terminals() if (len(t[0].toks) < len(S) if strict else len(t[0].toks) <= len(S))
                       and t[0].toks == S[:len(t[0].toks)]), key=lambda t: (len(t[0].toks), t[0].idx))
        return [latest.version for _, latest in prev]

    @rule(data=st.data(), how=st.sampled_from(["plain", "rid", "handout"]))
    def retrieve(self, data, how):
        text = self.draw_text(data)
        spellings = [t for t in self.terminals() if t[0].visible == text]  # oldest latest-insert first
        spellings.sort(key=lambda t: t[1].idx)
        rid = handed = None
        if how == "rid" and spellings:
            pick = data.draw(st.sampled_from([r for r in self.recs if r.term_alive and r.visible == text]))
            rid, chosen = pick.rid, next(t for t in spellings if t[0].toks == pick.toks)
        elif how == "handout" and spellings:
            k = data.draw(st.integers(0, len(spellings)))
            handed = {t[1].rid for t in spellings[:k]}
            chosen = spellings[k] if k < len(spellings) else spellings[-1]
        elif spellings:
            chosen = spellings[-1]
        r = self.tree.retrieve(text, now=self.tick(), rid=rid, handed_out=handed)
        if spellings:
            first, latest = chosen
            determined = len(spellings) == 1 or rid is not None or (handed is not None and len(handed) < len(spellings))
            assert r.exact == determined and r.ambiguous == (not determined) and r.alternatives == len(spellings)
            assert r.rid == (latest.rid if rid is None else rid) if determined else r.rid is None
            assert r.tokens.tolist() == first.toks
            assert r.matched_bytes == len(text) and r.anchored
            assert r.versions == list(dict.fromkeys(self.versions_before(first.toks, strict=True) + [latest.version]))
        else:
            assert not r.exact and r.rid is None
            assert r.matched_bytes == self.best_text_match(text, anchors_only=False)
            assert dec(r.tokens) == text[:r.matched_bytes]
            S = r.tokens.tolist()
            # anchored: the match ends where some cached trajectory's generation started or ended; a whole-text
            # match is anchored whenever any cached spelling of the text is
            assert r.anchored == (bool(S) and self.prefixes()[tuple(S)])
            if text and r.matched_bytes == len(text):
                anchored_spellings = sum(a and dec(k) == text for k, a in self.prefixes().items())
                assert r.anchored == (anchored_spellings > 0)
                assert r.alternatives == max(anchored_spellings, 1)
                assert r.ambiguous == (anchored_spellings > 1)
            else:
                assert r.alternatives == 0 and not r.ambiguous
            assert r.versions == list(dict.fromkeys(self.versions_before(S, strict=False)))
        mask, lps, r3 = self.expected_arrays(r.tokens.tolist())
        event(f"retrieve {how} exact={r.exact} ambiguous={r.ambiguous} r3={r3 is not None}")
        assert r.loss_mask.tolist() == mask and r.logprobs.tolist() == lps
        if r3 is None:
            assert r.routed_experts is None
        else:
            assert r.routed_experts is not None and np.array_equal(r.routed_experts, r3)

    @rule(frac=st.sampled_from([0.0, 0.3, 0.7, 0.95]), hard=st.sampled_from([0.0, 0.5, 2.0]),
          stale=st.sampled_from([None, "1", "2"]))
    def evict(self, frac, hard, stale):
        before = self.tree.nbytes
        budget = int(before * frac)
        hard_budget = int(max(budget, before * hard))
        pred = None if stale is None else (lambda v, s=stale: v == s)
        rep = self.tree.evict(budget_bytes=budget, hard_budget_bytes=hard_budget, stale_versions=pred)
        assert before - self.tree.nbytes == rep.freed_bytes and self.tree.nbytes <= hard_budget
        if self.tree.nbytes > budget:  # only leaves holding a never-retrieved, non-stale trajectory are left
            for nd in walk(self.tree):
                if not nd.children:
                    assert any(not t.retrieved for t in nd.terminals) and nd.version != stale
        for r in self.recs:
            r.alive_len = min(r.alive_len, cached_prefix_len(self.tree, r.toks))
        gone = sorted(r.rid for r in self.recs if r.term_alive and r.alive_len < len(r.toks))
        assert sorted(rep.rids) == gone
        event(f"evict nodes>0={rep.nodes > 0} unretrieved={rep.evicted_unretrieved > 0} stale={rep.evicted_stale > 0}")
        for r in self.recs:
            if r.rid in gone:
                r.term_alive = False

    # -------------------------------------------------------------------------------------------- helpers
    def draw_text(self, data) -> bytes:
        mode = data.draw(st.sampled_from(["visible", "token_text", "prefix", "extended", "random"]))
        if not self.recs or mode == "random":
            return dec(data.draw(SEQ))
        r = data.draw(st.sampled_from(self.recs[-8:] + self.recs))  # recent ones are more likely cached
        if mode == "visible":
            return r.visible
        if mode == "token_text":
            return dec(r.toks)
        base = data.draw(st.sampled_from([r.visible, dec(r.toks)]))
        if mode == "prefix":
            return base[:data.draw(st.integers(0, len(base)))]
        return base + dec(data.draw(SEQ))

    def draw_tokens(self, data) -> list[int]:
        if self.recs and data.draw(st.booleans()):
            r = data.draw(st.sampled_from(self.recs))
            return r.toks[:data.draw(st.integers(0, len(r.toks)))] + data.draw(SEQ)
        return data.draw(SEQ)

    @invariant()
    def consistent(self):
        if hasattr(self, "tree"):
            check_invariants(self.tree)
            # the tree holds exactly the union of the still-cached prefixes
            assert self.tree.stats()["tokens"] == len(self.prefixes())


def _lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


RadixMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestRadixStateful = RadixMachine.TestCase


# ------------------------------------------------------------------------------------------------ R3 width
def test_routed_experts_are_stored_narrow_and_widened_never_truncated():
    """Ids that fit a byte are stored as uint8; a later id above 255 widens every node to uint16 (and above
    65535 to int32), and every earlier row still reads back exactly."""
    rng = np.random.default_rng(5)
    tree = RadixTree(token_bytes)
    p = enc(P1)
    o1, o2, o3 = enc(b"ab") + [EOS], enc(b"bc") + [EOS], enc(b" the") + [EOS]
    a = rng.integers(0, 256, (len(p) + len(o1) - 1, 2, 2)).astype(np.int32)
    tree.insert(traj("t1", p, o1, r3=a), now=1)
    assert tree.routed_experts_dtype == np.uint8
    assert all(nd.r3.dtype == np.uint8 for nd in walk(tree) if nd.r3 is not None)
    before = tree.nbytes
    b = rng.integers(0, 300, (len(p) + len(o2) - 1, 2, 2)).astype(np.int32)
    b[0, 0, 0] = 299
    tree.insert(traj("t2", p, o2, r3=b), now=2)
    assert tree.routed_experts_dtype == np.uint16 and tree.nbytes > before
    check_invariants(tree)
    r1, r2 = tree.retrieve(P1 + b"ab", now=3), tree.retrieve(P1 + b"bc", now=4)
    # t2 overwrote the shared prompt rows (newest wins); t1's own generated rows are intact
    assert np.array_equal(r2.routed_experts, b) and r2.routed_experts.dtype == np.uint16
    assert np.array_equal(r1.routed_experts[len(p):], a[len(p):])
    c = np.full((len(p) + len(o3) - 1, 2, 2), 70000, np.int32)
    tree.insert(traj("t3", p, o3, r3=c), now=5)
    assert tree.routed_experts_dtype == np.int32
    assert np.array_equal(tree.retrieve(P1 + b" the", now=6).routed_experts, c)
    assert np.array_equal(tree.retrieve(P1 + b"ab", now=7).routed_experts[len(p):], a[len(p):])
    with pytest.raises(ValueError, match="negative expert id"):
        bad = b.copy()
        bad[1, 1, 1] = -5
        tree.insert(traj("bad", p, o2, r3=bad), now=8)


def test_num_experts_sets_the_starting_width():
    assert RadixTree(token_bytes, num_experts=256).routed_experts_dtype == np.uint8
    assert RadixTree(token_bytes, num_experts=257).routed_experts_dtype == np.uint16


def test_routed_experts_prefix_needs_known_rows_under_one_weight_version():
    rng = np.random.default_rng(6)
    tree = RadixTree(token_bytes)
    p = enc(P1)
    o = enc(b"hello") + [EOS]
    n = len(p) + len(o)
    a = rng.integers(0, 64, (n - 1, 2, 2)).astype(np.int32)
    tree.insert(traj("t1", p, o, r3=a, version="1"), now=1)
    nxt = p + o + enc(b"\n<|im_start|>user\nmore")
    rows = tree.routed_experts_prefix(np.array(nxt), version="1")
    assert rows.shape == (n - 1, 2, 2) and np.array_equal(rows, a)  # all but the last token's row
    assert tree.routed_experts_prefix(np.array(nxt), version="2") is None
    # a second trajectory under version 2 reports rows only from position 3 on: the prompt node now mixes
    # versions, so no prefix is offered under either version past what one version covers
    b = rng.integers(0, 64, (len(p) + 2 - 1, 2, 2)).astype(np.int32)
    b[:3] = -1
    tree.insert(traj("t2", p, enc(b"ab") + [EOS], r3=b, version="2"), now=2)
    assert tree.routed_experts_prefix(np.array(nxt), version="2") is None
    assert tree.routed_experts_prefix(np.array(nxt), version="1") is None
    assert np.array_equal(tree.retrieve(P1 + b"ab", now=3).routed_experts[3:], b[3:])


@pytest.mark.parametrize("bad", [-1, len(VOCAB), 2**31 - 1])
def test_out_of_range_token_ids_are_refused_before_anything_changes(bad):
    tree = RadixTree(token_bytes)
    p = enc(P1)
    tree.insert(traj("ok", p, enc(b"ab") + [EOS]), now=1)
    before = [(nd.data.copy(), nd.tlen) for nd in walk(tree)], tree.nbytes, tree.stats()
    with pytest.raises(ValueError, match="out of range"):
        tree.insert(traj("bad", p, enc(b"ab") + [bad, EOS], visible=P1 + b"ab?"), now=2)
    after = [(nd.data.copy(), nd.tlen) for nd in walk(tree)], tree.nbytes, tree.stats()
    assert len(before[0]) == len(after[0]) and all(np.array_equal(a[0], b[0]) for a, b in zip(before[0], after[0]))
    assert before[1:] == after[1:]
    check_invariants(tree)
