"""Trajectory-cache benchmark: router.core.radix.RadixTree vs the per-token list trie (bench/list_trie.py).

    python bench/bench_radix.py            # 500 prompts x 8 samples x (1 + 3 follow-up turns), ~1-2 min on 2 cores
    python bench/bench_radix.py --small    # 60 prompts, a few seconds
    python bench/bench_radix.py --prompts 200 --samples 8 --turns 3 --seed 1
    python bench/bench_radix.py --compare-ref 6293751   # also the radix tree as of a commit, same run
    python bench/bench_radix.py --compare-ref 94fceac --reps 3   # each tree 3 times, alternating: the best of each

Workload (GRPO, multi-turn, ChatML): a shared system prompt; per prompt a user question (prompt 200-600
tokens); `--samples` responses per prompt, each 100-400 token ids sampled from the tokenizer's plain-word tokens
plus <|im_end|>; then `--turns` follow-up user turns per sample whose text is the previous visible text +
"<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n". Every request is first looked up
by text (match_text, as the radix_lookup stage does); the unmatched tail is tokenized and the trajectory inserted;
at the end every trajectory is retrieved by its visible text (as /retrieve_from_text does). The workload is
generated once, up front, and replayed identically into both structures in the same process; only the structure's
own calls are timed. Lookup results are checked against the expected token prefix (the list trie's greedy text
descent can take a wrong branch where two tokens share a text prefix; those are counted, not fatal).

Memory: bytes per cached token measured with tracemalloc (every Python and numpy allocation, after gc) while
building each structure from the first 10% of the workload's prompts (inserts only; tracemalloc slows allocation,
so it is a separate, untimed build; per-token cost does not depend on scale). RSS deltas were tried and dropped:
the first structure built reuses memory the workload generator freed, so they under-count it.

Memory with routed experts: the same subset built again with R3 rows (`--r3`, default 48 layers x top-8, ids
from 128 experts), reported as bytes per cached token beyond the rows-free build; and the same trajectories
packed as durable-store records (router/wire/store.py), bytes per token with and without those rows.

--compare-ref GITREF loads router.core.radix as of GITREF (git archive, no checkout) and replays the same
workload through it in the same process, so "no slower than before" is measured on one host at one moment.

Tokenizer: the real Qwen2.5 BPE from router.tokenizer.load_tokenizer("builtin:qwen") when importable, else a
synthetic greedy longest-match tokenizer (printed in the header).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from list_trie import ListTrie  # noqa: E402

from router.core.radix import RadixTree, TrajectoryInput  # noqa: E402
from router.core.vocab import VocabBytes  # noqa: E402

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will can more other what time "
         "about up out some into only its could new them man these two may first any then now well like our very "
         "over such through years most where much before way should because each just those people how too "
         "little state good make world still own see men work long get here between both life being under never "
         "day same another know while last might us great old year off come since against go came right used "
         "take three small large next early young important few public bad able model token reward policy value "
         "gradient sample rollout train batch update learning function return number answer question problem "
         "step solve compute prove integer prime sum product equal triangle circle probability").split()


class BenchTokenizer:
    def __init__(self, synthetic: bool = False) -> None:
        try:
            if synthetic:
                raise ImportError("--synthetic")
            from router.tokenizer import load_tokenizer

            tok = load_tokenizer("builtin:qwen")
            self.name = "builtin:qwen (real Qwen2.5 byte-level BPE, via router.tokenizer)"
            # the same exact bytes as tok.token_bytes, gathered vectorized (both structures use it)
            blob, lens = tok.token_bytes(np.arange(len(tok)))
            offs = np.concatenate(([0], np.cumsum(lens, dtype=np.int64))).tolist()
            self.token_bytes = VocabBytes([blob[offs[i]:offs[i + 1]] for i in range(len(tok))])
            self._encode = lambda b: tok.encode(b.decode("utf-8"))
            self.eos = tok.encode("<|im_end|>")[0]
            n = 151643  # ordinary BPE ranks; added tokens follow
        except Exception as e:  # noqa: BLE001 - any failure: fall back and say so
            print(f"[router.tokenizer unavailable ({type(e).__name__}: {e}); using a SYNTHETIC tokenizer]")
            rng = np.random.default_rng(1234)
            pieces = [bytes([i]) for i in range(256)] + [b"<|im_start|>", b"<|im_end|>", b"<|endoftext|>"]
            words = {w.encode() for w in WORDS} | {("".join(rng.choice(list("etaoinshrdlu"), rng.integers(2, 8))))
                                                      .encode() for _ in range(6000)}
            pieces += sorted(words) + sorted(b" " + w for w in words)
            self.name = f"SYNTHETIC greedy longest-match ({len(pieces)} tokens)"
            ids = {p: i for i, p in enumerate(pieces)}
            maxlen = max(map(len, pieces))
            self.token_bytes = VocabBytes(pieces)

            def encode(text: bytes) -> list[int]:
                out, i = [], 0
                while i < len(text):
                    for k in range(min(maxlen, len(text) - i), 0, -1):
                        if text[i:i + k] in ids:
                            out.append(ids[text[i:i + k]])
                            i += k
                            break
                return out

            self._encode = encode
            self.eos = ids[b"<|im_end|>"]
            n = len(pieces)
        blob, lens = self.token_bytes(np.arange(n))
        offs = np.concatenate(([0], np.cumsum(lens, dtype=np.int64)))
        plain = re.compile(rb"^ ?[A-Za-z]{2,12}$|^[.,;:!?]$|^\n$")
        self.word_ids = np.array([i for i in range(n) if plain.match(blob[offs[i]:offs[i + 1]])], np.int32)

    def encode(self, text: bytes) -> list[int]:
        return self._encode(text)


class Req:
    """One /generate call of the workload: the text sent, what the cache should supply, what the engine did."""

    __slots__ = ("query", "prefix_len", "traj")

    def __init__(self, query: bytes, prefix_len: int, traj: TrajectoryInput):
        self.query, self.prefix_len, self.traj = query, prefix_len, traj


def words(rng, n: int) -> bytes:
    return " ".join(rng.choice(WORDS, n)).capitalize().encode() + b"."


def make_workload(tok: BenchTokenizer, rng, prompts: int, samples: int, turns: int) -> list[list[list[Req]]]:
    """[prompt][turn][sample] -> Req; turn 0 is the first request, turns 1.. the follow-ups."""
    system = b"<|im_start|>system\nYou are a careful assistant. " + words(rng, 110) + b"<|im_end|>\n"
    out = []
    for p in range(prompts):
        ptext = system + b"<|im_start|>user\n" + words(rng, int(rng.integers(40, 400))) + \
            b"<|im_end|>\n<|im_start|>assistant\n"
        pids = np.asarray(tok.encode(ptext), np.int32)
        rounds = [[None] * samples for _ in range(turns + 1)]
        for s in range(samples):
            query, prompt_ids, prefix = ptext, pids, 0  # the samples' first requests go out together
            for t in range(turns + 1):
                n = int(rng.integers(100, 401))
                out_ids = np.append(rng.choice(tok.word_ids, n), tok.eos).astype(np.int32)
                lps = (-rng.exponential(0.5, n + 1)).astype(np.float32)
                visible = query + tok.token_bytes(out_ids[:-1])[0]
                tr = TrajectoryInput(rid=f"{p}.{s}.{t}", prompt_ids=prompt_ids, output_ids=out_ids,
                                     output_logprobs=lps, visible_text=visible, weight_version="1",
                                     worker=f"http://w{s % 4}:30000", finish="stop")
                rounds[t][s] = Req(query, prefix, tr)
                follow = b"<|im_end|>\n<|im_start|>user\n" + words(rng, int(rng.integers(10, 40))) + \
                    b"<|im_end|>\n<|im_start|>assistant\n"
                query = visible + follow
                prefix = prompt_ids.size + out_ids.size
                rest = follow[len(b"<|im_end|>"):]  # the eos token covers "<|im_end|>"
                prompt_ids = np.concatenate((prompt_ids, out_ids, np.asarray(tok.encode(rest), np.int32)))
        out.append(rounds)
    return out


def run(struct, workload, is_radix: bool) -> dict:
    """Replay the workload: per (prompt, turn) the samples' lookups as one batch, then their inserts (GRPO
    samples are issued together); then every trajectory's retrieve, one batch per prompt. Timed with process
    CPU time per batch, so other processes on a shared machine do not count."""
    t_ins = t_look = t_ret = 0.0
    n_ins = n_look = n_ret = bad_look = bad_ret = 0
    clock, now = time.process_time, 0.0
    for rounds in workload:
        for reqs in rounds:
            now += 1.0
            t0 = clock()
            matches = [struct.match_text(r.query, now=now) for r in reqs]
            t1 = clock()
            for r in reqs:
                struct.insert(r.traj, now=now)
            t2 = clock()
            t_look, t_ins = t_look + t1 - t0, t_ins + t2 - t1
            n_look, n_ins = n_look + len(reqs), n_ins + len(reqs)
            for r, m in zip(reqs, matches):
                bad_look += (m.tokens.size if is_radix else len(m[0])) != r.prefix_len
    for rounds in workload:
        trs = [r.traj for reqs in rounds for r in reqs]
        texts = [bytes(bytearray(tr.visible_text)) for tr in trs]  # fresh objects, as parsed from request bodies
        t0 = clock()
        results = [struct.retrieve(text, now=now) for text in texts]
        t_ret += clock() - t0
        n_ret += len(texts)
        for tr, res in zip(trs, results):
            toks = res.tokens if is_radix else res["tokens"]
            want = tr.prompt_ids.size + tr.output_ids.size
            bad_ret += len(toks) != want or int(toks[-1]) != int(tr.output_ids[-1])
    return dict(ins=n_ins / t_ins, look=n_look / t_look, ret=n_ret / t_ret, bad_look=bad_look, bad_ret=bad_ret,
                all=(n_ins + n_look + n_ret) / (t_ins + t_look + t_ret))


def traced_bytes_per_token(factory, workload, is_radix: bool, r3_shape=None) -> tuple[float, int, int]:
    """(tracemalloc bytes per cached token, tokens, nbytes estimate) after inserting `workload`; with
    `r3_shape` = (layers, top_k) every trajectory carries routed-expert rows (made before tracing starts)."""
    rng = np.random.default_rng(7)
    items = []
    for rounds in workload:
        for reqs in rounds:
            for r in reqs:
                tr = r.traj
                if r3_shape is not None:
                    n = tr.prompt_ids.size + tr.output_ids.size
                    tr = msgspec.structs.replace(tr, routed_experts=rng.integers(0, 128, (n - 1, *r3_shape),
                                                                                  dtype=np.int32))
                items.append(tr)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    s = factory()
    for tr in items:
        s.insert(tr, now=0.0)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    ntok = s.stats()["tokens"] if is_radix else s.ntokens
    return used / ntok, ntok, (s.nbytes if is_radix else 0)


def stored_bytes_per_token(workload, r3_shape) -> tuple[float, float, float]:
    """Durable-store record bytes per token (router.wire.store's msgpack record, what SQLite's payload column
    holds) of the workload's trajectories as the cache answers them: (no R3, R3 at the stored width, R3 as
    int32), the R3 ids drawn from 128 experts as in the memory build."""
    from router.wire import store as store_wire

    rng = np.random.default_rng(7)
    sizes = [0, 0, 0]
    tokens = 0
    for rounds in workload:
        for reqs in rounds:
            for r in reqs:
                tr = r.traj
                toks = np.concatenate([tr.prompt_ids, tr.output_ids])
                mask = np.r_[np.zeros(tr.prompt_ids.size, np.uint8), np.ones(tr.output_ids.size, np.uint8)]
                lps = np.r_[np.zeros(tr.prompt_ids.size, np.float32), tr.output_logprobs]
                rows = rng.integers(0, 128, (toks.size - 1, *r3_shape), dtype=np.int32)
                for i, experts in enumerate((None, rows)):
                    rec = store_wire.pack(rid=tr.rid, created=0.0, prompt_len=tr.prompt_ids.size, finish="stop",
                                          worker=tr.worker, weight_version="1", versions=["1"], tokens=toks,
                                          logprobs=lps, loss_mask=mask, experts=experts)
                    sizes[i] += len(store_wire.encode(rec))
                    if i:
                        sizes[2] += len(store_wire.encode(rec)) + rows.size * 3  # the ids at 4 bytes, not 1
                tokens += toks.size
    return sizes[0] / tokens, sizes[1] / tokens, sizes[2] / tokens


def load_ref_radix(ref: str):
    """`router.core.radix` as of git ref `ref` (a module, or since the cut by job a package), imported
    from that commit's `router/` tree (git archive, no checkout) beside the working tree's."""
    repo = Path(__file__).resolve().parent.parent
    tar = subprocess.run(["git", "-C", str(repo), "archive", ref, "router"], check=True, capture_output=True).stdout
    where = tempfile.mkdtemp(prefix=f"radix-at-{ref}-")
    tarfile.open(fileobj=io.BytesIO(tar)).extractall(where)
    ours = {name: mod for name, mod in sys.modules.items() if name == "router" or name.startswith("router.")}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, where)
    try:  # the ref's modules keep references to each other; the working tree's come back after
        return importlib.import_module("router.core.radix")
    finally:
        sys.path.remove(where)
        for name in [n for n in sys.modules if n == "router" or n.startswith("router.")]:
            del sys.modules[name]
        sys.modules.update(ours)


def long_conversation(tok, factory, rng, turns: int = 10) -> list[tuple[int, int]]:
    """(bytes left to tokenize after the cache match, full query bytes) for requests 0..turns."""
    s = factory()
    query = b"<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n" + words(rng, 60) + \
        b"<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = np.asarray(tok.encode(query), np.int32)
    out = []
    for t in range(turns + 1):
        m = s.match_text(query, now=float(t))
        matched = m.matched_bytes if hasattr(m, "matched_bytes") else m[1]
        out.append((len(query) - matched, len(query)))
        out_ids = np.append(rng.choice(tok.word_ids, 200), tok.eos).astype(np.int32)
        visible = query + tok.token_bytes(out_ids[:-1])[0]
        s.insert(TrajectoryInput(rid=str(t), prompt_ids=prompt_ids, output_ids=out_ids,
                                 output_logprobs=np.zeros(out_ids.size, np.float32), visible_text=visible), now=t)
        follow = b"<|im_end|>\n<|im_start|>user\n" + words(rng, 25) + b"<|im_end|>\n<|im_start|>assistant\n"
        query = visible + follow
        prompt_ids = np.concatenate((prompt_ids, out_ids, np.asarray(tok.encode(follow[10:]), np.int32)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3, help="follow-up turns per sample")
    ap.add_argument("--small", action="store_true", help="60 prompts: a quick run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-ref", metavar="GITREF", help="also replay through router.core.radix as of GITREF")
    ap.add_argument("--reps", type=int, default=1,
                    help="replay each radix tree this many times, alternating between them, and report each one's "
                         "best (a shared machine's load then hits both alike); the list trie runs once")
    ap.add_argument("--r3", default="48x8", help="LAYERSxTOPK of the routed-expert rows in the R3 memory build")
    ap.add_argument("--synthetic", action="store_true", help="use the synthetic tokenizer even if the real one loads")
    args = ap.parse_args()
    if args.small:
        args.prompts = 60
    t_start = time.perf_counter()
    tok = BenchTokenizer(args.synthetic)
    rng = np.random.default_rng(args.seed)
    workload = make_workload(tok, rng, args.prompts, args.samples, args.turns)
    n_traj = args.prompts * args.samples * (args.turns + 1)
    print(f"tokenizer: {tok.name}; {tok.word_ids.size} plain-word token ids to sample responses from")
    print(f"workload: {args.prompts} prompts x {args.samples} samples x {args.turns + 1} requests = {n_traj} "
          f"trajectories (built in {time.perf_counter() - t_start:.1f} s)")

    structs = [("radix", lambda: RadixTree(tok.token_bytes), True)]
    if args.compare_ref:
        ref_mod = load_ref_radix(args.compare_ref)
        structs.append((f"radix@{args.compare_ref}", lambda: ref_mod.RadixTree(tok.token_bytes), True))
    structs.append(("list", lambda: ListTrie(tok.token_bytes), False))
    layers, top_k = (int(x) for x in args.r3.split("x"))
    mem_prompts = workload[:max(10, args.prompts // 10)]
    res, mem, mem_r3 = {}, {}, {}
    for rep in range(max(1, args.reps)):
        for name, factory, is_radix in structs if rep % 2 == 0 else structs[::-1]:
            if rep and not is_radix:
                continue
            gc.collect()
            struct = factory()
            got = run(struct, workload, is_radix)
            got["tokens"] = struct.stats()["tokens"] if is_radix else struct.ntokens
            if is_radix:
                got["stats"] = struct.stats()
            best = res.setdefault(name, got)
            for key in ("ins", "look", "ret", "all"):
                best[key] = max(best[key], got[key])
            del struct
            gc.collect()
    for name, factory, is_radix in structs:
        mem[name] = traced_bytes_per_token(factory, mem_prompts, is_radix)
        if is_radix:
            mem_r3[name] = traced_bytes_per_token(factory, mem_prompts, is_radix, (layers, top_k))
    conv = {name: long_conversation(tok, f, np.random.default_rng(args.seed + 1)) for name, f, _ in structs}
    disk = stored_bytes_per_token(mem_prompts, (layers, top_k))

    names = [n for n, _, _ in structs]
    R, L = res["radix"], res["list"]
    st = R["stats"]
    print(f"cached: {R['tokens']:,} tokens in {st['nodes']:,} nodes (radix), {L['tokens']:,} token nodes (list trie)")
    print()
    rows = [
        ("inserts/s", "ins", "x"),
        ("lookups/s (match_text of each request)", "look", "x"),
        ("retrieves/s (retrieve of each visible text)", "ret", "x"),
        ("all three, ops/s over the whole workload", "all", "x"),
    ]
    head = "".join(f"{n:>16}" for n in names)
    ratio_names = [n for n in names if n != "radix"]
    print(f"{'metric':<52}{head}" + "".join(f"{'radix vs ' + n.split('@')[-1]:>16}" for n in ratio_names))
    for label, key, _ in rows:
        vals = [res[n][key] for n in names]
        print(f"{label:<52}" + "".join(f"{v:>16,.1f}" for v in vals)
              + "".join(f"{res['radix'][key] / res[n][key]:>15.2f}x" for n in ratio_names))
    vals = [mem[n][0] for n in names]
    print(f"{'bytes/cached token, no R3 (tracemalloc, ' + str(len(mem_prompts)) + ' prompts)':<52}"
          + "".join(f"{v:>16,.1f}" for v in vals) + "".join(f"{mem[n][0] / mem['radix'][0]:>14.2f}x/" for n in ratio_names))
    r3_names = [n for n in names if n in mem_r3]
    print(f"{'  + R3 rows ' + args.r3 + ': bytes/token beyond no-R3':<52}"
          + "".join(f"{mem_r3[n][0] - mem[n][0]:>16,.1f}" for n in r3_names) + " " * 16 * (len(names) - len(r3_names))
          + "".join(f"{(mem_r3[n][0] - mem[n][0]) / (mem_r3['radix'][0] - mem['radix'][0]):>14.2f}x/"
                    for n in ratio_names if n in mem_r3))
    print(f"durable-store record bytes/token (same subset): no R3 {disk[0]:.2f}; R3 {args.r3} at the stored width "
          f"{disk[1]:.1f}, as int32 {disk[2]:.1f} ({(disk[2] - disk[0]) / (disk[1] - disk[0]):.2f}x the R3 bytes)")
    print(f"{'lookups returning the wrong prefix length':<52}" + "".join(f"{res[n]['bad_look']:>16}" for n in names))
    print(f"{'retrieves returning the wrong trajectory length':<52}" + "".join(f"{res[n]['bad_ret']:>16}" for n in names))
    print(f"radix nbytes estimate on the memory subset: {mem['radix'][2] / mem['radix'][1]:.1f} B/token "
          f"(tracemalloc: {mem['radix'][0]:.1f}); with R3: {mem_r3['radix'][2] / mem_r3['radix'][1]:.1f} "
          f"(tracemalloc: {mem_r3['radix'][0]:.1f}); stats: hits={st['hits']} misses={st['misses']} "
          f"splits={st['splits']} trajectories={st['trajectories']}")
    print()
    print("tokenizer work per request of one long conversation (bytes left to tokenize after the cache match "
          "/ full prompt bytes):")
    for t in (0, 1, 5, 10):
        (ra, full), (li, _) = conv["radix"][t], conv["list"][t]
        print(f"  request {t:>2}: radix {ra:>6} / {full:<7} list trie {li:>6} / {full}")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
