"""What health probing costs a router process with many engines (issue 19 item 7's sizing: 1,000 engines).

    python bench/bench_probes.py                          # 100 and 1,000 workers, the default 5 s interval, 20 s each
    python bench/bench_probes.py --workers 1000 --interval 1 --seconds 30
    python bench/bench_probes.py --compare-ref HEAD~1     # also the router as of a commit, same run

One nginx (1 worker process) answers `/health`, `/model_info` and `/server_info` for every "engine": the
workers are `http://127.0.0.<a>.<b>:<port>/`, distinct loopback addresses on one port, so a router sees N
different hosts and keeps a connection per worker, as it would with N engines. A router process
(`python -m router`, no routes, sessions off, log level warning) is started with all N in `[workers] urls`
and `health_interval_s = --interval`. Once every worker is healthy (each was probed and asked /model_info), the
router's CPU (utime+stime from /proc) is read over `--seconds` of no traffic but the probes: CPU per probe =
router CPU / (N x seconds / interval), and the share of a core the probes take. A router that is not ready
within 60 s (its event loop saturated by its own probes) is reported as such, with the CPU it used meanwhile.
`--compare-ref GITREF` measures each point also with the router as of GITREF (a temporary git worktree).

Needs `nginx` on PATH (apt-get install -y nginx).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_proxy as bp  # noqa: E402 - its process helpers and nginx upstream
import gitref  # noqa: E402


def worker_urls(port: int, n: int) -> list[str]:
    return [f"http://127.0.{1 + i // 250}.{1 + i % 250}:{port}" for i in range(n)]


def start_router(tmp: str, port: int, urls: list[str], interval: float, repo: str, label: str):
    cfg = os.path.join(tmp, f"router-{len(urls)}{label}.toml")
    with open(cfg, "w") as f:
        f.write(f"""[server]
port = {port}
log_level = "warning"
[workers]
urls = {json.dumps(urls)}
health_interval_s = {interval}
[sessions]
enabled = false
""")
    env = dict(os.environ, PYTHONPATH=repo, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    return bp.spawn(f"router-{len(urls)}{label}", [sys.executable, "-m", "router", "--config", cfg], tmp, env=env,
                    cwd=repo)


def measure(tmp: str, nginx_port: int, n: int, interval: float, seconds: float, repo: str, label: str) -> dict:
    port = bp.free_ports(1)[0]
    router = start_router(tmp, port, worker_urls(nginx_port, n), interval, repo, label)

    def all_healthy(port):
        status, body = bp.http_call(port, "GET", "/health")
        return status == 200 and json.loads(body)["healthy_workers"] == n

    row = {"router": label[1:] or "this checkout", "workers": n, "interval_s": interval}
    try:
        t0 = time.monotonic()
        try:
            row["ready_s"] = bp.wait_ready("router", router, port, all_healthy, 60)
        except RuntimeError:  # busy with its own probes: what it spent trying
            cpu = sum(bp.tree_cpu_us(router.pid))
            row.update(ready_s=None, cores=cpu / (time.monotonic() - t0))
            return row
        time.sleep(interval)  # every prober past its first round (the /model_info fetch)
        win = bp.CpuWindow({"router": router.pid})
        win.start()
        time.sleep(seconds)
        win.stop()
        row["fds"], row["rss_mb"] = bp.proc_fds_rss(router.pid)
    finally:
        bp.stop(router)
    probes = n * win.wall / interval
    row.update(probes_per_s=probes / win.wall, us_per_probe=win.cpu["router"] / probes * 1e6,
               cores=win.cpu["router"] / win.wall)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="100,1000", help="comma-separated worker counts")
    ap.add_argument("--interval", type=float, default=5.0, help="workers.health_interval_s (the default: 5)")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per point")
    ap.add_argument("--compare-ref", metavar="GITREF", help="also the router as of GITREF, same run")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, bp._on_signal)
    tmp = tempfile.mkdtemp(prefix="bench_probes_")
    targets = [("", bp.REPO)]
    if args.compare_ref:
        targets.append(("@" + args.compare_ref, gitref.worktree(bp.REPO, args.compare_ref, os.path.join(tmp, "ref"))))
    print(f"# bench_probes.py: logs in {tmp}", flush=True)
    rows = []
    try:
        nginx_port = bp.free_ports(1)[0]
        nginx = bp.start_nginx(tmp, nginx_port, None)
        # nginx listens on 127.0.0.1 only: listen on every loopback address instead
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf) as f:
            text = f.read().replace(f"listen 127.0.0.1:{nginx_port}", f"listen {nginx_port}")
        bp.stop(nginx)
        with open(conf, "w") as f:
            f.write(text)
        nginx = bp.spawn("nginx", ["nginx", "-p", tmp, "-c", conf, "-e", os.path.join(tmp, "nginx.error.log")], tmp)
        bp.wait_ready("nginx", nginx, nginx_port, lambda p: bp.http_call(p, "GET", "/health")[0] == 200, 10)
        for n in (int(x) for x in args.workers.split(",")):
            for label, repo in targets:
                r = measure(tmp, nginx_port, n, args.interval, args.seconds, repo, label)
                rows.append(r)
                print(f"{r['router']}, {n} workers: " + (
                    f"{r['us_per_probe']:.0f} µs per probe, {r['cores']:.3f} cores, {r['probes_per_s']:.0f} probes/s, "
                    f"ready in {r['ready_s']:.1f} s" if r["ready_s"] is not None else
                    f"not ready within 60 s, {r['cores']:.2f} cores meanwhile"), flush=True)
    finally:
        bp.stop_all()
    print("\n| router | workers | health_interval_s | probes/s | router CPU µs per probe | router cores | ready in |"
          "\n|---|---|---|---|---|---|---|")
    for r in rows:
        if r["ready_s"] is None:
            print(f"| {r['router']} | {r['workers']} | {r['interval_s']:g} | – | – | {r['cores']:.2f} | "
                  f"not within 60 s |")
        else:
            print(f"| {r['router']} | {r['workers']} | {r['interval_s']:g} | {r['probes_per_s']:.0f} | "
                  f"{r['us_per_probe']:.0f} | {r['cores']:.3f} | {r['ready_s']:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
