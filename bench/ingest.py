"""Ingest benchmark: real-time factors of the stream stage, and what the static check saves.

    python bench/ingest.py [--quick] [--model DIR] [--embedder DIR] [--device cpu] [--tiny] [--minutes 5]

Prints one JSON line on stdout (progress on stderr):
- decode: per test video (../shared/testdata), video seconds per wall second of (a) decoding alone (every frame
  to RGB, as `Source.frames()` yields it) and (b) decode + shot scoring + sampling + segmenting + static check
  (the ingest loop with a sink that stores nothing), plus the cuts found. Best of two runs each.
- full: the whole pipeline (vision encoder + compressor + memory) through `vidmem.agents.app.Vidmem.ingest` when
  `--model DIR` is given (or `--tiny`: the tests' tiny random checkpoints, which exercise the path but time
  nothing meaningful); skipped with a note otherwise.
- static_vs_busy: synthesized clips of the same length (a still scene with sensor noise; a panning, busy scene
  with a cut every 20 s): segments passed to `sink.encode` per minute of video, and their ratio.
`--quick` uses three short test videos and 2-minute synthetic clips (well under a minute on a laptop CPU).
Timing on a shared CPU is noisy: compare figures from one run, not across runs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("VIDMEM_TESTDATA", REPO.parent / "shared" / "testdata"))
QUICK_VIDEOS = ("bikes.mp4", "test.mp4", "testvideo.mp4")
REPEATS = 2  # timed runs per video; the best counts


def log(msg: str) -> None:
    print(f"[bench/ingest] {msg}", file=sys.stderr, flush=True)


class NullSink:
    """Stores nothing: isolates the stream stage. Counts what it is given."""

    def __init__(self) -> None:
        self.encode_calls = 0
        self.encoded = 0
        self.extended = 0

    def encode(self, segments: list) -> list[object]:
        self.encode_calls += 1
        self.encoded += len(segments)
        return [None] * len(segments)

    def commit(self, segment, encoded: object) -> int:  # noqa: ANN001
        return 0

    def extend(self, segment) -> None:  # noqa: ANN001
        self.extended += 1


async def _decode_only(path: Path) -> tuple[int, float]:
    from vidmem.stream import open_source

    source = open_source(path)
    n, last = 0, 0.0
    async for frame in source.frames():
        n, last = n + 1, frame.ts
    await source.aclose()
    return n, source.duration or last


def bench_decode(videos: list[Path]) -> dict:
    from vidmem.stream import IngestOptions, ingest, open_source

    out = {}
    for path in videos:
        decode_s = stage_s = float("inf")
        for _ in range(REPEATS):  # best of REPEATS, interleaved: the machine may be shared
            start = time.perf_counter()
            frames, duration = asyncio.run(_decode_only(path))
            decode_s = min(decode_s, time.perf_counter() - start)
            start = time.perf_counter()
            report = asyncio.run(ingest(open_source(path), NullSink(), stream=path.stem, options=IngestOptions()))
            stage_s = min(stage_s, time.perf_counter() - start)
        out[path.name] = {
            "video_seconds": round(duration, 3),
            "decoded_frames": frames,
            "decode_rtf": round(duration / decode_s, 2),
            "decode_sample_rtf": round(duration / stage_s, 2),
            "segments": report.segments,
            "reused_segments": report.reused_segments,
            "cuts": [round(c, 3) for c in report.cuts],
        }
        log(f"{path.name}: decode {out[path.name]['decode_rtf']}x, decode+sample {out[path.name]['decode_sample_rtf']}x real time")
    total_video = sum(v["video_seconds"] for v in out.values())
    return {
        "videos": out,
        "mean_decode_rtf": round(sum(v["decode_rtf"] for v in out.values()) / max(1, len(out)), 2),
        "mean_decode_sample_rtf": round(sum(v["decode_sample_rtf"] for v in out.values()) / max(1, len(out)), 2),
        "video_seconds": round(total_video, 3),
    }


def bench_static_vs_busy(minutes: float, *, fps: int, width: int, height: int) -> dict:
    from vidmem.stream import IngestOptions, ingest, open_source
    from vidmem.stream.synth import busy_scene, static_scene, write_video

    n = int(minutes * 60 * fps)
    out: dict = {"minutes": minutes, "clip_fps": fps, "size": [width, height]}
    with tempfile.TemporaryDirectory(prefix="vidmem-bench-ingest-") as tmp:
        clips = {"static": Path(tmp) / "static.mp4", "busy": Path(tmp) / "busy.mp4"}
        log(f"writing {minutes:g}-minute static and busy clips")
        write_video(clips["static"], static_scene(n, width=width, height=height), fps=fps)
        write_video(clips["busy"], busy_scene(n, fps=fps, width=width, height=height, shot_seconds=20), fps=fps)
        for kind, path in clips.items():
            sink = NullSink()
            report = asyncio.run(ingest(open_source(path), sink, stream=kind, options=IngestOptions()))
            out[kind] = {
                "encoded_segments": sink.encoded,
                "encode_calls": sink.encode_calls,
                "reused_segments": report.reused_segments,
                "encoded_segments_per_minute": round(sink.encoded / minutes, 2),
                "encode_calls_per_minute": round(sink.encode_calls / minutes, 2),
            }
            log(f"{kind}: {sink.encoded} segments encoded in {sink.encode_calls} calls, {report.reused_segments} reused")
    out["busy_over_static"] = round(out["busy"]["encoded_segments"] / max(1, out["static"]["encoded_segments"]), 1)
    return out


def bench_full(videos: list[Path], args: argparse.Namespace) -> dict:
    if not args.model and not args.tiny:
        return {"skipped": "no --model given: the full pipeline needs a VLM checkpoint (its vision tower encodes "
                           "segments); pass --model DIR [--embedder DIR], or --tiny to exercise the path"}
    from vidmem.agents.app import Settings, Vidmem
    from vidmem.stream import IngestOptions, open_source

    out: dict = {"videos": {}}
    with tempfile.TemporaryDirectory(prefix="vidmem-bench-full-") as tmp:
        model, embedder = args.model, args.embedder
        if args.tiny:
            sys.path.insert(0, str(REPO / "bench"))
            from common import tiny_checkpoints

            tiny = tiny_checkpoints(Path(tmp) / "ckpt")
            model, embedder = str(tiny["llava"]), str(tiny["clip"])
            out["note"] = "tiny random checkpoints: checks the path, the timing means nothing"
        app = Vidmem(Settings(memory=Path(tmp) / "memory", model=model, embedder=embedder, device=args.device))
        try:
            app.load_models()
            for path in videos:
                start = time.perf_counter()
                report = asyncio.run(app.ingest(open_source(path), stream=path.stem, options=IngestOptions()))
                wall = time.perf_counter() - start
                out["videos"][path.name] = {"rtf": round(report.video_seconds / wall, 2), "segments": report.segments,
                                            "visual_tokens": report.visual_tokens}
                log(f"{path.name}: full pipeline {out['videos'][path.name]['rtf']}x real time")
        finally:
            app.close()
    out["model"] = "tiny" if args.tiny else model
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three short videos, 2-minute synthetic clips")
    parser.add_argument("--model", help="VLM hub id or local directory for the full pipeline")
    parser.add_argument("--embedder", help="CLIP embedder for the full pipeline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="full pipeline with the tests' tiny random checkpoints")
    parser.add_argument("--minutes", type=float, default=None, help="length of the static and busy clips")
    args = parser.parse_args()

    try:
        entries = json.loads((TESTDATA / "videos.json").read_text())["videos"]
    except OSError:
        entries = {}
        log(f"no test videos at {TESTDATA}: skipping the real-video figures")
    videos = [TESTDATA / e["path"] for name, e in entries.items() if not args.quick or name in QUICK_VIDEOS]
    minutes = args.minutes or (2.0 if args.quick else 5.0)
    size = (128, 72) if args.quick else (320, 180)
    result = {
        "bench": "ingest",
        "quick": args.quick,
        "decode": bench_decode(videos) if videos else {"skipped": f"no test videos at {TESTDATA}"},
        "static_vs_busy": bench_static_vs_busy(minutes, fps=5 if args.quick else 25, width=size[0], height=size[1]),
        "full": bench_full(videos, args) if videos else {"skipped": "no test videos"},
        "load_average": round(os.getloadavg()[0], 2),
        "cores": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
