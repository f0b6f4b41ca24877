"""Pure stream logic: sampling evenly in time, shot cuts with NMS, top-k informative frames, segmenting, static check."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vidmem.stream.sampling import TimeSampler, sample_indices
from vidmem.stream.segmenter import Segmenter, StaticCheck
from vidmem.stream.shots import ShotDetector, ShotOptions, informative_frames, scores_to_cuts
from vidmem.stream.types import Frame, Segment


def test_sampling_is_even_in_time_not_by_frame_index():
    # 30 fps for 2 s, then 5 fps for 2 s: one sample per second either way.
    ts = [i / 30 for i in range(60)] + [2 + i / 5 for i in range(10)]
    picked = [ts[i] for i in sample_indices(ts, fps=1.0)]
    assert picked == pytest.approx([0.0, 1.0, 2.0, 3.0], abs=1e-9)


def test_sampling_at_ntsc_rate_takes_the_first_frame_at_or_after_each_second():
    ts = [i * 1001 / 30000 for i in range(300)]  # 29.97 fps for 10 s
    picked = [ts[i] for i in sample_indices(ts, fps=1.0)]
    assert len(picked) == 10
    assert all(abs(p - k) < 1 / 29.97 for k, p in enumerate(picked))


def test_sampling_at_higher_rate_than_the_video_keeps_every_frame_once():
    ts = [i / 2 for i in range(10)]  # 2 fps video sampled at 5 fps
    assert sample_indices(ts, fps=5.0) == list(range(10))


def test_a_cut_forces_a_sample_and_reanchors_the_grid():
    s = TimeSampler(1.0)
    assert s.offer(0.0)
    assert not s.offer(0.5)
    assert s.offer(0.6, cut=True)
    assert not s.offer(1.0)  # the grid now runs from 0.6
    assert s.offer(1.6)


def test_a_jump_in_time_takes_one_frame_not_a_burst():
    s = TimeSampler(1.0)
    assert s.offer(0.0)
    assert s.offer(100.0)
    assert not s.offer(100.5)
    assert s.offer(101.0)


@given(st.lists(st.floats(min_value=0.001, max_value=0.45), min_size=1, max_size=300), st.sampled_from([0.5, 1.0, 2.0]))
@settings(max_examples=50, deadline=None)
def test_each_period_of_video_gives_exactly_one_sample(steps, fps):
    ts = np.cumsum(steps).tolist()
    picked = [ts[i] for i in sample_indices(ts, fps)]
    assert picked[0] == ts[0]
    cell = lambda t: math.floor((t - ts[0]) * fps + 1e-3 * fps)  # noqa: E731 - which period of the grid t lies in
    if max(steps) < 1 / fps:  # no frame skips a whole period: every period with a frame is sampled once
        assert [cell(t) for t in picked] == sorted({cell(t) for t in ts})
    assert all(cell(b) > cell(a) for a, b in zip(picked, picked[1:]))


def _detect(scores: list[float], fps: float = 25.0, **opts) -> list[int]:
    return scores_to_cuts([i / fps for i in range(len(scores))], scores, ShotOptions(**opts))


def test_a_single_spike_is_a_cut_and_gradual_change_is_not():
    calm = [2.0] * 50
    spike = calm.copy()
    spike[20] = 60.0
    assert _detect(spike) == [20]
    fade = [4.0] * 50  # a fade: every frame changes a little
    assert _detect(fade) == []


def test_nms_keeps_only_the_peak_of_adjacent_high_scores():
    scores = [1.0] * 40
    scores[10], scores[11] = 40.0, 55.0  # a cut smeared over two frames (interlacing, a dissolve's edge)
    assert _detect(scores) == [11]


def test_no_second_cut_within_the_minimum_shot_length():
    scores = [1.0] * 60
    scores[10] = 60.0
    scores[15] = 60.0  # 0.2 s later at 25 fps
    scores[40] = 60.0
    assert _detect(scores, min_shot_seconds=0.5) == [10, 40]


def test_fast_motion_raises_the_bar():
    # High scores everywhere (camera shake): a frame only 1.5x its neighbours is not a cut.
    scores = [30.0] * 40
    scores[20] = 45.0
    assert _detect(scores) == []


def test_streaming_detector_returns_every_frame_once_in_order():
    det: ShotDetector[int] = ShotDetector()
    rng = np.random.default_rng(0)
    out = []
    for i in range(30):
        image = np.full((36, 64, 3), 40 if i < 12 else 200, dtype=np.uint8)
        image += rng.integers(0, 3, size=image.shape, dtype=np.uint8)
        out += det.push(i, i / 10, image)
        assert len(out) >= i + 1 - det.options.window  # bounded lookahead
    out += det.flush()
    assert [d.item for d in out] == list(range(30))
    assert [d.item for d in out if d.cut] == [12]
    assert det.cuts == [pytest.approx(1.2)]


def test_top_k_informative_frames_are_peaks_sorted_in_time():
    scores = [0.0] * 100
    for i, s in [(10, 50.0), (11, 45.0), (40, 30.0), (70, 80.0), (90, 5.0)]:
        scores[i] = s
    assert informative_frames(scores, 3) == [0, 10, 70]  # frame 0 always, then the two highest peaks (11 suppressed)
    assert informative_frames(scores, 4, first=False) == [10, 40, 70, 90]
    assert len(informative_frames(scores, 20)) == 20  # budget larger than the peaks: filled, no duplicates
    assert informative_frames([], 5) == []


def _frame(ts: float, value: int = 0) -> Frame:
    return Frame(ts=ts, image=np.full((36, 64, 3), value, dtype=np.uint8))


def _segments(times_and_cuts: list[tuple[float, bool]], *, end: float, max_frames: int = 4) -> list[Segment]:
    seg = Segmenter("s", max_frames=max_frames, period=1.0)
    out: list[Segment] = []
    for ts, cut in times_and_cuts:
        out += seg.add(_frame(ts), cut=cut)
    return out + seg.finish(end=end)


def test_segments_hold_up_to_four_frames_and_never_span_a_cut():
    frames = [(float(t), False) for t in range(10)]
    frames[6] = (6.0, True)
    segs = _segments(frames, end=10.0)
    assert [[f.ts for f in s.frames] for s in segs] == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert [s.cut for s in segs] == [False, False, True]
    assert [(s.start, s.end) for s in segs] == [(0, 4), (4, 6), (6, 10)]
    assert [s.index for s in segs] == [0, 1, 2]


@given(st.lists(st.tuples(st.floats(min_value=0.01, max_value=3.0), st.booleans()), min_size=1, max_size=60),
       st.integers(min_value=1, max_value=4))
@settings(max_examples=60, deadline=None)
def test_segment_ranges_are_ordered_non_overlapping_and_inside_the_video(steps, max_frames):
    ts = np.cumsum([s for s, _ in steps]).tolist()
    end = ts[-1] + 0.04
    segs = _segments([(t, c) for t, (_, c) in zip(ts, steps)], end=end, max_frames=max_frames)
    assert sum(len(s) for s in segs) == len(ts)
    assert all(1 <= len(s) <= max_frames for s in segs)
    for a, b in zip(segs, segs[1:]):
        assert a.start < a.end == b.start
    assert segs[0].start == ts[0] and segs[-1].end <= end + 1e-9
    assert all(s.frames[0].ts == s.start and all(f.ts < s.end for f in s.frames) for s in segs)
    cuts = {t for t, (_, c) in zip(ts, steps) if c}
    assert all(f.ts == s.start for s in segs for f in s.frames if f.ts in cuts)  # a cut always opens a segment


def test_a_gap_closes_the_segment_and_marks_the_next():
    seg = Segmenter("s", period=1.0)
    out = seg.add(_frame(0.0)) + seg.add(_frame(1.0))
    out += seg.gap(1.5, 9.0)
    out += seg.add(_frame(9.0)) + seg.finish()
    assert [(s.start, s.end) for s in out] == [(0.0, 1.5), (9.0, 10.0)]
    assert out[1].extra["gap_before"] == (1.5, 9.0)


def test_static_check_reuses_repeats_but_not_across_cuts_or_drift():
    check = StaticCheck(threshold=3.0)
    grey = Segment("s", [_frame(0, 100), _frame(1, 101)], end=2)
    same = Segment("s", [_frame(2, 101), _frame(3, 100)], end=4)
    drifted = Segment("s", [_frame(4, 105)], end=5)
    cut = Segment("s", [_frame(5, 105)], end=6, cut=True)
    assert not check.repeats(grey)
    assert check.repeats(same)
    assert not check.repeats(drifted)  # compared with the stored one (100), not the last reused one
    assert not check.repeats(cut)  # a cut is always stored


def test_static_check_ignores_sensor_noise_but_not_a_moving_object():
    rng = np.random.default_rng(1)
    scene = rng.integers(0, 255, size=(180, 320, 3)).astype(np.float64)
    noisy = [np.clip(scene + rng.normal(0, 3, scene.shape), 0, 255).astype(np.uint8) for _ in range(3)]
    moved = noisy[2].copy()
    moved[40:140, 100:220] = 255  # someone walks in
    check = StaticCheck()
    assert not check.repeats(Segment("s", [Frame(0, noisy[0])], end=1))
    assert check.repeats(Segment("s", [Frame(1, noisy[1])], end=2))
    assert not check.repeats(Segment("s", [Frame(2, moved)], end=3))
    assert math.isfinite(check.threshold)


def test_static_check_stores_a_fresh_segment_after_max_seconds():
    check = StaticCheck(threshold=3.0, max_seconds=10.0)
    kinds = [check.repeats(Segment("s", [_frame(t, 100)], end=t + 4)) for t in range(0, 40, 4)]
    # Stored at 0; reused while the stored one would cover <= 10 s; stored afresh at 8, 16, ...
    assert kinds == [False, True, False, True, False, True, False, True, False, True]


def test_content_score_is_pyscenedetects_content_val():
    import cv2
    from scenedetect import ContentDetector, FrameTimecode, StatsManager

    from vidmem.stream.shots import content_score, thumbnail

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (72, 128, 3), dtype=np.uint8) for _ in range(3)]  # narrower than the thumbnail
    detector, stats = ContentDetector(), StatsManager()
    detector.stats_manager = stats
    theirs = []
    for i, image in enumerate(images):
        timecode = FrameTimecode(i, fps=25.0)
        detector.process_frame(timecode, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        theirs.append(stats.get_metrics(timecode, ["content_val"])[0])
    ours = [content_score(thumbnail(a), thumbnail(b)) for a, b in zip(images, images[1:])]
    assert ours == pytest.approx(theirs[1:], rel=1e-9)


def test_static_check_sees_a_small_new_object_that_the_whole_picture_average_hides():
    # A 720p camera, sensor noise, and then a small object (2% of the picture) appears in a corner.
    rng = np.random.default_rng(3)
    scene = cv2.GaussianBlur(rng.integers(40, 200, size=(720, 1280, 3)).astype(np.uint8), (0, 0), 8).astype(np.float64)
    shots = [np.clip(scene + rng.normal(0, 3, scene.shape), 0, 255).astype(np.uint8) for _ in range(3)]
    small = shots[2].copy()
    small[560:690, 1000:1140] = 250  # 130 x 140 px: 2.0% of 1280 x 720
    whole_picture = StaticCheck(block_threshold=float("inf"))  # the old check: the whole picture's mean only
    assert not whole_picture.repeats(Segment("s", [Frame(0, shots[0])], end=1))
    assert whole_picture.repeats(Segment("s", [Frame(2, small)], end=3))  # hidden: this is what went wrong
    check = StaticCheck()
    assert not check.repeats(Segment("s", [Frame(0, shots[0])], end=1))
    assert check.repeats(Segment("s", [Frame(1, shots[1])], end=2))  # noise alone is still a repeat
    assert not check.repeats(Segment("s", [Frame(2, small)], end=3))  # the small object is a change
