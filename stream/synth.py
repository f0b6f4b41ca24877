"""Synthetic footage written with PyAV, for tests and benchmarks: static and busy scenes, hard cuts, custom
timestamps (variable frame rate), display rotation. Nothing here is used when ingesting real video.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from fractions import Fraction

import av
import numpy as np


def write_video(path: str | os.PathLike[str], frames: Iterable[np.ndarray], *, fps: float = 25.0,
                timestamps: Sequence[float] | None = None, rotation: int = 0, codec: str = "libx264",
                audio_seconds: float = 0.0, faststart: bool = False, pix_fmt: str = "yuv420p") -> None:
    """Encode (H, W, 3) uint8 RGB frames to `path`.

    `timestamps`: seconds per frame (variable frame rate; stored with a 1/90000 time base), else every
    1/fps. `rotation`: counter-clockwise display rotation in degrees, written as display-matrix side data.
    `audio_seconds`: add a silent AAC track of that length (players start at the earliest stream).
    `faststart`: put the MP4 index first (as web video does), so a truncated copy still opens.
    `pix_fmt`: the stored pixel format (yuv444p, yuvj422p for mjpeg, gray for ffv1...).
    """
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(os.fspath(path), mode="w", options=options) as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream(codec, rate=rate)
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "23", "bf": "0"}
        if timestamps is not None:
            stream.time_base = Fraction(1, 90000)
            stream.codec_context.time_base = Fraction(1, 90000)
        if rotation:
            stream.set_display_rotation(rotation)
        astream = container.add_stream("aac", rate=48000) if audio_seconds > 0 else None
        first = True
        for i, image in enumerate(frames):
            if first:
                stream.height, stream.width = image.shape[:2]
                first = False
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if timestamps is not None:
                frame.pts = round(timestamps[i] * 90000)
                frame.time_base = Fraction(1, 90000)
            else:
                frame.pts = i
                frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if astream is not None:
            samples = int(audio_seconds * 48000)
            for start in range(0, samples, 1024):
                n = min(1024, samples - start)
                aframe = av.AudioFrame.from_ndarray(np.zeros((1, n), dtype=np.float32), format="fltp", layout="mono")
                aframe.sample_rate = 48000
                aframe.pts = start
                for packet in astream.encode(aframe):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)


def static_scene(n: int, *, width: int = 320, height: int = 180, seed: int = 0, noise: float = 2.0) -> Iterable[np.ndarray]:
    """n frames of one still picture with a little sensor noise (a parked camera)."""
    rng = np.random.default_rng(seed)
    base = _picture(width, height, rng)
    for _ in range(n):
        jitter = rng.normal(0.0, noise, size=base.shape)
        yield np.clip(base + jitter, 0, 255).astype(np.uint8)


def busy_scene(n: int, *, fps: float = 25.0, width: int = 320, height: int = 180, seed: int = 0,
               shot_seconds: float | None = None) -> Iterable[np.ndarray]:
    """n frames of constant motion: a textured picture panning and a block sweeping across it.

    `shot_seconds`: start a new, unrelated picture (a hard cut) every that many seconds.
    """
    rng = np.random.default_rng(seed)
    base = _picture(width * 2, height, rng)
    shot = 0
    for i in range(n):
        t = i / fps
        if shot_seconds is not None and int(t // shot_seconds) != shot:
            shot = int(t // shot_seconds)
            base = _picture(width * 2, height, rng)
        x = int(t * 40) % width  # pixels: a 40 px/s pan
        frame = base[:, x:x + width].astype(np.uint8)  # (H, W, 3)
        bx = int(t * 120) % max(1, width - 40)  # a block moving at 120 px/s
        by = int(height / 2 + np.sin(t * 3) * height / 3) - 20
        frame[max(0, by):by + 40, bx:bx + 40] = (255 - i * 7 % 255, 40, 200)
        yield frame


def _picture(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A random smooth colour picture with edges: (height, width, 3) float64 in 0..255."""
    coarse = rng.uniform(0, 255, size=(max(2, height // 30), max(2, width // 30), 3))
    ys = np.linspace(0, coarse.shape[0] - 1, height).round().astype(int)
    xs = np.linspace(0, coarse.shape[1] - 1, width).round().astype(int)
    return coarse[ys][:, xs].astype(np.float64)  # (height, width, 3): blocky, so cuts and motion are visible
