"""The values that flow out of `vidmem.stream`: sampled frames and the segments cut from them."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_SEGMENT_FRAMES = 4  # Clapper section 3.1: a segment holds up to 4 sampled frames


@dataclass(frozen=True)
class Frame:
    """One decoded, sampled frame."""

    ts: float  # presentation time in seconds (from the file's start; unix seconds for live sources)
    image: np.ndarray  # (H, W, 3) uint8 RGB, rotation already applied
    score: float = 0.0  # AVS 3.2.1 shot-boundary score: the largest content change (0..255) since the last sample


@dataclass
class Segment:
    """Up to 4 consecutive sampled frames of one stream, never spanning a shot cut."""

    stream: str
    frames: list[Frame]  # 1..4 frames; frames[0] is the keyframe
    end: float  # seconds: where the next sampled frame starts (or the last frame's time plus one sample period)
    cut: bool = False  # True when the segment begins at a detected shot cut
    index: int = 0  # running number of the segment within this ingest run
    extra: dict = field(default_factory=dict)  # free-form annotations (e.g. a gap before it, the source name)

    @property
    def start(self) -> float:
        return self.frames[0].ts

    @property
    def keyframe(self) -> Frame:
        return self.frames[0]

    def __len__(self) -> int:
        return len(self.frames)
