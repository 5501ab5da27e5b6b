"""Heap probe: run inside the router (soak's --router-prelude) and log, every few seconds, where its
RSS is: glibc heap in use vs free-but-resident (by free chunk size), pymalloc blocks, GC counts.
This is how the soak's post-fill RSS growth was told apart from a leak (RELIABILITY.md, Known issues):
the heap in use was flat while its free chunks grew.

    python bench/soak.py --minutes 10 --router-prelude "import runpy; runpy.run_path('bench/heap_probe.py')"
    HEAP_PROBE_OUT=/tmp/heap.jsonl HEAP_PROBE_EVERY_S=30 python bench/soak.py ...   # defaults: /tmp/heap_probe.jsonl, 15

One JSON line per sample: t (s since start), rss_mb, heap_mb (glibc arenas, non-mmapped), in_use_mb,
free_mb, free_by_chunk_mb ({"<1K", "1-8K", "8-64K", ">=64K"}: free chunks in glibc's bins, from
malloc_info), mmap_mb, py_blocks (sys.getallocatedblocks), gc_collections (per generation). It runs
in a daemon thread and takes no GC walk, so it does not change what it measures beyond a
malloc_info call per sample. Linux/glibc only.
"""

import ctypes
import gc
import json
import os
import re
import sys
import tempfile
import threading
import time

_OUT = os.environ.get("HEAP_PROBE_OUT", "/tmp/heap_probe.jsonl")
_EVERY = float(os.environ.get("HEAP_PROBE_EVERY_S", "15"))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2
_libc.fopen.restype = ctypes.c_void_p
_libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
_libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fclose.argtypes = [ctypes.c_void_p]
_SIZE = re.compile(rb'<size from="(\d+)" to="\d+" total="(\d+)" count="\d+"/>')


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _free_by_chunk(path: str) -> dict:
    fp = _libc.fopen(path.encode(), b"w")
    _libc.malloc_info(0, fp)
    _libc.fclose(fp)
    with open(path, "rb") as f:
        xml = f.read()
    out = {"<1K": 0, "1-8K": 0, "8-64K": 0, ">=64K": 0}
    for start, total in _SIZE.findall(xml):
        start = int(start)
        key = "<1K" if start < 1024 else "1-8K" if start < 8192 else "8-64K" if start < 65536 else ">=64K"
        out[key] += int(total)
    return {k: round(v / 2**20, 1) for k, v in out.items()}


def _loop() -> None:
    t0 = time.monotonic()
    fd, xml_path = tempfile.mkstemp(prefix="malloc_info.", suffix=".xml")
    os.close(fd)
    while True:
        time.sleep(_EVERY)
        mi = _libc.mallinfo2()
        sample = {"t": round(time.monotonic() - t0), "rss_mb": round(_rss_mb(), 1),
                  "heap_mb": round(mi.arena / 2**20, 1), "in_use_mb": round(mi.uordblks / 2**20, 1),
                  "free_mb": round(mi.fordblks / 2**20, 1), "free_by_chunk_mb": _free_by_chunk(xml_path),
                  "mmap_mb": round(mi.hblkhd / 2**20, 1), "py_blocks": sys.getallocatedblocks(),
                  "gc_collections": [s["collections"] for s in gc.get_stats()]}
        with open(_OUT, "a") as f:
            f.write(json.dumps(sample) + "\n")


threading.Thread(target=_loop, name="heap-probe", daemon=True).start()
