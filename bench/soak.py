"""A month in an hour: many streams, flapping cameras, questions every few seconds, under a disk budget.

    python bench/soak.py --model DIR --embedder DIR [--minutes 60] [--streams 8] [--cameras 2] [--budget-mb 64]

In one process, as `vidmem monitor` runs them (one `Vidmem`, its scheduler, retention upkeep):
- `--streams` minus `--cameras` streams are written at an accelerated clock: each step stores one segment per
  stream covering `30 days / steps` of simulated time, so the run covers a simulated month (real tokens of the
  manifest's width, a real keyframe JPEG, clustered retrieval embeddings: what ingest stores, without the
  encoder's cost);
- `--cameras` streams are real live cameras: local HTTP MPEG-TS feeds read by `UrlSource` through the whole ingest
  path (decode, segmenting, the tiny VLM's encoder and compressor), each going down again and again for 1 s to
  `--max-outage` seconds (the issue's 5 minutes, scaled with the run);
- a question every `--ask-every` seconds about a random stream, through the scheduler at interactive priority:
  answered, or refused with an error (busy, or a stream that holds nothing yet), never anything else;
- the memory's disk budget (`vidmem retention --max-bytes`) is enforced by every write and by the upkeep loop.
Sampled every second: disk (`Memory.disk_usage`) and resident memory. Prints one JSON line: the disk high-water mark
beside the budget, RSS over the run's second and last quarters, questions answered/refused/failed, each camera's
outages and gaps, and whether any source was lost.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _tests_on_path, rss_mb  # noqa: E402

_tests_on_path()
from camera import HttpCamera  # noqa: E402  (tests/camera.py)

MONTH = 30 * 86400.0


def log(msg: str) -> None:
    print(f"[bench/soak] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keyframe_jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=60)
    return buffer.getvalue()


async def soak(args: argparse.Namespace, workdir: Path) -> dict:
    from vidmem.agents.app import Settings, Vidmem
    from vidmem.agents.scheduler import Priority
    from vidmem.agents.service import upkeep
    from vidmem.memory import Retention
    from vidmem.stream import Backoff, IngestOptions, open_source
    from vidmem.stream.synth import busy_scene, write_video

    seconds = args.minutes * 60.0
    budget = int(args.budget_mb * 1e6)
    app = Vidmem(Settings(memory=workdir / "memory", model=args.model, embedder=args.embedder, device="cpu",
                          max_new_tokens=8))
    await asyncio.to_thread(app.load_models)
    await asyncio.to_thread(app._prepare_ingest)  # binds the manifest: the synthetic writers store its widths
    memory = app.memory
    memory.set_retention(None, Retention(max_bytes=budget))
    manifest = memory.manifest
    feed = workdir / "feed.ts"
    write_video(feed, busy_scene(60, fps=10), fps=10)
    cameras = [HttpCamera(feed.read_bytes(), seconds=6.0, port=free_port()) for _ in range(args.cameras)]  # 6 s in 6 s
    for camera in cameras:
        camera.up()
    stop = asyncio.Event()
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((64, manifest.embed_dim)).astype(np.float32)
    synthetic = [f"sim{i}" for i in range(args.streams - args.cameras)]
    names = synthetic + [f"cam{i}" for i in range(args.cameras)]
    figures = {"questions": 0, "answered": 0, "refused": 0, "failed": [], "segments_written": 0, "outages": {},
               "disk_max": 0, "rss": []}
    sources = {}

    async def camera_stream(i: int) -> None:
        name = f"cam{i}"
        source = open_source(f"http://127.0.0.1:{cameras[i].port}/cam.ts", open_timeout=3, read_timeout=3,
                             backoff=Backoff(initial=0.05, cap=1.0, retry_first=True))
        sources[name] = source
        await app.ingest(source, stream=name, options=IngestOptions(fps=1, static_threshold=0), stop=stop)

    async def flapping(i: int) -> None:
        prng = random.Random(i)
        outages = figures["outages"].setdefault(f"cam{i}", [])
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), prng.uniform(3.0, 8.0))  # up for a while
                return
            except asyncio.TimeoutError:
                pass
            outage = prng.uniform(1.0, args.max_outage)
            await asyncio.to_thread(cameras[i].down)
            outages.append(round(outage, 2))
            try:
                await asyncio.wait_for(stop.wait(), outage)
            except asyncio.TimeoutError:
                pass
            await asyncio.to_thread(cameras[i].up)

    def write_step(step: int, steps: int) -> None:
        span = MONTH / steps
        start = time.time() - MONTH + step * span
        tokens = rng.standard_normal((64, manifest.dim)).astype(np.float16)  # (N, D)
        items = []
        for k, name in enumerate(synthetic):
            v = centres[(step + k) % len(centres)] + 0.3 * rng.standard_normal(manifest.embed_dim).astype(np.float32)
            items.append(dict(stream=name, start=start, end=start + span, frames=4, cut=False, tokens=tokens, slow=48,
                              embedding=v / np.linalg.norm(v), keyframe_jpeg=keyframe_jpeg(rng)))
        memory.add_segments(items)
        figures["segments_written"] += len(items)

    async def writer() -> None:
        steps = int(seconds / args.write_every)
        for step in range(steps):
            if stop.is_set():
                return
            await asyncio.to_thread(write_step, step, steps)
            await asyncio.sleep(args.write_every)

    async def questions() -> None:
        qrng = random.Random(3)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), args.ask_every)
                return
            except asyncio.TimeoutError:
                pass
            name = qrng.choice(names)
            figures["questions"] += 1
            try:
                call = lambda: app.ask("What is happening?", streams=[name], budget=1000)  # noqa: E731
                await asyncio.wrap_future(app.scheduler.submit(Priority.INTERACTIVE, call))
                figures["answered"] += 1
            except Exception as exc:  # noqa: BLE001 - sorted below: an error reply is fine, anything else is not
                from vidmem.errors import VidmemError

                if isinstance(exc, VidmemError):
                    figures["refused"] += 1
                    codes = figures.setdefault("refused_codes", {})
                    codes[exc.code] = codes.get(exc.code, 0) + 1
                    # what the refusals said, per kind of stream (a camera down for minutes holds no footage)
                    key = f"{'camera' if name.startswith('cam') else 'written'}: {_reason(str(exc))}"
                    reasons = figures.setdefault("refused_reasons", {})
                    reasons[key] = reasons.get(key, 0) + 1
                else:
                    figures["failed"].append(f"{type(exc).__name__}: {exc}")

    async def sampler() -> None:
        while not stop.is_set():
            figures["disk_max"] = max(figures["disk_max"], await asyncio.to_thread(memory.disk_usage))
            figures["rss"].append(rss_mb())
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    tasks = [asyncio.create_task(t) for t in (writer(), questions(), sampler(), upkeep(app, stop, every=5.0))]
    tasks += [asyncio.create_task(camera_stream(i)) for i in range(args.cameras)]
    tasks += [asyncio.create_task(flapping(i)) for i in range(args.cameras)]
    started = time.monotonic()
    await asyncio.sleep(seconds)
    states = {name: source.status.to_json() for name, source in sources.items()}  # before stopping: none ended
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    crashed = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    for camera in cameras:
        camera.down()
    stats = memory.stats()
    app.close()
    rss = figures.pop("rss")
    quarter = max(1, len(rss) // 4)
    return {
        "bench": "soak", "runtime": f"CPU, tiny LLaVA-OneVision checkpoint ({args.model}); no GPU",
        "wall_seconds": round(time.monotonic() - started, 1), "simulated_days": 30,
        "streams": args.streams, "cameras": args.cameras, "budget_bytes": budget,
        "disk_max_bytes": figures["disk_max"], "disk_end_bytes": stats["disk_bytes"],
        "segments_written": figures["segments_written"], "segments_kept": stats["segments"],
        "questions": figures["questions"], "answered": figures["answered"], "refused": figures["refused"],
        "refused_codes": figures.get("refused_codes", {}), "refused_reasons": figures.get("refused_reasons", {}),
        "failed": figures["failed"], "crashed_tasks": crashed,
        "rss_mb": {"second_quarter": round(float(np.mean(rss[quarter:2 * quarter])), 1),
                   "last_quarter": round(float(np.mean(rss[-quarter:])), 1), "max": round(max(rss), 1),
                   "per_minute": [round(float(np.mean(rss[i:i + 60])), 1) for i in range(0, len(rss), 60)]},
        "cameras_state": states, "outages": figures["outages"],
        "gaps": {s["name"]: s["gaps"] for s in stats["streams"] if s["name"].startswith("cam")},
        "sources_lost": [name for name, state in states.items() if state["state"] == "ended"],
    }


def _reason(message: str) -> str:
    """An error message without its particulars (stream names, numbers), to count alike refusals together."""
    return re.sub(r"'[^']*'|\d+(\.\d+)?", "_", message)[:100]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--embedder", required=True)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--cameras", type=int, default=2)
    parser.add_argument("--budget-mb", type=float, default=64.0)
    parser.add_argument("--write-every", type=float, default=0.05, help="seconds between synthetic steps")
    parser.add_argument("--ask-every", type=float, default=3.0)
    parser.add_argument("--max-outage", type=float, default=20.0, help="longest camera outage, seconds")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(soak(args, args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="vidmem-soak-") as tmp:
            result = asyncio.run(soak(args, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
