"""Load: thousands of concurrent streaming /generate requests through miles-router (issue #5).

    python bench/load_streams.py                      # 2,000 concurrent streams over 4 simulated workers
    python bench/load_streams.py --streams 500 --tokens 16 --rounds 1
    python bench/load_streams.py --json bench/results/load_streams.json

Simulated SGLang workers (`python -m router sim-worker`) and the router (`python -m router --config
<tmp toml>`, passthrough pipeline) run as subprocesses, so the load generator -- trio + h11 on raw
sockets, one connection per stream -- never shares a process (or a GIL) with the router. The open-file
limit is raised with `resource.setrlimit` (the children inherit it).

Each round opens every stream at once and checks each one: status 200, `text/event-stream`, every
`data:` event is JSON until a final `data: [DONE]`, and the last chunk reports `completion_tokens ==
--tokens`. Anything else counts as an error, by kind. The router's RSS (/proc/<pid>/status) is sampled
before the load, every 0.25 s during it, after each round and after an idle pause: with nothing cached
on the passthrough path it should come back flat. Concurrency: the router's own `GET /workers` (sum
of in-flight) is sampled while the streams run, and each worker reports its peak in-flight
(`/_sim/stats`); their sum is the number of streams that were open at the workers at once.

Prints one JSON document (and writes it with --json).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

import h11
import trio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCS: list[subprocess.Popen] = []


# ---- processes (also used by bench/soak.py) --------------------------------------------------

def raise_nofile(want: int = 65536) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _cleanup() -> None:
    for p in PROCS:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in PROCS:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


atexit.register(_cleanup)


def spawn(args: list[str], log_path: str | None = None, prelude: str | None = None) -> subprocess.Popen:
    """`python -m router ARGS` in its own session; with `prelude`, that Python code runs first in the
    same process (e.g. to try a patch against a soak without editing the router)."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    if prelude:
        code = prelude + "\nimport runpy, sys\nsys.argv[0] = 'router'\nrunpy.run_module('router', run_name='__main__', alter_sys=True)\n"
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "router", *args]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=out, start_new_session=True)
    PROCS.append(p)
    return p


def wait_http(url: str, path: str = "/health", timeout: float = 60.0) -> None:
    import http.client

    host, port = url.split("//")[1].rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url}{path} did not come up in {timeout} s")


def start_sims(n: int, latency: float, tokenizer: str = "builtin:tiny", logdir: str | None = None) -> list[str]:
    urls = []
    for i in range(n):
        port = free_port()
        spawn(["sim-worker", "--port", str(port), "--tokenizer", tokenizer, "--token-latency-s", str(latency),
               "--seed", str(i), "--name", f"sim-{i}"], os.path.join(logdir, f"sim-{i}.log") if logdir else None)
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_http(url)
    return urls


def start_router(toml: str, logdir: str, prelude: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    path = os.path.join(logdir, "router.toml")
    with open(path, "w") as f:
        f.write(toml.replace("@PORT@", str(port)))
    proc = spawn(["--config", path], os.path.join(logdir, "router.log"), prelude=prelude)
    url = f"http://127.0.0.1:{port}"
    wait_http(url)
    return proc, url


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def close_wait(port: int) -> int:
    """Sockets of the router's listening port in CLOSE-WAIT (the client closed, the router didn't)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    local, state = line.split()[1], line.split()[3]
                    if state == "08" and int(local.rsplit(":", 1)[1], 16) == port:
                        n += 1
        except OSError:
            pass
    return n


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def get_json(url: str, path: str):
    import http.client

    host, port = url.split("//")[1].rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request("GET", path)
    return json.loads(c.getresponse().read())


# ---- one stream ------------------------------------------------------------------------------

async def one_stream(host: str, port: int, body: bytes, tokens: int, res: dict, started: trio.Event) -> None:
    t0 = time.perf_counter()
    conn = h11.Connection(h11.CLIENT)
    stream = None
    try:
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(conn.send(h11.Request(method="POST", target="/generate", headers=[
            ("host", f"{host}:{port}"), ("content-type", "application/json"), ("content-length", str(len(body))),
        ])) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        pending = b""
        events = []
        status = None
        ctype = b""
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(ev, h11.Response):
                status = ev.status_code
                ctype = dict(ev.headers).get(b"content-type", b"")
            elif isinstance(ev, h11.Data):
                pending += ev.data
                while b"\n\n" in pending:
                    event, pending = pending.split(b"\n\n", 1)
                    if event.startswith(b"data: "):
                        if not events:
                            res["ttfe"].append(time.perf_counter() - t0)
                            started.set()
                        events.append(event[6:])
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        if status != 200:
            res["errors"][f"status {status}"] += 1
        elif not ctype.startswith(b"text/event-stream"):
            res["errors"]["not SSE"] += 1
        elif not events or events[-1] != b"[DONE]":
            res["errors"]["no [DONE]"] += 1
        else:
            last = json.loads(events[-2])
            if last["meta_info"]["completion_tokens"] != tokens:
                res["errors"]["wrong token count"] += 1
            else:
                res["ok"] += 1
                res["events"] += len(events)
        res["durations"].append(time.perf_counter() - t0)
    except (OSError, trio.BrokenResourceError, h11.ProtocolError, ValueError, KeyError) as e:
        res["errors"][type(e).__name__] += 1
    finally:
        if stream is not None:
            await stream.aclose()


async def sample(router_pid: int, url: str, out: dict, stop: trio.Event) -> None:
    host, port = url.split("//")[1].rsplit(":", 1)
    while not stop.is_set():
        out["rss"].append(round(rss_mb(router_pid), 1))
        out["fds"] = max(out["fds"], open_fds(router_pid))
        try:
            ws = await trio.to_thread.run_sync(get_json, url, "/workers")
            out["peak_inflight"] = max(out["peak_inflight"], sum(w["inflight"] for w in ws["workers"]))
        except Exception:  # noqa: BLE001 - sampling only
            pass
        with trio.move_on_after(0.25):
            await stop.wait()


async def run_round(url: str, router_pid: int, n: int, tokens: int, round_no: int) -> dict:
    host, port = url.split("//")[1].rsplit(":", 1)
    res = {"ok": 0, "events": 0, "errors": Counter(), "ttfe": [], "durations": []}
    samples = {"rss": [], "fds": 0, "peak_inflight": 0}
    stop = trio.Event()
    t0 = time.perf_counter()
    async with trio.open_nursery() as outer:
        outer.start_soon(sample, router_pid, url, samples, stop)
        async with trio.open_nursery() as n_:
            for i in range(n):
                body = json.dumps({"text": f"stream {round_no}-{i}: tell me a story", "stream": True,
                                   "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True}}).encode()
                n_.start_soon(one_stream, host, int(port), body, tokens, res, trio.Event())
        stop.set()
    elapsed = time.perf_counter() - t0
    q = lambda xs, p: round(sorted(xs)[min(len(xs) - 1, int(p * len(xs)))], 3) if xs else None  # noqa: E731
    return {
        "streams": n, "ok": res["ok"], "errors": dict(res["errors"]), "elapsed_s": round(elapsed, 2),
        "events_relayed": res["events"], "events_per_s": round(res["events"] / elapsed),
        "time_to_first_event_s": {"p50": q(res["ttfe"], 0.5), "p99": q(res["ttfe"], 0.99), "max": q(res["ttfe"], 1.0)},
        "stream_duration_s": {"p50": q(res["durations"], 0.5), "p99": q(res["durations"], 0.99),
                              "mean": round(statistics.mean(res["durations"]), 3) if res["durations"] else None},
        "router_peak_inflight": samples["peak_inflight"],
        "router_rss_mb_during": {"min": min(samples["rss"]), "max": max(samples["rss"])},
        "router_peak_fds": samples["fds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16, help="max_new_tokens (ignore_eos) per stream")
    # Slow tokens keep every stream open at once: 2,000 streams x 1.3 tokens/s is ~2.7k events/s, about
    # what 2 cores can move through sims + router + client (the sims cost most per event).
    ap.add_argument("--token-latency-s", type=float, default=0.75, help="sim time per token (keeps streams open)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of --streams streams (RSS should be flat across)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()

    limit = raise_nofile(max(65536, args.streams * 4))
    logdir = tempfile.mkdtemp(prefix="load_streams.")
    sims = start_sims(args.workers, args.token_latency_s, logdir=logdir)
    toml = (f'[server]\nhost = "127.0.0.1"\nport = @PORT@\nlog_level = "warning"\nrequest_timeout_s = 120\n'
            f'[workers]\nurls = {json.dumps(sims)}\nhealth_interval_s = 1.0\n'
            '[tokenizer]\npath = "builtin:tiny"\n')
    router, url = start_router(toml, logdir)
    time.sleep(1.0)
    out = {"config": vars(args), "nofile_limit": list(limit), "router_rss_mb": {"idle_before": round(rss_mb(router.pid), 1)},
           "rounds": []}
    for r in range(args.rounds):
        out["rounds"].append(trio.run(run_round, url, router.pid, args.streams, args.tokens, r))
        out["router_rss_mb"][f"after_round_{r + 1}"] = round(rss_mb(router.pid), 1)
        out["rounds"][-1]["router_close_wait_after"] = close_wait(int(url.rsplit(":", 1)[1]))
    time.sleep(2.0)
    out["router_rss_mb"]["idle_after"] = round(rss_mb(router.pid), 1)
    out["router_fds_idle_after"] = open_fds(router.pid)
    out["router_close_wait_idle_after"] = close_wait(int(url.rsplit(":", 1)[1]))
    ws = get_json(url, "/workers")["workers"]
    out["router_inflight_after"] = sum(w["inflight"] for w in ws)
    out["sims_peak_in_flight"] = [get_json(s, "/_sim/stats")["peak_in_flight"] for s in sims]
    out["sims_peak_in_flight_sum"] = sum(out["sims_peak_in_flight"])
    total = args.streams * args.rounds
    ok = sum(r["ok"] for r in out["rounds"])
    rss = out["router_rss_mb"]
    out["summary"] = {
        "streams_total": total, "completed_ok": ok, "errors": total - ok,
        "rss_growth_round1_to_last_mb": round(rss[f"after_round_{args.rounds}"] - rss["after_round_1"], 1),
        "verdict": "PASS" if ok == total and out["router_inflight_after"] == 0 else "FAIL",
    }
    router.send_signal(signal.SIGTERM)
    try:
        out["router_exit_code"] = router.wait(timeout=30)
    except subprocess.TimeoutExpired:
        out["router_exit_code"] = None
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")
    sys.exit(0 if out["summary"]["verdict"] == "PASS" else 1)


if __name__ == "__main__":
    main()
