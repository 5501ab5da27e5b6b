"""Proxy benchmark: direct vs miles-router vs sglang-router (smg), all measured in the same run.

    python bench/bench_proxy.py                 # full run, 10 s per point (about 2.5 min)
    python bench/bench_proxy.py --quick         # 3 s per point (about 1 min)
    python bench/bench_proxy.py --no-sglang-router --concurrency 64 --skip-sse
    python bench/bench_proxy.py --compare-ref HEAD~1  # adds miles-router as of another commit (same run)
    python bench/bench_proxy.py --processes 1,2       # adds miles-router with 1 and 2 processes (same run)
    python bench/bench_proxy.py --profile /tmp/prof # then a py-spy (+ perf) breakdown of miles-router
    python bench/bench_proxy.py --serve         # just start nginx + routers, for wrk/py-spy/strace by hand

Needs `wrk` and `nginx` on PATH (apt-get install -y nginx wrk); `smg` (pip install sglang-router) is optional
and skipped with a note when missing; `py-spy` only for --profile.

What it starts (every process in its own session, all killed on exit, Ctrl-C included):
  * JSON upstream: nginx (1 worker) answering `POST /generate` with a fixed SGLang-shaped JSON body
    (`return 200 '...'`, ~10-20 us CPU/request, so it is never the bottleneck);
  * SSE upstream: a raw trio + h11 server in its own process (nginx cannot pace events) that answers a
    `"stream": true` /generate with N `data:` events sent `interval` apart on an absolute schedule, then
    `data: [DONE]`;
  * miles-router: `python -m router --config <tmp toml>` with one worker (the upstream), no simulated workers,
    no routes (so every path is the built-in passthrough pipeline), log level warning;
  * sglang-router: `smg launch --worker-urls <upstream> --policy round_robin ...` (a router per upstream, so
    the SSE phase starts its own miles-router and smg);
  * with --processes N,...: `miles-router xN`, the same config with `[server] processes = N` and `[sessions]
    enabled = false` (N > 1 refuses sessions without a shared store; for a passthrough benchmark they are
    idle), JSON table only. Its CPU is the whole process tree: the supervisor and its N router processes.

JSON table: `wrk` with a Lua script that POSTs a ~200-byte /generate body and checks every response (status
2xx and a byte-exact body; anything else is counted in `bad`); concurrency 1, 64, 256; a 1 s warm-up per
point. CPU per request = delta of utime+stime (+ reaped children) of the router's process tree, from
/proc/<pid>/stat, divided by the requests wrk completed (10 ms tick resolution: fine over seconds of CPU).
`other procs` is host CPU (from /proc/stat) used by processes outside this benchmark during the point: on a
shared machine a non-zero value means req/s and latency of that point are depressed; CPU per request is the
robust number. `wrk µs/req` is the load generator's own CPU (from wait4).

SSE table: a separate trio + h11 client process keeps `--sse-streams` streams open back to back for the
point's duration and checks every stream byte-for-byte (N events in order, then [DONE], status 200).
Router CPU per chunk = router CPU / events relayed ([DONE] included; one upstream chunk per event).
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import gitref  # bench/gitref.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------ payloads (SGLang-shaped)

REQUEST_BODY = (
    b'{"text":"The quick brown fox jumps over the lazy dog","sampling_params":{"max_new_tokens":16,'
    b'"temperature":0.7},"stream":false,"rid":"r-000001","return_logprob":false}'
)
STREAM_REQUEST_BODY = REQUEST_BODY.replace(b'"stream":false', b'"stream":true')
RESPONSE_BODY = (
    b'{"text":" and runs away into the forest.","output_ids":[323,8473,3123,1119,279,13638,13],'
    b'"meta_info":{"id":"r-000001","finish_reason":{"type":"length","length":16},"prompt_tokens":10,'
    b'"weight_version":"default","completion_tokens":16,"cached_tokens":0,"e2e_latency":0.0123}}'
)
MODEL_INFO = b'{"model_path":"bench-model","tokenizer_path":"bench-model","is_generation":true,"weight_version":"default"}'
SERVER_INFO = b'{"model_path":"bench-model","version":"bench","weight_version":"default"}'


def sse_event(i: int) -> bytes:
    return (b'data: {"text":" tok","output_ids":[%d],"meta_info":{"id":"r-000001","completion_tokens":%d,'
            b'"finish_reason":null}}\n\n' % (1000 + i, i + 1))


SSE_DONE = b"data: [DONE]\n\n"

# ------------------------------------------------------------------ process handling

_ALL: list[tuple[str, subprocess.Popen]] = []


def spawn(name: str, cmd: list[str], logdir: str, *, env: dict | None = None, cpus: str | None = None,
          cwd: str | None = None) -> subprocess.Popen:
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    log = open(os.path.join(logdir, f"{name}.log"), "ab")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, env=env, cwd=cwd)
    log.close()
    _ALL.append((name, p))
    return p


def stop(p: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM the process group we created (pgid == pid), then SIGKILL if it lingers."""
    if p.returncode is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # the leader may be gone while a grandchild (e.g. nginx worker) remains in the group
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if p.returncode is None:
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            pass


def stop_all() -> None:
    while _ALL:
        _, p = _ALL.pop()
        stop(p, timeout=3.0)


def _on_signal(signum, frame):  # SIGTERM/SIGHUP -> the same path as Ctrl-C
    raise KeyboardInterrupt


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http_call(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 2.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_ready(name: str, p: subprocess.Popen, port: int, check, timeout: float) -> float:
    """Poll until check(port) is true; returns seconds waited. Raises RuntimeError (with log hint) otherwise."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited with code {p.returncode} during startup")
        try:
            if check(port):
                return time.monotonic() - t0
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.05)
    raise RuntimeError(f"{name} not ready after {timeout:.0f} s ({last})")


# ------------------------------------------------------------------ CPU accounting (/proc)

_CLK = os.sysconf("SC_CLK_TCK")


def _read_stat(pid: int):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2:].split()
    # rest[0] is field 3 (state); utime=14, stime=15, cutime=16, cstime=17, ppid=4
    return int(rest[1]), int(rest[11]) + int(rest[13]), int(rest[12]) + int(rest[14])


def tree_cpu_us(root: int) -> tuple[float, float]:
    """(user, sys) CPU seconds of `root` and its live descendants, plus children they already reaped."""
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _read_stat(int(d))
            if st is not None:
                stats[int(d)] = st
    kids = defaultdict(list)
    for pid, (ppid, _, _) in stats.items():
        kids[ppid].append(pid)
    user, system, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        st = stats.get(pid)
        if st is None:
            continue
        user += st[1]
        system += st[2]
        todo.extend(kids.get(pid, ()))
    return user / _CLK, system / _CLK


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies summed over CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return total - idle, total


class CpuWindow:
    """CPU used by a set of process trees between start() and stop(), plus host-wide busy time."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {k: v for k, v in pids.items() if v}

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.c0 = {k: tree_cpu_us(p) for k, p in self.pids.items()}
        self.h0 = host_cpu()

    def stop(self) -> None:
        self.wall = time.monotonic() - self.t0
        c1 = {k: tree_cpu_us(p) for k, p in self.pids.items()}
        self.cpu = {k: sum(c1[k]) - sum(self.c0[k]) for k in self.pids}
        self.sys = {k: c1[k][1] - self.c0[k][1] for k in self.pids}
        h1 = host_cpu()
        self.host_busy_s = (h1[0] - self.h0[0]) / _CLK


def proc_fds_rss(pid: int) -> tuple[int, float]:
    """(open fds, RSS in MB) of a process; (-1, nan) if it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        return fds, rss
    except (OSError, StopIteration):
        return -1, float("nan")


def rusage_wait(p: subprocess.Popen, timeout: float) -> float:
    """Wait for a direct child and return its CPU seconds (from wait4); kills it past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return ru.ru_utime + ru.ru_stime
        if time.monotonic() > deadline:
            stop(p)
            raise RuntimeError(f"{p.args[0]} did not finish within {timeout:.0f} s (killed)")
        time.sleep(0.02)


# ------------------------------------------------------------------ upstreams

NGINX_CONF = """
worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx_body;
  proxy_temp_path {tmp}/nginx_proxy;
  fastcgi_temp_path {tmp}/nginx_fastcgi;
  uwsgi_temp_path {tmp}/nginx_uwsgi;
  scgi_temp_path {tmp}/nginx_scgi;
  keepalive_requests 100000000;
  keepalive_timeout 75s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    default_type application/json;
    location = /generate {{ return 200 '{body}'; }}
    location = /health {{ return 200 '{{}}'; }}
    location = /health_generate {{ return 200 '{{}}'; }}
    location = /model_info {{ return 200 '{model_info}'; }}
    location = /get_model_info {{ return 200 '{model_info}'; }}
    location = /server_info {{ return 200 '{server_info}'; }}
    location = /get_server_info {{ return 200 '{server_info}'; }}
    location / {{ return 404 '{{"error":"not found"}}'; }}
  }}
}}
"""


def start_nginx(tmp: str, port: int, cpus: str | None) -> subprocess.Popen:
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(tmp=tmp, port=port, body=RESPONSE_BODY.decode(), model_info=MODEL_INFO.decode(),
                                  server_info=SERVER_INFO.decode()))
    p = spawn("nginx", ["nginx", "-p", tmp, "-c", conf, "-e", os.path.join(tmp, "nginx.error.log")], tmp, cpus=cpus)

    def ok(port):
        return http_call(port, "POST", "/generate", REQUEST_BODY) == (200, RESPONSE_BODY)

    wait_ready("nginx", p, port, ok, 10)
    return p


# The SSE upstream and the SSE client run as `python bench_proxy.py _sse-server|_sse-client ...`.

def sse_server_main(argv: list[str]) -> None:
    import h11
    import trio

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--events", type=int, required=True)
    ap.add_argument("--interval", type=float, required=True)
    a = ap.parse_args(argv)
    events = [sse_event(i) for i in range(a.events)]
    json_head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(RESPONSE_BODY))]
    sse_head = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"transfer-encoding", b"chunked")]
    small = {b"/health": b"{}", b"/health_generate": b"{}", b"/model_info": MODEL_INFO,
             b"/get_model_info": MODEL_INFO, b"/server_info": SERVER_INFO, b"/get_server_info": SERVER_INFO}

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        target, body = b"", []
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE:
                        return
                    continue
                t = type(ev)
                if t is h11.Request:
                    target, body = ev.target, []
                elif t is h11.Data:
                    body.append(ev.data)
                elif t is h11.EndOfMessage:
                    b = b"".join(body)
                    if target == b"/generate" and b'"stream":true' in b.replace(b" ", b""):
                        await stream.send_all(conn.send(h11.Response(status_code=200, headers=sse_head)))
                        t0 = trio.current_time()
                        for i, e in enumerate(events):
                            await trio.sleep_until(t0 + (i + 1) * a.interval)
                            await stream.send_all(conn.send(h11.Data(data=e)))
                        await stream.send_all(conn.send(h11.Data(data=SSE_DONE)) + conn.send(h11.EndOfMessage()))
                    else:
                        if target == b"/generate":
                            status, payload, head = 200, RESPONSE_BODY, json_head
                        else:
                            payload = small.get(target.split(b"?")[0])
                            status = 200 if payload is not None else 404
                            payload = payload or b'{"error":"not found"}'
                            head = [(b"content-type", b"application/json"),
                                    (b"content-length", b"%d" % len(payload))]
                        await stream.send_all(conn.send(h11.Response(status_code=status, headers=head))
                                              + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
                    if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                elif t is h11.ConnectionClosed:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    async def main() -> None:
        await trio.serve_tcp(handle, a.port, host="127.0.0.1", backlog=4096)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def sse_client_main(argv: list[str]) -> None:
    """Keep `--streams` SSE requests in flight for `--duration` s; check each one byte for byte; print JSON."""
    import h11
    import trio

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--streams", type=int, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--events", type=int, required=True)
    ap.add_argument("--stream-timeout", type=float, default=60.0)
    a = ap.parse_args(argv)
    expected = b"".join(sse_event(i) for i in range(a.events)) + SSE_DONE
    res = {"streams_ok": 0, "streams_bad": 0, "events": 0, "statuses": Counter(), "errors": Counter()}
    ttfb, total = [], []
    host = b"127.0.0.1:%d" % a.port
    req = h11.Request(method=b"POST", target=b"/generate", headers=[
        (b"host", host), (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(STREAM_REQUEST_BODY))])

    async def one_stream(state) -> None:
        if state.get("stream") is None:
            state["stream"] = await trio.open_tcp_stream("127.0.0.1", a.port)
            state["conn"] = h11.Connection(h11.CLIENT)
        stream, conn = state["stream"], state["conn"]
        t0 = trio.current_time()
        await stream.send_all(conn.send(req) + conn.send(h11.Data(data=STREAM_REQUEST_BODY))
                              + conn.send(h11.EndOfMessage()))
        status, buf, first = None, [], None
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            t = type(ev)
            if t is h11.Response:
                status = ev.status_code
            elif t is h11.Data:
                if first is None:
                    first = trio.current_time()
                buf.append(bytes(ev.data))
            elif t is h11.EndOfMessage:
                break
            elif t is h11.ConnectionClosed:
                raise ConnectionError("closed mid-response")
        end = trio.current_time()
        body = b"".join(buf)
        res["statuses"][status] += 1
        n_events = body.count(b"\n\n")
        res["events"] += n_events
        if status == 200 and body == expected:
            res["streams_ok"] += 1
            ttfb.append(first - t0)
            total.append(end - t0)
        else:
            res["streams_bad"] += 1
            why = f"status {status}" if status != 200 else f"body mismatch ({n_events} events, {len(body)} bytes)"
            res["errors"][why] += 1
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await stream.aclose()
            state["stream"] = None

    async def worker(deadline: float) -> None:
        state: dict = {}
        while trio.current_time() < deadline:
            try:
                with trio.fail_after(a.stream_timeout):
                    await one_stream(state)
            except (trio.TooSlowError, OSError, trio.BrokenResourceError, h11.ProtocolError,
                    ConnectionError) as e:
                res["streams_bad"] += 1
                res["errors"][f"{type(e).__name__}: {e}"[:120]] += 1
                if state.get("stream") is not None:
                    await state["stream"].aclose()
                state["stream"] = None

    async def main() -> None:
        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            for _ in range(a.streams):
                n.start_soon(worker, t0 + a.duration)
        res["wall_s"] = trio.current_time() - t0

    trio.run(main)
    res["ttfb_p50_ms"] = _pct(ttfb, 50) * 1e3
    res["ttfb_p99_ms"] = _pct(ttfb, 99) * 1e3
    res["stream_p50_ms"] = _pct(total, 50) * 1e3
    res["stream_p99_ms"] = _pct(total, 99) * 1e3
    res["statuses"] = {str(k): v for k, v in res["statuses"].items()}
    res["errors"] = dict(res["errors"].most_common(5))
    print("SSEJSON " + json.dumps(res), flush=True)


def start_sse_server(tmp: str, port: int, events: int, interval: float, cpus: str | None) -> subprocess.Popen:
    p = spawn("sse_upstream", [sys.executable, os.path.abspath(__file__), "_sse-server", "--port", str(port),
                               "--events", str(events), "--interval", str(interval)], tmp, cpus=cpus)
    wait_ready("sse upstream", p, port, lambda port: http_call(port, "GET", "/health")[0] == 200, 15)
    return p


# ------------------------------------------------------------------ routers

def start_miles(tmp: str, port: int, upstream_port: int, name: str, cpus: str | None,
                repo: str = REPO, processes: int | None = None) -> subprocess.Popen:
    """miles-router (the passthrough pipeline) from `repo`: this checkout, or --compare-ref's worktree; with
    `processes`, that many router processes (and sessions off)."""
    cfg = os.path.join(tmp, f"{name}.toml")
    several = "" if processes is None else f"processes = {processes}\n[sessions]\nenabled = false\n"
    with open(cfg, "w") as f:
        f.write(f"""
[simulate]
workers = 0

[workers]
urls = ["http://127.0.0.1:{upstream_port}"]

[server]
host = "127.0.0.1"
port = {port}
log_level = "warning"
{several}""")
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "router", "--config", cfg]
    p = spawn(name, cmd, tmp, env=env, cpus=cpus, cwd=repo)

    serving = set()  # pids that answered, each over a new connection: ready once all N processes have

    def ok(port):
        st, body = http_call(port, "GET", "/health")
        if st == 200 and json.loads(body).get("healthy_workers", 0) >= 1:
            serving.add(json.loads(body).get("pid"))
        return len(serving) >= (processes or 1)

    wait_ready(name, p, port, ok, 60)
    return p


def start_smg(tmp: str, port: int, prom_port: int, upstream_port: int, name: str,
              cpus: str | None) -> subprocess.Popen:
    smg = shutil.which("smg") or os.path.join(os.path.dirname(sys.executable), "smg")
    p = spawn(name, [smg, "launch", "--worker-urls", f"http://127.0.0.1:{upstream_port}", "--host", "127.0.0.1",
                     "--port", str(port), "--policy", "round_robin", "--prometheus-port", str(prom_port),
                     "--log-level", "warn"], tmp, cpus=cpus)

    def ok(port):
        return http_call(port, "POST", "/generate", REQUEST_BODY)[0] == 200

    wait_ready(name, p, port, ok, 60)
    return p


def smg_available() -> bool:
    return bool(shutil.which("smg") or os.path.exists(os.path.join(os.path.dirname(sys.executable), "smg")))


# ------------------------------------------------------------------ wrk

WRK_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '%(req)s'
local expected = '%(resp)s'
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) bad_status = 0; bad_body = 0; checked = 0 end
function response(status, headers, body)
  checked = checked + 1
  if status < 200 or status > 299 then bad_status = bad_status + 1
  elseif body ~= expected then bad_body = bad_body + 1 end
end
function done(summary, latency, requests)
  local bs, bb, ck = 0, 0, 0
  for _, t in ipairs(threads) do
    bs = bs + t:get("bad_status"); bb = bb + t:get("bad_body"); ck = ck + t:get("checked")
  end
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%%.0f,"duration_us":%%.0f,"connect":%%.0f,"read":%%.0f,' ..
    '"write":%%.0f,"status":%%.0f,"timeout":%%.0f,"p50_us":%%.0f,"p90_us":%%.0f,"p99_us":%%.0f,"max_us":%%.0f,' ..
    '"bad_status":%%.0f,"bad_body":%%.0f,"checked":%%.0f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, bs, bb, ck))
end
"""


def write_lua(tmp: str) -> str:
    path = os.path.join(tmp, "post.lua")
    with open(path, "w") as f:
        f.write(WRK_LUA % {"req": REQUEST_BODY.decode(), "resp": RESPONSE_BODY.decode()})
    return path


def run_wrk(tmp: str, lua: str, port: int, conc: int, seconds: int, threads: int,
            cpus: str | None = None) -> tuple[dict, float]:
    out = os.path.join(tmp, "wrk.out")
    with open(out, "wb") as f:
        cmd = ["wrk", f"-t{min(threads, conc)}", f"-c{conc}", f"-d{seconds}s", "--timeout", "10s", "-s", lua,
               f"http://127.0.0.1:{port}/generate"]
        if cpus:
            cmd = ["taskset", "-c", cpus, *cmd]
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        _ALL.append(("wrk", p))
        try:
            cpu = rusage_wait(p, seconds + 20)
        finally:
            _ALL.remove(("wrk", p))
            if p.returncode is None:  # interrupted: don't leave it running
                stop(p)
    text = open(out).read()
    m = re.search(r"^WRKJSON (.*)$", text, re.M)
    if not m:
        raise RuntimeError(f"wrk gave no result (exit {p.returncode}): {text[-500:]}")
    return json.loads(m.group(1)), cpu


# ------------------------------------------------------------------ measurement

@dataclass
class Point:
    target: str
    conc: int
    rps: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    requests: int = 0
    bad: int = 0
    bad_detail: str = ""
    router_us: float | None = None
    router_cores: float | None = None
    router_sys_pct: float | None = None
    upstream_us: float = float("nan")
    loadgen_us: float = float("nan")
    other_cores: float = float("nan")
    note: str = ""


@dataclass
class SsePoint:
    target: str
    streams: int
    ok: int = 0
    bad: int = 0
    events: int = 0
    expected_events: int = 0
    events_per_s: float = float("nan")
    ttfb_p50_ms: float = float("nan")
    stream_p50_ms: float = float("nan")
    stream_p99_ms: float = float("nan")
    router_us_per_chunk: float | None = None
    router_cores: float | None = None
    upstream_us_per_chunk: float = float("nan")
    other_cores: float = float("nan")
    errors: dict = field(default_factory=dict)
    note: str = ""


def measure_json(tmp, lua, args, target, port, router_pid, upstream_pid, conc, warm=True) -> Point:
    threads = 1 if conc == 1 else args.wrk_threads
    if warm:
        run_wrk(tmp, lua, port, conc, 1, threads, args.wrk_cpus)  # warm-up: connections, pools, caches
    win = CpuWindow({"router": router_pid, "upstream": upstream_pid})
    win.start()
    r, wrk_cpu = run_wrk(tmp, lua, port, conc, args.duration, threads, args.wrk_cpus)
    win.stop()
    n = int(r["requests"])
    pt = Point(target, conc, requests=n)
    pt.rps = n / (r["duration_us"] / 1e6)
    pt.p50_ms, pt.p99_ms = r["p50_us"] / 1e3, r["p99_us"] / 1e3
    errs = {k: int(r[k]) for k in ("connect", "read", "write", "timeout", "bad_status", "bad_body") if r[k]}
    unchecked = n - int(r["checked"])
    if unchecked > 0:
        errs["unchecked"] = unchecked
    pt.bad = sum(errs.values())
    pt.bad_detail = ",".join(f"{k}={v}" for k, v in errs.items())
    mine = sum(win.cpu.values()) + wrk_cpu
    if router_pid:
        pt.router_us = win.cpu["router"] / max(n, 1) * 1e6
        pt.router_cores = win.cpu["router"] / win.wall
        pt.router_sys_pct = 100 * win.sys["router"] / max(win.cpu["router"], 1e-9)
    pt.upstream_us = win.cpu["upstream"] / max(n, 1) * 1e6
    pt.loadgen_us = wrk_cpu / max(n, 1) * 1e6
    pt.other_cores = max(0.0, (win.host_busy_s - mine) / win.wall)
    return pt


def measure_sse(tmp, args, target, port, router_pid, upstream_pid) -> SsePoint:
    cmd = [sys.executable, os.path.abspath(__file__), "_sse-client", "--port", str(port), "--streams",
           str(args.sse_streams), "--duration", str(args.duration), "--events", str(args.sse_events)]
    if args.wrk_cpus:
        cmd = ["taskset", "-c", args.wrk_cpus, *cmd]
    out = os.path.join(tmp, "sse_client.out")
    win = CpuWindow({"router": router_pid, "upstream": upstream_pid})
    with open(out, "wb") as f:
        win.start()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        _ALL.append(("sse-client", p))
        try:
            client_cpu = rusage_wait(p, args.duration + 90)
        finally:
            _ALL.remove(("sse-client", p))
            if p.returncode is None:
                stop(p)
        win.stop()
    text = open(out).read()
    m = re.search(r"^SSEJSON (.*)$", text, re.M)
    if not m:
        raise RuntimeError(f"SSE client gave no result (exit {p.returncode}): {text[-800:]}")
    r = json.loads(m.group(1))
    sp = SsePoint(target, args.sse_streams, ok=r["streams_ok"], bad=r["streams_bad"], events=r["events"],
                  errors=r["errors"])
    sp.expected_events = (sp.ok + sp.bad) * (args.sse_events + 1)
    sp.events_per_s = r["events"] / r["wall_s"]
    sp.ttfb_p50_ms, sp.stream_p50_ms, sp.stream_p99_ms = r["ttfb_p50_ms"], r["stream_p50_ms"], r["stream_p99_ms"]
    ev = max(r["events"], 1)
    if router_pid:
        sp.router_us_per_chunk = win.cpu["router"] / ev * 1e6
        sp.router_cores = win.cpu["router"] / win.wall
    sp.upstream_us_per_chunk = win.cpu["upstream"] / ev * 1e6
    sp.other_cores = max(0.0, (win.host_busy_s - sum(win.cpu.values()) - client_cpu) / win.wall)
    return sp


# ------------------------------------------------------------------ profiling (py-spy)

_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame_path(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame)
    return (m.group("func"), m.group("path")) if m else (frame, "")


def _leaf_module(path: str) -> str:
    """Self time by package of the leaf frame (syscalls count for the Python frame that made them)."""
    if path.startswith("router/"):
        return path
    if "/" not in path or path.startswith("<frozen"):
        return "stdlib"
    return path.split("/", 1)[0]


def _owner(frames: list[str]) -> str:
    """Who caused a sample: the innermost frame that is router code, hypercorn or prometheus_client.

    h11/trio/stdlib frames are charged to the layer that called them (h11 parsing of the client connection ->
    hypercorn, of the worker connection -> upstream pool). Samples with no such frame are trio's run loop.
    """
    for fr in reversed(frames):
        func, path = _frame_path(fr)
        if path == "router/net/upstream.py":
            return "upstream pool (router/net/upstream.py, incl. its h11 + syscalls)"
        if path == "router/net/metrics.py" or path.startswith("prometheus_client/"):
            return "metrics (observe_request + prometheus_client)"
        if path.startswith("router/net/app.py") and func in ("RouterApp._watch_disconnect",):
            return "app: disconnect watcher task (_watch_disconnect, incl. its nursery)"
        if path.startswith("router/"):
            if path in ("router/__main__.py", "router/cli.py", "router/net/server.py", "router/http/serve.py"):
                continue  # entry frames: everything runs under them
            return f"app: {path} (+ trio/stdlib it calls)"
        if path.startswith("hypercorn/"):
            return "hypercorn (+ its h11, trio socket I/O, ASGI send/receive)"
    if frames and _frame_path(frames[-1])[1].startswith("trio/"):
        return "trio run loop / scheduler (no app frame)"
    return "other"


INCLUSIVE = (
    ("RouterApp._http (whole app, incl. upstream + ASGI sends)", "RouterApp._http"),
    ("RouterApp._proxy nursery + _watch_disconnect (setup/teardown)", "_proxy_overhead"),
    ("Forward.forward (select + upstream + relay to client)", "Forward.forward"),
    ("_RequestContext.__aenter__ (checkout + send + response head)", "_RequestContext.__aenter__"),
    ("UpstreamResponse.__anext__ (body)", "UpstreamResponse.__anext__"),
    ("ClientStream.start/send/finish (ASGI sends into hypercorn)", "ClientStream."),
    ("hypercorn HTTPStream.app_send (all ASGI sends)", "HTTPStream.app_send"),
    ("Metrics.observe_request", "Metrics.observe_request"),
    ("WorkerSupervisor._select / Router.select / WorkerPool.pick", "WorkerSupervisor._select"),
    ("request/response header filtering", "router/core/headers.py"),
    ("hypercorn outside the app (parse request, write response)", "_hypercorn_outside"),
    ("h11 anywhere (server + client side)", "(h11/"),
)


def _inclusive_hit(needle: str, frames: list[str]) -> bool:
    if needle == "_proxy_overhead":
        for i, fr in enumerate(frames):
            if fr.startswith("RouterApp._proxy "):
                rest = frames[i + 1:]
                return not rest or not rest[0].startswith("RouterApp._run ")
            if fr.startswith("RouterApp._watch_disconnect "):
                return True
        return False
    if needle == "_hypercorn_outside":
        return any("(hypercorn/" in fr for fr in frames) and not any("(router/net/app.py" in fr for fr in frames)
    return any(needle in fr for fr in frames)


def analyze_collapsed(path: str) -> str:
    owner, leaf, incl, funcs, lines_, total = Counter(), Counter(), Counter(), Counter(), Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not n.isdigit():
                continue
            n = int(n)
            total += n
            frames = stack.split(";")
            owner[_owner(frames)] += n
            leaf[_leaf_module(_frame_path(frames[-1])[1])] += n
            func, fpath = _frame_path(frames[-1])
            funcs[f"{func} ({fpath})"] += n
            lines_[frames[-1]] += n
            for label, needle in INCLUSIVE:
                if _inclusive_hit(needle, frames):
                    incl[label] += n
    if not total:
        return "(no samples)"
    pct = lambda v: f"{100 * v / total:.1f}%"  # noqa: E731
    lines = [f"py-spy samples (on-CPU only): {total}", "",
             "| owner (innermost router/hypercorn/metrics frame) | share |", "|---|---|"]
    lines += [f"| {k} | {pct(v)} |" for k, v in owner.most_common()]
    lines += ["", "| inclusive (frame anywhere on the stack) | share |", "|---|---|"]
    lines += [f"| {label} | {pct(incl[label])} |" for label, _ in INCLUSIVE]
    lines += ["", "| self time by leaf module | share |", "|---|---|"]
    lines += [f"| {k} | {pct(v)} |" for k, v in leaf.most_common(12)]
    lines += ["", "| top leaf functions | share |", "|---|---|"]
    lines += [f"| `{k}` | {pct(v)} |" for k, v in funcs.most_common(25)]
    lines += ["", "| top leaf lines | share |", "|---|---|"]
    lines += [f"| `{k}` | {pct(v)} |" for k, v in lines_.most_common(12)]
    return "\n".join(lines)


def _pyspy() -> str | None:
    p = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    return p if os.path.exists(p) else None


_GC_SYMBOLS = re.compile(r"^(gc_collect|visit_decref|visit_reachable|subtract_refs|update_refs|move_unreachable|"
                         r"deduce_unreachable|_PyFrame_Traverse|\w+_traverse$|gc_|_PyGC_|PyObject_GC_Track)")


def perf_split(tmp: str, pid: int, seconds: float, load) -> str:
    """Native view with `perf record` (if available): kernel vs CPython GC vs the rest, while `load()` runs."""
    perf = shutil.which("perf")
    if not perf:
        return "(perf not installed: no native/kernel split)"
    data = os.path.join(tmp, "perf.data")
    rec = spawn("perf", [perf, "record", "-F", "499", "-p", str(pid), "-o", data, "--", "sleep", str(seconds)], tmp)
    time.sleep(0.3)
    load()
    try:
        rec.wait(seconds + 20)
    except subprocess.TimeoutExpired:
        stop(rec)
    rep = subprocess.run([perf, "report", "-i", data, "--no-children", "--sort", "sym", "--stdio", "-g", "none"],
                         capture_output=True, text=True, timeout=60)
    kernel = gc = total = 0.0
    syms = []
    for line in rep.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+\[(.)\]\s+(\S+)", line)
        if not m:
            continue
        share, kind, sym = float(m.group(1)), m.group(2), m.group(3)
        total += share
        if kind == "k":
            kernel += share
        elif _GC_SYMBOLS.match(sym):
            gc += share
        syms.append((share, kind, sym))
    if not total:
        return f"(perf recorded nothing: {rep.stderr.strip()[:200]})"
    top = ", ".join(f"{s} {sh:.1f}%" for sh, k, s in syms[:8])
    return (f"perf (native, {seconds:g} s, 499 Hz): kernel {kernel:.1f}%, CPython cyclic GC {gc:.1f}%, "
            f"user-space rest {total - kernel - gc:.1f}%. Top symbols: {top}")


def pyspy_profile(tmp, args, label, router_pid, outdir, load, seconds) -> str:
    """py-spy (blocking sampling, 200 Hz) on the router while `load()` runs; returns the breakdown."""
    pyspy = _pyspy()
    if not pyspy:
        return "(py-spy not installed: pip install py-spy)"
    os.makedirs(outdir, exist_ok=True)
    collapsed = os.path.join(outdir, f"{label}.collapsed.txt")
    rec = spawn("py-spy", [pyspy, "record", "--pid", str(router_pid), "--duration", str(seconds), "--rate", "200",
                           "--format", "raw", "--output", collapsed], tmp)
    time.sleep(1.0)  # attach
    desc = load()
    try:
        rec.wait(seconds + 30)
    except subprocess.TimeoutExpired:
        stop(rec)
    out = [f"profiled load (py-spy attached, so these CPU numbers are inflated): {desc}", ""]
    out.append(analyze_collapsed(collapsed) if os.path.exists(collapsed) else f"(py-spy wrote nothing; {tmp}/py-spy.log)")
    out.append(f"\ncollapsed stacks: {collapsed}")
    if args.profile_svg:
        svg = os.path.join(outdir, f"{label}.svg")
        rec2 = spawn("py-spy-svg", [pyspy, "record", "--pid", str(router_pid), "--duration", str(seconds),
                                    "--rate", "200", "--output", svg], tmp)
        time.sleep(1.0)
        load()
        try:
            rec2.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            stop(rec2)
        out.append(f"flame graph: {svg}")
    out.append("")
    out.append(perf_split(tmp, router_pid, max(3, seconds - 1), load))
    return "\n".join(out)


def profile_json(tmp, lua, args, port, router_pid, upstream_pid, outdir) -> str:
    conc = args.profile_concurrency
    run_wrk(tmp, lua, port, conc, 1, 1 if conc == 1 else args.wrk_threads, args.wrk_cpus)

    def load():
        pt = measure_json(tmp, lua, args, "miles-router (profiled)", port, router_pid, upstream_pid, conc, warm=False)
        return f"c={conc}, {pt.rps:.0f} req/s, router {pt.router_us:.0f} µs/req, bad {pt.bad}"

    return pyspy_profile(tmp, args, "miles_router_json", router_pid, outdir, load, args.duration + 1)


def profile_sse(tmp, args, port, router_pid, upstream_pid, outdir) -> str:
    def load():
        sp = measure_sse(tmp, args, "miles-router (profiled)", port, router_pid, upstream_pid)
        return (f"{sp.streams} SSE streams, {sp.events} events, router {sp.router_us_per_chunk:.1f} µs/chunk, "
                f"bad streams {sp.bad}")

    return pyspy_profile(tmp, args, "miles_router_sse", router_pid, outdir, load, args.duration + 2)


# ------------------------------------------------------------------ report

def fmt(x, spec=".0f", none="–"):
    if x is None or (isinstance(x, float) and x != x):
        return none
    return format(x, spec)


def json_table(points: list[Point]) -> str:
    out = ["| target | conc | req/s | p50 ms | p99 ms | bad/total | router CPU µs/req | router cores | router sys% | "
           "upstream µs/req | wrk µs/req | other procs (cores) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        bad = f"{p.bad}/{p.requests}" + (f" ({p.bad_detail})" if p.bad_detail else "")
        out.append(f"| {p.target} | {p.conc} | {fmt(p.rps)} | {fmt(p.p50_ms, '.2f')} | {fmt(p.p99_ms, '.2f')} | "
                   f"{bad} | {fmt(p.router_us)} | {fmt(p.router_cores, '.2f')} | {fmt(p.router_sys_pct)} | {fmt(p.upstream_us)} | "
                   f"{fmt(p.loadgen_us)} | {fmt(p.other_cores, '.2f')} |" + (f" {p.note}" if p.note else ""))
    return "\n".join(out)


def sse_table(points: list[SsePoint], events: int, interval_ms: float) -> str:
    out = [f"SSE: {points[0].streams if points else '?'} concurrent streams x {events} events {interval_ms:g} ms "
           f"apart (+ [DONE]), back to back",
           "",
           "| target | streams ok/bad | events got/expected | events/s | TTFB p50 ms | stream p50 ms | stream p99 ms | "
           "router CPU µs/chunk | router cores | upstream µs/chunk | other procs (cores) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        out.append(f"| {p.target} | {p.ok}/{p.bad} | {p.events}/{p.expected_events} | {fmt(p.events_per_s)} | "
                   f"{fmt(p.ttfb_p50_ms, '.1f')} | {fmt(p.stream_p50_ms)} | {fmt(p.stream_p99_ms)} | "
                   f"{fmt(p.router_us_per_chunk, '.1f')} | {fmt(p.router_cores, '.2f')} | "
                   f"{fmt(p.upstream_us_per_chunk, '.1f')} | {fmt(p.other_cores, '.2f')} |"
                   + (f" errors: {p.errors}" if p.errors else ""))
    return "\n".join(out)


def ratios(points: list[Point], sse: list[SsePoint]) -> tuple[str, list[str]]:
    by = {(p.target, p.conc): p for p in points}
    concs = sorted({p.conc for p in points})
    lines = ["| conc | miles rps / direct | smg rps / direct | miles rps / smg | miles CPU/req ÷ smg CPU/req |",
             "|---|---|---|---|---|"]
    for c in concs:
        d, m, s = by.get(("direct", c)), by.get(("miles-router", c)), by.get(("sglang-router", c))

        def r(a, b, attr):
            va, vb = (getattr(a, attr) if a else None), (getattr(b, attr) if b else None)
            return fmt(va / vb, ".2f") if va and vb else "–"
        lines.append(f"| {c} | {r(m, d, 'rps')} | {r(s, d, 'rps')} | {r(m, s, 'rps')} | {r(m, s, 'router_us')} |")
    verdicts = []
    m64 = by.get(("miles-router", 64))
    if m64 and m64.router_us is not None:
        ok = m64.router_us <= 500
        verdicts.append(f"target <= 500 µs router CPU/request at c=64: miles-router {m64.router_us:.0f} µs -> "
                        f"{'MET' if ok else 'NOT MET'}")
    ms = [p for p in sse if p.target == "miles-router"]
    if ms and ms[0].router_us_per_chunk is not None:
        ok = ms[0].router_us_per_chunk <= 80
        verdicts.append(f"target <= 80 µs router CPU/SSE chunk: miles-router {ms[0].router_us_per_chunk:.1f} µs -> "
                        f"{'MET' if ok else 'NOT MET'}")
        ss = [p for p in sse if p.target == "sglang-router"]
        if ss and ss[0].router_us_per_chunk:
            verdicts.append(f"SSE CPU/chunk miles ÷ smg: {ms[0].router_us_per_chunk / ss[0].router_us_per_chunk:.2f}")
    for p in points:
        if p.target.startswith("miles-router gc0=") and p.conc == 64 and m64 and m64.router_us:
            verdicts.append(f"{p.target} at c=64: {p.router_us:.0f} µs/req ({100 * (p.router_us / m64.router_us - 1):+.0f}%"
                            f" vs miles-router)")
    for p in sse:
        if p.target.startswith("miles-router gc0=") and ms and ms[0].router_us_per_chunk:
            verdicts.append(f"{p.target} SSE: {p.router_us_per_chunk:.1f} µs/chunk "
                            f"({100 * (p.router_us_per_chunk / ms[0].router_us_per_chunk - 1):+.0f}% vs miles-router)")
    for p in points:
        one = by.get(("miles-router x1", p.conc))
        if p.target.startswith("miles-router x") and p.target != "miles-router x1" and one and one.rps:
            verdicts.append(f"{p.target} / miles-router x1 at c={p.conc}: {p.rps / one.rps:.2f}x req/s, "
                            f"{p.router_us / one.router_us:.2f}x router CPU per request, "
                            f"{p.router_cores:.2f} / {one.router_cores:.2f} router cores")
    busy = [p for p in [*points, *sse] if p.other_cores == p.other_cores and p.other_cores > 0.25]
    if busy:
        verdicts.append(f"host was shared: other processes used > 0.25 cores during {len(busy)} of "
                        f"{len(points) + len(sse)} points (max {max(p.other_cores for p in busy):.2f}); req/s and "
                        f"latency of those points are depressed, CPU µs/req is the robust number")
    bad = [p for p in points if p.bad] + [p for p in sse if p.bad or p.events != p.expected_events]
    verdicts.append("all responses 2xx and byte-exact, every SSE event arrived" if not bad else
                    "PROBLEMS: " + "; ".join(f"{p.target}" for p in bad))
    return "\n".join(lines), verdicts


# ------------------------------------------------------------------ main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="3 s per point instead of 10")
    ap.add_argument("--duration", type=int, help="seconds per measured point (default 10, --quick 3)")
    ap.add_argument("--concurrency", default="1,64,256", help="comma-separated wrk connection counts")
    ap.add_argument("--wrk-threads", type=int, default=2, help="wrk -t for concurrency > 1 (c=1 uses -t1)")
    ap.add_argument("--no-sglang-router", action="store_true", help="skip sglang-router (smg)")
    ap.add_argument("--skip-json", action="store_true")
    ap.add_argument("--skip-sse", action="store_true")
    ap.add_argument("--sse-streams", type=int, default=64)
    ap.add_argument("--sse-events", type=int, default=100)
    ap.add_argument("--sse-interval-ms", type=float, default=10.0)
    ap.add_argument("--compare-ref", metavar="GITREF",
                    help="also measure miles-router as of GITREF (a git worktree) in the same run: an A/B of a change")
    ap.add_argument("--processes", metavar="N,...",
                    help="also measure miles-router with N router processes (`--processes N`), for each N given; "
                         "JSON table only")
    ap.add_argument("--pin", action="store_true",
                    help="taskset: routers on CPU 0, upstreams on the last CPU, load generators unpinned")
    ap.add_argument("--profile", metavar="DIR",
                    help="after the measured points, load miles-router once more (JSON c=--profile-concurrency, "
                         "and SSE) under py-spy, then perf if installed; print a breakdown, keep stacks in DIR")
    ap.add_argument("--profile-concurrency", type=int, default=64)
    ap.add_argument("--profile-svg", action="store_true", help="with --profile: also record flame graph SVGs (one more load each)")
    ap.add_argument("--serve", action="store_true",
                    help="only start nginx + miles-router (+ smg), print their ports and wait for Ctrl-C "
                         "(for py-spy/strace/wrk by hand)")
    ap.add_argument("--json", metavar="FILE", help="also write raw results as JSON")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    args.duration = args.duration or (3 if args.quick else 10)
    args.wrk_cpus = None
    concs = [int(c) for c in args.concurrency.split(",") if c.strip()]

    for tool in ("wrk", "nginx") if not args.skip_json else ():
        if not shutil.which(tool):
            print(f"bench_proxy: `{tool}` not found (apt-get install -y nginx wrk)", file=sys.stderr)
            return 2
    use_smg = not args.no_sglang_router
    if use_smg and not smg_available():
        print("NOTE: `smg` (pip install sglang-router) not found: sglang-router is skipped", flush=True)
        use_smg = False
    ncpu = os.cpu_count() or 1
    router_cpus = "0" if args.pin and ncpu > 1 else None
    upstream_cpus = str(ncpu - 1) if args.pin and ncpu > 1 else None

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(stop_all)
    tmp = tempfile.mkdtemp(prefix="bench_proxy_")
    t_start = time.monotonic()
    results: dict = {"args": vars(args), "json": [], "sse": []}
    points: list[Point] = []
    sse_points: list[SsePoint] = []
    notes: list[str] = []
    profile_reports: list[tuple[str, str]] = []
    print(f"bench_proxy: {ncpu} CPUs, load avg {os.getloadavg()[0]:.2f}, {args.duration} s per point, "
          f"tmp {tmp}", flush=True)
    compare_repo = None
    if args.compare_ref:
        compare_repo = gitref.worktree(REPO, args.compare_ref, os.path.join(tmp, "compare_ref"))
    try:
        if args.serve:
            ports = free_ports(4)
            nginx = start_nginx(tmp, ports[0], upstream_cpus)
            miles = start_miles(tmp, ports[1], ports[0], "miles_json", router_cpus)
            lua = write_lua(tmp)
            print(f"nginx           http://127.0.0.1:{ports[0]}/generate  (pid {nginx.pid})")
            print(f"miles-router    http://127.0.0.1:{ports[1]}/generate  (pid {miles.pid})")
            if use_smg:
                smg = start_smg(tmp, ports[2], ports[3], ports[0], "smg_json", router_cpus)
                print(f"sglang-router   http://127.0.0.1:{ports[2]}/generate  (pid {smg.pid})")
            print(f"wrk -t2 -c64 -d10s -s {lua} http://127.0.0.1:{ports[1]}/generate\n"
                  f"py-spy record --pid {miles.pid} -d 10 -o /tmp/miles.svg\nCtrl-C to stop", flush=True)
            while all(p.poll() is None for _, p in _ALL):
                time.sleep(0.5)
            raise RuntimeError("a served process exited")
        if not args.skip_json:
            procs = [int(n) for n in args.processes.split(",")] if args.processes else []
            ports = free_ports(6 + len(procs))
            nginx_port, miles_port, smg_port, smg_prom, ref_port = ports[:5]
            nginx = start_nginx(tmp, nginx_port, upstream_cpus)
            t = time.monotonic()
            miles = start_miles(tmp, miles_port, nginx_port, "miles_json", router_cpus)
            print(f"  miles-router ready in {time.monotonic() - t:.1f} s", flush=True)
            targets = [("direct", nginx_port, None), ("miles-router", miles_port, miles.pid)]
            if compare_repo:
                ref = start_miles(tmp, ref_port, nginx_port, "miles_ref_json", router_cpus, compare_repo)
                targets.append((f"miles-router @{args.compare_ref}", ref_port, ref.pid))
            for n, port in zip(procs, ports[6:]):
                t = time.monotonic()
                several = start_miles(tmp, port, nginx_port, f"miles_x{n}_json", router_cpus, processes=n)
                print(f"  miles-router x{n} ready in {time.monotonic() - t:.1f} s", flush=True)
                targets.append((f"miles-router x{n}", port, several.pid))
            if use_smg:
                try:
                    t = time.monotonic()
                    smg = start_smg(tmp, smg_port, smg_prom, nginx_port, "smg_json", router_cpus)
                    print(f"  sglang-router ready in {time.monotonic() - t:.1f} s", flush=True)
                    targets.append(("sglang-router", smg_port, smg.pid))
                except RuntimeError as e:
                    notes.append(f"sglang-router skipped: {e} (log: {tmp}/smg_json.log)")
                    print("NOTE: " + notes[-1], flush=True)
            for name, port, _ in targets:  # byte-exact sanity check before any load
                st, body = http_call(port, "POST", "/generate", REQUEST_BODY)
                if st != 200 or body != RESPONSE_BODY:
                    notes.append(f"{name}: sanity request answered {st} with {body[:200]!r}")
                    print("WARNING: " + notes[-1], flush=True)
            lua = write_lua(tmp)
            fds0, rss0 = proc_fds_rss(miles.pid)
            for conc in concs:
                for name, port, pid in targets:
                    pt = measure_json(tmp, lua, args, name, port, pid, nginx.pid, conc)
                    points.append(pt)
                    print(f"  {name:14s} c={conc:<4d} {pt.rps:9.0f} req/s  p50 {pt.p50_ms:7.2f} ms  p99 "
                          f"{pt.p99_ms:7.2f} ms  router {fmt(pt.router_us):>5s} µs/req  bad {pt.bad}"
                          f"  other {pt.other_cores:.2f} cores", flush=True)
            if args.profile:
                profile_reports.append(("JSON, c=%d" % args.profile_concurrency,
                                        profile_json(tmp, lua, args, miles_port, miles.pid, nginx.pid, args.profile)))
            fds1, rss1 = proc_fds_rss(miles.pid)
            notes.append(f"miles-router before/after the JSON load: {fds0} -> {fds1} open fds, RSS {rss0:.0f} -> "
                         f"{rss1:.0f} MB (idle upstream sockets stay pooled until the next request; peak "
                         f"concurrency {max(concs)})")
            stop_all()

        if not args.skip_sse:
            ports = free_ports(5)
            sse_port, miles_port, smg_port, smg_prom, ref_port = ports
            up = start_sse_server(tmp, sse_port, args.sse_events, args.sse_interval_ms / 1e3, upstream_cpus)
            miles = start_miles(tmp, miles_port, sse_port, "miles_sse", router_cpus)
            targets = [("direct", sse_port, None), ("miles-router", miles_port, miles.pid)]
            if compare_repo:
                ref = start_miles(tmp, ref_port, sse_port, "miles_ref_sse", router_cpus, compare_repo)
                targets.append((f"miles-router @{args.compare_ref}", ref_port, ref.pid))
            if use_smg:
                try:
                    smg = start_smg(tmp, smg_port, smg_prom, sse_port, "smg_sse", router_cpus)
                    targets.append(("sglang-router", smg_port, smg.pid))
                except RuntimeError as e:
                    notes.append(f"sglang-router (SSE) skipped: {e}")
            for name, port, pid in targets:
                sp = measure_sse(tmp, args, name, port, pid, up.pid)
                sse_points.append(sp)
                print(f"  SSE {name:14s} {sp.ok} ok / {sp.bad} bad streams, {sp.events}/{sp.expected_events} events,"
                      f" router {fmt(sp.router_us_per_chunk, '.1f')} µs/chunk", flush=True)
            if args.profile:
                profile_reports.append(("SSE", profile_sse(tmp, args, miles_port, miles.pid, up.pid, args.profile)))
            stop_all()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        stop_all()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        return 130
    except RuntimeError as e:
        print(f"bench_proxy: {e}\n  logs in {tmp}", file=sys.stderr)
        stop_all()
        return 1
    finally:
        stop_all()

    print()
    print(f"## Proxy benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {ncpu} CPUs, {args.duration} s/point, "
          f"wall {time.monotonic() - t_start:.0f} s, load avg now {os.getloadavg()[0]:.2f})")
    if points:
        print("\nJSON POST /generate (wrk, ~200 B request, ~330 B response):\n")
        print(json_table(points))
    if sse_points:
        print()
        print(sse_table(sse_points, args.sse_events, args.sse_interval_ms))
    table, verdicts = ratios(points, sse_points)
    if points:
        print("\nRatios (same run):\n")
        print(table)
    print()
    for v in verdicts + notes:
        print("- " + v)
    for what, report in profile_reports:
        print(f"\n### miles-router profile ({what})\n")
        print(report)
    if args.json:
        results["json"] = [p.__dict__ for p in points]
        results["sse"] = [p.__dict__ for p in sse_points]
        results["notes"] = notes + verdicts
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not args.keep_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"\ntemp dir kept: {tmp}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_sse-server":
        sse_server_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_sse-client":
        sse_client_main(sys.argv[2:])
    else:
        raise SystemExit(main())
