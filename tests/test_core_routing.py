"""router/core/routing.py without sockets: the routing decisions are pure functions of the pool, the request and
`now` (the over-the-wire behaviour is in test_routing.py, test_sticky.py, test_version_policy.py)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.config import RoutingConfig
from router.core.pipeline import Exchange, StageError
from router.core.routing import Router, WeightVersions, openai_prompt_prefix, prompt_prefix
from router.core.workers import WorkerPool


def router_for(urls=("http://a:1", "http://b:1"), policies=(), **routing) -> Router:
    pool = WorkerPool()
    for u in urls:
        pool.add(u)
    return Router(pool, msgspec.convert(routing, RoutingConfig), WeightVersions(keep=2), policies)


def exchange(path="/generate", body=b"{}", headers=(), route=None) -> Exchange:
    return Exchange("POST", path, b"", list(headers), body, route=route)


@given(st.lists(st.sampled_from("abcdef"), max_size=30), st.integers(1, 4))
def test_weight_versions_are_ordered_by_first_sighting_and_only_the_newest_keep_are_current(seen, keep):
    v = WeightVersions(keep)
    for x in seen:
        v.note(x)
    order = list(dict.fromkeys(seen))
    assert list(v.seen) == order
    assert v.stale() == frozenset(order[:max(0, len(order) - keep)])
    assert v.newest(seen) == (order[-1] if order else None)
    assert not v.is_stale(None) and not v.is_stale("never seen")


def test_the_current_version_is_the_newest_a_healthy_worker_serves_and_others_are_held():
    r = router_for()
    a, b = r.pool.active
    a.weight_version, b.weight_version = "v1", "v2"
    assert r.current_version() == "v2"
    assert r.version_hold(b) is None
    assert "differs from the pool's current 'v2'" in r.version_hold(a)
    b.state = b.state.QUARANTINED
    assert r.current_version() == "v1"  # the quarantined worker's version does not count


def test_a_bad_version_policy_header_is_a_named_400_decided_once_per_request():
    r = router_for()
    with pytest.raises(StageError) as e:
        r.eligibility(exchange(headers=[(b"x-smg-version-policy", b"newest")]))
    assert e.value.status == 400 and e.value.message.startswith("x-smg-version-policy: ")
    ex = exchange(headers=[(b"x-smg-version-policy", b"latest-only")])
    assert r.eligibility(ex) is r.eligibility(ex)


def test_a_retry_goes_to_the_least_loaded_of_the_rest():
    r = router_for(("http://a:1", "http://b:1", "http://c:1"))
    a, b, c = r.pool.active
    b.inflight = 3
    w, reason = r.select(exchange(), exclude=[a], now=0.0)
    assert (w, reason) == (c, "retry")


def test_prefix_affinity_says_when_it_cannot_read_the_prompt():
    r = router_for(default_policy="prefix_affinity")
    w, reason = r.select(exchange(body=b"not json"), now=0.0)
    assert w is not None and reason == "affinity_unreadable"
    ex = exchange(body=b'{"text": "' + b"x" * 200 + b'"}')
    w, reason = r.select(ex, now=0.0)
    assert reason != "affinity_unreadable" and ex.affinity_seq == b"x" * 200


def test_a_sticky_key_keeps_its_worker_and_reports_new_then_sticky():
    r = router_for(default_policy="sticky")
    ex = exchange(headers=[(b"x-smg-routing-key", b"conv-1")])
    w1, reason1 = r.select(ex, now=0.0)
    assert reason1 == "sticky_new" and ex.sticky_pick == "conv-1"
    w2, reason2 = r.select(exchange(headers=[(b"x-smg-routing-key", b"conv-1")]), now=1.0)
    assert (w2, reason2) == (w1, "sticky")
    assert r.select(exchange(), now=2.0)[1] == "least_inflight"  # no key: by load


def test_the_routing_key_order_router_header_body_lineage():
    r = router_for(sticky_body_field="session_id")
    body = b'{"session_id": "from-body", "rid": "conv_t2_r1"}'
    ex = exchange(body=body, headers=[(b"x-smg-routing-key", b"from-header")])
    ex.routing_key = "router-own"
    assert r.routing_key(ex) == "router-own"
    assert r.routing_key(exchange(body=body, headers=[(b"x-smg-routing-key", b"from-header")])) == "from-header"
    assert r.routing_key(exchange(body=body)) == "from-body"
    assert r.routing_key(exchange(body=b'{"rid": "conv_t2_r1"}')) is not None


def test_chat_prompts_route_by_the_rendered_template_else_by_their_message_bytes():
    body = b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}'
    rendered = openai_prompt_prefix(body, lambda messages, tools: f"<{messages[0]['content']}|{len(tools)}>")
    assert rendered == b"<hi|1>"
    raw = openai_prompt_prefix(body, None)
    assert raw == b'[{"type": "function"}]\n{"role": "user", "content": "hi"}\n'

    def broken(messages, tools):
        raise ValueError("template cannot render this")

    assert openai_prompt_prefix(body, broken) == raw
    assert openai_prompt_prefix(b'{"prompt": [1, 2, 3]}', None).tolist() == [1, 2, 3]
    assert openai_prompt_prefix(b'{"prompt": ["one", "two"]}', None) is None  # a batch: no single prompt


def test_generate_prompts_route_by_ids_else_text():
    ids = prompt_prefix(exchange(body=b'{"input_ids": [5, 6]}'), None)
    assert isinstance(ids, np.ndarray) and ids.tolist() == [5, 6]
    assert prompt_prefix(exchange(body=b'{"text": "abc"}'), None) == b"abc"
    assert prompt_prefix(exchange(body=b'{"text": ["a", "b"]}'), None) is None


def test_the_prefix_index_learns_a_reply_only_on_routes_that_use_it():
    from router.wire.sglang import ReplySummary

    off = router_for()
    off.record_served(np.arange(64, dtype=np.int32), "http://a:1")
    assert len(off.prefix_index) == 0
    on = router_for(default_policy="prefix_affinity")
    ex = exchange(body=b'{"text": "' + b"q" * 100 + b'"}')
    w, _ = on.select(ex, now=0.0)
    ex.worker = w
    on.learn_reply(ex, msgspec.convert({"text": "a" * 100}, ReplySummary))
    assert on.prefix_index.lookup(b"q" * 100 + b"a" * 100)[0] == [w.url]
