"""Outages: a disk that fills up while tokens are written, and a camera URL that goes away and comes back.

The broker going down and coming back (events queued meanwhile, all delivered) and refused credentials are covered
by tests/test_mqtt_monitor.py (test_events_during_a_broker_outage_are_delivered_after_reconnect,
test_bad_credentials_give_a_clear_error_and_a_running_monitor_rides_them_out); a live HTTP stream that drops once
by tests/test_stream_faults.py. These add the memory's side: what is committed stays, the error is one line.
"""
from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
from camera import HttpCamera
from rel_support import WAIT, check_consistent, cli, cli_env, committed_ids, one_error_line

from vidmem.stream.synth import busy_scene, write_video


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_disk_while_writing_tokens_gives_one_clear_error_and_a_consistent_memory(tmp_path, tiny_models, videos):
    disk = tmp_path / "disk"
    memory = disk / "memory"
    video = str(videos["demo.mp4"]["file"])
    if _mount_tmpfs(disk, "400k"):  # a real filesystem that runs out of space (ENOSPC)
        try:
            result = subprocess.run(cli("ingest", video, "--stream", "cam", "--fps", "4", memory=memory, tiny=tiny_models),
                                    capture_output=True, text=True, env=cli_env(), timeout=WAIT)
            kept = committed_ids(memory)
            report = check_consistent(memory) if (memory / "memory.sqlite").exists() else {"segments": 0}
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=False)
    else:  # unprivileged: the same failure injected with a file-size limit (EFBIG on the write that crosses it)
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

        result = subprocess.run(cli("ingest", video, "--stream", "cam", "--fps", "4", memory=memory, tiny=tiny_models),
                                capture_output=True, text=True, env=cli_env(), timeout=WAIT, preexec_fn=limit)
        kept = committed_ids(memory)
        report = check_consistent(memory)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    line = one_error_line(result.stderr)
    assert "memory" in line.lower() or "token" in line.lower() or "disk" in line.lower() or "space" in line.lower(), line
    assert report["segments"] == len(kept)


# The production backoff (0.5 s doubling to a 30 s cap) scaled down 10x, and the outage with it: 6 s here stand for
# the 60 s of a camera rebooting. Waits and attempts scale together, so the source knocks as often as it would in
# production (about 7 failed attempts) - more than the 5 after which it used to give up.
SCALE = 0.1
OUTAGE_S = 60.0 * SCALE


@pytest.mark.slow
def test_a_camera_that_disappears_for_a_minute_is_reconnected_with_the_gap_recorded(tmp_path, tiny_models):
    from vidmem.agents.app import Settings, Vidmem
    from vidmem.memory import Memory
    from vidmem.stream import Backoff, IngestOptions, open_source

    feed = tmp_path / "feed.ts"
    write_video(feed, busy_scene(120, fps=10), fps=10)  # 12 s of MPEG-TS
    camera = HttpCamera(feed.read_bytes(), seconds=12.0)  # 12 s of video in 12 s, repeated
    camera.up()
    app = Vidmem(Settings(memory=tmp_path / "memory", model=str(tiny_models.llava), embedder=str(tiny_models.clip),
                          device="cpu"))
    seen: list = []  # every state the source reported, as a monitor publishing <prefix>/<stream>/state hears them

    async def scenario():
        stop = asyncio.Event()
        backoff = Backoff(initial=0.5 * SCALE, cap=30.0 * SCALE)  # no max_attempts: it never gives up
        source = open_source(f"http://127.0.0.1:{camera.port}/cam.ts", open_timeout=3, read_timeout=3, backoff=backoff)
        task = asyncio.create_task(app.ingest(source, stream="door", options=IngestOptions(fps=2, static_threshold=0),
                                              stop=stop, on_status=lambda stream, status: seen.append(status)))
        deadline = time.monotonic() + WAIT
        while not committed_ids(app.settings.memory, "door") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        before = committed_ids(app.settings.memory, "door")
        camera.down()  # the camera goes away: its port is closed, reconnections are refused ...
        while source.status.state != "reconnecting" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(OUTAGE_S)
        during = dict(source.status.to_json())
        camera.up()  # ... and it comes back on the same address
        while not source.gaps and time.monotonic() < deadline:  # recorded once the reconnection succeeds
            await asyncio.sleep(0.1)
        after_gap = committed_ids(app.settings.memory, "door")
        while len(committed_ids(app.settings.memory, "door") - after_gap) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        live_again = Memory.open(app.settings.memory, readonly=True)  # what `vidmem stats` shows meanwhile
        try:
            stats = live_again.stats()
        finally:
            live_again.close()
        stop.set()
        return before, during, stats, await task

    try:
        before, during, stats, report = asyncio.run(scenario())
        rows = app.memory.segments(stream="door")
        gaps = app.memory.gaps("door")
    finally:
        app.close()
        camera.down()
    assert before and before <= {r.id for r in rows}  # nothing recorded before the outage was lost
    assert during["state"] == "reconnecting" and during["attempts"] > 5, during  # a long outage, ridden out
    states = [s.state for s in seen]
    assert states[:2] == ["connecting", "live"] and "reconnecting" in states, states
    assert states[states.index("reconnecting"):].count("live") >= 1  # live again, without a restart
    assert states[-1] == "ended"  # stopped by us, not given up
    assert report.gaps, report.to_json()
    gap_start, gap_end = max(report.gaps, key=lambda g: g[1] - g[0])
    assert gap_end - gap_start >= OUTAGE_S  # the outage is recorded, not hidden
    assert any(r.start >= gap_end - 1.0 for r in rows)  # and recording went on after it
    # Every gap is stored in the memory (a stall on two busy cores may add a short one beside the outage).
    assert [g[1:] for g in gaps] == pytest.approx(report.gaps)
    door = next(s for s in stats["streams"] if s["name"] == "door")  # `vidmem stats` shows the state and the gap
    assert door["source"]["state"] == "live" and door["gaps"] == len(gaps) and door["source"]["reconnects"] >= 1, door
    starts = [r.start for r in rows]
    assert starts == sorted(starts)
    check_consistent(app.settings.memory)
