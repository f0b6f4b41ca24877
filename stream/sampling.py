"""Sampling decoded frames at a target rate, evenly in time (never by frame index).

A sampler keeps a grid of instants `t0, t0 + 1/fps, ...` anchored at the first frame; the first decoded frame at
or after each grid instant is taken. Variable-frame-rate video is thus sampled at the same instants a player
would show, and a frame-rate change mid-file changes nothing. A shot cut (AVS section 3.2.1) forces the cut
frame to be sampled and re-anchors the grid there, so the first frame of every shot is a keyframe. A jump in
time (a gap in a live stream, a seek) takes one frame and re-anchors instead of emitting a burst.
"""
from __future__ import annotations

from dataclasses import dataclass

EPSILON = 1e-3  # seconds: a frame this close before a grid instant counts as on it (float timestamps)


@dataclass
class TimeSampler:
    """Decides, frame by frame, which decoded frames to keep."""

    fps: float = 1.0  # samples per second of video time
    _next: float | None = None  # the next grid instant, seconds

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ValueError("fps must be positive.")

    @property
    def period(self) -> float:
        return 1.0 / self.fps

    def offer(self, ts: float, *, cut: bool = False) -> bool:
        """True when the frame at `ts` seconds is to be sampled (always at a cut or the first frame)."""
        if self._next is None or cut:
            self._next = ts + self.period
            return True
        if ts < self._next - EPSILON:
            return False
        # Advance the grid past this frame; a jump of more than one period re-anchors at the frame.
        self._next += self.period
        if ts >= self._next - EPSILON:
            self._next = ts + self.period
        return True

    def reset(self) -> None:
        """Start a new grid at the next frame (after a gap)."""
        self._next = None


def sample_indices(timestamps: list[float], fps: float) -> list[int]:
    """Offline helper: indices of the frames a `TimeSampler` at `fps` would keep."""
    sampler = TimeSampler(fps)
    return [i for i, ts in enumerate(timestamps) if sampler.offer(ts)]
