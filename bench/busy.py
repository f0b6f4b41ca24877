"""A question's time to first token with live streams ingesting beside it, against the idle figure.

    python bench/busy.py [--quick] [--streams 8] [--questions 4] [--seconds 30] [--fps 2] [--budget 6000]
                         [--layers 24] [--vision-layers 27] [--runtime NAME]

One process, one `Vidmem`, one model, as `vidmem serve` runs them. The memory is first filled with synthetic
segments (245 stored tokens of the language model's width, random retrieval embeddings: what ingest stores, without
the encoder's cost), so every question finds a full budget of evidence. Then three phases, side by side:
- idle: `--questions` questions over the whole memory, one after the other, with nothing ingesting;
- busy, batched: `--streams` live streams (`PushSource`, as the websocket server feeds them) each receive real
  footage, decoded with PyAV from a test video (each stream from its own offset), at `--fps` frames per second for
  `--seconds`, through the whole ingest path (sampling at 1 fps, segmenting, the vision tower, the compressor, the
  embedder, the memory), their live windows refreshed through the scheduler after each committed segment (as the
  server does); a third of the way in, the same questions are asked at interactive priority. The vision tower and
  embedder run batched across streams (`Settings.encode_batch_frames`, agents/encoding.py);
- busy, unbatched: the same with `encode_batch_frames=0` (each stream encodes in its own thread, as before).
Each question's time to first token is measured from its submission to the scheduler to its first streamed token
(the queue wait, selection and prefill included). Busy phases also report segments committed per second while
footage was fed (`segments_per_s`; the questions may outlast the feeding) and over the whole phase including the
flush of what the streams' queues held at the end (`segments_per_s_with_flush`), frames the live sources dropped (a
source's queue overflows when ingest falls behind), refreshes run, and the shared encoder's figures (calls, frames,
streams per call). Each phase ends when the refreshes it queued have run. Prints one JSON line; progress goes to
stderr.

Full mode builds LLaVA-OneVision 0.5B's architecture in memory with random weights (bench/common.py: Qwen2-0.5B,
SigLIP-so400m at 384 px; timing does not depend on the weights), `--layers` / `--vision-layers` build fewer decoder /
tower layers for a shorter run (say so when quoting it). `--quick` uses the tests' tiny checkpoints and runs in
about a minute. Absolute times only mean something on the hardware and load they were measured on (the JSON line
carries the load average); the ratios are measured side by side in one run.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    TESTDATA, clip512_checkpoint, emit, full_size_vlm, logger, machine_info, tiny_checkpoints, unit_rows,
)

from vidmem.agents.app import Settings, Vidmem  # noqa: E402
from vidmem.agents.runtime import apply_runtime, describe  # noqa: E402
from vidmem.agents.scheduler import Priority  # noqa: E402
from vidmem.stream.ingest import IngestOptions  # noqa: E402
from vidmem.stream.sources import PushSource  # noqa: E402

log = logger("busy")

SEGMENT_SECONDS = 4.0
SEGMENT_TOKENS, SLOW_TOKENS = 245, 196  # 196 keyframe + 49 TimePerceiver tokens (DESIGN.md "Token math")
QUESTIONS = (
    "What happened at the front door?",
    "Is anyone in the picture right now?",
    "When did the car leave?",
    "What colour was the bicycle?",
    "Who came in last?",
    "What is on the table?",
)


def footage(path: Path, *, side: int, count: int = 120) -> list[np.ndarray]:
    """Up to `count` evenly spread frames of a real video, decoded with PyAV, no side above `side` px."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            image = frame.to_image()
            image.thumbnail((side, side))
            frames.append(np.array(image.convert("RGB")))  # (H, W, 3) uint8, writable
    step = max(1, len(frames) // count)
    return frames[::step][:count]


def build_app(args: argparse.Namespace, work: Path) -> Vidmem:
    if args.quick:
        tiny = tiny_checkpoints(work / "models")
        app = Vidmem(Settings(memory=work / "memory", model=str(tiny["llava"]), embedder=str(tiny["clip"]),
                              device="cpu", runtime=args.runtime, max_new_tokens=8))
    else:
        clip = clip512_checkpoint(work / "clip512")
        app = Vidmem(Settings(memory=work / "memory", embedder=str(clip), device="cpu", runtime=args.runtime,
                              max_new_tokens=8))
        log(f"building LLaVA-OneVision 0.5B's architecture with random weights ({args.layers} text layers, "
            f"{args.vision_layers} tower layers)")
        app._vlm = full_size_vlm(device="cpu", vision_layers=args.vision_layers, text_layers=args.layers)
        apply_runtime(app._vlm, args.runtime)  # what Vidmem.vlm does after load_vlm
    app.load_models()
    app.memory.bind(app.manifest())
    return app


def seed(app: Vidmem, streams: list[str], *, segments: int, end: float) -> None:
    """`segments` synthetic segments per stream, back to back, ending at `end` (unix seconds)."""
    rng = np.random.default_rng(0)
    dim = app.vlm.hidden_size
    pool = [(rng.standard_normal((SEGMENT_TOKENS, dim)) * 0.5).astype(np.float16) for _ in range(8)]
    for stream in streams:
        start = end - segments * SEGMENT_SECONDS
        embeddings = unit_rows(rng, segments, app.embedder.dim)
        app.memory.add_segments([
            dict(stream=stream, start=start + i * SEGMENT_SECONDS, end=start + (i + 1) * SEGMENT_SECONDS, frames=4,
                 cut=False, tokens=pool[i % len(pool)], slow=SLOW_TOKENS, embedding=embeddings[i])
            for i in range(segments)
        ])


async def ask(app: Vidmem, question: str, budget: int) -> dict:
    """One question through the scheduler at interactive priority; times from submission."""
    first: list[float] = []
    submitted = time.perf_counter()

    def on_token(_: str) -> None:
        if not first:
            first.append(time.perf_counter())

    call = lambda: app.ask(question, budget=budget, on_token=on_token)  # noqa: E731
    answer = await asyncio.wrap_future(app.scheduler.submit(Priority.INTERACTIVE, call))
    done = time.perf_counter()
    return {"ttft_s": round((first[0] if first else done) - submitted, 3), "answer_s": round(done - submitted, 3),
            "prefill_tokens": answer.prefill_tokens}


async def questions(app: Vidmem, args: argparse.Namespace) -> list[dict]:
    out = []
    for i in range(args.questions):
        out.append(await ask(app, QUESTIONS[i % len(QUESTIONS)], args.budget))
        log(f"  question {i + 1}: {out[-1]}")
    return out


def summary(asked: list[dict]) -> dict:
    ttft = [a["ttft_s"] for a in asked]
    return {"ttft_s": ttft, "ttft_median_s": round(statistics.median(ttft), 3),
            "prefill_tokens": [a["prefill_tokens"] for a in asked]}


async def busy(app: Vidmem, args: argparse.Namespace, frames: list[np.ndarray], names: list[str]) -> dict:
    """Live streams ingesting for `args.seconds`, the questions asked after a third of it."""
    sources = [PushSource(name, max_pending=8) for name in names]
    stop = asyncio.Event()
    commits: list[float] = []  # perf_counter of each committed segment
    refreshes = {"run": 0, "failed": 0}

    def on_segment(stream: str):
        def committed_one(row, segment) -> None:  # ingest worker thread: refresh the window at refresh priority
            commits.append(time.perf_counter())

            def refresh() -> None:
                try:
                    app.refresh_live(stream)
                    refreshes["run"] += 1
                except Exception:  # noqa: BLE001 - a failed refresh costs the next question a longer prefill
                    refreshes["failed"] += 1

            try:
                app.scheduler.submit(Priority.REFRESH, refresh, key=("refresh", stream))
            except Exception:  # noqa: BLE001 - busy: the next segment asks again
                pass

        return committed_one

    async def feed(index: int, source: PushSource) -> None:
        start = time.monotonic()
        n = int(args.seconds * args.fps)
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / args.fps - time.monotonic()))  # a steady rate, no drift
            source.push(frames[(index * 17 + i) % len(frames)])
        source.close()

    options = IngestOptions(fps=1.0, queue_size=4)  # a short queue: a stream that falls behind drops frames
    before = app.encoding_stats() or {}
    started = time.perf_counter()
    ingests = [asyncio.create_task(app.ingest(source, stream=name, options=options, stop=stop,
                                              on_segment=on_segment(name)))
               for name, source in zip(names, sources)]
    feeders = [asyncio.create_task(feed(i, source)) for i, source in enumerate(sources)]
    fed_until: list[float] = []
    feeding = asyncio.gather(*feeders)
    feeding.add_done_callback(lambda _: fed_until.append(time.perf_counter()))
    await asyncio.sleep(args.seconds / 3)  # the streams are ingesting and refreshing
    at = len(commits)
    asked = await questions(app, args)
    await feeding
    fed = fed_until[0] - started
    while_fed = sum(t <= fed_until[0] for t in commits)
    stop.set()  # what waits in the (short) queues is still stored
    reports = await asyncio.gather(*ingests)
    wall = time.perf_counter() - started
    # the refreshes still queued run now, so the next phase starts with an empty scheduler (captions come last)
    await asyncio.wrap_future(app.scheduler.submit(Priority.CAPTION, lambda: None))
    after = app.encoding_stats() or {}
    encoding = {key: after[key] - before.get(key, 0) for key in ("calls", "frames", "requests", "multi_stream_calls")} \
        if after else None
    if encoding and encoding["calls"]:
        encoding["frames_per_call"] = round(encoding["frames"] / encoding["calls"], 2)
    return {
        **summary(asked),
        "segments": sum(r.segments for r in reports), "segments_before_questions": at,
        "segments_while_fed": while_fed, "segments_per_s": round(while_fed / fed, 3),
        "segments_per_s_with_flush": round(sum(r.segments for r in reports) / wall, 3),
        "fed_seconds": round(fed, 2), "wall_seconds": round(wall, 2),
        "frames_pushed": sum(s.received for s in sources), "frames_dropped": sum(r.dropped_frames for r in reports),
        "refreshes": refreshes, "encoding": encoding,
    }


def run(args: argparse.Namespace, work: Path) -> dict:
    app = build_app(args, work)
    try:
        names = [f"cam{i}" for i in range(args.streams)]
        seed(app, names, segments=args.seed_segments, end=time.time() - 60)
        frames = footage(Path(args.video), side=args.side)
        log(f"{len(frames)} frames of {args.video}; model {app.vlm.name}")
        model = "tiny LLaVA-OneVision (tests/checkpoints.py)" if args.quick else app.vlm.name
        out: dict = {"bench": "busy", "model": model, "embedder": app.embedder.name,
                     "runtime": describe(app.vlm), "device": "cpu", "streams": args.streams, "fps": args.fps,
                     "seconds": args.seconds, "questions": args.questions, "budget": args.budget,
                     "text_layers": None if args.quick else args.layers,
                     "vision_layers": None if args.quick else args.vision_layers}
        asyncio.run(ask(app, "Warm-up: what is in the picture?", args.budget))  # first-call costs out of every phase
        log("idle: questions with nothing ingesting")
        out["idle"] = summary(asyncio.run(questions(app, args)))
        settings = app.settings
        for phase, batch in (("busy_batched", settings.encode_batch_frames or 32), ("busy_unbatched", 0)):
            app.settings = replace(settings, encode_batch_frames=batch)
            log(f"{phase}: {args.streams} live streams at {args.fps} fps for {args.seconds} s, questions after "
                f"{args.seconds / 3:.0f} s")
            out[phase] = asyncio.run(busy(app, args, frames, names))
            log(f"  {phase}: {out[phase]['segments']} segments, {out[phase]['segments_per_s']} per s")
        app.settings = settings
        idle = out["idle"]["ttft_median_s"]
        for phase in ("busy_batched", "busy_unbatched"):
            out[f"{phase}_over_idle"] = round(out[phase]["ttft_median_s"] / idle, 2) if idle else None
        out["scheduler"] = {"done": {p.name.lower(): n for p, n in app.scheduler.done.items()},
                            "coalesced": app.scheduler.coalesced}
        return out
    finally:
        app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny checkpoints, about a minute")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0, help="each busy phase's feeding time")
    parser.add_argument("--fps", type=float, default=2.0, help="frames pushed per second per stream")
    parser.add_argument("--budget", type=int, default=6000)
    parser.add_argument("--seed-segments", type=int, default=60, help="synthetic segments per stream before")
    parser.add_argument("--side", type=int, default=320, help="pushed frames' longest side in px")
    parser.add_argument("--layers", type=int, default=24, help="full mode: decoder layers of 24")
    parser.add_argument("--vision-layers", type=int, default=27, help="full mode: SigLIP layers of 27")
    parser.add_argument("--runtime", default=None, help="eager | fast | fast-lm (agents/runtime.py)")
    parser.add_argument("--video", default=str(TESTDATA / "mmaction2" / "test.mp4"))
    args = parser.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 15.0)
        args.questions = min(args.questions, 3)
        args.budget = min(args.budget, 2000)
        args.seed_segments = min(args.seed_segments, 20)
    with tempfile.TemporaryDirectory(prefix="vidmem-bench-busy-") as tmp:
        result = run(args, Path(tmp))
    result["machine"] = machine_info()
    emit(result)


if __name__ == "__main__":
    main()
