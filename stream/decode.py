"""PyAV decoding: opening containers with timeouts, and turning decoded frames into `Frame`s with player timestamps.

Blocking code only; `vidmem.stream.sources` runs it in worker threads. Timestamps follow what a player shows:
the frame's presentation time minus the container's start time, in seconds, so a delayed video start (an edit
list, audio that begins first) keeps its offset and an MPEG-TS clock that starts at 1.4 s reads 0. Frames
without a timestamp get the previous one plus a nominal frame duration; a timestamp that goes backwards (a
clock reset, a concatenated file) is shifted so time keeps increasing. The display matrix (or the legacy
`rotate` tag) is applied to the pixels. Only the video stream is demuxed, so broken or absent audio is never
touched.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import av
import cv2
import numpy as np

from vidmem.errors import SourceError
from vidmem.stream.types import Frame

logger = logging.getLogger(__name__)

BACKWARD_JUMP = 0.5  # seconds: a timestamp this far behind the previous one is a clock reset, not jitter


def open_container(url: str, *, name: str, format: str | None = None, options: dict | None = None,
                   open_timeout: float = 10.0, read_timeout: float = 10.0) -> av.container.InputContainer:
    """av.open with timeouts; any failure (missing, not a video, unreachable, timed out) -> SourceError."""
    try:
        container = av.open(url, mode="r", format=format, options=options or {},
                            timeout=(open_timeout, read_timeout))
    except av.error.ExitError as exc:  # PyAV's timeout interrupted FFmpeg ("Immediate exit requested")
        raise SourceError(f"Cannot open video source {name}: no video arrived within {open_timeout:g} s.") from exc
    except av.error.FFmpegError as exc:
        raise SourceError(f"Cannot open video source {name}: {_reason(exc)}.") from exc
    except OSError as exc:
        raise SourceError(f"Cannot open video source {name}: {exc.strerror or exc}.") from exc
    if not container.streams.video:
        container.close()
        raise SourceError(f"Video source {name} has no video stream.")
    return container


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.rstrip(".").split(": '")[0] or type(exc).__name__


@dataclass
class Clock:
    """Turns one video stream's raw timestamps into increasing seconds (see the module docstring)."""

    origin: float  # seconds subtracted from every raw timestamp (the container's start time)
    frame_duration: float  # nominal seconds per frame, for frames without a timestamp
    last: float | None = None  # the previous output timestamp
    shift: float = 0.0  # seconds added after clock resets

    def __call__(self, raw: float | None) -> float:
        if raw is None:
            ts = 0.0 if self.last is None else self.last + self.frame_duration
        else:
            ts = raw - self.origin + self.shift
            if self.last is not None and ts <= self.last:
                if self.last - ts > BACKWARD_JUMP:
                    logger.warning("timestamps jump back %.3f s; continuing from %.3f s", self.last - ts, self.last)
                    self.shift += self.last - ts + self.frame_duration
                ts = self.last + (self.frame_duration if self.last - ts > BACKWARD_JUMP else 1e-3)
        self.last = ts
        return ts


def stream_clock(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Clock:
    """The clock of a file's video stream: origin at the container's start, nominal duration from its rate."""
    if container.start_time is not None:
        origin = container.start_time / av.time_base
    elif stream.start_time is not None and stream.time_base is not None:
        origin = float(stream.start_time * stream.time_base)
    else:
        origin = 0.0
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Clock(origin=origin, frame_duration=1.0 / float(rate) if rate else 1.0 / 25.0)


def stream_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                    origin: float) -> float | None:
    """Seconds from the container's start to the end of the video stream, when the file says."""
    if stream.duration is not None and stream.time_base is not None:
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else origin
        return max(0.0, start - origin + float(stream.duration * stream.time_base))
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def stream_rotation(stream: av.video.stream.VideoStream) -> int:
    """Counter-clockwise degrees from the legacy `rotate` tag (a clockwise angle), for frames without side data."""
    tag = stream.metadata.get("rotate")
    try:
        return -int(float(tag)) % 360 if tag else 0
    except ValueError:
        return 0


def to_rgb(frame: av.VideoFrame, fallback_rotation: int = 0, max_side: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB as displayed: any pixel format converted, shrunk to `max_side`, the rotation applied."""
    image = frame.to_ndarray(format="rgb24")  # (H, W, 3)
    h, w = image.shape[:2]
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        # Measured: swscale converting and shrinking in one pass is slower than converting, then OpenCV's
        # bilinear resize; area averaging only where bilinear would alias (shrinking by more than half).
        size = (max(2, round(w * scale)), max(2, round(h * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR if scale >= 0.5 else cv2.INTER_AREA)
    try:
        rotation = int(frame.rotation)  # counter-clockwise degrees from the display matrix
    except (AttributeError, ValueError, TypeError):
        rotation = 0
    if rotation == 0:
        rotation = fallback_rotation
    k = round(rotation / 90) % 4
    if k:
        image = np.ascontiguousarray(np.rot90(image, k=k))  # (W, H, 3) for 90/270: np.rot90 turns counter-clockwise
    return image


def decode_frames(container: av.container.InputContainer, *, name: str, clock: Clock | None = None,
                  threads: bool = True, max_side: int | None = None) -> Iterator[Frame]:
    """Every decoded frame of the first video stream, in presentation order, with increasing timestamps."""
    stream = container.streams.video[0]
    if threads:
        stream.thread_type = "AUTO"  # frame + slice threads: decoding is the costliest step of ingest
    clock = clock or stream_clock(container, stream)
    fallback = stream_rotation(stream)
    try:
        for vf in container.decode(stream):
            raw = vf.time if vf.pts is not None else None
            if raw is not None and raw - clock.origin < -1e-6 and clock.last is None:
                continue  # pre-roll before the start (edit lists): players do not show it
            image = to_rgb(vf, fallback, max_side)
            yield Frame(ts=clock(raw), image=image)
    except av.error.ExitError as exc:  # PyAV's read timeout interrupted FFmpeg ("Immediate exit requested")
        raise SourceError(f"Video source {name} stalled: no data arrived within the read timeout.") from exc
    except av.error.FFmpegError as exc:
        raise SourceError(f"Video source {name} failed while decoding: {_reason(exc)}.") from exc
    except (OSError, MemoryError) as exc:
        raise SourceError(f"Video source {name} failed while reading: {exc}.") from exc


def is_truncated(last_ts: float | None, frame_duration: float, duration: float | None) -> bool:
    """True when decoding stopped well short of the duration the file declares (a truncated download)."""
    if duration is None or not math.isfinite(duration):
        return False
    end = (last_ts if last_ts is not None else 0.0) + frame_duration
    return end < duration - max(1.0, 0.05 * duration)
