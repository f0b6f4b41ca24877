"""Motion-gated sampling: a frame the fps grid offers is encoded only when blocks of the picture changed.

A home camera mostly shows the same picture. `TimeSampler` offers a frame at most `fps` times per second (the
cap); `MotionGate` then keeps the offered frame only when, compared with the last frame it kept, enough blocks of
a small grey thumbnail changed (the mean absolute difference inside a block above `threshold`), or when
`keyframe_seconds` passed since the last kept frame (at least one keyframe every N seconds, so a still scene
keeps recent evidence), or at a shot cut, a gap, or the first frame. Comparing against the last *kept* frame
(not the previous one) means slow drift adds up and is eventually sampled.

Blocks rather than the whole picture: a person crossing a corner of a wide shot changes a few blocks a lot and
the frame's mean hardly at all. The ingest loop marks a segment holding a frame kept for motion
(`segment.extra["motion"]`), and the whole-picture static check in `segmenter.py` then always stores it.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

MOTION_THUMB = (96, 54)  # (width, height) of the grey thumbnails the gate compares


@dataclass(frozen=True)
class MotionOptions:
    """When an offered frame counts as changed."""

    grid: tuple[int, int] = (12, 9)  # (columns, rows) of blocks over the thumbnail
    threshold: float = 10.0  # mean |grey difference| (0..255) inside a block above which that block changed
    min_blocks: int = 1  # changed blocks needed to keep a frame
    keyframe_seconds: float = 10.0  # keep a frame at least this often, whatever moves

    def __post_init__(self) -> None:
        cols, rows = self.grid
        if not (1 <= cols <= MOTION_THUMB[0] and 1 <= rows <= MOTION_THUMB[1]):
            raise ValueError(f"motion grid must be between 1x1 and {MOTION_THUMB[0]}x{MOTION_THUMB[1]} blocks.")
        if self.threshold < 0 or self.min_blocks < 1:
            raise ValueError("motion threshold must be >= 0 and min_blocks >= 1.")
        if not self.keyframe_seconds > 0:
            raise ValueError("keyframe_seconds must be positive.")


def thumbnail(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (54, 96) float32 grey, what `changed_blocks` compares."""
    small = cv2.resize(image, MOTION_THUMB, interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)  # (54, 96)


def changed_blocks(a: np.ndarray, b: np.ndarray, options: MotionOptions) -> int:
    """How many blocks of two (54, 96) grey thumbnails differ by more than the threshold on average."""
    cols, rows = options.grid
    diff = np.abs(a - b)
    # INTER_AREA averages each block's pixels: (54, 96) -> (rows, cols) mean differences
    per_block = cv2.resize(diff, (cols, rows), interpolation=cv2.INTER_AREA)
    return int((per_block > options.threshold).sum())


@dataclass
class MotionGate:
    """Decides, for each frame the fps grid offers, whether it is worth encoding."""

    options: MotionOptions = MotionOptions()
    _reference: np.ndarray | None = None  # thumbnail of the last kept frame
    _kept_at: float | None = None  # its time, seconds
    kept: int = 0
    skipped: int = 0
    moved: bool = False  # the last kept frame was kept because blocks changed (not first, cut or keyframe interval)

    def offer(self, ts: float, image: np.ndarray, *, cut: bool = False) -> bool:
        """True when the frame at `ts` is kept: the first one, a cut, motion, or the keyframe interval elapsed."""
        thumb = thumbnail(image)
        forced = (
            self._reference is None
            or cut
            or self._kept_at is None
            or ts - self._kept_at >= self.options.keyframe_seconds - 1e-3
            or ts < self._kept_at  # time went backwards (a new live connection): start afresh
        )
        self.moved = not forced and changed_blocks(thumb, self._reference, self.options) >= self.options.min_blocks
        keep = forced or self.moved
        if keep:
            self._reference, self._kept_at = thumb, ts
            self.kept += 1
        else:
            self.skipped += 1
        return keep

    def reset(self) -> None:
        """After a gap: the next offered frame is kept."""
        self._reference = self._kept_at = None
