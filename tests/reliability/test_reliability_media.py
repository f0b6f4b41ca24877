"""Hostile media through `vidmem ingest`: each file is decoded or rejected with one clear line, never a hang.

The CLI runs in-process (`vidmem.agents.cli.main`, the same function the `vidmem` script calls) so that each case
costs a model load and not a Python start-up; stdout and stderr are captured at the file-descriptor level, so
FFmpeg's own chatter would show too. Whatever the outcome, the memory reopens consistent.
"""
from __future__ import annotations

import json
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from rel_support import WAIT, check_consistent, committed_ids

from vidmem.agents.cli import main as vidmem_main
from vidmem.stream.synth import busy_scene, write_video


def ingest(capfd, source, memory: Path, tiny, *extra: str) -> tuple[int, str, str, float]:  # noqa: ANN001
    started = time.monotonic()
    code = vidmem_main(["ingest", str(source), "--stream", "cam", "--json", "--no-progress", "--memory", str(memory),
                        "--model", str(tiny.llava), "--embedder", str(tiny.clip), "--device", "cpu", *extra])
    out, err = capfd.readouterr()
    return code, out, err, time.monotonic() - started


def assert_rejected(code: int, err: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("vidmem: error: "), err
    return lines[0]


def assert_decoded_or_rejected(code: int, out: str, err: str, memory: Path) -> str:
    """A clean success with segments, or one clear error; the memory is consistent either way."""
    if code == 0:
        report = json.loads(out)
        assert report["segments"] >= 1 and report["frames"] >= 1
        outcome = "decoded"
    else:
        assert_rejected(code, err)
        outcome = "rejected"
    if (memory / "memory.sqlite").exists():
        check_consistent(memory)
    return outcome


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    write_video(path, busy_scene(120, fps=10), fps=10, faststart=True)  # 12 s, index first (web video)
    return path


def test_files_that_are_not_videos_are_refused_before_the_memory_is_touched(tmp_path, tiny_models, capfd):
    cases = {
        "empty.mp4": b"",
        "notes.mp4": b"this is a text file, not a video\n" * 50,
        "noise.mkv": random.Random(1).randbytes(100_000),
        "fake.mp4": b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 5000,  # an MP4 signature and nothing else
        "document.mp4": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" * 20,
        "program.mp4": Path(shutil.which("true") or "/bin/true").read_bytes(),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        memory = tmp_path / f"memory-{name}"
        code, _, err, seconds = ingest(capfd, path, memory, tiny_models)
        line = assert_rejected(code, err)
        assert str(path) in line, line
        assert seconds < WAIT and not memory.exists()
    (tmp_path / "folder.mp4").mkdir()
    for source in (tmp_path / "folder.mp4", tmp_path / "missing.mp4"):
        code, _, err, _ = ingest(capfd, source, tmp_path / "memory-x", tiny_models)
        assert_rejected(code, err)
    assert not (tmp_path / "memory-x").exists()


def test_truncated_and_bit_flipped_videos_are_decoded_as_far_as_possible_or_refused(tmp_path, tiny_models, capfd, clip,
                                                                                    videos):
    data = clip.read_bytes()
    rnd = random.Random(7)
    cases: dict[str, bytes] = {
        "half.mp4": data[: len(data) // 2],
        "header-only.mp4": data[:4096],
        "missing-index.mp4": videos["bikes.mp4"]["file"].read_bytes()[:200_000],  # its index is at the end
    }
    for i in range(4):  # flip bytes: a few in the media data, or a burst anywhere (the index included)
        flipped = bytearray(data)
        spots = [rnd.randrange(len(data) // 4, len(data)) for _ in range(50)] if i < 2 else \
            [rnd.randrange(0, len(data)) + k for k in range(64) for _ in range(1)]
        for spot in spots:
            if spot < len(flipped):
                flipped[spot] ^= 0xFF
        cases[f"flipped-{i}.mp4"] = bytes(flipped)
    outcomes = {}
    for name, body in cases.items():
        path = tmp_path / name
        path.write_bytes(body)
        memory = tmp_path / f"memory-{name}"
        code, out, err, seconds = ingest(capfd, path, memory, tiny_models)
        outcomes[name] = assert_decoded_or_rejected(code, out, err, memory)
        assert seconds < WAIT
    # half a web video holds whole segments before the cut: they are stored even though the run ends in an error
    assert committed_ids(tmp_path / "memory-half.mp4"), outcomes
    assert outcomes["header-only.mp4"] == "rejected" and outcomes["missing-index.mp4"] == "rejected"


def test_a_huge_resolution_frame_and_a_wrong_extension_are_decoded(tmp_path, tiny_models, capfd, videos):
    huge = tmp_path / "huge.mp4"  # one 8000x8000 PNG frame in an MP4: 64 megapixels, 192 MB as RGB
    with av.open(str(huge), "w") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = 8000, 8000, "rgb24"
        image = np.zeros((8000, 8000, 3), np.uint8)
        image[::50] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    del image
    code, out, err, seconds = ingest(capfd, huge, tmp_path / "m1", tiny_models)
    assert assert_decoded_or_rejected(code, out, err, tmp_path / "m1") == "decoded" and seconds < WAIT

    misnamed = tmp_path / "holiday.jpg"  # a real video with an image's extension: FFmpeg probes the content
    misnamed.write_bytes(videos["test.mp4"]["file"].read_bytes())
    code, out, err, _ = ingest(capfd, misnamed, tmp_path / "m2", tiny_models)
    assert assert_decoded_or_rejected(code, out, err, tmp_path / "m2") == "decoded"
    assert json.loads(out)["segments"] == 3


class StallingServer:
    """An HTTP server that answers with headers (and a few bytes of video) and then says nothing more."""

    def __init__(self, head: bytes) -> None:
        self.head = head
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.stop = threading.Event()
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\n\r\n" + self.head)
            self.held.append(conn)  # never closed, never written to again

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/camera.mp4"

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for conn in self.held:
            conn.close()
        self.listener.close()


@pytest.mark.slow
def test_a_stream_that_stalls_after_its_headers_ends_in_a_clear_error(tmp_path, tiny_models, capfd, clip):
    for head in (b"", clip.read_bytes()[:3000]):
        with StallingServer(head) as url:
            code, _, err, seconds = ingest(capfd, url, tmp_path / "memory", tiny_models)
        line = assert_rejected(code, err)
        assert "127.0.0.1" in line and ("within" in line or "stalled" in line) and seconds < WAIT
        assert not committed_ids(tmp_path / "memory")
