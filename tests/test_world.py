"""The synthetic world's ground truth, checked against the frames decoded from the H.264 files it writes."""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from vidmem.stream import world


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def centroid(frame: np.ndarray, colour: str) -> tuple[float, float] | None:
    """Centre of the pixels within 60 (per channel) of `colour`, or None when there are hardly any."""
    near = np.abs(frame.astype(int) - np.array(world.COLOURS[colour])).max(axis=-1) < 60  # (H, W)
    if near.sum() < 20:
        return None
    ys, xs = np.nonzero(near)
    return float(xs.mean()), float(ys.mean())


def blobs(mask: np.ndarray) -> int:
    """Connected groups of at least 20 pixels in a (H, W) bool mask (4-neighbourhood)."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        count += size >= 20
    return count


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[tuple[world.Footage, list[np.ndarray]]]:
    folder = tmp_path_factory.mktemp("world")
    out = []
    for seed in range(8):
        footage = world.make_clip(seed)
        out.append((footage, decode(world.write(footage, folder / f"{footage.name}.mp4"))))
    return out


def test_decoded_frames_show_the_objects_and_backgrounds_the_ground_truth_names(clips):
    for footage, frames in clips:
        assert len(frames) == footage.seconds == 16
        for second, frame in enumerate(frames):
            shot = footage.shot_at(second)
            _, labels = world.render(shot, second - shot.start)
            inside = labels >= 0
            background = np.array(world.BACKGROUNDS[shot.background])
            # away from edges (chroma is subsampled), the background is its colour
            far = ~np.pad(inside, 3, mode="edge")[:-6, :-6] & ~inside
            far &= ~np.roll(inside, 3, axis=0) & ~np.roll(inside, -3, axis=0) & ~np.roll(inside, 3, axis=1) & ~np.roll(inside, -3, axis=1)
            assert np.abs(frame[far].mean(axis=0) - background).max() < 12, (footage.name, second)
            if shot.thing is None:
                assert not inside.any()
                for colour in world.COLOURS:
                    assert centroid(frame, colour) is None, (footage.name, second, colour)
                continue
            colour = np.array(world.COLOURS[shot.thing.colour])
            core = inside & np.roll(inside, 2, 0) & np.roll(inside, -2, 0) & np.roll(inside, 2, 1) & np.roll(inside, -2, 1)
            assert np.abs(frame[core].mean(axis=0) - colour).max() < 25, (footage.name, second)
            # as many separate objects as the count says
            near = np.abs(frame.astype(int) - colour).max(axis=-1) < 60
            grown = near | np.roll(near, 1, 0) | np.roll(near, -1, 0) | np.roll(near, 1, 1) | np.roll(near, -1, 1)
            assert blobs(grown) == shot.thing.count, (footage.name, second)  # grown: chroma edges leave 1 px gaps


def test_motions_move_the_way_the_questions_say(clips):
    seen = set()
    for footage, frames in clips:
        for shot, thing in footage.things():
            path = [centroid(frames[shot.start + s], thing.colour) for s in range(shot.seconds)]
            xs, ys = [p[0] for p in path], [p[1] for p in path]
            if thing.motion in world.LINEAR:
                axis = xs if thing.motion in ("left", "right") else ys
                sign = 1 if thing.motion in ("right", "down") else -1
                steps = np.diff(axis) * sign
                assert (steps > world.SPEEDS[thing.speed] - 2).all(), (footage.name, thing)
            elif thing.motion in world.REVERSALS:
                first = thing.motion.split("-")[0]
                axis = xs if first in ("left", "right") else ys
                sign = 1 if first in ("right", "down") else -1
                offsets = (np.array(axis) - axis[0]) * sign
                assert offsets[1] > 10 and abs(offsets[2]) < 2 and offsets[3] < -10, (footage.name, thing, offsets)
            else:
                assert np.ptp(xs) < 1.5 and np.ptp(ys) < 1.5
            seen.add(thing.motion.split("-")[0] if thing.motion in world.REVERSALS else thing.motion)
    assert {"still", "left", "right", "up", "down"} & seen  # the seeds cover several motions


def test_a_reversal_and_its_mirror_differ_only_in_frame_order():
    """Why the temporal kind defeats pooling: same first frame, same frames, another order."""
    thing = world.Thing("circle", "red", "large", x=48, y=48, motion="right-left")
    mirror = world.Thing("circle", "red", "large", x=48, y=48, motion="left-right")
    a = [world.render(world.Shot(0, 4, "black", thing), s)[0] for s in range(4)]
    b = [world.render(world.Shot(0, 4, "black", mirror), s)[0] for s in range(4)]
    assert np.array_equal(a[0], b[0])
    assert np.array_equal(np.mean(a, axis=0), np.mean(b, axis=0))
    assert not np.array_equal(a[1], b[1])


def test_questions_cover_every_kind_and_answers_follow_from_the_footage():
    kinds = set()
    for seed in range(30):
        footage = world.make_clip(seed)
        for q in world.questions(footage, "v.mp4"):
            kinds.add(q.kind)
            if q.kind == "when":
                shot = footage.shot_at(int(q.answer))
                assert shot.thing is not None and shot.thing.name in q.question
            if q.kind == "count":
                shot = footage.shot_at(int(q.start))
                assert int(q.answer) == shot.thing.count
            if q.kind == "absent" and q.answer == "no":
                assert all(t.name not in q.question for _, t in footage.things())
            if q.kind == "order":
                names = [t.name for _, t in footage.things()]
                first, second = q.question.split("the ")[1].split(" or")[0], q.question.split("the ")[2].rstrip("?")
                earlier = first if names.index(first) < names.index(second) else second
                assert earlier.split()[0] == q.answer
    assert kinds == {"what", "when", "order", "motion", "temporal", "count", "absent"}


def test_the_same_seed_gives_the_same_footage_and_questions(tmp_path):
    a, b = world.build_set(tmp_path / "a", [3, 4]), world.build_set(tmp_path / "b", [3, 4])
    assert (tmp_path / "a" / "questions.json").read_text() == (tmp_path / "b" / "questions.json").read_text()
    for footage in a.footage:
        assert [f.tobytes() for f in decode(a.path(footage))] == [f.tobytes() for f in decode(b.path(footage))]
    assert world.make_clip(5) != world.make_clip(6)
    rows = json.loads((tmp_path / "a" / "questions.json").read_text())
    assert rows and set(rows[0]) >= {"video", "question", "answer", "kind"}


def test_an_hour_holds_one_needle_at_its_stated_time(tmp_path):
    hour = world.make_hour(7)
    assert hour.seconds == 3600
    needles = [s for s in hour.shots if s.thing is not None and s.thing.name == hour.target]
    assert len(needles) == 1
    colour = needles[0].thing.colour
    assert all(s.thing.colour != colour for s in hour.shots if s.thing is not None and s is not needles[0])
    path = world.write(hour, tmp_path / "hour.mp4")
    assert path.stat().st_size < 2_000_000  # static stretches cost next to nothing
    frames = decode(path)
    assert len(frames) == 3600
    seen = [t for t in range(0, 3600) if centroid(frames[t], colour) is not None]
    assert seen == list(range(needles[0].start, needles[0].end))
    (q,) = world.questions(hour, "hour.mp4")
    assert q.kind == "needle" and q.answer == needles[0].thing.shape


def test_event_streams_show_the_target_only_when_asked_to():
    for seed in range(5):
        with_event = world.make_event_stream(seed, target=("red", "circle"), with_event=True)
        quiet = world.make_event_stream(seed, target=("red", "circle"), with_event=False)
        assert [s.thing.name for s in with_event.shots if s.thing is not None].count("red circle") == 1
        assert all(s.thing.colour != "red" for s in quiet.shots if s.thing is not None)
        assert with_event.seconds == quiet.seconds == 60


@pytest.mark.parametrize("kind,said,truth,ok", [
    ("what", "It is a circle.", "circle", True),
    ("what", "a square", "circle", False),
    ("when", "It appears at 00:00:09.", "8", True),
    ("when", "[00:00:13-00:00:16]", "8", False),
    ("when", "after 12 seconds", "12", True),
    ("when", "circle", "8", False),
    ("count", "three", "3", True),
    ("count", "2", "3", False),
    ("absent", "No, there is none.", "no", True),
    ("absent", "yes", "no", False),
    ("absent", "yes no", "yes", False),
])
def test_grading_reads_free_text(kind, said, truth, ok):
    assert world.grade(kind, said, truth) is ok


def test_vidmem_cuts_a_clip_into_one_segment_per_shot(tmp_path):
    """The layouts line up with vidmem's segmenting, so a question's shot is a stored segment."""
    from bench.world_models import segment_video

    footage = world.make_clip(11)
    segments = segment_video(world.write(footage, tmp_path / "c.mp4"))
    assert segments.spans == [(float(s.start), float(s.end)) for s in footage.shots]
