"""A synthetic world with ground truth by construction: footage written as real H.264 files, and questions about it.

Nothing here is used when ingesting real video; `bench/quality.py` and the tests use it to measure answers.

Visual grammar (docs/world.md shows examples):
- A frame is `SIZE` x `SIZE` pixels (96) of one flat **background** colour (`BACKGROUNDS`: black, gray, white),
  with at most one kind of object on it.
- An **object** is a filled **shape** (`SHAPES`: circle, square, triangle) in a **colour** (`COLOURS`: red, green,
  blue, yellow) and a **size** (`SIZES`: small, 12 px across; large, 24 px across), centred on a **position**.
- Footage runs at 1 frame per second (vidmem samples 1 fps by default, so every written frame is a sampled frame);
  all times are whole seconds.
- Footage is a list of **shots**. A shot has a start, a length, a background and zero or more identical objects
  (its **count**: 0 is an empty, static stretch; 2 or 3 objects stand in a row). Every shot boundary is a **scene
  cut**: the background or the objects change at once. Objects **appear** at their shot's start and **disappear**
  at its end, so the times of events are known exactly.
- A shot's objects follow one **motion** over its frames (offsets per second from the start position, `offset`):
  `still`; `left`, `right`, `up`, `down` at a **speed** of `SPEEDS` px/s (slow 5, fast 9); and the **reversals**
  `right-left`, `left-right`, `up-down`, `down-up`, which go one step (`REVERSAL_STEP` px) one way, back, then one
  step the other way: offsets 0, +s, 0, -s. A reversal and its mirror show the same first frame and the same set of
  frames in another order, so the keyframe plus the mean over time (pooling) cannot tell them apart; only the
  order of frames inside the segment can.
- **Clips** (`make_clip`): 4 shots of 4 s (16 s, one vidmem segment per shot), objects of 4 distinct colours, one
  shot empty at times, random shapes, sizes, backgrounds, positions and motions, counts of 1-3.
- **Hours** (`make_hour`): an hour of static stretches (60 s shots of one still distractor object, never the
  needle's colour) with one 4 s **needle** shot (an object of a colour seen nowhere else in the hour) at a random
  time; 3,600 frames at 96 px compress to a few hundred kB.
- **Event streams** (`make_event_stream`): a minute of distractor shots, with or without one 8 s shot of a target
  object, for watch rules.

Questions (`questions`; `answer` is the word or number a correct free-text answer contains, `grade` checks one):
- `what`: "What shape is the red object?" -> "circle"; "What colour is the triangle?" (shape unique) -> "blue".
- `when`: "When does the red circle appear?" -> the shot's start in seconds; a correct answer cites a time
  (HH:MM:SS, MM:SS or seconds) within one segment (4 s) of it.
- `order`: "Which comes first, the red circle or the blue square?" -> the colour of the earlier one.
- `motion`: "Which way does the red circle move?" (linear motions) -> left, right, up or down.
- `temporal`: "Which way does the red circle move first?" (reversals) -> the first direction. Decided only by the
  order of frames inside one segment.
- `count`: "How many red circles are there?" -> "1".."3".
- `absent`: "Is there a red square?" -> "no" for a colour and shape that never appear together; as many controls
  that do appear -> "yes" (so answering "no" to everything scores 50%).
- `needle`: over an hour, "What shape is the red object?" -> the needle's shape.

Everything is seeded: the same seed gives the same footage, the same bytes of questions and the same frames.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from vidmem.stream.synth import write_video

SIZE = 96  # frame width and height, pixels
FPS = 1  # frames per second of footage
SEGMENT_SECONDS = 4  # vidmem's segments: up to 4 sampled frames at 1 fps

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (15, 15, 15), "gray": (120, 120, 120), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 12, "large": 24}  # pixels across
SPEEDS: dict[str, int] = {"slow": 5, "fast": 9}  # pixels per second
LINEAR = ("left", "right", "up", "down")
REVERSALS = ("right-left", "left-right", "up-down", "down-up")
MOTIONS = ("still",) + LINEAR + REVERSALS
REVERSAL_STEP = 14  # pixels: a reversal goes 0, +step, 0, -step
_UNIT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
KINDS = ("what", "when", "order", "motion", "temporal", "count", "absent", "needle")
NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


@dataclass(frozen=True)
class Thing:
    """`count` identical objects of one shape, colour and size, with one motion."""

    shape: str
    colour: str
    size: str
    x: int  # start centre of the first object, pixels
    y: int
    motion: str = "still"
    speed: str = "slow"
    count: int = 1  # objects standing in a row, `spacing` apart
    spacing: int = 28  # pixels between the centres of neighbouring objects

    def offset(self, second: int) -> tuple[int, int]:
        """(dx, dy) pixels from the start position `second` seconds into the shot."""
        if self.motion == "still":
            return 0, 0
        if self.motion in _UNIT:
            ux, uy = _UNIT[self.motion]
            step = SPEEDS[self.speed] * second
            return ux * step, uy * step
        first, _ = self.motion.split("-")
        ux, uy = _UNIT[first]
        phase = (0, 1, 0, -1)[second % 4]  # 0, +step, 0, -step
        return ux * REVERSAL_STEP * phase, uy * REVERSAL_STEP * phase

    def centres(self, second: int) -> list[tuple[int, int]]:
        dx, dy = self.offset(second)
        return [(self.x + dx + i * self.spacing, self.y + dy) for i in range(self.count)]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def describe(self) -> str:
        number = ("a", "two", "three")[self.count - 1]
        shape = self.shape if self.count == 1 else PLURAL[self.shape]
        move = {"still": "standing still"}.get(self.motion)
        if move is None and self.motion in _UNIT:
            move = f"moving {self.motion}"
        if move is None:
            first, second = self.motion.split("-")
            move = f"moving {first} then {second}"
        return f"{number} {self.size} {self.colour} {shape} {move}"


@dataclass(frozen=True)
class Shot:
    """`seconds` of footage from `start`: one background, optionally one kind of object."""

    start: int
    seconds: int
    background: str
    thing: Thing | None = None

    @property
    def end(self) -> int:
        return self.start + self.seconds

    def describe(self) -> str:
        if self.thing is None:
            return f"an empty {self.background} background"
        return f"{self.thing.describe()} on a {self.background} background"


@dataclass(frozen=True)
class Footage:
    """A whole video: its shots in time order, and what it is for ("clip", "hour", "event", "quiet")."""

    name: str
    shots: tuple[Shot, ...]
    kind: str = "clip"
    seed: int = 0
    target: str | None = None  # hours and event streams: the needle's or event's "colour shape"

    @property
    def seconds(self) -> int:
        return self.shots[-1].end if self.shots else 0

    def shot_at(self, second: int) -> Shot:
        for shot in self.shots:
            if shot.start <= second < shot.end:
                return shot
        raise ValueError(f"{self.name} has no footage at {second} s")

    def things(self) -> list[tuple[Shot, Thing]]:
        return [(s, s.thing) for s in self.shots if s.thing is not None]

    def to_json(self) -> dict:
        return asdict(self)


# ---- drawing ---------------------------------------------------------------------------------------------------
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE]  # (SIZE, SIZE) pixel centres


def shape_mask(shape: str, cx: float, cy: float, size: int) -> np.ndarray:
    """(SIZE, SIZE) bool: the pixels a `shape` of `size` px centred at (cx, cy) covers."""
    half = size / 2
    dx, dy = _XX + 0.5 - cx, _YY + 0.5 - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # apex up, base at the bottom
        inside_y = (dy >= -half) & (dy <= half)
        width = (dy + half) / 2  # half-width grows from 0 at the apex to `half` at the base
        return inside_y & (np.abs(dx) <= width)
    raise ValueError(f"unknown shape {shape!r}")


def render(shot: Shot, second: int) -> tuple[np.ndarray, np.ndarray]:
    """The frame `second` seconds into `shot` and its label map.

    Returns (SIZE, SIZE, 3) uint8 RGB and (SIZE, SIZE) int8 labels: -1 background, else the index of the object.
    """
    frame = np.empty((SIZE, SIZE, 3), np.uint8)
    frame[:] = BACKGROUNDS[shot.background]
    labels = np.full((SIZE, SIZE), -1, np.int8)
    if shot.thing is not None:
        size = SIZES[shot.thing.size]
        for index, (cx, cy) in enumerate(shot.thing.centres(second)):
            mask = shape_mask(shot.thing.shape, cx, cy, size)
            frame[mask] = COLOURS[shot.thing.colour]
            labels[mask] = index
    return frame, labels


def frames(footage: Footage) -> Iterator[np.ndarray]:
    """Every frame of `footage`, one per second."""
    for shot in footage.shots:
        for second in range(shot.seconds):
            yield render(shot, second)[0]


def write(footage: Footage, path: str | os.PathLike[str]) -> Path:
    """Writes `footage` as H.264 (yuv420p, 1 fps) to `path` and returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames(footage), fps=FPS)
    return path


# ---- layouts -----------------------------------------------------------------------------------------------------
def _thing(rng: np.random.Generator, colour: str, *, motion: str | None = None, count: int | None = None) -> Thing:
    """A random object of `colour` whose motion keeps it inside the frame for 4 s."""
    shape = str(rng.choice(SHAPES))
    size = str(rng.choice(list(SIZES)))
    count = int(count if count is not None else rng.choice([1, 1, 1, 2, 3]))
    motion = motion or str(rng.choice(MOTIONS))
    if count > 1 and motion not in ("still", "up", "down", "up-down", "down-up"):
        motion = str(rng.choice(["still", "up", "down", "up-down", "down-up"]))  # a row has no room to go sideways
    speed = str(rng.choice(list(SPEEDS)))
    px = SIZES[size]
    spacing = px + 6
    reach = 3 * SPEEDS[speed] if motion in _UNIT else REVERSAL_STEP if motion != "still" else 0
    ux, uy = _UNIT.get(motion.split("-")[0], (0, 0))
    margin = px // 2 + 2
    row = (count - 1) * spacing
    # room on each side: the object's half size, plus the reach in the directions it will go
    left = margin + (reach if ux < 0 or (motion in REVERSALS and ux) else 0)
    right = SIZE - margin - row - (reach if ux > 0 or (motion in REVERSALS and ux) else 0)
    top = margin + (reach if uy < 0 or (motion in REVERSALS and uy) else 0)
    bottom = SIZE - margin - (reach if uy > 0 or (motion in REVERSALS and uy) else 0)
    x = int(rng.integers(left, max(left, right) + 1))
    y = int(rng.integers(top, max(top, bottom) + 1))
    return Thing(shape=shape, colour=colour, size=size, x=x, y=y, motion=motion, speed=speed, count=count, spacing=spacing)


def make_clip(seed: int, *, shots: int = 4, name: str | None = None, empty_chance: float = 0.3) -> Footage:
    """A 16 s clip: `shots` shots of 4 s, objects of distinct colours, sometimes one empty shot."""
    rng = np.random.default_rng([seed, 1])
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    empty = int(rng.integers(shots)) if rng.random() < empty_chance else -1
    out, start, backgrounds = [], 0, list(BACKGROUNDS)
    previous = None
    for i in range(shots):
        background = str(rng.choice([b for b in backgrounds if b != previous] or backgrounds))
        previous = background
        thing = None if i == empty else _thing(rng, colours.pop())
        out.append(Shot(start=start, seconds=SEGMENT_SECONDS, background=background, thing=thing))
        start += SEGMENT_SECONDS
    return Footage(name=name or f"clip-{seed}", shots=tuple(out), kind="clip", seed=seed)


def make_hour(seed: int, *, seconds: int = 3600, scene_seconds: int = 60, name: str | None = None) -> Footage:
    """An hour of still distractors with one 4 s needle of a colour that appears nowhere else."""
    rng = np.random.default_rng([seed, 2])
    needle_colour = str(rng.choice(list(COLOURS)))
    others = [c for c in COLOURS if c != needle_colour]
    needle = _thing(rng, needle_colour, count=1)
    at = int(rng.integers(scene_seconds // SEGMENT_SECONDS, (seconds - scene_seconds) // SEGMENT_SECONDS)) * SEGMENT_SECONDS
    shots, start, previous = [], 0, None
    while start < seconds:
        background = str(rng.choice([b for b in BACKGROUNDS if b != previous]))
        previous = background
        thing = _thing(rng, str(rng.choice(others)), motion="still", count=1) if rng.random() < 0.8 else None
        end = min(seconds, start + scene_seconds)
        if start <= at < end:  # the needle interrupts this scene
            if at > start:
                shots.append(Shot(start, at - start, background, thing))
            shots.append(Shot(at, SEGMENT_SECONDS, background, needle))
            if end > at + SEGMENT_SECONDS:
                shots.append(Shot(at + SEGMENT_SECONDS, end - at - SEGMENT_SECONDS, background, thing))
        else:
            shots.append(Shot(start, end - start, background, thing))
        start = end
    return Footage(name=name or f"hour-{seed}", shots=tuple(shots), kind="hour", seed=seed, target=needle.name)


def make_event_stream(seed: int, *, target: tuple[str, str], with_event: bool, seconds: int = 60,
                      event_seconds: int = 8, name: str | None = None) -> Footage:
    """A minute of distractors (never the target's colour); with `with_event`, the target shows for 8 s once."""
    colour, shape = target
    rng = np.random.default_rng([seed, 3, int(with_event)])
    others = [c for c in COLOURS if c != colour]
    at = int(rng.integers(2, (seconds - event_seconds) // SEGMENT_SECONDS)) * SEGMENT_SECONDS
    shots, start, previous = [], 0, None
    while start < seconds:
        background = str(rng.choice([b for b in BACKGROUNDS if b != previous]))
        previous = background
        if with_event and start == at:
            thing = _thing(rng, colour, motion="still", count=1)
            thing = Thing(**{**asdict(thing), "shape": shape})
            shots.append(Shot(start, event_seconds, background, thing))
            start += event_seconds
            continue
        length = min(SEGMENT_SECONDS * 2, seconds - start)
        if with_event and start < at < start + length:
            length = at - start
        thing = _thing(rng, str(rng.choice(others)), motion="still", count=1) if rng.random() < 0.7 else None
        shots.append(Shot(start, length, background, thing))
        start += length
    kind = "event" if with_event else "quiet"
    return Footage(name=name or f"{kind}-{seed}", shots=tuple(shots), kind=kind, seed=seed, target=f"{colour} {shape}")


# ---- questions ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    video: str  # the footage's file name (relative to the questions file)
    question: str
    answer: str  # the word or number a correct answer contains; for "when", the event's time in seconds
    kind: str
    start: float = 0.0  # the evidence: the shot the question is about (seconds), for training and retrieval
    end: float = 0.0

    def to_json(self) -> dict:
        return {"video": self.video, "question": self.question, "answer": self.answer, "kind": self.kind,
                "start": self.start, "end": self.end}


def questions(footage: Footage, video: str, *, seed: int = 0) -> list[Question]:
    """Ground-truth questions about `footage` (written to `video`), of every kind it supports."""
    rng = np.random.default_rng([footage.seed, seed, 4])
    out: list[Question] = []
    things = footage.things()

    def ask(text: str, answer: object, kind: str, shot: Shot | None = None) -> None:
        span = (float(shot.start), float(shot.end)) if shot is not None else (0.0, float(footage.seconds))
        out.append(Question(video, text, str(answer), kind, *span))

    if footage.kind == "hour":
        shot = next(s for s in footage.shots if s.thing is not None and s.thing.name == footage.target)
        ask(f"What shape is the {shot.thing.colour} object?", shot.thing.shape, "needle", shot)
        return out
    shapes = [t.shape for _, t in things]
    for shot, thing in things:
        ask(f"What shape is the {thing.colour} object?", thing.shape, "what", shot)
        if shapes.count(thing.shape) == 1:
            ask(f"What colour is the {thing.shape}?", thing.colour, "what", shot)
        ask(f"When does the {thing.name} appear?", shot.start, "when", shot)
        if thing.motion in LINEAR:
            ask(f"Which way does the {thing.name} move?", thing.motion, "motion", shot)
        elif thing.motion in REVERSALS:
            ask(f"Which way does the {thing.name} move first?", thing.motion.split("-")[0], "temporal", shot)
        ask(f"How many {thing.colour} {PLURAL[thing.shape]} are there?", thing.count, "count", shot)
    for i, (a_shot, a) in enumerate(things):
        for b_shot, b in things[i + 1:]:
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            earlier = a if a_shot.start < b_shot.start else b
            ask(f"Which comes first, the {first.name} or the {second.name}?", earlier.colour, "order")
    present = {t.name for _, t in things}
    missing = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
    for name in rng.permutation(missing)[: len(things)]:
        ask(f"Is there a {name}?", "no", "absent")
    for shot, thing in things:
        ask(f"Is there a {thing.name}?", "yes", "absent", shot)
    return out


def descriptions(footage: Footage) -> list[tuple[Shot, str]]:
    """One caption per shot ("a large red circle moving right on a black background")."""
    return [(shot, shot.describe()) for shot in footage.shots]


def caption(footage: Footage) -> str:
    """The whole footage in one caption, shot by shot in time order (for the caption objective)."""
    return ". ".join(f"{shot.start} s: {shot.describe()}" for shot in footage.shots) + "."


# ---- grading -----------------------------------------------------------------------------------------------------
_TIME = re.compile(r"(?<![\d:])(?:(\d{1,2}):)?(\d{1,2}):(\d{2})(?![\d:])|(?<![\d:.])(\d+(?:\.\d+)?)\s*(?:s\b|sec|second)")
_NUMBER = re.compile(r"(?<![\d:])\d+(?![\d:])")


def cited_times(text: str) -> list[float]:
    """Times an answer cites, in seconds: "00:01:23", "1:23", "83 s", "83 seconds"."""
    times = []
    for hours, minutes, seconds, plain in _TIME.findall(text):
        if plain:
            times.append(float(plain))
        else:
            times.append(int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds))
    return times


def grade(kind: str, answer: str, truth: str, *, tolerance: float = SEGMENT_SECONDS) -> bool:
    """Whether a free-text `answer` is right: it contains the `truth` word or number (whole words, any case);
    for "when", it cites a time within `tolerance` seconds (one segment) of `truth`; for counts, a digit or number
    word; for yes/no, the right one and not the other."""
    text = answer.lower()
    truth = truth.lower()
    if kind == "when":
        times = cited_times(text)
        return bool(times) and abs(times[0] - float(truth)) <= tolerance
    words = re.findall(r"[a-z]+|\d+", text)
    if truth.isdigit():
        numbers = [int(w) for w in words if w.isdigit()] + [NUMBER_WORDS[w] for w in words if w in NUMBER_WORDS]
        return bool(numbers) and numbers[0] == int(truth)
    if truth in ("yes", "no"):
        other = "no" if truth == "yes" else "yes"
        return truth in words and other not in words
    return truth in words


# ---- data sets ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorldSet:
    """Footage written under one folder, with its questions."""

    folder: Path
    footage: list[Footage] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)

    def path(self, footage: Footage) -> Path:
        return self.folder / f"{footage.name}.mp4"


def build_set(folder: str | os.PathLike[str], seeds: Sequence[int], *, hours: Sequence[int] = (),
              write_files: bool = True) -> WorldSet:
    """Clips for `seeds` and hours for `hours` written under `folder` (skipped when already there), with questions.

    Writes `questions.json` (a list of {"video", "question", "answer", "kind", "start", "end"}) and
    `footage.json` (every shot of every video) beside them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = [make_clip(s) for s in seeds] + [make_hour(s) for s in hours]
    out = WorldSet(folder)
    for footage in made:
        video = f"{footage.name}.mp4"
        if write_files and not (folder / video).is_file():
            write(footage, folder / video)
        out.footage.append(footage)
        out.questions.extend(questions(footage, video))
    (folder / "questions.json").write_text(json.dumps([q.to_json() for q in out.questions], indent=1))
    (folder / "footage.json").write_text(json.dumps([f.to_json() for f in out.footage]))
    return out
