"""Question cost against history: `ask`'s evidence step over 1 day and over 30 days of one busy stream.

    python bench/history.py [--days 1,30] [--queries 40] [--segment-seconds 4]

One busy camera stores a segment every 4 s (21,600 a day, 648,000 in 30 days), each with a 512-d retrieval
embedding (clustered, as CLIP embeddings are); tokens are a token-sized stub because their bytes do not change
what is measured. For each history length it times, in a fresh process that opens the memory read-only as
`vidmem ask` does, with the index the writer saved:
- `evidence`: what `Vidmem.select` does that depends on history: FAISS candidates (`Memory.search`), the index
  lookups for neighbours, live window and anchors (`Vidmem.evidence_timeline`), and selection under the
  6,000-token budget (`agents.select.select`). The rest of `ask` does not grow with history: the context-room
  check counts tokens of the prompt text, and the VLM's prefill and decode see at most the budget;
- `search`: the FAISS retrieval inside it alone (`Memory.search`, k=32);
- `timeline_load`: what the evidence step cost before: loading every segment row in range into Python.
Both over the whole history and over the last hour. Prints one JSON line; p50/p95 in milliseconds, and the
ratio 30 days / 1 day side by side. CPU only (no model involved).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

E = 512
CENTRES = 2000
BATCH = 10_000


def log(msg: str) -> None:
    print(f"[bench/history] {msg}", file=sys.stderr, flush=True)


def fill(path: Path, segments: int, seconds: float) -> None:
    from vidmem.memory import Manifest, Memory

    rng = np.random.default_rng(7)
    cents = rng.standard_normal((CENTRES, E)).astype(np.float32)
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)  # (C, E)
    tokens = np.zeros((1, 8), np.float16)
    start0 = time.time() - segments * seconds  # a live camera: unix seconds, ending now
    with Memory.open(path) as memory:
        memory.bind(Manifest(encoder="bench", encoder_name="bench", compressor="stub", dim=8, embedder="bench",
                             embed_dim=E))
        for first in range(0, segments, BATCH):
            n = min(BATCH, segments - first)
            v = cents[rng.integers(0, CENTRES, n)] + 0.6 * rng.standard_normal((n, E)).astype(np.float32) / np.sqrt(E)
            v /= np.linalg.norm(v, axis=1, keepdims=True)  # (n, E)
            memory.add_segments([dict(stream="cam", start=start0 + i * seconds, end=start0 + (i + 1) * seconds,
                                      frames=4, cut=False, tokens=tokens, slow=1, embedding=v[j])
                                 for j, i in enumerate(range(first, first + n))])
            if (first // BATCH) % 20 == 0:
                log(f"  {path.name}: {first + n:,} of {segments:,} segments")
        memory.search(v[0], k=1)  # the writer builds the index and saves it on close, as a long-running one does


def measure(path: str, queries: int) -> dict:
    """In this (fresh) process: open read-only, time the evidence step and the old timeline load."""
    from vidmem.agents.app import Settings, Vidmem
    from vidmem.agents.select import SelectOptions, select

    app = Vidmem(Settings(memory=Path(path)), readonly=True)  # no model: the evidence step needs none

    def evidence_step(vec: np.ndarray, since: float | None):
        options = SelectOptions()
        candidates = app.memory.search(vec, k=options.candidates, streams=["cam"], since=since, kinds=["image"])
        timeline = app.evidence_timeline(["cam"], since, None, candidates, (), options)
        return select(timeline, candidates, options=options)

    rng = np.random.default_rng(11)
    q = rng.standard_normal((queries, E)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)  # (Q, E)
    newest = app.memory.span(stream="cam")[1]
    out = {}
    for label, since in (("all", None), ("last_hour", newest - 3600)):
        evidence_step(q[0], since)  # loads the saved index once
        evidence, load, picks = [], [], []
        for vec in q:
            t0 = time.perf_counter()
            selection = evidence_step(vec, since)
            evidence.append(time.perf_counter() - t0)
            picks.append(len(selection.picks))
        search = []
        for vec in q:
            t0 = time.perf_counter()
            app.memory.search(vec, k=32, streams=["cam"], since=since, kinds=["image"])
            search.append(time.perf_counter() - t0)
        for _ in range(min(5, queries)):
            t0 = time.perf_counter()
            app.memory.segments(stream="cam", since=since)
            load.append(time.perf_counter() - t0)
        out[label] = {"evidence_ms": _pcts(evidence), "search_ms": _pcts(search), "timeline_load_ms": _pcts(load),
                      "picks_mean": float(np.mean(picks))}
    app.close()
    return out


def _pcts(times: list[float]) -> dict:
    ms = np.array(times) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", default="1,30")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--segment-seconds", type=float, default=4.0)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure this memory in this process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.queries)))
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="vidmem-history-") as tmp:
        for days in [float(d) for d in args.days.split(",")]:
            segments = int(days * 86400 / args.segment_seconds)
            path = Path(tmp) / f"days{days:g}"
            t0 = time.perf_counter()
            fill(path, segments, args.segment_seconds)
            log(f"{days:g} days: {segments:,} segments stored in {time.perf_counter() - t0:.0f} s; measuring")
            run = subprocess.run([sys.executable, __file__, "--measure", str(path), "--queries", str(args.queries)],
                                 capture_output=True, text=True, check=True)
            results[f"{days:g}d"] = {"segments": segments, **json.loads(run.stdout.strip().splitlines()[-1])}
    keys = list(results)
    first, last = results[keys[0]], results[keys[-1]]
    ratio = {label: round(last[label]["evidence_ms"]["p50"] / first[label]["evidence_ms"]["p50"], 2)
             for label in ("all", "last_hour")}
    load_ratio = {label: round(last[label]["timeline_load_ms"]["p50"] / first[label]["timeline_load_ms"]["p50"], 2)
                  for label in ("all", "last_hour")}
    print(json.dumps({"bench": "history", "runtime": "CPU, numpy + faiss + sqlite (no model)",
                      "stream": f"one camera, a segment every {args.segment_seconds:g} s",
                      "results": results, f"evidence_ratio_{keys[-1]}_over_{keys[0]}": ratio,
                      f"timeline_load_ratio_{keys[-1]}_over_{keys[0]}": load_ratio}))


if __name__ == "__main__":
    main()
