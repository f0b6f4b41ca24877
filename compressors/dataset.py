"""Training data: JSONL examples, the validation split, and vision features cached on disk per video.

Examples are JSONL, one object per line; relative video paths resolve against the JSONL file's folder:
- "caption" (Clapper stage 1): {"video", "caption"};
- "qa": {"video", "question", "answer"}, optionally "since" / "until" (seconds into the video) to limit the
  evidence to that stretch, as `vidmem ask --since/--until` does;
- "reconstruction" (SVC): {"video"}; other keys are ignored.

Videos are read exactly as `vidmem ingest` reads them: `vidmem.stream`'s file source (rotation applied, player
timestamps, the same frame size), its sampler at `fps`, its shot detector, segmenter and static check, all run
by the ingest loop itself with a sink that keeps the vision features instead of storing tokens. A training
segment is therefore the segment ingest would store, with the same start and end times.

Features live on disk, not in RAM: one folder per (video content, vision encoder, fps), holding a safetensors
file per segment (float16, (T, L, D)) and `segments.json` with their times, written last, so a folder without
it is an interrupted extraction and is redone. Only the segments a step uses are read back (memory-mapped).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from vidmem.errors import ConfigError, SourceError

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when what a cache folder holds changes; older folders are then recomputed
CACHE_DTYPE = torch.float16  # features on disk: half the bytes of fp32, far below the compressors' sensitivity
HASH_CHUNK = 1 << 20  # bytes read at a time when hashing a video


# -- examples -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One training line."""

    video: Path  # absolute path
    caption: str | None = None  # caption objective: the target
    question: str | None = None  # qa objective: the question asked over the video
    answer: str | None = None  # qa objective: the target
    since: float | None = None  # caption and qa objectives: evidence from this second on
    until: float | None = None  # caption and qa objectives: evidence up to this second


def _text(row: dict, key: str, where: str, objective: str) -> str:
    value = row.get(key)
    if not (isinstance(value, str) and value.strip()):
        raise ConfigError(f"{where} needs a non-empty \"{key}\" for the {objective} objective")
    return value.strip()


def _seconds(row: dict, key: str, where: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: \"{key}\" must be seconds into the video (a number >= 0), not {value!r}")
    return float(value)


def read_examples(path: Path, objective: str) -> list[Example]:
    """Parse a training JSONL for `objective`; every problem is a `ConfigError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training data not found: {path}")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} is not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("video"), str):
            raise ConfigError(f"{where} needs a \"video\" path")
        video = Path(row["video"])
        video = video if video.is_absolute() else (path.parent / video)
        if not video.is_file():
            raise ConfigError(f"{where}: video not found: {video}")
        fields: dict[str, Any] = {"video": video.resolve()}
        if objective == "caption":
            fields["caption"] = _text(row, "caption", where, objective)
        elif objective == "qa":
            fields["question"] = _text(row, "question", where, objective)
            fields["answer"] = _text(row, "answer", where, objective)
        if objective in ("caption", "qa"):  # the evidence: the whole video, or the segments within since..until
            fields["since"], fields["until"] = _seconds(row, "since", where), _seconds(row, "until", where)
            if fields["since"] is not None and fields["until"] is not None and fields["until"] <= fields["since"]:
                raise ConfigError(f"{where}: \"until\" ({fields['until']:g}) must come after \"since\" ({fields['since']:g})")
        examples.append(Example(**fields))
    if not examples:
        raise ConfigError(f"{path} holds no training examples")
    return examples


def split_validation(examples: list[Example], fraction: float, *, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out whole videos (every example of a held-out video) so validation never sees a training video.

    At least one video is held out when `fraction` > 0, and at least one is kept for training.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"val_split must be a share in [0, 1), not {fraction}")
    if fraction == 0.0:
        return examples, []
    videos = sorted({e.video for e in examples})
    if len(videos) < 2:
        raise ConfigError("val_split needs examples from at least two videos (it holds out whole videos); "
                          "give a separate validation file instead")
    held = max(1, min(len(videos) - 1, round(fraction * len(videos))))
    chosen = set(random.Random(seed).sample(videos, held))
    return [e for e in examples if e.video not in chosen], [e for e in examples if e.video in chosen]


# -- segments and their features ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedSegment:
    """A segment as ingest would store it, with its vision features on disk."""

    start: float  # seconds from the video's start
    end: float  # seconds: where the next segment starts (extended over repeats by the static check)
    frames: int  # sampled frames it covers (including repeats folded into it)
    encoded: int  # frames whose features it holds: T (repeats are not encoded again)
    cut: bool  # it begins at a shot cut
    path: Path  # safetensors file holding "features": (T, L, D) float16

    def features(self) -> torch.Tensor:
        """(T, L, D) float32 vision features of its frames."""
        from safetensors.torch import load_file

        return load_file(str(self.path))["features"].float()


def video_digest(path: Path) -> str:
    """sha256 of the file's bytes (first 16 hex digits): a renamed or copied video hits the same cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:16]


class FeatureSink:
    """The ingest loop's sink for training: encodes each segment's frames and writes the features to `folder`."""

    def __init__(self, encoder: Any, folder: Path) -> None:
        self.encoder = encoder
        self.folder = folder
        self.records: list[dict] = []

    def encode(self, segments: list) -> list[torch.Tensor]:
        images = [frame.image for segment in segments for frame in segment.frames]
        with torch.inference_mode():
            features = self.encoder(images).to("cpu", CACHE_DTYPE)  # (sum T, L, D)
        return list(features.split([len(s) for s in segments]))  # one (T, L, D) per segment

    def commit(self, segment: Any, features: torch.Tensor) -> int:
        from safetensors.torch import save_file

        name = f"segment-{len(self.records):06d}.safetensors"
        save_file({"features": features.contiguous()}, str(self.folder / name))
        self.records.append({"start": segment.start, "end": segment.end, "frames": len(segment),
                             "encoded": len(segment), "cut": segment.cut, "file": name})
        return 0  # no tokens are stored

    def extend(self, segment: Any) -> None:
        if self.records:  # a repeat of the last stored segment: it now lasts until this one's end
            self.records[-1]["end"] = segment.end
            self.records[-1]["frames"] += len(segment)


def ingest_features(video: Path, encoder: Any, folder: Path, *, fps: float, progress: bool = False) -> list[dict]:
    """Run vidmem's ingest loop over `video` into `folder`; returns the segment records (times, frames, file)."""
    from vidmem.stream import IngestOptions, ingest, open_source

    folder.mkdir(parents=True, exist_ok=True)
    sink = FeatureSink(encoder, folder)
    source = open_source(str(video))  # what `vidmem ingest FILE` opens: same size limit, rotation and clock
    asyncio.run(ingest(source, sink, stream=video.stem or "video", options=IngestOptions(fps=fps), progress=progress))
    if not sink.records:
        raise SourceError(f"no segments could be read from {video}")
    return sink.records


class FeatureCache:
    """Vision features of training videos, computed once through ingest and kept on disk."""

    def __init__(self, root: Path, encoder: Any, *, fps: float, progress: bool = False) -> None:
        self.root = Path(root)
        self.encoder = encoder
        self.fps = fps
        self.progress = progress
        self._segments: dict[Path, list[CachedSegment]] = {}  # only the index (times, file names) is held in RAM
        self._digests: dict[Path, str] = {}

    def folder(self, video: Path) -> Path:
        """The cache folder of `video`: keyed by its content, the vision encoder's fingerprint and the fps."""
        if video not in self._digests:
            self._digests[video] = video_digest(video)
        return self.root / f"{self._digests[video]}-{self.encoder.fingerprint}-fps{self.fps:g}-v{CACHE_VERSION}"

    def segments(self, video: Path) -> list[CachedSegment]:
        """Every segment ingest makes of `video`, in time order (extracted on first use)."""
        if video not in self._segments:
            folder = self.folder(video)
            index = folder / "segments.json"
            if index.is_file():
                records = json.loads(index.read_text())
            else:
                if folder.exists():  # an extraction that was interrupted
                    shutil.rmtree(folder)
                log.info("extracting vision features of %s (%s)", video, folder.name)
                tmp = folder.with_name(folder.name + ".partial")
                shutil.rmtree(tmp, ignore_errors=True)
                records = ingest_features(video, self.encoder, tmp, fps=self.fps, progress=self.progress)
                (tmp / "segments.json").write_text(json.dumps(records))
                os.replace(tmp, folder)
            self._segments[video] = [
                CachedSegment(r["start"], r["end"], r["frames"], r["encoded"], r["cut"], folder / r["file"]) for r in records
            ]
        return self._segments[video]

    def prepare(self, videos: list[Path]) -> None:
        """Extract every video's features up front (with a progress bar), so steps only read from disk."""
        todo = sorted(set(videos))
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="vision features", unit="video")
        for video in todo:
            self.segments(video)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()


def sampled_frames(path: Path, *, fps: float = 1.0, max_frames: int | None = None) -> list[np.ndarray]:
    """A short video's frames as (H, W, 3) uint8 RGB, read through `vidmem.stream` and sampled at `fps` by ingest's
    sampler (rotation applied, player timestamps, ingest's size limit); with `max_frames`, evenly spaced ones.

    For tests and benches that need a clip's frames; every frame sampled is held in memory.
    """
    from vidmem.stream import open_source
    from vidmem.stream.sampling import TimeSampler

    async def read() -> list[np.ndarray]:
        source, sampler, frames = open_source(str(path)), TimeSampler(fps), []
        try:
            async for frame in source.frames():
                if sampler.offer(frame.ts):
                    frames.append(frame.image)
        finally:
            await source.aclose()
        return frames

    frames = asyncio.run(read())
    if max_frames is not None and len(frames) > max_frames:
        keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
    return frames


def default_cache_dir() -> Path:
    """$VIDMEM_CACHE/features, else $XDG_CACHE_HOME/vidmem/features, else ~/.cache/vidmem/features."""
    if os.environ.get("VIDMEM_CACHE"):
        return Path(os.environ["VIDMEM_CACHE"]) / "features"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vidmem" / "features"


def in_window(segments: list[CachedSegment], since: float | None, until: float | None) -> list[CachedSegment]:
    """The segments overlapping [since, until], as `ask --since/--until` limits the evidence."""
    lo = -math.inf if since is None else since
    hi = math.inf if until is None else until
    return [s for s in segments if s.end > lo and s.start < hi]


def thin(segments: list[CachedSegment], max_frames: int) -> list[CachedSegment]:
    """At most `max_frames` sampled frames' worth of segments, evenly spaced over the list, in time order.

    Clapper samples at most 96 frames of a long video (section 4.1); here whole segments are kept, so every
    segment shown still carries its own start and end time.
    """
    if sum(s.encoded for s in segments) <= max_frames:
        return segments
    count = min(len(segments), max_frames)  # every segment holds at least one frame
    while count > 1:
        step = len(segments) / count
        chosen = [segments[int(i * step)] for i in range(count)]
        if sum(s.encoded for s in chosen) <= max_frames:
            return chosen
        count -= 1
    return [segments[0]]


def batches(count: int, size: int, *, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Example indices, `size` at a time, epoch after epoch, each epoch a fresh seeded permutation.

    Position `start` (examples consumed so far) makes the order of a resumed run the order of an unbroken one.
    """
    position = start
    while True:
        epoch, offset = divmod(position, count)
        order = random.Random(seed * 1_000_003 + epoch).sample(range(count), count)
        batch = order[offset : offset + size]
        while len(batch) < size:  # the batch runs into the next epoch
            epoch += 1
            order = random.Random(seed * 1_000_003 + epoch).sample(range(count), count)
            batch += order[: size - len(batch)]
        position += size
        yield batch
