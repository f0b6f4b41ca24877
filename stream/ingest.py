"""The async ingest loop: source -> shot detection + sampling + segmenting -> encoder batches -> store.

Two asyncio tasks joined by a bounded queue of segments (DESIGN.md, data flow):

- the analysis task reads every decoded frame from the source, scores it for shot boundaries (AVS section
  3.2.1), samples it evenly in time, cuts segments (Clapper section 3.1: up to 4 frames, never across a cut)
  and applies the static check; the CPU work runs in a worker thread frame by frame;
- the storage task batches segments for `sink.encode` (vision encoder + compressor, in a worker thread), then
  `sink.commit`s each result in order; a segment that repeats the last stored one goes to `sink.extend` instead.

Backpressure: when the encoder falls behind, the segment queue fills, the analysis task waits, and the source
is read no further. A file source then decodes no further (it slows down); a live source's own bounded queue
overflows and it drops and counts frames (`dropped_frames`). Setting `stop` (the CLI does on SIGINT/SIGTERM)
ends reading, flushes the segment in flight and returns the report. A `SourceError` in the middle stores the
segments completed before the fault (not the one in flight) and is then raised.

Fades are not cuts (see `vidmem.stream.shots`): segments through a fade close every 4 samples as usual.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from collections.abc import AsyncIterator
from typing import Any, Protocol

from vidmem.errors import ConfigError, SourceError
from vidmem.stream.motion import MotionGate, MotionOptions
from vidmem.stream.sampling import TimeSampler
from vidmem.stream.segmenter import Segmenter, StaticCheck
from vidmem.stream.shots import ShotDetector, ShotOptions
from vidmem.stream.avs import select_informative
from vidmem.stream.sources import FileSource, Source
from vidmem.stream.types import MAX_SEGMENT_FRAMES, Frame, Segment

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestOptions:
    """How a source is turned into segments."""

    fps: float = 1.0  # sampled frames per second of video
    max_segment_frames: int = MAX_SEGMENT_FRAMES  # frames per segment (Clapper: 4)
    batch_segments: int = 4  # segments per sink.encode call at most
    queue_size: int = 16  # segments waiting for the encoder before the analysis task waits
    static_threshold: float = 3.0  # static check: mean grey difference (0..255) below which a segment repeats; 0 = off
    static_max_seconds: float = 300.0  # static check: extend a stored segment over at most this many seconds
    detect_cuts: bool = True  # run the shot-boundary detector (AVS section 3.2.1)
    shots: ShotOptions = ShotOptions()  # shot-boundary detector settings
    frame_budget: int | None = None  # files only: keep the k most informative frames (AVS eq. 5) instead of fps
    motion: MotionOptions | None = None  # motion-gated sampling (stream/motion.py): fps is then a cap; None = off

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ConfigError(f"fps must be positive, not {self.fps}.")
        if not 1 <= self.max_segment_frames <= MAX_SEGMENT_FRAMES:
            raise ConfigError(f"max_segment_frames must be between 1 and {MAX_SEGMENT_FRAMES}.")
        if self.batch_segments < 1 or self.queue_size < 1:
            raise ConfigError("batch_segments and queue_size must be at least 1.")
        if self.frame_budget is not None and self.frame_budget < 1:
            raise ConfigError(f"frame_budget must be at least 1 frame, not {self.frame_budget}.")


class SegmentSink(Protocol):
    """Where segments go; every method blocks and is called from a worker thread, one call at a time."""

    def encode(self, segments: list[Segment]) -> list[object]:
        """Vision encoder + compressor for a batch; one opaque result per segment."""

    def commit(self, segment: Segment, encoded: object) -> int:
        """Store one encoded segment; returns the visual tokens stored for it."""

    def extend(self, segment: Segment) -> None:
        """`segment` repeats the last committed one: extend that one's time range to `segment.end`."""


@dataclass
class IngestReport:
    """What one ingest run did; `to_json` is the CLI's `vidmem ingest --json` object."""

    stream: str
    segments: int = 0  # segments committed (reused ones not counted)
    frames: int = 0  # sampled frames in committed and reused segments
    visual_tokens: int = 0
    video_seconds: float = 0.0  # time covered by committed and reused segments
    wall_seconds: float = 0.0
    dropped_frames: int = 0
    cuts: list[float] = field(default_factory=list)  # seconds where shots begin
    reused_segments: int = 0  # segments the static check folded into their predecessor
    gaps: list[tuple[float, float]] = field(default_factory=list)  # seconds lost to a broken live connection
    source: str = ""
    decoded_frames: int = 0  # every frame the source decoded
    encode_calls: int = 0  # sink.encode calls
    encoded_segments: int = 0  # segments passed to sink.encode
    stopped: bool = False  # True when `stop` ended the run early
    cached_frames: int = 0  # frames whose vision features the sink reused (STC cacher) instead of running the tower

    def to_json(self) -> dict:
        return {
            "stream": self.stream,
            "segments": self.segments,
            "frames": self.frames,
            "visual_tokens": self.visual_tokens,
            "video_seconds": round(self.video_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3),
            "dropped_frames": self.dropped_frames,
            "cuts": [round(c, 3) for c in self.cuts],
            "reused_segments": self.reused_segments,
            "gaps": [[round(a, 3), round(b, 3)] for a, b in self.gaps],
            "source": self.source,
            "cached_frames": self.cached_frames,
        }


ENCODE, EXTEND = "encode", "extend"
ANALYSIS_CHUNK = 8  # decoded frames of a file analysed per worker-thread call (fewer thread hops)


class Analyser:
    """Frames in, ("encode" | "extend", segment) out: shot detection, sampling, segmenting, static check.

    Blocking CPU work with no I/O; `ingest` runs `feed` in a worker thread.
    """

    def __init__(self, stream: str, options: IngestOptions, *, duration: float | None = None) -> None:
        self.options = options
        self.duration = duration
        self.detector: ShotDetector[Frame] = ShotDetector(options.shots)
        self.sampler = TimeSampler(options.fps)
        self.motion = MotionGate(options.motion) if options.motion is not None else None
        self._moved: set[float] = set()  # times of sampled frames the motion gate kept because blocks changed
        # the last segment lasts one sample period past its last frame; with motion gating a skipped frame means
        # "as the last kept one", so it lasts up to the keyframe interval (clipped to the end of the video)
        period = 1.0 / options.fps if options.motion is None else max(1.0 / options.fps, options.motion.keyframe_seconds)
        self.segmenter = Segmenter(stream, max_frames=options.max_segment_frames, period=period)
        self.static = (StaticCheck(options.static_threshold, options.static_max_seconds)
                       if options.static_threshold > 0 else None)
        self._since_sample = 0.0  # the largest content score since the last sampled frame
        self._last_ts: float | None = None
        self._frame_duration = 0.0
        self.decoded = 0

    def feed(self, frame: Frame) -> list[tuple[str, Segment]]:
        self.decoded += 1
        if self._last_ts is not None:
            self._frame_duration = frame.ts - self._last_ts
        self._last_ts = frame.ts
        if self.options.detect_cuts:
            decided = self.detector.push(frame, frame.ts, frame.image)
            return self._after_detection([(d.item, d.score, d.cut) for d in decided])
        return self._after_detection([(frame, 0.0, False)])

    def _after_detection(self, decided: list[tuple[Frame, float, bool]]) -> list[tuple[str, Segment]]:
        out: list[tuple[str, Segment]] = []
        for frame, score, cut in decided:
            self._since_sample = max(self._since_sample, score)
            if not self.sampler.offer(frame.ts, cut=cut):
                continue
            if self.motion is not None:
                if not self.motion.offer(frame.ts, frame.image, cut=cut):
                    continue  # nothing moved since the last kept frame: the fps grid moves on, the score adds up
                if self.motion.moved:
                    self._moved.add(frame.ts)
            sampled = dataclasses.replace(frame, score=self._since_sample)
            self._since_sample = 0.0
            out += self._route(self.segmenter.add(sampled, cut=cut))
        return out

    def add_sampled(self, frame: Frame, *, cut: bool) -> list[tuple[str, Segment]]:
        """Offline AVS mode: a frame already chosen (by `vidmem.stream.avs`) goes straight to the segmenter."""
        self._last_ts = frame.ts
        return self._route(self.segmenter.add(frame, cut=cut))

    def _route(self, segments: list[Segment]) -> list[tuple[str, Segment]]:
        for s in segments:
            if self._moved and any(f.ts in self._moved for f in s.frames):
                s.extra["motion"] = True  # the static check stores it: something moved in part of the picture
                self._moved.difference_update(f.ts for f in s.frames)
        return [(EXTEND if self.static is not None and self.static.repeats(s) else ENCODE, s) for s in segments]

    def video_end(self) -> float | None:
        """Where the video ends: the declared duration, else the last frame plus one frame duration."""
        if self._last_ts is None:
            return self.duration
        end = self._last_ts + self._frame_duration
        if self.duration is None or self._last_ts >= self.duration:  # frames past the declared end: trust them
            return end
        return max(min(self.duration, end), self._last_ts)

    def finish(self) -> list[tuple[str, Segment]]:
        """End of input (or stop): decide the frames in the detector's lookahead and close the last segment."""
        out = self._after_detection([(d.item, d.score, d.cut) for d in self.detector.flush()])
        return out + self._route(self.segmenter.finish(end=self.video_end()))

    def gap(self, start: float, end: float) -> list[tuple[str, Segment]]:
        """A live connection was lost between `start` and `end`: close up, and begin afresh after it."""
        out = self._after_detection([(d.item, d.score, d.cut) for d in self.detector.flush()])
        self.detector.reset()
        self.sampler.reset()
        if self.motion is not None:
            self.motion.reset()
        return out + self._route(self.segmenter.gap(start, end))

    @property
    def cuts(self) -> list[float]:
        return list(self.detector.cuts)


async def ingest(source: Source, sink: SegmentSink, *, stream: str, options: IngestOptions = IngestOptions(),
                 progress: bool = False, stop: asyncio.Event | None = None) -> IngestReport:
    """Read `source` to its end (or until `stop` is set), storing its segments in `sink`; returns the report."""
    if options.frame_budget is not None and not isinstance(source, FileSource):
        raise ConfigError("frame_budget (AVS top-k sampling) needs a recorded file, not a live source.")
    report = IngestReport(stream=stream, source=source.name)
    analyser = Analyser(stream, options, duration=source.duration)
    queue: asyncio.Queue[tuple[str, Segment] | None] = asyncio.Queue(maxsize=options.queue_size)
    stop = stop or asyncio.Event()
    started = time.monotonic()
    bar = _progress_bar(source, progress)

    async def analyse_budget() -> None:
        # AVS eq. 3-5 over the whole file, then the chosen frames go through segmenting and the static check.
        assert options.frame_budget is not None
        selection = await asyncio.to_thread(select_informative, source.name, options.frame_budget,
                                            shots=options.shots, max_side=getattr(source, "max_side", None))
        analyser.decoded = selection.decoded
        analyser.detector.cuts = list(selection.cuts)
        cuts = set(selection.cuts)
        for frame in selection.frames:
            if stop.is_set():
                break
            for item in analyser.add_sampled(frame, cut=frame.ts in cuts):
                await queue.put(item)
        for item in analyser._route(analyser.segmenter.finish(end=selection.duration)):
            await queue.put(item)

    async def analyse_chunk(frames: list[Frame]) -> None:
        if not frames:
            return
        chunk = list(frames)
        frames.clear()
        items = await asyncio.to_thread(lambda: [item for f in chunk for item in analyser.feed(f)])
        for item in items:
            await queue.put(item)
        if bar is not None:
            _advance(bar, chunk[-1].ts, started)

    async def analyse_frames() -> None:
        seen_gaps = 0
        pending: list[Frame] = []  # files: frames analysed a chunk per worker-thread call
        async with contextlib.aclosing(source.frames()) as frames:
            async for frame in _until(frames, stop):
                if len(source.gaps) > seen_gaps:  # a live source reconnected: close up before the gap
                    await analyse_chunk(pending)
                    while len(source.gaps) > seen_gaps:
                        for item in analyser.gap(*source.gaps[seen_gaps]):
                            await queue.put(item)
                        seen_gaps += 1
                pending.append(frame)
                if source.live or len(pending) >= ANALYSIS_CHUNK:  # live: no waiting for company
                    await analyse_chunk(pending)
        await analyse_chunk(pending)
        for item in await asyncio.to_thread(analyser.finish):
            await queue.put(item)

    async def analyse() -> None:
        failure: SourceError | None = None
        try:
            await (analyse_budget() if options.frame_budget is not None else analyse_frames())
        except SourceError as exc:
            failure = exc  # store what was completed before the fault, not the segment in flight
        # Not in a `finally`: when cancelled, nobody would take the sentinel from a full queue.
        await queue.put(None)
        if failure is not None:
            raise failure

    async def store() -> None:
        batch: list[Segment] = []
        while True:
            item = await queue.get()
            if item is not None and item[0] == ENCODE:
                batch.append(item[1])
                if len(batch) < options.batch_segments and not queue.empty():
                    continue
            if batch:
                await _encode_and_commit(sink, batch, report)
                batch = []
            if item is None:
                return
            if item[0] == EXTEND:
                await asyncio.to_thread(sink.extend, item[1])
                report.reused_segments += 1
                report.frames += len(item[1].frames)
                report.video_seconds += item[1].end - item[1].start

    analysis = asyncio.create_task(analyse(), name=f"vidmem-analyse {stream}")
    storage = asyncio.create_task(store(), name=f"vidmem-store {stream}")
    try:
        await asyncio.gather(analysis, storage)
    except BaseException:
        # One side failed: let the storage side finish what it holds only when the source failed.
        failed_source = analysis.done() and not analysis.cancelled() and isinstance(analysis.exception(), SourceError)
        if failed_source and not storage.done():
            await storage
        for task in (analysis, storage):
            task.cancel()
        await asyncio.gather(analysis, storage, return_exceptions=True)
        raise
    finally:
        await source.aclose()
        if bar is not None:
            bar.close()
        report.wall_seconds = time.monotonic() - started
        report.cuts = analyser.cuts
        report.dropped_frames = getattr(source, "dropped", 0)
        report.gaps = list(source.gaps)
        report.decoded_frames = analyser.decoded
        report.stopped = stop.is_set()
    logger.info("ingested %s: %d segments (%d reused), %d frames, %.1f s of video in %.1f s", stream,
                report.segments, report.reused_segments, report.frames, report.video_seconds, report.wall_seconds)
    return report


async def _encode_and_commit(sink: SegmentSink, batch: list[Segment], report: IngestReport) -> None:
    encoded = await asyncio.to_thread(sink.encode, batch)  # model work: off the event loop
    report.encode_calls += 1
    report.encoded_segments += len(batch)
    if len(encoded) != len(batch):
        raise RuntimeError(f"sink.encode returned {len(encoded)} results for {len(batch)} segments")
    for segment, result in zip(batch, encoded, strict=True):
        tokens = await asyncio.to_thread(sink.commit, segment, result)
        report.segments += 1
        report.frames += len(segment.frames)
        report.visual_tokens += int(tokens)
        report.video_seconds += segment.end - segment.start


async def _until(frames: AsyncIterator[Frame], stop: asyncio.Event) -> AsyncIterator[Frame]:
    """Yield from `frames` until `stop` is set, even while the source is waiting for its next frame."""

    async def next_frame() -> tuple[bool, Frame | None]:
        try:
            return True, await frames.__anext__()
        except StopAsyncIteration:
            return False, None

    stopper = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            nxt = asyncio.ensure_future(next_frame())
            done, _ = await asyncio.wait({nxt, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
                return
            more, frame = nxt.result()
            if not more:
                return
            yield frame
    finally:
        stopper.cancel()


def _progress_bar(source: Source, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    total = source.duration if source.duration and math.isfinite(source.duration) and not source.live else None
    return tqdm(total=round(total, 1) if total else None, unit="s", desc=source.name, file=sys.stderr,
                bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} s [{elapsed}<{remaining}{postfix}]", leave=False)


def _advance(bar: Any, ts: float, started: float) -> None:
    if bar.total is None:
        bar.update(1)
        return
    bar.n = min(ts, bar.total)
    elapsed = time.monotonic() - started
    bar.set_postfix_str(f"{ts / elapsed:.1f}x real time" if elapsed > 0 else "", refresh=False)
    bar.refresh()
