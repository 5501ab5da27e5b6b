"""Keep-alive race vs. resending a delivered /generate, end to end: client -> router -> a fake worker.

The fake worker is a raw trio socket server (h11 for parsing) that answers GETs (health, model_info)
with 200 and counts every POST /generate it reads in full. Per keep-alive connection it can answer,
close the connection while idle, or read a /generate and close (or reset) without replying.

What RL users expect: a stale kept-alive connection never costs a request (transparent recovery),
and a /generate that reached a live worker -- which may have run it -- is never silently run again,
neither on a fresh connection to that worker nor on another worker. The client gets a 502 JSON
error that says so, and decides itself (router/net/upstream.py, RELIABILITY.md).
"""

from __future__ import annotations

import socket
import struct
from functools import partial

import h11
import msgspec
import pytest
import trio

from harness import client, start_router

_OK = b'{"text":"ok","meta_info":{"finish_reason":{"type":"length","length":1}}}'


class FakeWorker:
    """`on_generate(data_connection, generate_index_on_it)` -> "reply" | "drop" | "reset", where data
    connections (those carrying a /generate; the router's health probes use others) are numbered from 0;
    with `idle_close_s`, a connection idle that long after a reply is closed by the worker (FIN)."""

    def __init__(self, on_generate=lambda conn, n: "reply", idle_close_s: float | None = None) -> None:
        self.on_generate = on_generate
        self.idle_close_s = idle_close_s
        self.generates: list[tuple[int, int, bytes]] = []  # (connection, index on it, body) read in full
        self.data_connection_count = 0
        self.idle_closes = 0
        self.url = ""

    async def start(self, nursery: trio.Nursery) -> FakeWorker:
        listeners = await nursery.start(partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1"))
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        return self

    @property
    def data_connections(self) -> set[int]:
        return {c for c, _, _ in self.generates}

    async def _serve(self, stream: trio.SocketStream) -> None:
        index = None
        conn = h11.Connection(h11.SERVER)
        generated = 0
        request, body = None, b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    idle = conn.their_state is h11.IDLE and self.idle_close_s is not None and generated
                    with trio.move_on_after(self.idle_close_s if idle else float("inf")) as scope:
                        data = await stream.receive_some(65536)
                    if scope.cancelled_caught:
                        self.idle_closes += 1
                        return  # a short keep-alive timeout: close the idle connection
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    reply = b"{}"
                    if request.method == b"POST" and request.target == b"/generate":
                        if index is None:
                            index = self.data_connection_count
                            self.data_connection_count += 1
                        self.generates.append((index, generated, body))
                        action = self.on_generate(index, generated)
                        generated += 1
                        if action == "reset":
                            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            stream.socket.close()
                            return
                        if action == "drop":
                            return  # read in full, then closed without a reply byte
                        reply = _OK
                    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(reply))]
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers))
                                          + conn.send(h11.Data(data=reply)) + conn.send(h11.EndOfMessage()))
                    conn.start_next_cycle()
                else:  # ConnectionClosed
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            if stream.socket.fileno() != -1:
                await stream.aclose()


async def router_for(nursery, *workers, **routes):
    return await start_router(nursery, workers={"urls": [w.url for w in workers], "health_interval_s": 5.0},
                              routes=[{"path": "/generate", **routes}])


def blind_idle_check(router) -> None:
    """The pool checks a pooled socket for EOF before reusing it; blinding that check makes the worker's
    FIN arrive "after the check", the race no check can close."""
    router.runtime.upstream._poller = type("BlindPoll", (), {"register": lambda *a: None,
                                                             "unregister": lambda *a: None,
                                                             "poll": lambda *a: []})()


async def generate(c, n: int, **kw):
    # compact JSON bytes of our own making (httpx's json= spacing differs between releases)
    body = msgspec.json.encode({"text": f"prompt {n}", "sampling_params": {"max_new_tokens": 1}})
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return await c.post("/generate", content=body, headers=headers, **kw)


@pytest.mark.parametrize("check", ["idle check", "race after the check"])
async def test_stale_keepalive_connection_is_recovered_transparently(nursery, check):
    """The worker closes a kept-alive connection while it is idle (a keep-alive timeout shorter than the
    router's). Normally the pool's EOF check before reuse drops it; when the FIN only arrives after that
    check, the request meets a connection the worker had already closed, its TCP never acknowledges the
    request, and the pool resends it on a fresh connection. Either way: 200, and the worker reads each
    request once."""
    worker = await FakeWorker(idle_close_s=0.05).start(nursery)
    router = await router_for(nursery, worker)
    if check == "race after the check":
        blind_idle_check(router)
    async with client(router) as c:
        assert (await generate(c, 1)).status_code == 200
        with trio.fail_after(5):
            while worker.idle_closes < 1:
                await trio.sleep(0.01)
        r = await generate(c, 2)
        assert r.status_code == 200 and r.content == _OK
    assert [body for *_, body in worker.generates] == [b'{"text":"prompt 1","sampling_params":{"max_new_tokens":1}}',
                                                      b'{"text":"prompt 2","sampling_params":{"max_new_tokens":1}}']
    assert len(worker.data_connections) == 2
    stats = router.runtime.upstream.stats()
    if check == "idle check":
        assert (stats["stale_discarded"], stats["keepalive_retries"]) == (1, 0)
    else:
        assert (stats["stale_discarded"], stats["keepalive_retries"]) == (0, 1)
    assert stats["not_resent"] == 0


@pytest.mark.parametrize("how", ["drop", "reset"])
async def test_delivered_generate_is_not_resent(nursery, how):
    """A live worker reads a whole POST /generate on a reused connection, then closes (or resets) it
    without replying. It may have run the generation, so the router does not resend it -- not on a
    fresh connection to that worker and not to the other worker -- and the client gets a clean 502
    JSON error saying so. The next request is served normally."""
    plan = lambda conn, n: how if (conn, n) == (0, 1) else "reply"  # noqa: E731
    a, b = await FakeWorker(plan).start(nursery), await FakeWorker(plan).start(nursery)
    router = await router_for(nursery, a, b, policy="sticky")  # one routing key: both requests on one worker
    key = {"x-smg-routing-key": "conversation-1"}
    async with client(router) as c:
        assert (await generate(c, 1, headers=key)).status_code == 200
        used, other = (a, b) if a.generates else (b, a)
        r = await generate(c, 2, headers=key)
        assert r.status_code == 502
        err = r.json()
        assert err["stage"] == "forward" and err["worker"] == used.url
        assert "not resent" in err["error"] and "may have received and run it" in err["error"]
        assert [(conn, n) for conn, n, _ in used.generates] == [(0, 0), (0, 1)]  # read once, never again
        assert other.generates == []
        assert router.runtime.upstream.stats()["not_resent"] == 1
        assert router.runtime.upstream.stats()["keepalive_retries"] == 0
        r = await generate(c, 3, headers=key)  # later traffic is unaffected
        assert r.status_code == 200
    assert len(used.generates) + len(other.generates) == 3
