"""Cutting sampled frames into segments, and the static check that lets a repeated segment extend its predecessor.

Clapper (section 3.1) groups up to 4 consecutive sampled frames into a segment whose first frame is the keyframe.
A segment never spans a shot cut (AVS section 3.2.1): the first sampled frame after a cut starts a new segment.
A segment's time range is [first frame's time, next segment's start); the last one ends one sample period after
its last frame, clipped to the end of the video, so ranges are ordered, non-overlapping and inside the video.

Static check (after STC's feature cache, related-work-abstracts.txt): a segment whose frames all look like the
keyframe of the segment last stored is not encoded again; the stored one is extended in time. "Look like" is
judged on small grey thumbnails, over the whole picture (mean absolute difference below `threshold`) and block by
block (no 8x6-pixel block of the 64x36 thumbnail, about an eighth of the picture's width and a sixth of its
height, differs by more than `block_threshold` on average): a small new object, a person at the far end of a
hallway, changes one block a lot and the whole picture hardly at all, and must count as a change. The reference stays the stored segment, so slow drift adds up
and is eventually stored; and after `max_seconds` of extension a fresh segment is stored anyway, so a still
camera keeps recent evidence (and time granularity) in the memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from vidmem.stream.types import MAX_SEGMENT_FRAMES, Frame, Segment

MIN_SPAN = 1e-3  # seconds: the shortest time range a segment may have
STATIC_THUMB = (64, 36)  # (width, height) of the grey thumbnails the static check compares
STATIC_BLOCK = (6, 8)  # (height, width) in thumbnail pixels of the blocks compared one by one: a 6 x 8 grid


def block_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The largest mean |a - b| over the blocks of two (36, 64) grey thumbnails."""
    bh, bw = STATIC_BLOCK
    h, w = a.shape
    diff = np.abs(a - b).reshape(h // bh, bh, w // bw, bw)  # (rows, bh, cols, bw)
    return float(diff.mean(axis=(1, 3)).max())


@dataclass
class Segmenter:
    """Turns the sampled frames of one stream into segments, in order."""

    stream: str
    max_frames: int = MAX_SEGMENT_FRAMES  # frames per segment (1..4)
    period: float = 1.0  # seconds between samples, for the last segment's end
    _current: Segment | None = None
    _count: int = 0
    _gap_before: tuple[float, float] | None = field(default=None)

    def __post_init__(self) -> None:
        if not 1 <= self.max_frames <= MAX_SEGMENT_FRAMES:
            raise ValueError(f"max_segment_frames must be between 1 and {MAX_SEGMENT_FRAMES}.")

    def add(self, frame: Frame, *, cut: bool = False) -> list[Segment]:
        """Add the next sampled frame; returns the segments this completes (0 or 1)."""
        done: list[Segment] = []
        cur = self._current
        if cur is not None and (cut or len(cur.frames) >= self.max_frames):
            cur.end = frame.ts
            done.append(cur)
            cur = None
        if cur is None:
            cur = Segment(self.stream, [frame], end=math.nan, cut=cut, index=self._count)
            self._count += 1
            if self._gap_before is not None:
                cur.extra["gap_before"] = self._gap_before
                self._gap_before = None
        else:
            cur.frames.append(frame)
        self._current = cur
        return done

    def finish(self, end: float | None = None) -> list[Segment]:
        """Close the segment in flight; `end` (seconds) caps its end at the end of the video."""
        cur, self._current = self._current, None
        if cur is None:
            return []
        last = cur.frames[-1].ts
        # Never an empty range, even for a one-frame video or a gap right after the last frame.
        cur.end = last + self.period if end is None else max(min(last + self.period, end), last + MIN_SPAN)
        return [cur]

    def gap(self, start: float, end: float) -> list[Segment]:
        """A live source lost `start..end` seconds: close the segment in flight at `start`, mark the next one."""
        done = self.finish(end=start)
        self._gap_before = (start, end)
        return done

    @property
    def in_flight(self) -> Segment | None:
        return self._current


def grey_thumbnail(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB uint8 -> (36, 64) float32 grey, what the static check compares."""
    small = cv2.resize(image, STATIC_THUMB, interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)


@dataclass
class StaticCheck:
    """Says whether each new segment repeats the last stored one."""

    threshold: float = 3.0  # mean |grey difference| (0..255) under which two frames count as the same picture
    max_seconds: float = 300.0  # a stored segment is extended over at most this long; then a fresh one is stored
    block_threshold: float = 12.0  # ... and no block of the thumbnail may differ by this much on average
    _reference: np.ndarray | None = None  # grey thumbnail of the stored segment's keyframe
    _since: float = 0.0  # start (seconds) of the stored segment

    def repeats(self, segment: Segment) -> bool:
        """True when `segment` repeats the reference (it is then not stored); otherwise it becomes the reference."""
        thumbs = [grey_thumbnail(f.image) for f in segment.frames]
        ref = self._reference
        fresh = (segment.cut or "gap_before" in segment.extra or segment.extra.get("motion")  # stream/motion.py
                 or segment.end - self._since > self.max_seconds)
        if ref is not None and not fresh:
            if all(float(np.abs(t - ref).mean()) < self.threshold and block_difference(t, ref) < self.block_threshold
                   for t in thumbs):
                return True
        self._reference = thumbs[0]
        self._since = segment.start
        return False
