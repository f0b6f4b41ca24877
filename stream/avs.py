"""Offline adaptive video sampling for a fixed frame budget (AVS section 3.2.1, eq. 3-5).

For a recorded file: score every decoded frame for a shot boundary (eq. 3, the content score of
`vidmem.stream.shots`), suppress non-maxima (eq. 4), keep the k highest and sort them in time (eq. 5). Frame 0
is always kept, since the opening shot has no boundary to score. Two passes over the file: the first scores
(holding only small thumbnails' worth of state), the second decodes again and keeps the chosen frames, so memory
stays at k frames however long the file. Blocking code: run it in a worker thread (`ingest` does).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from vidmem.stream import decode
from vidmem.stream.shots import ShotOptions, content_score, informative_frames, scores_to_cuts, thumbnail
from vidmem.stream.sources import MAX_SIDE
from vidmem.stream.types import Frame

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """The frames AVS picked from one file."""

    frames: list[Frame]  # the chosen frames in time order, `score` set to their shot-boundary score
    cuts: list[float]  # seconds of every shot cut found in the file (chosen frames at these times begin a shot)
    decoded: int  # frames decoded in one pass
    duration: float | None  # seconds, as the file declares (or the last frame's end)


def select_informative(path: str | os.PathLike[str], k: int, *, shots: ShotOptions = ShotOptions(),
                       max_side: int | None = MAX_SIDE) -> Selection:
    """The k most informative frames of a video file (blocking; raises SourceError on a bad file)."""
    name = os.fspath(path)
    timestamps: list[float] = []
    scores: list[float] = []
    container = decode.open_container(name, name=name)
    try:
        prev = None
        for frame in decode.decode_frames(container, name=name, max_side=max_side):  # pass 1: scores only
            hsv = thumbnail(frame.image)
            scores.append(0.0 if prev is None else content_score(prev, hsv))
            timestamps.append(frame.ts)
            prev = hsv
        stream = container.streams.video[0]
        duration = decode.stream_duration(container, stream, decode.stream_clock(container, stream).origin)
    finally:
        container.close()
    if not timestamps:
        return Selection([], [], 0, duration)
    chosen = informative_frames(scores, k, radius=shots.window)
    cut_indices = set(scores_to_cuts(timestamps, scores, shots))
    wanted = set(chosen)
    frames: list[Frame] = []
    container = decode.open_container(name, name=name)
    try:
        for i, frame in enumerate(decode.decode_frames(container, name=name, max_side=max_side)):  # pass 2
            if i in wanted:
                frames.append(replace(frame, score=scores[i]))
                if len(frames) == len(wanted):
                    break
    finally:
        container.close()
    cuts = sorted(timestamps[i] for i in cut_indices)
    if duration is None:
        duration = timestamps[-1] + (timestamps[-1] - timestamps[-2] if len(timestamps) > 1 else 0.0)
    logger.info("AVS picked %d of %d frames of %s (%d cuts)", len(frames), len(timestamps), name, len(cuts))
    return Selection(frames, cuts, len(timestamps), duration)
