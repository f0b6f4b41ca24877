"""Ingesting real and synthesized video files: cuts, time ranges, timestamps, rotation, the static check."""
from __future__ import annotations

import asyncio
import functools
import sys
from pathlib import Path

import numpy as np
import pytest
from stream_support import RecordingSink, run_ingest

from vidmem.stream import FileSource, open_source
from vidmem.stream.synth import busy_scene, static_scene, write_video


def _f1(found: list[int], expected: list[int], tolerance: int = 1) -> float:
    if not found and not expected:
        return 1.0
    matched = sum(any(abs(f - e) <= tolerance for f in found) for e in expected)
    precision = matched / len(found) if found else 0.0
    recall = matched / len(expected) if expected else 0.0
    return 0.0 if matched == 0 else 2 * precision * recall / (precision + recall)


def _frame_index(seconds: float, fps: float) -> int:
    return round(seconds * fps)


@functools.lru_cache(maxsize=None)
def _ingested(path: Path):
    """One default ingest per real video, shared by the tests that only read its result."""
    return run_ingest(open_source(path))


@pytest.mark.parametrize(("name", "expected"), [
    ("bikes.mp4", [30, 76, 137, 187, 242]),
    ("testvideo.mp4", [30, 180, 394]),  # ContentDetector's ground truth: hard cuts, not the fades
    ("fades.mp4", []),  # fades are not cuts
])
def test_cuts_match_ground_truth_within_one_frame(videos, name, expected):
    entry = videos[name]
    truth = entry.get("expected_cuts", entry.get("expected_cuts_by_detector", {}).get("ContentDetector"))
    assert truth == expected
    report, sink = _ingested(entry["file"])
    fps = entry["probe"]["avg_fps"]
    found = [_frame_index(c, fps) for c in report.cuts]
    assert _f1(found, expected) >= 0.9, (found, expected)
    # Every cut opens a segment, and its keyframe is the cut frame itself.
    starts = {round(s.start, 3) for s in sink.segments if s.cut}
    assert starts == {round(c, 3) for c in report.cuts}


@pytest.mark.parametrize("name", ["bikes.mp4", "testvideo.mp4", "bigbuckbunny.mp4", "test.mp4"])
def test_segment_ranges_are_ordered_and_inside_the_video(videos, name):
    entry = videos[name]
    report, sink = _ingested(entry["file"])
    duration = entry["probe"]["container_duration_s"]
    ranges = sink.ranges
    assert ranges and ranges[0][0] == 0.0
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        assert a0 < a1 <= b0 < b1
    assert all(0.0 <= s0 < s1 <= duration + 1e-6 for s0, s1 in ranges)
    assert all(1 <= len(s) <= 4 for s in sink.segments)
    assert report.segments == len(sink.segments) == sink.encoded
    assert report.frames == sum(len(s) for s in sink.segments) + _reused_frames(report, sink)
    assert report.video_seconds == pytest.approx(sum(b - a for a, b in ranges), abs=1e-6)
    assert report.video_seconds == pytest.approx(duration, abs=0.05)  # the whole file is covered, once
    assert report.visual_tokens == sum(196 if len(s) == 1 else 245 for s in sink.segments)
    json = report.to_json()
    assert set(json) >= {"stream", "segments", "frames", "visual_tokens", "video_seconds", "wall_seconds",
                         "dropped_frames", "cuts"}


def _reused_frames(report, sink) -> int:
    return report.frames - sum(len(s) for s in sink.segments) if report.reused_segments else 0


def test_one_sample_per_second_evenly_in_time(videos):
    report, sink = run_ingest(open_source(videos["test.mp4"]["file"]), static_threshold=0)
    times = [f.ts for s in sink.segments for f in s.frames]
    assert times == pytest.approx([float(i) for i in range(10)], abs=0.04)
    assert report.frames == 10 and report.segments == 3  # 4 + 4 + 2 frames, no cuts in this clip
    report2, sink2 = run_ingest(open_source(videos["test.mp4"]["file"]), fps=2.0, static_threshold=0)
    assert report2.frames == 20


def test_decoded_frames_are_rgb_with_the_players_timestamps(videos):
    entry = videos["bigbuckbunny.mp4"]  # has an audio track, which is ignored

    async def read():
        source = open_source(entry["file"], max_side=None)
        frames = [f async for f in source.frames()]
        await source.aclose()
        return source, frames

    source, frames = asyncio.run(read())
    assert len(frames) == entry["asserted"]["frames"]
    assert frames[0].image.shape == (720, 1280, 3) and frames[0].image.dtype == np.uint8
    mean = np.mean([f.image.mean() for f in frames])
    assert mean == pytest.approx(entry["asserted"]["mean_rgb_value"], rel=entry["asserted"]["tolerance_rel"])
    assert frames[0].ts == entry["probe"]["first_pts_s"]
    assert frames[-1].ts == pytest.approx(entry["probe"]["last_pts_s"], abs=1e-6)
    assert source.duration == pytest.approx(entry["probe"]["container_duration_s"], abs=0.1)
    assert all(b.ts > a.ts for a, b in zip(frames, frames[1:]))


def test_large_frames_are_shrunk_while_decoding(videos):
    async def first():
        source = open_source(videos["testvideo.mp4"]["file"])
        async for frame in source.frames():
            await source.aclose()
            return frame

    assert first_shape(asyncio.run(first())) == (540, 960, 3)


def first_shape(frame) -> tuple[int, ...]:
    return frame.image.shape


def test_variable_frame_rate_keeps_the_files_timestamps(tmp_path: Path):
    # 10 fps for 2 s, a 3 s freeze (one frame held), then 30 fps for 2 s.
    stamps = [i / 10 for i in range(20)] + [5.0 + i / 30 for i in range(60)]
    path = tmp_path / "vfr.mp4"
    write_video(path, busy_scene(len(stamps), fps=10), timestamps=stamps)

    async def read():
        source = open_source(path)
        frames = [f.ts async for f in source.frames()]
        await source.aclose()
        return frames

    assert asyncio.run(read()) == pytest.approx(stamps, abs=1e-4)
    report, sink = run_ingest(open_source(path), static_threshold=0)
    sampled = [f.ts for s in sink.segments for f in s.frames]
    assert sampled == pytest.approx([0.0, 1.0, 5.0, 6.0], abs=1e-4)  # nothing invented during the freeze
    assert sink.ranges[-1][1] <= stamps[-1] + 1 / 30 + 1e-6


@pytest.mark.parametrize(("rotation", "corner"), [(90, "bottom-left"), (-90, "top-right"), (180, "bottom-right")])
def test_rotation_metadata_is_applied(tmp_path: Path, rotation: int, corner: str):
    image = np.zeros((64, 128, 3), dtype=np.uint8)
    image[:32, :64] = (255, 0, 0)  # red in the top-left quadrant of the stored picture
    path = tmp_path / "rotated.mp4"
    write_video(path, [image] * 3, fps=5, rotation=rotation)

    async def first():
        source = open_source(path)
        async for frame in source.frames():
            await source.aclose()
            return frame.image

    shown = asyncio.run(first())
    assert shown.shape == ((64, 128, 3) if rotation == 180 else (128, 64, 3))
    h, w = shown.shape[0] // 2, shown.shape[1] // 2
    quadrants = {"top-left": shown[:h, :w], "top-right": shown[:h, w:], "bottom-left": shown[h:, :w],
                 "bottom-right": shown[h:, w:]}
    reddest = max(quadrants, key=lambda q: quadrants[q][..., 0].mean())
    assert reddest == corner


def test_delayed_video_start_keeps_its_offset(tmp_path: Path):
    # The video begins 1.5 s after the file starts (audio first): a player shows its first frame at 1.5 s.
    path = tmp_path / "late.mp4"
    stamps = [1.5 + i / 10 for i in range(30)]
    write_video(path, busy_scene(30, fps=10), timestamps=stamps, audio_seconds=5.0)
    report, sink = run_ingest(open_source(path), static_threshold=0)
    assert sink.ranges[0][0] == pytest.approx(1.5, abs=1e-3)
    assert all(s0 >= 1.5 - 1e-3 for s0, _ in sink.ranges)


@pytest.mark.slow
def test_a_static_scene_costs_ten_times_fewer_encoder_calls_than_a_busy_one(tmp_path: Path):
    minutes, fps, size = 3, 5, {"width": 128, "height": 72}
    n = minutes * 60 * fps
    static, busy = tmp_path / "static.mp4", tmp_path / "busy.mp4"
    write_video(static, static_scene(n, **size), fps=fps)
    write_video(busy, busy_scene(n, fps=fps, shot_seconds=20, **size), fps=fps)
    r_static, s_static = run_ingest(open_source(static))
    r_busy, s_busy = run_ingest(open_source(busy))
    assert s_static.encoded * 10 <= s_busy.encoded, (s_static.encoded, s_busy.encoded)
    # Nothing is lost: the reused segments' time is still covered by the stored one.
    assert r_static.video_seconds == pytest.approx(r_busy.video_seconds, abs=0.5)
    assert s_static.ranges[-1][1] == pytest.approx(minutes * 60, abs=0.5)
    assert r_static.reused_segments >= 40
    assert r_busy.segments >= 45


def test_encoding_runs_off_the_event_loop_in_batches(videos):
    report, sink = run_ingest(open_source(videos["test.mp4"]["file"]), batch_segments=2, static_threshold=0)
    assert "MainThread" not in sink.threads
    assert sink.encode_calls >= 2 and sink.encoded == report.segments


def test_two_sources_into_one_sink_at_once(videos):
    sink_a, sink_b = RecordingSink(), RecordingSink()

    async def both():
        from vidmem.stream import ingest

        return await asyncio.gather(ingest(open_source(videos["bikes.mp4"]["file"]), sink_a, stream="a"),
                                    ingest(open_source(videos["test.mp4"]["file"]), sink_b, stream="b"))

    ra, rb = asyncio.run(both())
    assert ra.stream == "a" and rb.stream == "b"
    assert {s.stream for s in sink_a.segments} == {"a"} and {s.stream for s in sink_b.segments} == {"b"}
    assert ra.video_seconds == pytest.approx(10.0, abs=0.05) and rb.video_seconds == pytest.approx(10.0, abs=0.05)


def test_file_source_is_checked_on_open(tmp_path: Path):
    path = tmp_path / "ok.mp4"
    write_video(path, busy_scene(10), fps=10)
    source = FileSource(path)
    assert not source.live and source.duration == pytest.approx(1.0, abs=0.01)
    asyncio.run(source.aclose())
    asyncio.run(source.aclose())  # twice is fine


@pytest.mark.parametrize(("codec", "pix_fmt", "suffix", "size"), [
    ("libx264", "yuv444p", ".mp4", (61, 97)),  # odd width and height
    ("mjpeg", "yuvj422p", ".avi", (64, 96)),
    ("ffv1", "gray", ".mkv", (64, 96)),
])
def test_odd_pixel_formats_and_sizes_decode_to_rgb(tmp_path: Path, codec, pix_fmt, suffix, size):
    h, w = size
    frames = [np.full((h, w, 3), v, dtype=np.uint8) for v in (30, 128, 220)]
    path = tmp_path / f"odd{suffix}"
    write_video(path, frames, fps=2, codec=codec, pix_fmt=pix_fmt)

    async def read():
        source = open_source(path)
        out = [f async for f in source.frames()]
        await source.aclose()
        return out

    out = asyncio.run(read())
    assert [f.image.shape for f in out] == [(h, w, 3)] * 3
    assert [f.ts for f in out] == pytest.approx([0.0, 0.5, 1.0])
    assert [round(float(f.image.mean()) / 10) for f in out] == [3, 13, 22]


def test_timestamps_that_go_back_keep_increasing(tmp_path: Path):
    # Two MPEG-TS recordings joined byte for byte (`cat a.ts b.ts`): the clock restarts half way.
    parts = []
    for seed in (1, 2):
        part = tmp_path / f"part{seed}.ts"
        write_video(part, busy_scene(30, fps=10, seed=seed), fps=10)
        parts.append(part.read_bytes())
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(parts))
    report, sink = run_ingest(open_source(joined), static_threshold=0)
    times = [f.ts for s in sink.segments for f in s.frames]
    assert all(b > a for a, b in zip(times, times[1:]))
    assert report.decoded_frames == 60
    assert report.video_seconds == pytest.approx(6.0, abs=0.15)


def test_frame_budget_picks_the_most_informative_frames(videos):
    entry = videos["bikes.mp4"]
    report, sink = run_ingest(open_source(entry["file"]), frame_budget=8, static_threshold=0)
    times = [f.ts for s in sink.segments for f in s.frames]
    assert len(times) == 8 and times == sorted(times) and times[0] == 0.0
    cut_times = [i / entry["probe"]["avg_fps"] for i in entry["expected_cuts"]]
    for cut in cut_times:  # every shot's first frame is among them (AVS eq. 5 on NMS'd boundary scores)
        assert any(abs(t - cut) <= 1 / 25 + 1e-6 for t in times)
    assert all(s.cut for s in sink.segments[1:])  # each shot starts a segment
    assert report.video_seconds == pytest.approx(10.0, abs=0.05)
    assert report.decoded_frames == entry["probe"]["decoded_frames"]


def test_frame_budget_needs_a_file():
    from vidmem.errors import ConfigError
    from vidmem.stream import PushSource

    with pytest.raises(ConfigError, match="frame_budget"):
        run_ingest(PushSource("cam"), frame_budget=4)


@pytest.mark.skipif(sys.platform != "linux", reason="V4L2 device paths are Linux's")
def test_a_missing_camera_is_a_source_error():
    from vidmem.errors import SourceError

    with pytest.raises(SourceError, match="Camera not found"):
        open_source("/dev/video97")
    with pytest.raises(SourceError, match="Camera not found"):
        open_source("camera:97")
