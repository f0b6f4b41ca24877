"""Sources to segments: decoding, time-based sampling, shot boundaries, segmenting, the async ingest loop."""
from __future__ import annotations

from vidmem.stream.ingest import IngestOptions, IngestReport, SegmentSink, ingest
from vidmem.stream.shots import ShotDetector, ShotOptions, informative_frames
from vidmem.stream.sources import (
    Backoff,
    CameraSource,
    FileSource,
    PushSource,
    Source,
    SourceStatus,
    UrlSource,
    open_source,
)
from vidmem.stream.types import Frame, Segment

__all__ = [
    "Backoff",
    "CameraSource",
    "FileSource",
    "Frame",
    "IngestOptions",
    "IngestReport",
    "PushSource",
    "Segment",
    "SegmentSink",
    "ShotDetector",
    "ShotOptions",
    "Source",
    "SourceStatus",
    "UrlSource",
    "informative_frames",
    "ingest",
    "open_source",
]
