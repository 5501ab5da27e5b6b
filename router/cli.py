"""`miles-router`: run the router, check a config, or run one simulated SGLang worker.

    miles-router --config router.toml [--host H] [--port P] [--log-level L] [--processes N]
    miles-router check --config router.toml
    miles-router sim-worker --port 31000 [--tokenizer builtin:qwen] [--seed 0] [--token-latency-s 0.01]
    miles-router store stats|export|vacuum --config router.toml [--out FILE] [--all] [--format samples|retrieve]

A bad config or pipeline, a trajectory store that cannot be opened, `--processes N` (`server.processes`) > 1
without a store every process shares (router/net/supervisor.py), or a library whose patched code is not the
reviewed one (router/http/reviewed.py) prints one line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from functools import partial

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _processes(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"must be a whole number in 1..256, got {text!r}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="miles-router", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the router (the default)")
    for q in (p, run):
        q.add_argument("--config", help="router TOML file (default: built-in defaults)")
        q.add_argument("--host")
        q.add_argument("--port", type=int)
        q.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
        q.add_argument("--processes", type=_processes, metavar="N",
                       help="router processes sharing the port (server.processes; > 1 needs [store] url)")
    chk = sub.add_parser("check", help="validate a config and print the resolved configuration")
    chk.add_argument("--config", required=True)
    demo = sub.add_parser("demo-agent", help="run a short tool-calling agent (openai SDK) through /sessions "
                                             "and print its training samples' shapes")
    demo.add_argument("--url", default="http://127.0.0.1:30000")
    demo.add_argument("--turns", type=int, default=4)
    sim = sub.add_parser("sim-worker", help="run one simulated SGLang worker")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=31000)
    sim.add_argument("--tokenizer", default="builtin:qwen")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--token-latency-s", type=float, default=0.0)
    sim.add_argument("--weight-version", default="default")
    sim.add_argument("--no-routed-experts", action="store_true")
    sim.add_argument("--name", default="sim")
    st = sub.add_parser("store", help="inspect or maintain the durable trajectory store")
    st.add_argument("action", choices=["stats", "export", "vacuum"])
    st.add_argument("--config", required=True)
    st.add_argument("--out", help="export: the safetensors file to write (default: stdout is refused)")
    st.add_argument("--all", action="store_true", help="export: retrieved trajectories too")
    st.add_argument("--format", choices=["samples", "retrieve"], default="samples",
                    help="export: miles' samples layout (the default) or /retrieve_from_text's safetensors layout")
    return p


def _load(path: str | None):
    from router.config import ConfigError, default_config, load_config
    from router.core.pipeline import PipelineError, load_pipeline

    try:
        cfg = load_config(path) if path else default_config()
        pipelines = {(r.method, r.path): load_pipeline(r.pipeline, cfg.base_dir) for r in cfg.routes}
        if cfg.sessions.enabled:
            pipelines[("POST", "/sessions/{id}/v1/chat/completions")] = load_pipeline(cfg.sessions.pipeline, cfg.base_dir)
    except (ConfigError, PipelineError) as e:
        print(f"miles-router: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg, pipelines


def _persisting(cfg, pipelines) -> bool:
    specs = list(pipelines.values())
    if cfg.sessions.enabled:
        from router.core.pipeline import load_pipeline

        specs.append(load_pipeline(cfg.sessions.pipeline, cfg.base_dir))
    return any(getattr(s.cls, "uses_store", False) for p in specs for s in p.stages)


def _check_store(cfg, pipelines) -> None:
    """Refuse to start on a store that cannot be opened: one line saying why, exit 2."""
    if not (cfg.store.enabled and _persisting(cfg, pipelines)):
        return
    from router.core.store import StoreOpenError
    from router.net.store_open import check_openable

    try:
        check_openable(cfg)
    except StoreOpenError as e:
        print(f"miles-router: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _setup_logging(level: str, *, with_pid: bool = False) -> None:
    name = "%(name)s[%(process)d]" if with_pid else "%(name)s"  # several router processes write to one stderr
    logging.basicConfig(level=getattr(logging, level.upper()), format=f"%(asctime)s %(levelname)s {name}: %(message)s")
    # One line per health probe is noise; the router logs state changes itself.
    for noisy in ("httpx", "httpcore", "hypercorn"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def tune_process() -> None:
    """Process-wide settings for a long-running proxy."""
    import gc
    import resource

    # Each proxied request holds two sockets; the default soft limit (often 1024) is far too low.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Startup objects (tokenizer tables, modules) are permanent: keep them out of every collection,
    # and collect the young generation less often (measured -17% CPU per proxied request).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def _libraries_reviewed() -> bool:
    """The server's library fixes match the installed hypercorn/trio/h11; else one line on stderr."""
    from router.http import reviewed

    try:
        reviewed.check()
    except reviewed.LibraryChanged as e:
        print(f"miles-router: cannot start: {e}", file=sys.stderr)
        return False
    return True


def _check_processes(cfg, pipelines, where: str) -> None:
    """Refuse `server.processes` > 1 without state every process shares: one line naming the key, exit 2."""
    from router.net.supervisor import processes_problem

    problem = processes_problem(cfg, pipelines)
    if problem is not None:
        print(f"miles-router: {where}: {problem}", file=sys.stderr)
        raise SystemExit(2)


def _child_command(args, cfg) -> list[str]:
    """How the supervisor starts one router process: this command line, minus --processes and --port."""
    cmd = [sys.executable, "-m", "router", "run", "--host", cfg.server.host, "--log-level", cfg.server.log_level]
    if args.config:
        cmd += ["--config", os.path.abspath(args.config)]
    return cmd


def cmd_run(args) -> int:
    import trio

    from router.net.server import run_router
    from router.net.siblings import SiblingLink

    if not _libraries_reviewed():
        return 2
    link = SiblingLink.from_env()  # set: this is one of the processes of `--processes N`
    cfg, pipelines = _load(args.config)
    if link is None:
        if args.processes is not None:
            cfg.server.processes = args.processes
        n = cfg.server.processes
        where = f"--processes {n}" if args.processes is not None else f"{args.config}: server.processes = {n}"
        _check_processes(cfg, pipelines, where)
    _check_store(cfg, pipelines)
    if args.host:
        cfg.server.host = args.host
    if args.port is not None:
        cfg.server.port = args.port
    if args.log_level:
        cfg.server.log_level = args.log_level
    several = link is not None or cfg.server.processes > 1
    _setup_logging(cfg.server.log_level, with_pid=several)
    tune_process()
    try:
        if link is not None:
            # the supervisor runs the simulated workers, once for all processes
            cfg.simulate.workers = 0
            cfg.workers.urls = [*cfg.workers.urls, *link.workers]
            trio.run(partial(run_router, cfg, siblings=link))
        elif cfg.server.processes > 1:
            from router.net.supervisor import Supervisor

            return trio.run(Supervisor(cfg, _child_command(args, cfg)).run)
        else:
            trio.run(run_router, cfg)
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"miles-router: cannot start: {e}", file=sys.stderr)
        return 1
    return 0


def _route_table(cfg) -> list[dict]:
    """The routes the router answers itself for this config (router/net/routes.py), as `check` prints them."""
    import trio

    from router.net.app import RouterApp
    from router.net.runtime import Runtime

    async def build() -> list[dict]:
        async with trio.open_nursery() as n:
            rt = Runtime(cfg, n)
            try:
                rt.load_pipelines()
                return RouterApp(rt).routes.rows()
            finally:
                await rt.aclose()

    return trio.run(build)


def cmd_check(args) -> int:
    import msgspec

    cfg, pipelines = _load(args.config)
    out = msgspec.to_builtins(cfg)
    if cfg.store.url is not None:  # printed without its password
        from router.net.store_pg import redact

        out["store"]["url"] = redact(cfg.store.url)
    out["routes"] = [
        {**msgspec.to_builtins(r), "stages": pipelines[(r.method, r.path)].describe()} for r in cfg.routes
    ]
    if cfg.sessions.enabled:
        key = ("POST", "/sessions/{id}/v1/chat/completions")
        out["routes"].append({"path": key[1], "method": "POST", "pipeline": cfg.sessions.pipeline,
                              "policy": "sticky (session id)", "stages": pipelines[key].describe()})
    out["routes"].append({"path": "(any other path)", "pipeline": "passthrough", "stages": [{"stage": "forward", "phase": "forward", "options": {}}]})
    out["router_routes"] = _route_table(cfg)
    print(json.dumps(out, indent=2))
    print(f"{args.config}: OK", file=sys.stderr)
    return 0


def cmd_sim_worker(args) -> int:
    import trio

    from router.sim import SimOptions, serve_sim_worker

    if not _libraries_reviewed():
        return 2
    _setup_logging("info")
    opts = SimOptions(tokenizer=args.tokenizer, seed=args.seed, token_latency_s=args.token_latency_s,
                      weight_version=args.weight_version, enable_routed_experts=not args.no_routed_experts,
                      name=args.name)

    async def main() -> None:
        async with trio.open_nursery() as n:
            url, _ = await n.start(serve_sim_worker, opts, args.host, args.port)
            logging.getLogger("miles_router").info("simulated SGLang worker on %s", url)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_store(args) -> int:
    from router.core.store import StoreOpenError

    cfg, _ = _load(args.config)
    from router.net import store_tools

    try:
        if args.action == "stats":
            print(json.dumps(store_tools.stats(cfg), indent=2))
        elif args.action == "vacuum":
            print(json.dumps(store_tools.vacuum(cfg), indent=2))
        else:
            if not args.out:
                print("miles-router: store export needs --out FILE", file=sys.stderr)
                return 2
            print(json.dumps(store_tools.export(cfg, args.out, unretrieved_only=not args.all, layout=args.format),
                             indent=2))
    except StoreOpenError as e:
        print(f"miles-router: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "store":
        return cmd_store(args)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "sim-worker":
        return cmd_sim_worker(args)
    if args.command == "demo-agent":
        from router.demo import run

        return run(args.url, args.turns)
    return cmd_run(args)


if __name__ == "__main__":
    raise SystemExit(main())
