"""Bad sources end in one clear SourceError (or a recorded gap and a reconnect), never a hang or a lost segment."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from services import free_port
from stream_support import RecordingSink, run_ingest

from vidmem.errors import SourceError, VidmemError
from vidmem.stream import IngestOptions, ingest, open_source
from vidmem.stream.synth import busy_scene, write_video


def _one_sentence(exc: BaseException) -> str:
    text = str(exc)
    assert isinstance(exc, VidmemError) and text.endswith(".") and "\n" not in text and "Traceback" not in text
    return text


def test_missing_file(tmp_path: Path):
    with pytest.raises(SourceError) as err:
        open_source(tmp_path / "nope.mp4")
    assert "not found" in _one_sentence(err.value)


def test_empty_file(tmp_path: Path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(SourceError) as err:
        open_source(tmp_path / "empty.mp4")
    assert "empty" in _one_sentence(err.value)


def test_a_directory_is_not_a_video(tmp_path: Path):
    with pytest.raises(SourceError):
        open_source(tmp_path)


@pytest.mark.parametrize("content", [b"this is a text file, not a video\n" * 40, bytes(range(256)) * 64],
                         ids=["text", "binary"])
def test_non_video_file(tmp_path: Path, content: bytes):
    path = tmp_path / "notes.mp4"
    path.write_bytes(content)
    with pytest.raises(SourceError) as err:
        open_source(path)
    assert str(path) in _one_sentence(err.value)


def test_unsupported_scheme():
    with pytest.raises(SourceError) as err:
        open_source("gopher://user:secret@example.com/video")
    assert "secret" not in _one_sentence(err.value)


def test_truncated_file_keeps_the_segments_completed_before_the_fault(tmp_path: Path):
    whole = tmp_path / "whole.mp4"
    write_video(whole, busy_scene(200, fps=10), fps=10, faststart=True)  # 20 s, index first (web video)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    sink = RecordingSink()
    with pytest.raises(SourceError) as err:
        run_ingest(open_source(cut), sink, static_threshold=0)
    assert "truncated" in _one_sentence(err.value)
    # 1 sample/s, 4 per segment: the decodable ~9.5 s give two complete segments; the one in flight is dropped.
    assert sink.ranges == [(0.0, 4.0), (4.0, 8.0)]


def test_a_file_cut_right_after_its_header_stores_nothing(tmp_path: Path):
    whole = tmp_path / "whole.mp4"
    write_video(whole, busy_scene(50, fps=10), fps=10, faststart=True)
    data = whole.read_bytes()
    path = tmp_path / "header-only.mp4"
    path.write_bytes(data[: data.find(b"mdat") + 104])  # the index, then almost no picture data
    sink = RecordingSink()
    with pytest.raises(SourceError) as err:
        run_ingest(open_source(path), sink)
    _one_sentence(err.value)
    assert sink.segments == [] and sink.encode_calls == 0


def test_truncated_index_is_refused_on_open(videos, tmp_path: Path):
    data = videos["bikes.mp4"]["file"].read_bytes()  # its index (moov) is at the end
    path = tmp_path / "bikes-part.mp4"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SourceError):
        open_source(path)


def test_closed_port_fails_fast():
    port = free_port()
    source = open_source(f"http://user:pw@127.0.0.1:{port}/live.ts", open_timeout=2, read_timeout=2)
    assert source.live and "pw" not in source.name
    started = time.monotonic()
    with pytest.raises(SourceError) as err:
        run_ingest(source)
    assert time.monotonic() - started < 10
    assert "pw" not in _one_sentence(err.value)


def test_rtsp_to_a_closed_port_fails_fast():
    source = open_source(f"rtsp://127.0.0.1:{free_port()}/cam", open_timeout=2, read_timeout=2)
    started = time.monotonic()
    with pytest.raises(SourceError):
        run_ingest(source)
    assert time.monotonic() - started < 10


@contextmanager
def _silent_server() -> Iterator[int]:
    """Accepts TCP connections and never answers (a stalled camera or proxy)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
        listener.close()


def test_a_server_that_never_answers_times_out():
    with _silent_server() as port:
        source = open_source(f"http://127.0.0.1:{port}/video.mp4", open_timeout=1.5, read_timeout=1.5)
        started = time.monotonic()
        with pytest.raises(SourceError):
            run_ingest(source)
        assert time.monotonic() - started < 10


class _VideoServer:
    """A local HTTP server streaming a video file; it can stall or hang up after some bytes, per connection."""

    def __init__(self, body: bytes, *, content_length: bool, plan: list[tuple[str, int]]) -> None:
        self.body = body
        self.plan = list(plan)  # per connection: ("stall" | "close" | "full", bytes before it happens)
        self.connections = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.connections += 1
                action, limit = server.plan.pop(0) if server.plan else ("full", len(server.body))
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                if content_length:
                    self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                sent = min(limit, len(server.body))
                try:
                    for i in range(0, sent, 16384):
                        self.wfile.write(server.body[i:min(i + 16384, sent)])
                    self.wfile.flush()
                    if action == "stall":
                        server.release.wait(30)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/stream"

    def __enter__(self) -> _VideoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("http") / "clip.mp4"
    write_video(path, busy_scene(200, fps=10), fps=10, faststart=True)  # 20 s
    return path.read_bytes()


@pytest.fixture(scope="module")
def live_ts(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("http") / "live.ts"
    write_video(path, busy_scene(120, fps=10), fps=10)  # 12 s of MPEG-TS, served without a length: a live feed
    return path.read_bytes()


def test_recorded_http_video_ingests_like_a_file(recording: bytes):
    with _VideoServer(recording, content_length=True, plan=[]) as server:
        source = open_source(server.url, open_timeout=5, read_timeout=5)
        report, sink = run_ingest(source, static_threshold=0)
    assert not source.live
    assert sink.ranges[0][0] == 0.0 and sink.ranges[-1][1] == pytest.approx(20.0, abs=0.01)
    assert report.segments == 5 and report.dropped_frames == 0


def test_a_recorded_http_video_that_stalls_midway_ends_with_the_completed_segments(recording: bytes):
    with _VideoServer(recording, content_length=True, plan=[("stall", len(recording) // 2)]) as server:
        source = open_source(server.url, open_timeout=2, read_timeout=2)
        sink = RecordingSink()
        started = time.monotonic()
        with pytest.raises(SourceError) as err:
            run_ingest(source, sink, static_threshold=0)
        assert time.monotonic() - started < 15
    _one_sentence(err.value)
    assert sink.ranges and sink.ranges[-1][1] <= 12.0
    assert all(b - a == pytest.approx(4.0) for a, b in sink.ranges)  # only complete segments


def test_a_live_stream_that_drops_is_reconnected_and_the_gap_recorded(live_ts: bytes):
    # The first connection hangs up half way; later ones play through (a live feed never ends by itself).
    plan = [("close", len(live_ts) // 2)]
    sink = RecordingSink()

    async def run():
        source = open_source(server.url, open_timeout=3, read_timeout=3)
        stop = asyncio.Event()
        task = asyncio.create_task(ingest(source, sink, stream="cam", options=IngestOptions(static_threshold=0),
                                          stop=stop))
        while not any("gap_before" in s.extra for s in sink.segments) and not task.done():
            await asyncio.sleep(0.05)
        stop.set()  # what SIGINT does
        return await asyncio.wait_for(task, 20), source

    with _VideoServer(live_ts, content_length=False, plan=plan) as server:
        report, source = asyncio.run(run())
    assert source.live and server.connections >= 2
    assert report.stopped and len(report.gaps) >= 1
    gap_start, gap_end = report.gaps[0]
    assert gap_end >= gap_start
    after = [s for s in sink.segments if "gap_before" in s.extra]
    assert after and after[0].start >= gap_end - 1.0
    before = [s for s in sink.segments if s.end <= gap_start + 1e-6]
    assert before and before[-1].end == pytest.approx(gap_start, abs=1.0)  # the segment cut off by the loss is kept
    assert all(a1 <= b0 for (_, a1), (b0, _) in zip(sink.ranges, sink.ranges[1:]))  # still ordered
    assert abs(sink.ranges[0][0] - time.time()) < 120  # live timestamps are unix seconds


def test_a_live_stream_that_dies_ends_in_source_error_after_the_retries(live_ts: bytes):
    server = _VideoServer(live_ts, content_length=False, plan=[("close", len(live_ts) // 2)])
    sink = RecordingSink()

    async def run():
        source = open_source(server.url, open_timeout=1, read_timeout=1, max_reconnects=2)
        task = asyncio.create_task(ingest(source, sink, stream="cam", options=IngestOptions(static_threshold=0)))
        while server.connections < 1 or not sink.segments:
            await asyncio.sleep(0.05)
        server.httpd.shutdown()  # the camera goes away for good
        server.httpd.server_close()
        return await task, source

    with server:
        started = time.monotonic()
        with pytest.raises(SourceError) as err:
            asyncio.run(run())
    assert "reconnection" in _one_sentence(err.value)
    assert time.monotonic() - started < 30
    assert sink.segments  # what was completed before the loss stays stored
    assert all(a1 <= b0 for (_, a1), (b0, _) in zip(sink.ranges, sink.ranges[1:]))


def test_a_live_url_behind_a_slow_encoder_drops_frames_and_counts_them(live_ts: bytes):
    sink = RecordingSink(encode_delay=0.3)

    async def run():
        source = open_source(server.url, open_timeout=3, read_timeout=3)
        stop = asyncio.Event()
        options = IngestOptions(fps=5.0, queue_size=1, batch_segments=1, static_threshold=0)
        task = asyncio.create_task(ingest(source, sink, stream="cam", options=options, stop=stop))
        while not (source.dropped and sink.segments) and not task.done():
            await asyncio.sleep(0.05)
        stop.set()
        return await asyncio.wait_for(task, 20), source

    with _VideoServer(live_ts, content_length=False, plan=[]) as server:  # bursts 12 s of video at once
        report, source = asyncio.run(run())
    assert report.dropped_frames == source.dropped > 0
    assert report.decoded_frames + report.dropped_frames <= server.connections * 120
    assert sink.segments and all(a1 <= b0 for (_, a1), (b0, _) in zip(sink.ranges, sink.ranges[1:]))
