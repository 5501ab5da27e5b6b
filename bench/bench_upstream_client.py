"""Client-side CPU per request: router.net.upstream.UpstreamPool vs httpx.AsyncClient.

A minimal trio + h11 keep-alive server runs in a separate process (pinned to the last CPU when there are two or
more); the client runs in this process (pinned to CPU 0) and its CPU is read with time.process_time(), so server
work is not counted. Each request is a ~200-byte JSON POST answered with a ~200-byte JSON body.
A second table streams SSE: 64 concurrent responses of 101 chunked events sent 10 ms apart (as in
bench_proxy.py), and reports client CPU per received chunk.

    python bench/bench_upstream_client.py [--requests 20000] [--rounds 3] [--no-stream]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from functools import partial

import h11
import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from router.net.upstream import UpstreamPool  # noqa: E402

REQUEST_BODY = (
    b'{"text":"The quick brown fox jumps over the lazy dog","sampling_params":{"max_new_tokens":16,'
    b'"temperature":0.7},"stream":false,"rid":"r-000001","return_logprob":false}'
)
RESPONSE_BODY = (
    b'{"text":" and runs away.","meta_info":{"id":"r-000001","finish_reason":{"type":"length","length":16},'
    b'"prompt_tokens":10,"completion_tokens":16,"cached_tokens":0,"e2e_latency":0.01}}'
)
REQUEST_HEADERS = [(b"content-type", b"application/json"), (b"x-request-id", b"r-000001")]
STREAM_EVENTS = 101
STREAM_INTERVAL_S = 0.010
STREAM_EVENT = b'data: {"text":" tok","meta_info":{"completion_tokens":1}}\n\n'


# ---------------------------------------------------------------- server (child process)

async def _send_event_stream(stream: trio.SocketStream, conn: h11.Connection) -> None:
    await stream.send_all(conn.send(h11.Response(
        status_code=200, headers=[(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")])))
    for _ in range(STREAM_EVENTS):
        await trio.sleep(STREAM_INTERVAL_S)
        await stream.send_all(conn.send(h11.Data(data=STREAM_EVENT)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def _serve_connection(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    response_head = h11.Response(
        status_code=200,
        headers=[(b"content-type", b"application/json"), (b"content-length", b"%d" % len(RESPONSE_BODY))],
    )
    target = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if type(event) is h11.Request:
                target = event.target
            elif type(event) is h11.EndOfMessage:
                if target == b"/stream":
                    await _send_event_stream(stream, conn)
                else:
                    await stream.send_all(
                        conn.send(response_head) + conn.send(h11.Data(data=RESPONSE_BODY))
                        + conn.send(h11.EndOfMessage())
                    )
                conn.start_next_cycle()
            elif type(event) is h11.ConnectionClosed or conn.their_state is h11.MUST_CLOSE:
                return
    except (trio.BrokenResourceError, h11.RemoteProtocolError):
        return


def _server_main(port_queue: multiprocessing.Queue) -> None:
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, _serve_connection, 0, host="127.0.0.1"))
            port_queue.put(listeners[0].socket.getsockname()[1])

    trio.run(serve)


# ---------------------------------------------------------------- clients

async def _run_load(do_request, total: int, concurrency: int) -> None:
    per_worker = total // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await do_request()

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)


async def _measure(make_client, total: int, concurrency: int) -> tuple[float, float]:
    """Returns (client CPU us per request, requests per second)."""
    async with make_client(None) as do_request:
        await _run_load(do_request, max(concurrency * 20, 500), concurrency)  # warm-up: open the connections
        done = (total // concurrency) * concurrency
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await _run_load(do_request, total, concurrency)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return cpu / done * 1e6, done / wall


async def _measure_stream(make_client, concurrency: int, rounds: int) -> tuple[float, float]:
    """Returns (client CPU us per received chunk, chunks per response)."""
    counter = [0]
    async with make_client(counter) as do_stream:
        await _run_load(do_stream, concurrency, concurrency)  # warm-up: open the connections
        counter[0] = 0
        cpu0 = time.process_time()
        await _run_load(do_stream, concurrency * rounds, concurrency)
        cpu = time.process_time() - cpu0
    return cpu / counter[0] * 1e6, counter[0] / (concurrency * rounds)


def _pool_client(url: str, chunk_counter: list[int] | None):
    """`do_request` (JSON POST) when chunk_counter is None, else `do_stream` (SSE, counts chunks)."""

    class Client:
        async def __aenter__(self):
            self.pool = UpstreamPool()

            async def do_request() -> None:
                async with self.pool.request(
                    url, "POST", "/generate", REQUEST_HEADERS, REQUEST_BODY, timeout_s=30.0
                ) as response:
                    body = await response.read()
                assert response.status == 200 and body == RESPONSE_BODY

            async def do_stream() -> None:
                async with self.pool.request(
                    url, "POST", "/stream", REQUEST_HEADERS, REQUEST_BODY, timeout_s=30.0
                ) as response:
                    async for _ in response.iter_chunks():
                        chunk_counter[0] += 1

            return do_request if chunk_counter is None else do_stream

        async def __aexit__(self, *exc_info):
            await self.pool.aclose()

    return Client()


def _httpx_client(url: str, chunk_counter: list[int] | None):
    import httpx

    class Client:
        async def __aenter__(self):
            self.client = httpx.AsyncClient(
                base_url=url,
                trust_env=False,
                timeout=30.0,
                limits=httpx.Limits(max_connections=1000, max_keepalive_connections=1000),
            )
            headers = [(k.decode(), v.decode()) for k, v in REQUEST_HEADERS]

            async def do_request() -> None:
                response = await self.client.post("/generate", content=REQUEST_BODY, headers=headers)
                assert response.status_code == 200 and response.content == RESPONSE_BODY

            async def do_stream() -> None:
                async with self.client.stream("POST", "/stream", content=REQUEST_BODY, headers=headers) as response:
                    async for _ in response.aiter_raw():
                        chunk_counter[0] += 1

            return do_request if chunk_counter is None else do_stream

        async def __aexit__(self, *exc_info):
            await self.client.aclose()

    return Client()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="requests per measurement at c=64 (c=1: 1/4)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-stream", action="store_true", help="skip the SSE measurement")
    args = parser.parse_args()

    port_queue: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=_server_main, args=(port_queue,), daemon=True)
    server.start()
    try:
        url = f"http://127.0.0.1:{port_queue.get(timeout=10)}"
        if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        clients = {"UpstreamPool (h11)": _pool_client, "httpx.AsyncClient": _httpx_client}
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for name, make in clients.items():
                for concurrency in (1, 64):
                    total = args.requests if concurrency > 1 else args.requests // 4
                    results.setdefault((name, concurrency), []).append(
                        trio.run(_measure, partial(make, url), total, concurrency)
                    )
        print(f"client CPU per request, median of {args.rounds} rounds (min-max); server in another process")
        print(f"{'client':<20} {'conc':>4} {'CPU us/req':>11} {'(min-max)':>13} {'req/s':>8}")
        for (name, concurrency), samples in results.items():
            cpu = [s[0] for s in samples]
            rps = [s[1] for s in samples]
            print(
                f"{name:<20} {concurrency:>4} {statistics.median(cpu):>11.0f} "
                f"{f'({min(cpu):.0f}-{max(cpu):.0f})':>13} {statistics.median(rps):>8.0f}"
            )
        if not args.no_stream:
            print(f"\nSSE: 64 concurrent streams x {STREAM_EVENTS} events, {STREAM_INTERVAL_S * 1000:.0f} ms apart")
            print(f"{'client':<20} {'CPU us/chunk':>12} {'chunks/resp':>12}")
            for name, make in clients.items():
                per_chunk, chunks = trio.run(_measure_stream, partial(make, url), 64, 3)
                print(f"{name:<20} {per_chunk:>12.1f} {chunks:>12.1f}")
    finally:
        server.kill()
        server.join()


if __name__ == "__main__":
    main()
