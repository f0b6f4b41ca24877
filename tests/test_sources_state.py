"""Sources report what they are doing, and a live source's backoff is capped, jittered and endless."""
from __future__ import annotations

import asyncio
import random
import threading

import pytest
from camera import HttpCamera
from services import free_port
from stream_support import RecordingSink, run_ingest

from vidmem.errors import SourceError
from vidmem.stream import Backoff, IngestOptions, ingest, open_source
from vidmem.stream.synth import busy_scene, write_video


def test_backoff_doubles_up_to_its_cap_with_jitter_below_each_step():
    policy = Backoff(initial=0.5, cap=30.0, jitter=0.5)
    rng = random.Random(7)
    for attempt in range(200):  # forever: the waits stop growing at the cap and never overflow
        ceiling = min(30.0, 0.5 * 2**attempt)
        delay = policy.delay(attempt, rng)
        assert 0.5 * ceiling <= delay <= ceiling
    waits = {round(policy.delay(10, rng), 6) for _ in range(20)}
    assert len(waits) > 10  # cameras that fail together do not knock again in step
    assert Backoff(jitter=0.0).delay(3) == 4.0
    with pytest.raises(ValueError):
        Backoff(initial=2.0, cap=1.0)


def test_a_file_source_is_live_while_read_and_ends_normally(videos):
    source = open_source(videos["counter.mp4"]["file"])
    seen = []
    source.on_status.append(seen.append)
    report, sink = run_ingest(source)
    assert sink.segments
    assert [s.state for s in seen] == ["live", "ended"]
    assert source.status.state == "ended" and source.status.error is None and source.status.gaps == 0


def test_a_camera_that_is_down_at_start_is_waited_for_when_the_backoff_says_so(tmp_path):
    feed = tmp_path / "live.ts"
    write_video(feed, busy_scene(60, fps=10), fps=10)
    camera = HttpCamera(feed.read_bytes(), loop=False, port=free_port())
    booting = threading.Timer(1.0, camera.up)  # the camera answers only after the source has knocked a few times
    booting.start()
    sink = RecordingSink()
    source = open_source(camera.url, open_timeout=2, read_timeout=2,
                         backoff=Backoff(initial=0.05, cap=0.2, retry_first=True))
    seen = []
    source.on_status.append(seen.append)

    async def run():
        stop = asyncio.Event()
        task = asyncio.create_task(ingest(source, sink, stream="cam", options=IngestOptions(static_threshold=0),
                                          stop=stop))
        while not sink.segments and not task.done():
            await asyncio.sleep(0.05)
        stop.set()
        return await asyncio.wait_for(task, 30)

    try:
        asyncio.run(run())
    finally:
        booting.cancel()
        camera.down()
    states = [s.state for s in seen]
    assert states[0] == "reconnecting" and "live" in states, states
    assert max(s.attempts for s in seen) >= 3  # it knocked while the camera booted, then recorded
    assert sink.segments


def test_without_retry_first_an_unreachable_camera_is_an_error_at_once():
    source = open_source(f"http://127.0.0.1:{free_port()}/cam.ts", open_timeout=2, read_timeout=2)
    with pytest.raises(SourceError):
        run_ingest(source)
    assert source.status.state == "ended" and "Connection refused" in (source.status.error or "")
