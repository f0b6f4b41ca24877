"""Memory benchmark: search latency at 10k/100k/1M segments, RAM while ingesting, disk bytes per footage second.

    python bench/memory.py [--quick] [--sizes 10000,100000,1000000] [--queries 300] [--device cpu]

Prints one JSON line on stdout (progress on stderr):
- search: per size, p50/p99 milliseconds of `Memory.search(k=32)` end to end (FAISS plus the SQLite row fetch),
  wall clock and this thread's CPU time, unfiltered and with filters (one of 4 streams; the last hour; one
  stream over the last day), recall@10 against exact inner product under the same filter, the index type, the
  seconds to build it from SQLite and the RAM it takes. Measured in a fresh process that loads the saved index
  (as each `vidmem ask` does); `after_build` holds the same figures from the process that built it.
  Embeddings are 512-d unit vectors drawn around 2,000 random centres (real CLIP embeddings cluster too);
  queries are stored vectors plus noise. Segments come 4 streams at a time, 4 s each, like four cameras.
- ram: resident set size (MB) while default-size segments are added (245 tokens x 1152 fp16 per 4 s segment).
- disk: bytes on disk per second of footage at the default settings, fp16 and int8.
`--quick` runs only the 10k size and a short RAM/disk run (well under a minute).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vidmem.memory import Manifest, Memory

E = 512  # retrieval embedding width (CLIP ViT-B/32)
D = 1152  # SigLIP-so400m token width
TOKENS = 245  # default tokens per 4-frame segment (196 keyframe + 49 TimePerceiver)
SEGMENT_SECONDS = 4.0  # 4 frames at 1 fps
STREAMS = 4
CENTRES = 2000
BATCH = 10_000
K = 32


def log(msg: str) -> None:
    print(f"[bench/memory] {msg}", file=sys.stderr, flush=True)


def rss_mb(field: str = "VmRSS") -> float:
    """Resident MB; field="RssAnon" leaves out mapped file pages (token chunks a reader touched), which the
    kernel reclaims as page cache under pressure."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def centres() -> np.ndarray:
    rng = np.random.default_rng(1234)
    c = rng.standard_normal((CENTRES, E)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)  # (C, E)


def batch_vectors(first: int, n: int, cents: np.ndarray) -> np.ndarray:
    """Embeddings of segments first..first+n, reproducible per batch."""
    rng = np.random.default_rng(first + 1)
    v = cents[rng.integers(0, CENTRES, n)] + 0.6 * rng.standard_normal((n, E)).astype(np.float32) / np.sqrt(E)
    return v / np.linalg.norm(v, axis=1, keepdims=True)  # (n, E)


def fill(memory: Memory, have: int, want: int, cents: np.ndarray) -> None:
    tiny = np.zeros((1, 8), np.float16)  # search figures do not depend on token bytes; keep the disk small
    t0 = time.perf_counter()
    for first in range(have, want, BATCH):
        n = min(BATCH, want - first)
        vecs = batch_vectors(first, n, cents)
        memory.add_segments([dict(stream=f"cam{i % STREAMS}", start=(i // STREAMS) * SEGMENT_SECONDS,
                                  end=(i // STREAMS + 1) * SEGMENT_SECONDS, frames=4, cut=False, tokens=tiny,
                                  slow=1, embedding=vecs[j]) for j, i in enumerate(range(first, first + n))])
        if (first // BATCH) % 10 == 0:
            log(f"  added {first + n:,} segments ({time.perf_counter() - t0:.0f} s)")


def keep(pos: np.ndarray, streams: list[str] | None = None, since: float | None = None) -> np.ndarray:
    """Which segment positions (0-based insertion order) pass a filter, given how `fill` lays them out."""
    ok = np.ones(len(pos), bool)
    if streams is not None:
        ok &= np.isin(pos % STREAMS, [int(s[3:]) for s in streams])
    if since is not None:
        ok &= (pos // STREAMS + 1) * SEGMENT_SECONDS >= since
    return ok


def exact_top(queries: np.ndarray, size: int, cents: np.ndarray, k: int, filters: dict) -> np.ndarray:
    """Exact top-k segment ids (1-based, as SQLite assigns them) by brute force, batch by batch."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for first in range(0, size, BATCH):
        n = min(BATCH, size - first)
        scores = queries @ batch_vectors(first, n, cents).T  # (Q, n)
        scores[:, ~keep(np.arange(first, first + n), **filters)] = -np.inf
        s = np.concatenate([best_s, scores], axis=1)
        i = np.concatenate([best_i, np.arange(first + 1, first + n + 1)[None].repeat(len(queries), 0)], axis=1)
        top = np.argsort(-s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def percentiles(times: list[float], cpu: list[float]) -> dict:
    """Wall-clock and this thread's CPU time per search (CPU time does not count waiting for a core)."""
    ms, cpu_ms = np.array(times) * 1000, np.array(cpu) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3), "cpu_p50_ms": round(float(np.percentile(cpu_ms, 50)), 3),
            "cpu_p99_ms": round(float(np.percentile(cpu_ms, 99)), 3)}


def search_bench(sizes: list[int], n_queries: int, device: str, workdir: Path) -> dict:
    """Fill the memory up to each size here, then measure in a fresh process, as `vidmem ask` would run."""
    cents = centres()
    manifest = Manifest(encoder="bench", encoder_name="bench", compressor="timeperceiver", dim=8,
                        embedder="clip-ViT-B-32", embed_dim=E)
    out = {}
    path = workdir / "search"
    for size in sizes:
        log(f"search at {size:,} segments: filling")
        with Memory.open(path, device=device) as memory:
            memory.bind(manifest)
            fill(memory, memory.stats()["segments"], size, cents)  # a kept --workdir is reused
        # Twice: the first process builds the index (and saves it on close), the second loads it, as every
        # later `vidmem ask` would. Both are reported; the loaded one is the steady state.
        runs = []
        for _ in range(2):
            done = subprocess.run([sys.executable, __file__, "--measure", str(path), "--size", str(size),
                                   "--queries", str(n_queries), "--device", device], stdout=subprocess.PIPE)
            if done.returncode != 0:
                raise SystemExit(f"measuring {size} segments failed")
            runs.append(json.loads(done.stdout))
        built, loaded = runs
        loaded["build_s"], loaded["load_s"] = built["build_s"], loaded["build_s"]
        loaded["after_build"] = {name: built[name] for name in ("none", "one_of_4_streams", "last_hour",
                                                                 "one_stream_last_day")}
        loaded["after_build"]["index_rss_mb"] = built["index_rss_mb"]
        out[str(size)] = loaded
        log(f"  {size:,}: {json.dumps(loaded)}")
    return out


def measure(path: Path, size: int, n_queries: int, device: str) -> dict:
    """Search figures for the memory at `path` (filled by `fill` up to `size`), from this fresh process."""
    cents = centres()
    rng = np.random.default_rng(size)
    rows = []
    starts = np.arange(0, size, BATCH)
    firsts = rng.choice(starts, size=min(10, len(starts)), replace=False)
    for first in firsts:  # queries near stored vectors of 10 random batches (regenerating all would cost GBs)
        vecs = batch_vectors(int(first), min(BATCH, size - int(first)), cents)
        rows += list(vecs[rng.integers(0, len(vecs), -(-n_queries // len(firsts)))])
    queries = np.stack(rows[:n_queries])  # (Q, E)
    queries += 0.3 * rng.standard_normal(queries.shape).astype(np.float32) / np.sqrt(E)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    del rows, vecs
    rss_before = rss_mb()
    with Memory.open(path, device=device) as memory:
        t0 = time.perf_counter()
        memory.search(queries[0], k=K)  # loads or builds the index
        build = time.perf_counter() - t0
        rss_index = rss_mb()
        index = memory._indexes.indexes["image"]
        end = (size // STREAMS) * SEGMENT_SECONDS
        filters = {
            "none": {},
            "one_of_4_streams": {"streams": ["cam1"]},
            "last_hour": {"since": end - 3600},
            "one_stream_last_day": {"streams": ["cam2"], "since": end - 86400},
        }
        figures = {"index": "ivf" if index.ivf else "flat", "build_s": round(build, 2),
                   "nlist": int(index.index.nlist) if index.ivf else None}
        for name, kw in filters.items():
            times, cpu, found = [], [], []
            for q in queries:
                t, c = time.perf_counter(), time.thread_time()
                hits = memory.search(q, k=K, **kw)
                times.append(time.perf_counter() - t)
                cpu.append(time.thread_time() - c)
                found.append([r.id for r, _ in hits[:10]])
            figures[name] = percentiles(times, cpu)
            truth = exact_top(queries[:50], size, cents, 10, kw)
            recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found[:50], truth)])
            figures[name]["recall_at_10"] = round(float(recall), 3)
        figures["index_rss_mb"] = round(rss_index - rss_before, 1)  # what loading/building the index added
        figures["rss_mb"] = round(rss_mb(), 1)
        figures["load_average"] = round(os.getloadavg()[0], 2)  # other work on the machine inflates p99
    return figures


def ram_and_disk_bench(segments: int, workdir: Path) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    manifest = Manifest(encoder="bench", encoder_name="bench", compressor="timeperceiver", dim=D,
                        embedder="clip-ViT-B-32", embed_dim=E)
    tokens = rng.standard_normal((TOKENS, D)).astype(np.float16)
    jpeg = rng.bytes(30_000)  # a typical 384 px keyframe JPEG
    ram, disk = {"segments": [], "rss_mb": [], "anon_mb": []}, {}
    for dtype in ("float16", "int8"):
        path = workdir / f"disk-{dtype}"
        with Memory.open(path, token_dtype=dtype) as memory:
            memory.bind(manifest)
            n = segments if dtype == "float16" else max(50, segments // 10)
            for i in range(n):
                emb = rng.standard_normal(E).astype(np.float32)
                row = memory.add_segment(stream="cam", start=i * SEGMENT_SECONDS, end=(i + 1) * SEGMENT_SECONDS,
                                         frames=4, cut=False, tokens=tokens, slow=196,
                                         embedding=emb / np.linalg.norm(emb), keyframe_jpeg=jpeg)
                if dtype == "float16" and i % 20 == 0:
                    memory.read_tokens(row)  # a reader touching its tokens must not grow RAM either
                    memory.search(emb, k=K)
                if dtype == "float16" and (i % max(1, n // 20) == 0 or i == n - 1):
                    ram["segments"].append(i + 1)
                    ram["rss_mb"].append(round(rss_mb(), 1))
                    ram["anon_mb"].append(round(rss_mb("RssAnon"), 1))
        total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        seconds = n * SEGMENT_SECONDS
        disk[dtype] = {"bytes_per_second": round(total / seconds), "mb_per_hour": round(total / seconds * 3600 / 1e6, 1),
                       "includes_keyframe_jpeg_bytes": len(jpeg)}
        log(f"  disk {dtype}: {disk[dtype]}")
    half = len(ram["rss_mb"]) // 2
    for key in ("rss_mb", "anon_mb"):
        growth = (ram[key][-1] - ram[key][half]) / max(1, ram["segments"][-1] - ram["segments"][half])
        ram[f"{key}_per_1000_segments_second_half"] = round(growth * 1000, 2)
    # What the index itself must grow by: a flat fp32 vector, the int8 copy and metadata per segment.
    ram["index_mb_per_1000_segments"] = round(1000 * (E * 4 + E + 4 + 28) / 2**20, 2)
    return ram, disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k segments only, short RAM/disk run")
    parser.add_argument("--sizes", default=None, help="comma-separated segment counts")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--ram-segments", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--workdir", default=None, help="where to build the memories (default: a temp dir)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one size, fresh process
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.size, args.queries, args.device)), flush=True)
        return
    if args.sizes == "none":
        sizes = []  # RAM and disk figures only
    else:
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else \
            ([10_000] if args.quick else [10_000, 100_000, 1_000_000])
    ram_segments = args.ram_segments or (100 if args.quick else 1500)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vidmem-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        search = search_bench(sizes, args.queries, args.device, workdir)
        log(f"ram and disk with {ram_segments} default-size segments")
        ram, disk = ram_and_disk_bench(ram_segments, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"bench": "memory", "quick": args.quick, "cpus": os.cpu_count(), "embed_dim": E, "k": K,
                      "search": search, "ram": ram, "disk": disk,
                      "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
