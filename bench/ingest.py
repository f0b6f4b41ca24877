"""Ingest benchmark: real-time factors of the stream stage, and what the static check saves.

    python bench/ingest.py [--quick] [--model DIR] [--embedder DIR] [--device cpu] [--tiny] [--minutes 5]
                           [--runtime-only] [--no-runtime]

Prints one JSON line on stdout (progress on stderr):
- decode: per test video (../shared/testdata), video seconds per wall second of (a) decoding alone (every frame
  to RGB, as `Source.frames()` yields it) and (b) decode + shot scoring + sampling + segmenting + static check
  (the ingest loop with a sink that stores nothing), plus the cuts found. Best of two runs each.
- full: the whole pipeline (vision encoder + compressor + memory) through `vidmem.agents.app.Vidmem.ingest` when
  `--model DIR` is given (or `--tiny`: the tests' tiny random checkpoints, which exercise the path but time
  nothing meaningful); skipped with a note otherwise.
- static_vs_busy: synthesized clips of the same length (a still scene with sensor noise; a panning, busy scene
  with a cut every 20 s): segments passed to `sink.encode` per minute of video, and their ratio.
- motion: the static and busy clips again with motion-gated sampling (stream/motion.py) on: segments encoded.
- CPU runtime (agents/runtime.py), at the top level: `tower_ms_eager` / `tower_ms_fast`, ms per frame of the vision
  tower (SigLIP-so400m's full architecture, random weights, 384 px; eager fp32 versus int8 linear layers,
  alternating, best of 3, with the features' relative error); `rtf_static` / `rtf_busy`, video seconds per wall
  second of the whole ingest path (`Vidmem.ingest`: tower + TimePerceiver + CLIP + memory) at 1 fps with the full-size
  0.5B architecture on the default runtime, over a mostly static home-camera clip (someone walks through once)
  and a busy one (panning, a block moving, a cut every 20 s), read from files as fast as they go.
  `--runtime-only` measures only these (about 15 minutes on 2 busy cores); `--quick` uses the tiny checkpoints.
`--quick` uses three short test videos and 2-minute synthetic clips (well under a minute on a laptop CPU).
Timing on a shared CPU is noisy: compare figures from one run, not across runs.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import (  # noqa: E402
    SIGLIP_SO400M, clip512_checkpoint, full_size_vlm, home_camera_scene, machine_info, tiny_checkpoints,
)

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
    from vidmem.stream.motion import MotionOptions
    from vidmem.stream.synth import busy_scene, static_scene, write_video

    n = int(minutes * 60 * fps)
    out: dict = {"minutes": minutes, "clip_fps": fps, "size": [width, height]}
    with tempfile.TemporaryDirectory(prefix="vidmem-bench-ingest-") as tmp:
        clips = {"static": Path(tmp) / "static.mp4", "busy": Path(tmp) / "busy.mp4"}
        log(f"writing {minutes:g}-minute static and busy clips")
        write_video(clips["static"], static_scene(n, width=width, height=height), fps=fps)
        write_video(clips["busy"], busy_scene(n, fps=fps, width=width, height=height, shot_seconds=20), fps=fps)
        clips["home"] = Path(tmp) / "home.mp4"
        write_video(clips["home"], home_camera_scene(n, fps=fps, width=width, height=height,
                                                     visits=((minutes * 20, minutes * 20 + 8),)), fps=fps)
        for kind, path in clips.items():
            for gated in (False, True):
                sink = NullSink()
                options = IngestOptions(motion=MotionOptions() if gated else None)
                report = asyncio.run(ingest(open_source(path), sink, stream=kind, options=options))
                figures = {
                    "encoded_segments": sink.encoded,
                    "encode_calls": sink.encode_calls,
                    "reused_segments": report.reused_segments,
                    "sampled_frames": report.frames,
                    "encoded_segments_per_minute": round(sink.encoded / minutes, 2),
                    "encode_calls_per_minute": round(sink.encode_calls / minutes, 2),
                }
                if gated:
                    out.setdefault("motion_gated", {"options": dataclasses.asdict(MotionOptions())})[kind] = figures
                else:
                    out[kind] = figures
                log(f"{kind}{' (motion-gated)' if gated else ''}: {sink.encoded} segments encoded in "
                    f"{sink.encode_calls} calls, {report.reused_segments} reused, {report.frames} frames sampled")
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


def bench_tower(args: argparse.Namespace, repeats: int = 3, frames: int = 2) -> dict:
    """ms per frame of the vision tower, eager fp32 versus the fast runtime, alternating in one run."""
    import numpy as np
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vidmem.compressors.encoder import Preprocess, VisionEncoder
    from vidmem.compressors.runtime import TOWER_TOLERANCE, optimize_tower, runtime_name

    config = dict(SIGLIP_SO400M, num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2) \
        if args.quick else SIGLIP_SO400M
    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(**config, attn_implementation="sdpa")).eval()
    eager = VisionEncoder(tower, preprocess=Preprocess(size=384), name="siglip-so400m (random)")
    fast = VisionEncoder(optimize_tower(tower, "fast"), preprocess=Preprocess(size=384), name="siglip-so400m (random)")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (360, 640, 3), dtype=np.uint8) for _ in range(frames)]
    reference, quantized = eager(images), fast(images)  # also the warm-up
    runs: dict[str, list[float]] = {"eager": [], "fast": []}
    for _ in range(repeats):
        for name, encoder in (("eager", eager), ("fast", fast)):
            start = time.perf_counter()
            encoder(images)
            runs[name].append(time.perf_counter() - start)
    out = {f"tower_ms_{name}": round(1000 * min(times) / frames, 1) for name, times in runs.items()}
    out.update({
        "tower_speedup": round(out["tower_ms_eager"] / out["tower_ms_fast"], 2),
        "tower_model": f"SigLIP-so400m architecture ({config['num_hidden_layers']} layers, {config['image_size']} px, "
                       f"random weights){' (tiny: --quick)' if args.quick else ''}",
        "tower_runtime_eager": runtime_name(eager.tower),
        "tower_runtime_fast": runtime_name(fast.tower),
        "tower_fast_relative_error": round(float((quantized - reference).norm() / reference.norm()), 4),
        "tower_tolerance": TOWER_TOLERANCE,
        "tower_frames_per_call": frames,
    })
    log(f"tower: {out}")
    return out


def bench_live_rtf(args: argparse.Namespace) -> dict:
    """Real-time factor of the whole ingest path at 1 fps on a static and a busy clip (full-size 0.5B on CPU)."""
    from vidmem.agents.app import Settings, Vidmem
    from vidmem.agents.runtime import apply_runtime, describe
    from vidmem.stream import IngestOptions, open_source
    from vidmem.stream.motion import MotionOptions
    from vidmem.stream.synth import busy_scene, write_video

    static_s, busy_s, fps = (40, 12, 5) if args.quick else (120, 16, 10)
    width, height = (320, 180) if args.quick else (640, 360)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="vidmem-bench-rtf-") as tmp:
        work = Path(tmp)
        clips = {"static": work / "home.mp4", "busy": work / "busy.mp4"}
        write_video(clips["static"], home_camera_scene(static_s * fps, fps=fps, width=width, height=height,
                                                       visits=((static_s / 3, static_s / 3 + 8),)), fps=fps)
        write_video(clips["busy"], busy_scene(busy_s * fps, fps=fps, width=width, height=height, shot_seconds=20),
                    fps=fps)
        if args.quick:
            tiny = tiny_checkpoints(work / "models")
            app = Vidmem(Settings(memory=work / "memory", model=str(tiny["llava"]), embedder=str(tiny["clip"]),
                                  device="cpu", runtime=args.runtime, feature_cache=args.feature_cache))
        else:
            app = Vidmem(Settings(memory=work / "memory", embedder=str(clip512_checkpoint(work / "clip512")),
                                  device="cpu", runtime=args.runtime, feature_cache=args.feature_cache))
            log("building LLaVA-OneVision 0.5B's architecture with random weights (full SigLIP tower)")
            app._vlm = full_size_vlm(device="cpu", vision_layers=SIGLIP_SO400M["num_hidden_layers"])
            apply_runtime(app._vlm, args.runtime)  # what Vidmem.vlm does after load_vlm
        try:
            app.load_models()
            out["rtf_model"] = app.vlm.name
            out["rtf_feature_cache"] = args.feature_cache
            out["rtf_runtime"] = describe(app.vlm)
            runs = [("static", clips["static"], None), ("static_motion", clips["static"], MotionOptions()),
                    ("busy", clips["busy"], None)]
            for kind, path, motion in runs:
                start = time.perf_counter()
                options = IngestOptions(fps=1.0, motion=motion)
                report = asyncio.run(app.ingest(open_source(path), stream=kind.replace("_", "-"), options=options))
                wall = time.perf_counter() - start
                out[f"rtf_{kind}"] = round(report.video_seconds / wall, 3)
                out[f"rtf_{kind}_detail"] = {"video_seconds": round(report.video_seconds, 1), "wall_seconds": round(wall, 1),
                                             "encoded_segments": report.encoded_segments,
                                             "reused_segments": report.reused_segments, "frames": report.frames,
                                             "cached_frames": report.cached_frames}  # the STC cacher's (default)
                log(f"{kind}: {out[f'rtf_{kind}']}x real time {out[f'rtf_{kind}_detail']}")
        finally:
            app.close()
    out["rtf_note"] = ("files read as fast as they decode at 1 fps; a live camera at 1 fps keeps up when rtf >= 1; "
                       "static_motion: the static clip with motion-gated sampling (--motion), which stores the "
                       "walk-through that the default static check folds away")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three short videos, 2-minute synthetic clips")
    parser.add_argument("--model", help="VLM hub id or local directory for the full pipeline")
    parser.add_argument("--embedder", help="CLIP embedder for the full pipeline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="full pipeline with the tests' tiny random checkpoints")
    parser.add_argument("--minutes", type=float, default=None, help="length of the static and busy clips")
    parser.add_argument("--runtime", choices=("eager", "fast", "fast-lm"), default=None,
                        help="runtime for the real-time factors (default: $VIDMEM_RUNTIME, else fast on a CPU)")
    parser.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="the real-time factors with the STC feature cacher (the default) or without")
    parser.add_argument("--runtime-only", action="store_true", help="only the tower and real-time-factor figures")
    parser.add_argument("--no-runtime", action="store_true", help="skip the tower and real-time-factor figures")
    parser.add_argument("--no-tower", action="store_true", help="with --runtime-only: the real-time factors alone")
    args = parser.parse_args()
    if args.runtime_only:
        result = {"bench": "ingest", "quick": args.quick, **({} if args.no_tower else bench_tower(args)),
                  **bench_live_rtf(args),
                  "machine": machine_info(), "note": "eager and fast side by side in one run on a shared machine"}
        print(json.dumps(result))
        return

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
        **({} if args.no_runtime else {**bench_tower(args), **bench_live_rtf(args)}),
        "load_average": round(os.getloadavg()[0], 2),
        "cores": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
