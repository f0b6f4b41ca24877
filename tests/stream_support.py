"""Test scaffolding for the stream tests: a real sink that records what the ingest loop hands it."""
from __future__ import annotations

import asyncio
import threading

from vidmem.stream import IngestOptions, IngestReport, Segment, Source, ingest


class RecordingSink:
    """Keeps committed segments in a list, counts encoder calls, extends the last segment on reuse."""

    def __init__(self, *, encode_delay: float = 0.0) -> None:
        self.segments: list[Segment] = []  # committed, in order; reused ones extend the last one's end
        self.encode_calls = 0
        self.encoded = 0  # segments passed to encode
        self.extended = 0
        self.encode_delay = encode_delay  # seconds per encode call: a slow encoder
        self.threads: set[str] = set()

    def encode(self, segments: list[Segment]) -> list[object]:
        self.threads.add(threading.current_thread().name)
        self.encode_calls += 1
        self.encoded += len(segments)
        if self.encode_delay:
            threading.Event().wait(self.encode_delay)
        return [("tokens", s.index) for s in segments]

    def commit(self, segment: Segment, encoded: object) -> int:
        assert encoded == ("tokens", segment.index)
        self.segments.append(segment)
        return 196 if len(segment) == 1 else 245

    def extend(self, segment: Segment) -> None:
        assert self.segments, "extend before any commit"
        self.extended += 1
        self.segments[-1].end = segment.end

    @property
    def ranges(self) -> list[tuple[float, float]]:
        return [(s.start, s.end) for s in self.segments]


def run_ingest(source: Source, sink: RecordingSink | None = None, **options: object) -> tuple[IngestReport, RecordingSink]:
    sink = sink or RecordingSink()
    report = asyncio.run(ingest(source, sink, stream="test", options=IngestOptions(**options)))
    return report, sink
