"""Fuzz pass (issue #5): hypothesis over everything the router parses -- /generate bodies through the
radix-cache pipeline, /add_worker, /retrieve_from_text, and raw requests with random methods,
paths, query strings and headers.

Properties: the router itself never answers 5xx (a worker's own status, passed through, is fine:
those replies carry `x-miles-router-worker`, the router's own don't), every request is answered
within a few seconds (no hang), nothing leaks (in-flight back to 0), and the router stays healthy.

One simulated worker and two routers run for the whole module on a trio loop in a background
thread, so each example is one request (fast: a few ms) rather than a router start.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import unicodedata
from functools import partial
from pathlib import Path
from urllib.parse import quote

import httpx
import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import make_config, start_sim
from test_decode_errors import is_ours
from router.core.urls import normalize_worker_url
from router.net.server import run_router
from router.tokenizer import load_tokenizer
from router.wire import DECODE_ERRORS, decode_error_text

ROOT = Path(__file__).resolve().parent.parent
KEY = "fuzz-admin-key"
# 150 examples per property keeps the default run fast; MILES_FUZZ_EXAMPLES=5000 for a deeper pass.
FUZZ = settings(max_examples=int(os.environ.get("MILES_FUZZ_EXAMPLES", 150)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TIMEOUT = 5.0


class Stack:
    """sim + routers on their own trio loop in a thread; URLs and handles for the tests."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.token = None
        self.stop = None

    def run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # noqa: BLE001 - reported by the fixture
            self.error = e
            self.ready.set()

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.stop = trio.Event()
        async with trio.open_nursery() as n:
            self.sim = await start_sim(n)
            # The data router: radix-cache pipeline; admin calls need a key the fuzzer never sends,
            # so random requests can't pause, abort or re-point its worker.
            cfg = make_config(workers={"urls": [self.sim.url], "allowed_hosts": ["127.0.0.1"]},
                              server={"port": 0, "admin_api_key": KEY, "max_body_bytes": 1 << 20,
                                      "request_timeout_s": 5.0},
                              routes=[{"path": "/generate", "pipeline": str(ROOT / "pipelines/radix-cache.toml")}])
            self.router = await n.start(partial(run_router, cfg, install_signals=False))
            # The admin router: no workers, an allowlist; /add_worker is fuzzed here.
            admin_cfg = make_config(workers={"allowed_hosts": ["127.0.0.1", "localhost", "::1"],
                                             "health_interval_s": 5.0})
            self.admin = await n.start(partial(run_router, admin_cfg, install_signals=False))
            self.ready.set()
            await self.stop.wait()
            n.cancel_scope.cancel()

    def close(self) -> None:
        if self.token is not None:
            trio.from_thread.run_sync(self.stop.set, trio_token=self.token)


@pytest.fixture(scope="module")
def stack():
    s = Stack()
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    assert s.ready.wait(60), "stack did not start"
    if s.error:
        raise s.error
    yield s
    s.close()
    t.join(10)


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.router.url, trust_env=False, timeout=TIMEOUT) as c:
        yield c


def router_reply_ok(status: int, headers, body: bytes) -> None:
    """The core property: a 5xx must be a worker's own; the router's own replies are JSON errors
    (those of the HTTP layer too, for requests that never reach the app)."""
    from_worker = "x-miles-router-worker" in headers
    if not from_worker:
        assert status < 500, (status, body[:500])
        if status >= 400:
            error = json.loads(body)["error"]
            assert isinstance(error, str), body[:500]
            assert_decode_problem_is_ours(error)


_DECODE_PREFIX = re.compile(r"(?:invalid JSON body(?: for /\w+)?|invalid /generate body|invalid /retrieve_from_text body"
                            r"|request body is not JSON): (?P<problem>.*)", re.S)


def assert_decode_problem_is_ours(error: str) -> None:
    """A body the router could not decode is described in the router's words (never msgspec's)."""
    m = _DECODE_PREFIX.fullmatch(error)
    if m is not None:
        assert is_ours(m.group("problem")), error
    assert not any(word in error for word in ("Expected `", "UnicodeDecodeError", "RecursionError", "Input data")), error


def still_healthy(stack, http) -> None:
    assert http.get("/health").json()["status"] == "ok"
    r = http.post("/generate", json={"text": "still ok", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.text
    assert all(w.inflight == 0 for w in stack.router.runtime.pool.all)


# ---- strategies ------------------------------------------------------------------------------

leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                 st.text(max_size=16))
anything = st.recursive(leaf, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
                        max_leaves=12)
sampling = st.one_of(
    st.fixed_dictionaries({}, optional={
        "max_new_tokens": st.integers(-2, 8), "n": st.integers(-1, 3), "temperature": st.floats(-1, 3),
        "ignore_eos": st.booleans(), "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2)),
        "sampling_seed": st.integers(-5, 2**40), "top_k": st.integers(-2, 50),
    }),
    anything,
)
text = st.text(max_size=80)
generate_fields = {
    "text": st.one_of(text, st.lists(text, max_size=3), anything),
    "input_ids": st.one_of(st.lists(st.integers(-3, 400), max_size=40),
                           st.lists(st.lists(st.integers(0, 320), max_size=6), max_size=3),
                           st.lists(st.integers(-(2**40), 2**40), max_size=3), anything),
    "stream": st.one_of(st.booleans(), anything),
    "rid": st.one_of(st.text(max_size=8), st.lists(st.text(max_size=4), max_size=3), anything),
    "return_logprob": st.one_of(st.booleans(), st.lists(st.booleans(), max_size=3), anything),
    "return_routed_experts": st.one_of(st.booleans(), anything),
    "sampling_params": sampling,
    "x_extra": anything,
}
generate_obj = st.fixed_dictionaries({}, optional=generate_fields)


def encode(obj) -> bytes:
    return msgspec.json.encode(obj)


@st.composite
def mangled(draw, objs):
    """Valid JSON, then maybe cut, spliced with junk or invalid UTF-8."""
    raw = encode(draw(objs))
    how = draw(st.sampled_from(["keep", "keep", "cut", "junk", "utf8", "nest"]))
    if how == "cut" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif how == "junk":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=8)) + raw[at:]
    elif how == "utf8":
        raw = raw.replace(b'"', b'"\xff\xfe', 1) if b'"' in raw else raw + b"\xc3"
    elif how == "nest":
        depth = draw(st.integers(100, 3000))
        raw = raw[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}" if raw.startswith(b"{") else raw
    return raw


bodies = st.one_of(mangled(generate_obj), st.binary(max_size=120), mangled(anything))


# ---- /generate through the radix-cache pipeline ----------------------------------------------

@FUZZ
@given(body=bodies, stream_it=st.booleans())
def test_fuzz_generate(stack, http, body, stream_it):
    headers = {"content-type": "application/json"}
    if stream_it:
        with http.stream("POST", "/generate", content=body, headers=headers) as r:
            data = r.read()
    else:
        r = http.post("/generate", content=body, headers=headers)
        data = r.content
    router_reply_ok(r.status_code, r.headers, data)


def test_fuzz_generate_left_the_router_healthy(stack, http):
    still_healthy(stack, http)


# ---- /retrieve_from_text ---------------------------------------------------------------------

retrieve_obj = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=200)}),
    st.fixed_dictionaries({"texts": st.lists(st.text(max_size=60), max_size=4)}),
    st.fixed_dictionaries({}, optional={"text": anything, "texts": anything, "other": anything}),
)


@FUZZ
@given(body=st.one_of(mangled(retrieve_obj), st.binary(max_size=80)))
def test_fuzz_retrieve_from_text(stack, http, body):
    r = http.post("/retrieve_from_text", content=body)
    router_reply_ok(r.status_code, r.headers, r.content)
    assert r.status_code in (200, 400), (r.status_code, r.text)
    if r.status_code == 200:
        out = r.json()
        for res in out.get("results", [out]):
            n = res["token_length"]
            assert len(res["tokens"]) == len(res["loss_mask"]) == len(res["rollout_logp"]) == n
            text = res["response"]
            if res["matched_chars"] == 0 and unicodedata.normalize("NFC", text) == text:
                # A fresh text's tokens spell it exactly, byte for byte (the tokenizer normalizes
                # to NFC, so only for NFC input).
                tok = load_tokenizer("builtin:tiny")
                assert tok.text_bytes(res["tokens"]) == text.encode("utf-8", "surrogatepass")


def test_fuzz_retrieve_left_the_router_healthy(stack, http):
    still_healthy(stack, http)


# ---- /add_worker and /remove_worker ----------------------------------------------------------

hosts = st.one_of(
    st.sampled_from(["127.0.0.1", "localhost", "[::1]", "::1", "10.0.0.1", "evil.com", "127.1", "2130706433",
                     "[::ffff:127.0.0.1]", "LOCALHOST", "127.0.0.1.", "", "[", "]", "[::1", "a b", "é.com", "%31"]),
    st.text(max_size=12),
)
urls = st.one_of(
    st.builds(lambda scheme, sep, cred, host, port, tail: f"{scheme}{sep}{cred}{host}{port}{tail}",
              st.sampled_from(["http", "https", "HTTP", "ftp", "file", "", "javascript", "http+unix"]),
              st.sampled_from(["://", ":/", ":", "//", ":///"]),
              st.sampled_from(["", "", "u@", "u:p@", ":@", "127.0.0.1@", "a%40b@"]),
              hosts,
              st.one_of(st.just(""), st.integers(-2, 70000).map(lambda p: f":{p}"), st.text(max_size=4).map(lambda t: ":" + t)),
              st.sampled_from(["", "", "/", "/x", "?q=1", "#f", "\\@evil.com", "\r\n", " "])),
    st.text(max_size=40),
)
worker_bodies = st.one_of(
    mangled(st.fixed_dictionaries({}, optional={"url": st.one_of(urls, anything), "worker_url": st.one_of(urls, anything)})),
    st.binary(max_size=60),
)


@pytest.fixture(scope="module")
def admin(stack):
    with httpx.Client(base_url=stack.admin.url, trust_env=False, timeout=TIMEOUT) as c:
        yield c


@FUZZ
@given(body=worker_bodies, query=st.one_of(st.none(), urls), remove=st.booleans())
def test_fuzz_add_and_remove_worker(stack, admin, body, query, remove):
    path = "/remove_worker" if remove else "/add_worker"
    target = path + (f"?url={quote(query, safe='')}" if query is not None else "")
    r = admin.post(target, content=body)
    router_reply_ok(r.status_code, r.headers, r.content)
    assert r.status_code in ((200, 400, 404) if remove else (200, 400, 403)), (r.status_code, r.text)
    if r.status_code == 200 and not remove:
        for url in r.json()["worker_urls"]:
            assert normalize_worker_url(url) == url  # only canonical scheme://host:port is ever stored
            assert url.split("//")[1].rsplit(":", 1)[0].strip("[]") in ("127.0.0.1", "localhost", "::1")
            assert admin.post("/remove_worker", json={"url": url}).status_code == 200
    assert admin.get("/list_workers").json() == {"urls": []}


gateway_bodies = st.one_of(
    mangled(st.fixed_dictionaries({}, optional={
        "url": st.one_of(urls, anything), "bootstrap_port": st.one_of(st.integers(-2, 70000), anything),
        "worker_type": st.one_of(st.sampled_from(["regular", "prefill", "decode", "", "REGULAR"]), anything),
        "priority": anything, "labels": anything})),
    st.binary(max_size=60),
)
# ("." and ".." are dot segments: every HTTP client removes them from a path, so they never arrive as ids)
worker_ids = st.one_of(st.uuids().map(str), st.text(max_size=40).filter(lambda s: s not in (".", "..")), urls)


@FUZZ
@given(body=gateway_bodies, worker_id=worker_ids, method=st.sampled_from(["GET", "DELETE", "PUT"]))
def test_fuzz_gateway_workers_api(stack, admin, body, worker_id, method):
    r = admin.post("/workers", content=body)
    router_reply_ok(r.status_code, r.headers, r.content)
    assert r.status_code in (202, 400, 403), (r.status_code, r.text)
    if r.status_code >= 400:
        assert r.json()["code"] in ("BAD_REQUEST", "FORBIDDEN"), r.text
    else:
        worker_id = r.json()["worker_id"]
        assert r.headers["location"] == f"/workers/{worker_id}"
    r = admin.request(method, f"/workers/{quote(worker_id, safe='')}")
    router_reply_ok(r.status_code, r.headers, r.content)
    assert "x-miles-router-worker" not in r.headers  # never proxied
    assert r.status_code in {"GET": (200, 400, 404), "DELETE": (202, 400, 404), "PUT": (405,)}[method], r.text
    for w in admin.get("/workers").json()["workers"]:  # leave the pool empty for the next example
        assert admin.delete(f"/workers/{w['id']}").status_code == 202
    assert admin.get("/list_workers").json() == {"urls": []}


# ---- raw requests: random methods, paths, queries and headers ---------------------------------

token_chars = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
header_names = st.one_of(
    st.sampled_from(["content-type", "x-smg-routing-key", "authorization", "x-admin-key", "accept", "te",
                     "connection", "keep-alive", "upgrade", "expect", "x-forwarded-for", "cookie", "trailer",
                     "proxy-authorization", "x-miles-router-worker", "Content-Type", "X-Custom"]),
    st.text(alphabet=token_chars, min_size=0, max_size=12),
)
header_values = st.one_of(
    st.sampled_from([b"", b"application/json", b"close", b"keep-alive, x-drop", b"100-continue", b"websocket",
                     b"h2c", b"Bearer x", b"chunked", b"trailers"]),
    st.binary(max_size=24),
)
query_bytes = st.one_of(
    st.text(alphabet="abc=&%20+/?:@!$'()*,;~._-0123456789ABCDEF", max_size=30).map(str.encode),
    st.binary(max_size=20),
)
paths = st.one_of(
    st.sampled_from([b"/generate", b"/health", b"/workers", b"/list_workers", b"/metrics", b"/retrieve_from_text",
                     b"/cache/stats", b"/_sim/echo", b"/model_info", b"/add_worker", b"/abort_request",
                     b"/flush_cache", b"/v1/models", b"/", b"//", b"/generate/", b"/%2e%2e/x", b"*",
                     b"http://127.0.0.1:1/_sim/echo", b"/_sim/echo%00"]),
    st.binary(max_size=16).map(lambda b: b"/" + b),
)
methods = st.one_of(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD"]),
                    st.text(alphabet=token_chars, min_size=1, max_size=8).map(str.encode))


def raw_exchange(url: str, request: bytes) -> bytes:
    host, port = url.split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
        s.sendall(request)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


@FUZZ
@given(method=methods, path=paths, query=query_bytes, headers=st.lists(st.tuples(header_names, header_values), max_size=6),
       body=st.one_of(st.binary(max_size=40), mangled(generate_obj)))
def test_fuzz_raw_requests(stack, method, path, query, headers, body):
    skip = {"content-length", "transfer-encoding", "host"}
    lines = [method + b" " + path + (b"?" + query if query else b"") + b" HTTP/1.1", b"Host: fuzz",
             b"Content-Length: %d" % len(body), b"Connection: close"]
    lines += [n.encode() + b": " + v for n, v in headers if n.lower() not in skip]
    response = raw_exchange(stack.router.url, b"\r\n".join(lines) + b"\r\n\r\n" + body)
    if not response:
        return  # closed without an answer (e.g. an upgrade the router doesn't speak): no hang, no 5xx
    head, _, payload = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    status = int(status_line.split(b" ")[1])
    got = {ln.split(b":", 1)[0].strip().lower().decode("latin-1") for ln in header_lines}
    if status >= 500 and "x-miles-router-worker" not in got:
        raise AssertionError(f"router {status} for {method!r} {path!r}: {payload[:300]!r}")


def test_fuzz_raw_left_the_router_healthy(stack, http):
    still_healthy(stack, http)
    assert stack.sim.worker.faults.hang is False and not stack.sim.worker.paused


# ---- decode error texts ------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, database=None)
@given(s=st.text(alphabet=st.sampled_from(["a", "\\", '"', "u", "\ud800", "\udbff", "\udc00", "\U0001f600"]),
                 max_size=12))
def test_a_complete_body_is_never_called_truncated(s):
    """msgspec says "Input data was truncated" for a lone high surrogate escape; the router's text for
    a decode error never does for a body that is complete (json.dumps escapes every surrogate)."""
    body = json.dumps({"text": s}).encode()
    try:
        assert msgspec.json.decode(body) == json.loads(body)  # no lone surrogate: decodes
        valid = True
    except DECODE_ERRORS as e:
        text = decode_error_text(e, body)
        assert "truncated" not in text and "surrogate" in text, (body, text)
        valid = False
    cut = body[:-2]  # and a body that is cut off is called truncated, unless it was bad before the cut
    text = decode_error_text(_decode_error(cut), cut)
    assert "truncated" in text or (not valid and "surrogate" in text), (cut, text)


def _decode_error(body: bytes) -> Exception:
    try:
        msgspec.json.decode(body)
    except DECODE_ERRORS as e:
        return e
    raise AssertionError(f"{body!r} decoded")
