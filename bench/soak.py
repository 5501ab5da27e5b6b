"""Soak: the radix-cache pipeline at steady load for minutes, with worker faults flipped at random
(issue #5).

    python bench/soak.py --minutes 10                 # the real soak (64 MB cache budget)
    python bench/soak.py --minutes 1                  # quick check
    python bench/soak.py --minutes 1 --budget-mb 2    # small budget: eviction happens within a minute
    python bench/soak.py --minutes 1 --json bench/results/soak.json
    python bench/soak.py --minutes 10 --extra-toml '[routing]\nprefix_capacity_blocks = 1000'

Simulated workers and the router run as subprocesses (`python -m router sim-worker`, `python -m
router --config <tmp toml>` with `[[routes]] /generate -> pipelines/radix-cache.toml` and `[cache]
budget_bytes`). A trio client keeps `--concurrency` conversations going (1-4 turns each, ~30% of the
requests streamed); after every completed turn it retrieves the conversation's text once and checks
it (exact, ends with the engine's output ids and logprobs, loss mask 1 on them, and for a first turn
the prompt tokens are the tokenizer's). That answer is the trajectory's reference.

Every `--fault-every-s` a random worker gets a random fault for 1-4 s (`/_sim/faults`: 500 or 503
replies, hang, delay, dropped connection mid-reply, failing health checks). Errors the client sees
while faults are on are expected and are counted by kind; they are not "lost trajectories".

Lost trajectories: every few seconds a sample of stored trajectories, and at the end all of them, are
retrieved again. One that no longer comes back exactly equal to its reference is
  * "evicted" if the cache's eviction counter moved since it was stored (the budget was reached; the
    cache evicts retrieved trajectories first, so that is allowed) -- "evicted, then re-covered" when
    its text still came back exact (`match: "prefix"`: a longer trajectory covers it up to a point where
    a generation started or ended);
  * otherwise "lost" (the target is 0).
The router's RSS is sampled every second; the verdict also requires it to stay under start + 1.5 x
budget (the hard budget) + 150 MB of fixed overhead.

Prints one JSON document (and writes it with --json); exit code 1 unless the verdict is PASS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter

import httpx
import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from load_streams import raise_nofile, rss_mb, start_router, start_sims  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = [
    ("generate_500", {"generate_status": 500}, {"generate_status": None}),
    ("generate_503", {"generate_status": 503}, {"generate_status": None}),
    ("hang", {"hang": True}, {"hang": False}),
    ("delay_1s", {"delay_s": 1.0}, {"delay_s": 0.0}),
    ("drop_mid_reply", {"drop_after_bytes": 200}, {"drop_after_bytes": None}),
    ("health_503", {"health_status": 503}, {"health_status": 200}),
]
WORDS = ("alpha beta gamma delta rollout token cache prefix reward policy sample answer question step "
         "proof lemma matrix vector gradient batch epoch worker router stream").split()


class Soak:
    def __init__(self, args, url: str, router_pid: int, sims: list[str]) -> None:
        self.args = args
        self.url = url
        self.router_pid = router_pid
        self.sims = sims
        self.rng = random.Random(args.seed)
        self.stored: dict[str, dict] = {}  # visible text -> reference
        self.stored_total = 0
        self.requests = 0
        self.ok = 0
        self.errors = Counter()
        self.error_bodies: Counter = Counter()  # (status, the first 160 bytes of the body): what the errors said
        self.bad_reference = Counter()  # a fresh retrieve that didn't match the reply: exactness bug
        self.faults = Counter()
        self.checks = Counter()
        self.lost_examples: list[str] = []
        self.rss: list[tuple[float, float]] = []
        self.cache: list[dict] = []
        self.evictions = 0  # latest /cache/stats "evictions" (nodes)
        self.deadline = 0.0
        self.tok = None

    # ---- the client --------------------------------------------------------------------------
    async def conversation(self, c: httpx.AsyncClient, cid: int) -> None:
        rng = random.Random(self.rng.random())
        text = f"<conv {cid}> " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "|"
        first = True
        for _turn in range(rng.randint(1, 4)):
            if time.monotonic() > self.deadline:
                return
            body = {"text": text, "sampling_params": {"max_new_tokens": rng.randint(4, 48), "ignore_eos": True,
                                                      "temperature": 0.8}}
            out = await self.generate(c, body, stream=rng.random() < 0.3)
            if out is None:
                return  # the conversation broke off on a fault: start a new one
            visible = text + out["text"]
            await self.reference(c, visible, out, prompt=text if first else None)
            first = False
            text = visible + " user: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) + "|"

    async def generate(self, c: httpx.AsyncClient, body: dict, stream: bool) -> dict | None:
        self.requests += 1
        try:
            if not stream:
                r = await c.post("/generate", json=body)
                if r.status_code != 200:
                    self.errors[f"status {r.status_code}"] += 1
                    self.error_bodies[(r.status_code, r.content[:160].decode("utf-8", "replace"))] += 1
                    return None
                self.ok += 1
                return r.json()
            final = None
            async with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    await r.aread()
                    self.errors[f"status {r.status_code}"] += 1
                    self.error_bodies[(r.status_code, r.content[:160].decode("utf-8", "replace"))] += 1
                    return None
                prev = None
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        if line == "data: [DONE]":
                            final = prev
                        prev = line[6:]
            if final is None:
                self.errors["stream without [DONE]"] += 1
                return None
            self.ok += 1
            return json.loads(final)
        except httpx.HTTPError as e:
            self.errors[type(e).__name__] += 1
            return None

    async def reference(self, c, visible: str, out: dict, prompt: str | None) -> None:
        r = await c.post("/retrieve_from_text", json={"text": visible})
        got = r.json()
        ids = out["output_ids"]
        lps = [t[0] for t in out["meta_info"]["output_token_logprobs"]]
        problems = []
        if not got.get("exact"):
            problems.append("not exact right after the reply")
        elif got["tokens"][-len(ids):] != ids:
            problems.append("output ids differ")
        elif any(abs(a - b) > 1e-6 for a, b in zip(got["rollout_logp"][-len(ids):], lps)):
            problems.append("logprobs differ")
        elif got["loss_mask"][-len(ids):] != [1] * len(ids):
            problems.append("loss mask")
        elif prompt is not None and got["tokens"][:-len(ids)] != self.tok.encode(prompt):
            problems.append("prompt tokens differ from the tokenizer's")
        if problems:
            self.bad_reference[problems[0]] += 1
            return
        self.stored_total += 1
        # Compact copies (tens of thousands of references are kept for a 10-minute run).
        self.stored[visible] = {"tokens": array("i", got["tokens"]), "logp": array("d", got["rollout_logp"]),
                                "mask": bytes(got["loss_mask"]), "evictions_at_store": self.evictions}

    async def verify(self, c, texts: list[str]) -> None:
        for text in texts:
            ref = self.stored[text]
            r = await c.post("/retrieve_from_text", json={"text": text})
            got = r.json()
            same = got.get("exact") and array("i", got["tokens"]) == ref["tokens"] \
                and array("d", got["rollout_logp"]) == ref["logp"] and bytes(got["loss_mask"]) == ref["mask"]
            if same:
                self.checks["ok"] += 1
                continue
            # The sampled eviction counter may be up to a second old: read it now before judging.
            self.evictions = (await c.get("/cache/stats")).json().get("evictions", 0)
            if self.evictions > ref["evictions_at_store"]:
                # The cache reached its budget since this was stored, so it may have been evicted. Its
                # text can then still be covered by a longer trajectory: exact (match "prefix") when
                # that one covers it up to a generation boundary; not exact (match "inside_prompt")
                # when e.g. the next turn's prompt re-tokenized a character the engine had cut in half.
                # Either way: evicted, allowed.
                self.checks["evicted, then re-covered" if got.get("exact") else "evicted"] += 1
                del self.stored[text]
                continue
            self.checks["lost"] += 1
            if got.get("exact"):
                a, b = list(ref["tokens"]), got["tokens"]
                at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                self.lost_examples.append({"text": text[:60], "why": "exact but different tokens",
                                           "len": [len(a), len(b)], "first_diff_at": at,
                                           "ref": a[max(0, at - 3):at + 4], "got": b[max(0, at - 3):at + 4]})
            else:
                self.lost_examples.append({"text": text[:60], "why": "not found, no eviction since stored",
                                           "evictions": [ref["evictions_at_store"], self.evictions],
                                           "matched_chars": got.get("matched_chars"), "chars": len(text)})

    # ---- background tasks --------------------------------------------------------------------
    async def workers_loop(self, c) -> None:
        cid = 0
        async with trio.open_nursery() as n:
            async def worker():
                nonlocal cid
                while time.monotonic() < self.deadline:
                    cid += 1
                    await self.conversation(c, cid)

            for _ in range(self.args.concurrency):
                n.start_soon(worker)

    async def fault_loop(self) -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as c:
            while time.monotonic() < self.deadline - 5:
                await trio.sleep(self.rng.uniform(0.5, 1.5) * self.args.fault_every_s)
                sim = self.rng.choice(self.sims)
                name, on, off = self.rng.choice(FAULTS)
                self.faults[name] += 1
                await c.post(sim + "/_sim/faults", json=on)
                await trio.sleep(self.rng.uniform(1, 4))
                await c.post(sim + "/_sim/faults", json=off)

    async def sample_loop(self, c) -> None:
        t0 = time.monotonic()
        while time.monotonic() < self.deadline:
            stats = (await c.get("/cache/stats")).json()
            self.evictions = stats.get("evictions", 0)
            self.rss.append((round(time.monotonic() - t0, 1), round(rss_mb(self.router_pid), 1)))
            self.cache.append({"t": round(time.monotonic() - t0, 1), "bytes": stats.get("bytes", 0),
                               "trajectories": stats.get("trajectories", 0), "evictions": self.evictions})
            await trio.sleep(1.0)

    async def spot_check_loop(self, c) -> None:
        while time.monotonic() < self.deadline:
            await trio.sleep(5)
            if self.stored:
                await self.verify(c, self.rng.sample(list(self.stored), min(50, len(self.stored))))

    async def run(self) -> None:
        from router.tokenizer import load_tokenizer

        self.tok = await trio.to_thread.run_sync(load_tokenizer, "builtin:tiny")
        limits = httpx.Limits(max_connections=self.args.concurrency + 8)
        async with httpx.AsyncClient(base_url=self.url, trust_env=False, timeout=30, limits=limits) as c:
            self.deadline = time.monotonic() + self.args.minutes * 60
            self.rss.append((0.0, round(rss_mb(self.router_pid), 1)))
            async with trio.open_nursery() as n:
                n.start_soon(self.sample_loop, c)
                n.start_soon(self.fault_loop)
                n.start_soon(self.spot_check_loop, c)
                await self.workers_loop(c)
            # Faults are all off again; every stored trajectory is checked once more.
            self.evictions = (await c.get("/cache/stats")).json().get("evictions", 0)
            await self.verify(c, list(self.stored))
            self.final_stats = (await c.get("/cache/stats")).json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--budget-mb", type=float, default=64.0, help="[cache] budget_bytes, in MB")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=24, help="conversations in flight")
    ap.add_argument("--token-latency-s", type=float, default=0.002)
    ap.add_argument("--fault-every-s", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-toml", default="", help="appended to the router's config, e.g. "
                    "'[routing]\\nprefix_capacity_blocks = 1000' (to see what a setting costs)")
    ap.add_argument("--router-prelude", default="", help="Python code run in the router process before it "
                    "starts (to measure a patch without editing the router)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()

    raise_nofile()
    logdir = tempfile.mkdtemp(prefix="soak.")
    sims = start_sims(args.workers, args.token_latency_s, logdir=logdir)
    budget = int(args.budget_mb * 1024 * 1024)
    toml = (f'[server]\nhost = "127.0.0.1"\nport = @PORT@\nlog_level = "warning"\nrequest_timeout_s = 3.0\n'
            f'[workers]\nurls = {json.dumps(sims)}\nhealth_interval_s = 0.25\nfailure_threshold = 2\n'
            'success_threshold = 2\n'
            '[tokenizer]\npath = "builtin:tiny"\n'
            f'[cache]\nbudget_bytes = {budget}\nhard_budget_bytes = {budget * 3 // 2}\ncleanup_interval_s = 1.0\n'
            + args.extra_toml.replace("\\n", "\n") + "\n"
            f'[[routes]]\npath = "/generate"\npipeline = "{os.path.join(REPO, "pipelines/radix-cache.toml")}"\n')
    router, url = start_router(toml, logdir, prelude=args.router_prelude or None)
    time.sleep(1.0)
    soak = Soak(args, url, router.pid, sims)
    t0 = time.monotonic()
    trio.run(soak.run)
    elapsed = time.monotonic() - t0
    rss = [r for _, r in soak.rss]
    peak_cache = max((s["bytes"] for s in soak.cache), default=0)
    overhead_mb = 150.0
    out = {
        "config": vars(args), "logs": logdir, "elapsed_s": round(elapsed, 1),
        "requests": soak.requests, "served_ok": soak.ok, "req_per_s": round(soak.requests / elapsed, 1),
        "faults_injected": dict(soak.faults), "faults_total": sum(soak.faults.values()),
        "client_errors_seen": dict(soak.errors), "client_errors_total": sum(soak.errors.values()),
        "client_error_bodies": [{"status": st, "body": b, "count": n} for (st, b), n in soak.error_bodies.most_common(8)],
        "bad_fresh_retrievals": dict(soak.bad_reference),
        "trajectories_stored": soak.stored_total,
        "verifications": dict(soak.checks),
        "trajectories_lost": soak.checks["lost"] + sum(soak.bad_reference.values()),
        "lost_examples": soak.lost_examples[:5],
        "cache": {"budget_mb": args.budget_mb, "peak_bytes_mb": round(peak_cache / 2**20, 1),
                  "final": soak.final_stats},
        "router_rss_mb": {"start": rss[0], "max": max(rss), "end": rss[-1],
                          "bound": round(rss[0] + args.budget_mb * 1.5 + overhead_mb, 1),
                          "series_every_10s": [r for t, r in soak.rss[::10]]},
    }
    out["verdict"] = "PASS" if out["trajectories_lost"] == 0 and max(rss) <= out["router_rss_mb"]["bound"] else "FAIL"
    router.send_signal(signal.SIGTERM)
    try:
        out["router_exit_code"] = router.wait(timeout=40)
    except subprocess.TimeoutExpired:
        out["router_exit_code"] = None
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")
    sys.exit(0 if out["verdict"] == "PASS" else 1)


if __name__ == "__main__":
    main()
