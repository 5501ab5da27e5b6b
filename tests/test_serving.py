"""The router's HTTP server (router/http/serve.py + router/http/hypercorn_fixes.py): hypercorn's trio
worker serving with the router's own connection classes, checked over real sockets with a tiny ASGI
app so each behaviour is isolated; and the library patches' scope and review check
(router/http/reviewed.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h11
import pytest
import trio

from router.http import hypercorn_fixes, reviewed
from router.http.serve import serve_asgi

BIG = bytes(range(256)) * (8 * 4096)  # 8 MiB: far more than a socket buffer takes at once
CHUNKS = [b"a", b"", b"x" * 300, b"\r\n0\r\n\r\n", BIG[:70000], b"tail"]  # an empty one must not end the body


async def app(scope, receive, send):
    """/sleep?S: answer after S seconds; /stream: head, then a body only once `release` is set;
    /big: 8 MiB with a Content-Length; anything else: a small JSON reply."""
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].rsplit(".", 1)[1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    path, query = scope["path"], scope["query_string"].decode()
    if path == "/sleep":
        await trio.sleep(float(query))
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await app.release.wait()
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": False})
        return
    if path == "/chunks":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for piece in CHUNKS:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    body = BIG if path == "/big" else json.dumps({"path": path}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def start(nursery, **kw):
    app.release = trio.Event()
    stop = trio.Event()
    url = await nursery.start(lambda task_status: serve_asgi(app, "127.0.0.1", 0, shutdown_trigger=stop.wait,
                                                             task_status=task_status, **kw))
    host, port = url.split("//")[1].rsplit(":", 1)
    return host, int(port), stop


async def read_response(stream, buf=b""):
    """One Content-Length response from `stream`: (head, body, leftover)."""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        assert data, f"connection closed mid-head: {buf!r}"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        data = await stream.receive_some(1 << 20)
        assert data, "connection closed mid-body"
        rest += data
    return head, rest[:length], rest[length:]


async def closed_by_server(stream, within: float) -> bool:
    with trio.move_on_after(within):
        while await stream.receive_some(65536):
            pass
        return True
    return False


LIBRARY_METHODS = [
    ("hypercorn.trio.tcp_server", "TCPServer", ("__init__", "_read_data", "protocol_send", "run")),
    ("hypercorn.protocol.h11", "H11Protocol", ("stream_send", "_send_h11_event", "_send_error_response")),
    ("trio", "SocketListener", ("accept", "aclose")),
    ("trio", "SocketStream", ("receive_some",)),
]


def _library_methods() -> dict:
    import importlib

    return {(m, c, n): getattr(getattr(importlib.import_module(m), c), n) for m, c, names in LIBRARY_METHODS
            for n in names}


def test_importing_the_router_or_the_simulator_leaves_hypercorn_and_trio_as_shipped():
    """The fixes are the router's server classes, not patches: a fresh interpreter that imports the
    simulator (and the router's server) sees every hypercorn/trio method as its module defines it."""
    code = f"""
import importlib, inspect, sys
import router.sim, router.net.server, router.http.serve
for m, c, names in {LIBRARY_METHODS!r}:
    cls = getattr(importlib.import_module(m), c)
    for n in names:
        fn = getattr(cls, n)
        assert fn.__module__.startswith(m.split(".")[0]), (c, n, fn.__module__)
        assert not fn.__module__.startswith("router"), (c, n)
print("untouched")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "untouched", r.stderr


async def test_serving_does_not_patch_the_libraries(nursery):
    """Not on import, and not while serving: only this server's connections use the fixes."""
    before = _library_methods()
    host, port, _ = await start(nursery)
    s = await trio.open_tcp_stream(host, port)
    await s.send_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(s)
    await s.aclose()
    assert _library_methods() == before


def test_the_reviewed_sources_are_the_installed_ones():
    reviewed.check()  # the pinned versions are the reviewed ones: nothing to report


async def test_a_changed_library_method_refuses_to_start_with_one_line(nursery, monkeypatch):
    """A release that changes a method a fix replaces: the server does not start, and says which."""
    from hypercorn.protocol.h11 import H11Protocol

    async def changed(self, event):  # stands in for a new release's version of the method
        await self.send(event)

    monkeypatch.setattr(H11Protocol, "_send_h11_event", changed)
    with pytest.raises(reviewed.LibraryChanged) as ei:
        await start(nursery)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("hypercorn 0.18") and "hypercorn.protocol.h11:H11Protocol._send_h11_event differs" in msg
    assert "a Content-Length head written with its body" in msg and "router/http/hypercorn_fixes.py" in msg


def test_a_changed_library_refuses_to_start_the_router_cli(tmp_path):
    """The same from the command line: exit 2 and one line, before anything listens."""
    (tmp_path / "new_release.py").write_text("async def receive_some(self, max_bytes=None):\n    return b''\n")
    code = ("import sys, trio; sys.path.insert(0, sys.argv[2]); import new_release\n"
            "trio.SocketStream.receive_some = new_release.receive_some\n"
            "from router.cli import main; sys.exit(main(['--config', sys.argv[1]]))")
    cfg = tmp_path / "r.toml"
    cfg.write_text("[server]\nport = 0\n")
    r = subprocess.run([sys.executable, "-c", code, str(cfg), str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "trio._highlevel_socket:SocketStream.receive_some differs from the reviewed source" in lines[0]
    assert "router/http/trio_recv.py" in lines[0]


async def test_keepalive_deadline_spares_busy_requests_and_closes_idle_connections(nursery):
    host, port, _ = await start(nursery, keep_alive_timeout_s=0.3)
    s = await trio.open_tcp_stream(host, port)
    # A request that takes longer than the keep-alive timeout is not cut: the timer is off while busy.
    await s.send_all(b"GET /sleep?0.8 HTTP/1.1\r\nHost: x\r\n\r\n")
    head, body, _ = await read_response(s)
    assert head.startswith(b"HTTP/1.1 200") and json.loads(body) == {"path": "/sleep"}
    # Idle for less than the timeout, then another request on the same connection: re-armed, not expired.
    for _ in range(3):
        await trio.sleep(0.15)
        await s.send_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body, _ = await read_response(s)
        assert json.loads(body) == {"path": "/again"}
    # Then silence: the server hangs up after ~0.3 s.
    t0 = trio.current_time()
    assert await closed_by_server(s, within=3)
    assert 0.25 <= trio.current_time() - t0 < 2
    await s.aclose()


async def test_shutdown_closes_idle_connections_and_lets_busy_ones_finish(nursery):
    host, port, stop = await start(nursery, graceful_timeout_s=5)
    idle = await trio.open_tcp_stream(host, port)
    await idle.send_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(idle)
    busy = await trio.open_tcp_stream(host, port)
    await busy.send_all(b"GET /sleep?0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
    await trio.sleep(0.1)
    stop.set()
    assert await closed_by_server(idle, within=1)  # idle: closed at once, not after the keep-alive timeout
    head, body, rest = await read_response(busy)  # busy: answered in full, then closed
    assert head.startswith(b"HTTP/1.1 200") and json.loads(body) == {"path": "/sleep"}
    assert not rest and await closed_by_server(busy, within=2)


async def test_content_length_reply_is_written_with_its_head_and_streams_get_theirs_at_once(nursery, monkeypatch):
    writes = []
    real_write = os.write

    def recording_write(fd, data):
        n = real_write(fd, data)
        writes.append(bytes(data[:n]))
        return n

    monkeypatch.setattr(hypercorn_fixes.os, "write", recording_write)
    host, port, _ = await start(nursery)
    s = await trio.open_tcp_stream(host, port)
    await s.send_all(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
    head, body, _ = await read_response(s)
    heads = [w for w in writes if w.startswith(b"HTTP/1.1 200")]
    assert len(heads) == 1 and heads[0].endswith(b'{"path": "/small"}'), writes  # one write: head + body

    # A stream's head is not held back: the client has it while the app still waits for its first event.
    await s.send_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(2):
        got = await s.receive_some(65536)
    assert got.startswith(b"HTTP/1.1 200") and b"text/event-stream" in got and b"data:" not in got
    app.release.set()
    with trio.fail_after(2):
        while not got.endswith(b"0\r\n\r\n"):
            got += await s.receive_some(65536)
    # Framed exactly as h11 frames a chunk (router/http/hypercorn_fixes.py writes it without h11).
    assert got.split(b"\r\n\r\n", 1)[1] == b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"
    await s.aclose()


async def test_streamed_chunks_are_framed_exactly_as_h11_frames_them(nursery):
    host, port, _ = await start(nursery)
    s = await trio.open_tcp_stream(host, port)
    await s.send_all(b"GET /chunks HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    with trio.fail_after(5):
        while not got.endswith(b"\r\n0\r\n\r\n"):
            got += await s.receive_some(1 << 20)
    expected = h11.Connection(h11.SERVER)
    expected.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    expected.next_event()
    expected.send(h11.Response(status_code=200, headers=[]))
    framing = b"".join(expected.send(h11.Data(data=piece)) or b"" for piece in CHUNKS) + expected.send(h11.EndOfMessage())
    assert got.split(b"\r\n\r\n", 1)[1] == framing
    await s.aclose()


async def test_large_body_to_a_slow_reader_arrives_whole(nursery):
    """Writes the kernel takes only in part continue through trio, in order and complete."""
    host, port, _ = await start(nursery)
    s = await trio.open_tcp_stream(host, port)
    await s.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    await trio.sleep(0.3)  # the server's socket buffer fills while we do not read
    head, body, rest = await read_response(s)
    assert body == BIG
    head, body, _ = await read_response(s, rest)  # the connection is still in step
    assert json.loads(body) == {"path": "/after"}
    await s.aclose()


async def test_client_gone_mid_write_does_not_break_the_server(nursery):
    host, port, _ = await start(nursery)
    for _ in range(3):
        s = await trio.open_tcp_stream(host, port)
        await s.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await s.receive_some(1024)
        s.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await s.aclose()  # RST while the server is still writing
    s = await trio.open_tcp_stream(host, port)
    await s.send_all(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
    _, body, _ = await read_response(s)
    assert json.loads(body) == {"path": "/fine"}


async def test_malformed_request_gets_a_json_400(nursery):
    host, port, _ = await start(nursery)
    for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"):
        s = await trio.open_tcp_stream(host, port)
        await s.send_all(raw)
        head, body, _ = await read_response(s)
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, head
        assert "malformed HTTP request" in json.loads(body)["error"]
        await s.aclose()
