"""Live behaviour of the ingest loop: pushed frames, drops under pressure, stop flushes, progress, backpressure."""
from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest
from PIL import Image
from stream_support import RecordingSink, run_ingest

from vidmem.errors import ProtocolError
from vidmem.stream import IngestOptions, PushSource, ingest, open_source
from vidmem.stream.synth import busy_scene


def _encoded(image: np.ndarray, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **save)
    return buf.getvalue()


def _scene(n: int) -> list[np.ndarray]:
    return list(busy_scene(n, fps=10, width=96, height=64))


def test_pushed_frames_come_out_in_order_with_their_times():
    async def run():
        source = PushSource("cam", max_pending=8)
        images = _scene(3)
        assert source.push(images[0], ts=100.0)
        assert source.push_encoded(_encoded(images[1], "PNG"), ts=100.5)
        assert source.push_encoded(_encoded(images[2], "WEBP", lossless=True))  # stamped on receipt
        source.close()
        return [f async for f in source.frames()], images

    frames, images = asyncio.run(run())
    assert [f.ts for f in frames[:2]] == [100.0, 100.5]
    assert abs(frames[2].ts - time.time()) < 60
    assert np.array_equal(frames[1].image, images[1]) and np.array_equal(frames[2].image, images[2])


def test_jpeg_exif_orientation_is_applied():
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[:, :20] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    data = _encoded(image, "JPEG", exif=exif, quality=95)

    async def run():
        source = PushSource("cam")
        source.push_encoded(data, ts=1.0)
        source.close()
        return [f async for f in source.frames()][0].image

    shown = asyncio.run(run())
    assert shown.shape == (40, 20, 3)
    assert shown[:20].mean() > 200 > 50 > shown[20:].mean()  # the left half is now on top


@pytest.mark.parametrize("data", [b"", b"not an image", _encoded(np.zeros((8, 8, 3), np.uint8), "BMP"),
                                  _encoded(np.zeros((8, 8, 3), np.uint8), "PNG")[:40]],
                         ids=["empty", "text", "bmp", "truncated-png"])
def test_invalid_pushed_images_are_a_protocol_error(data: bytes):
    source = PushSource("cam")
    with pytest.raises(ProtocolError) as err:
        source.push_encoded(data)
    assert str(err.value).endswith(".")


def test_a_full_queue_drops_and_counts_instead_of_waiting():
    source = PushSource("cam", max_pending=2)
    image = _scene(1)[0]
    assert [source.push(image, ts=float(i)) for i in range(5)] == [True, True, False, False, False]
    assert (source.received, source.dropped) == (5, 3)
    source.close()
    assert not source.push(image)  # closed: dropped too
    assert source.dropped == 4


def test_a_live_source_behind_a_slow_encoder_drops_frames_and_reports_them():
    sink = RecordingSink(encode_delay=0.3)

    async def run():
        source = PushSource("cam", max_pending=4)
        options = IngestOptions(fps=10.0, queue_size=1, batch_segments=1, static_threshold=0)
        task = asyncio.create_task(ingest(source, sink, stream="cam", options=options))
        for i, image in enumerate(_scene(60)):  # 60 frames offered at 20 fps: far more than the sink can take
            source.push(image, ts=1000.0 + i / 10)
            await asyncio.sleep(0.05)
        source.close()
        return await asyncio.wait_for(task, 60), source

    report, source = asyncio.run(run())
    assert source.dropped > 0 and report.dropped_frames == source.dropped
    assert report.frames + report.dropped_frames <= 60
    assert sink.ranges and all(a1 <= b0 for (_, a1), (b0, _) in zip(sink.ranges, sink.ranges[1:]))


def test_a_file_source_slows_down_instead_of_dropping(videos):
    report, sink = run_ingest(open_source(videos["bikes.mp4"]["file"]), RecordingSink(encode_delay=0.05),
                              queue_size=1, batch_segments=1)
    assert report.dropped_frames == 0
    assert report.decoded_frames == videos["bikes.mp4"]["probe"]["decoded_frames"]
    assert report.video_seconds == pytest.approx(10.0, abs=0.05)


def test_stop_flushes_the_segment_in_flight_and_returns(videos):
    sink = RecordingSink()

    async def run():
        source = PushSource("cam")
        stop = asyncio.Event()
        options = IngestOptions(fps=1.0, static_threshold=0)
        task = asyncio.create_task(ingest(source, sink, stream="cam", options=options, stop=stop))
        for i, image in enumerate(_scene(6)):  # 6 frames a second apart: one full segment, two in flight
            source.push(image, ts=50.0 + i)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        stop.set()  # the CLI does this on SIGINT/SIGTERM; the source is still open
        return await asyncio.wait_for(task, 10)

    report = asyncio.run(run())
    assert report.stopped
    assert sink.ranges == [(50.0, 54.0), (54.0, pytest.approx(56.0))]
    assert [len(s) for s in sink.segments] == [4, 2]
    assert report.frames == 6 and report.segments == 2


def test_progress_bar_shows_the_real_time_factor(videos, capsys):
    sink = RecordingSink()
    asyncio.run(ingest(open_source(videos["bikes.mp4"]["file"]), sink, stream="b", progress=True))
    err = capsys.readouterr().err
    assert "x real time" in err and "bikes.mp4" in err


def test_options_are_validated_with_a_clear_message():
    from vidmem.errors import ConfigError

    with pytest.raises(ConfigError, match="fps"):
        IngestOptions(fps=0)
    with pytest.raises(ConfigError, match="max_segment_frames"):
        IngestOptions(max_segment_frames=5)


_SIGNAL_SCRIPT = r"""
import asyncio, json, signal, sys, time
sys.path.insert(0, sys.argv[2])
from stream_support import RecordingSink
from vidmem.stream import IngestOptions, ingest, open_source

stop = None

class Announcing(RecordingSink):
    def encode(self, segments):
        if self.encode_calls == 1:  # the second batch waits for the signal: the loop is mid-file when it comes
            while not stop.is_set():
                time.sleep(0.01)
        return super().encode(segments)

    def commit(self, segment, encoded):
        tokens = super().commit(segment, encoded)
        if len(self.segments) == 1:
            print("committed", flush=True)
        return tokens

async def main():
    global stop
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sink = Announcing()
    options = IngestOptions(batch_segments=1, queue_size=1)
    report = await ingest(open_source(sys.argv[1]), sink, stream="s", options=options, stop=stop)
    print(json.dumps({"report": report.to_json(), "ranges": sink.ranges, "sizes": [len(s) for s in sink.segments],
                      "stopped": report.stopped}), flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_flushes_the_segment_in_flight_and_exits_cleanly(videos, sig):
    import json
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", _SIGNAL_SCRIPT, str(videos["testvideo.mp4"]["file"]), tests],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "committed"
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stopped"] and "Traceback" not in err
    ranges = result["ranges"]
    assert result["report"]["segments"] == len(ranges) >= 1
    assert all(a1 <= b0 for (_, a1), (b0, _) in zip(ranges, ranges[1:]))
    assert ranges[-1][1] < 20.0  # it stopped early (the file is 24 s)...
    assert result["report"]["frames"] == sum(result["sizes"])  # ...and what it had sampled was stored, not lost
