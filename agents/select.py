"""Query-aware selection of a question's evidence under a visual-token budget (pure logic, no I/O).

DESIGN.md "Selection under a budget": always the recent window on a live stream; FAISS candidates for the
question; neighbours merged into key clips (F2C, related-work-abstracts.txt); resolution per segment by
relevance (full, keyframe or low detail, at the costs each segment's compressor declared in its views: 245, 196
and 49 for TimePerceiver); evenly spaced low-detail anchors over the whole range with what is left, so the
storyline survives; then whatever still fits upgrades the picks, best first; chronological order. The total never exceeds the budget: every step only adds what still fits.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from vidmem.compressors.base import Views
from vidmem.errors import BudgetError


class Level(enum.IntEnum):
    """How much of a stored segment goes to the model; higher is more detail (the compressor's views)."""

    LOW = 1  # the "low" view (TimePerceiver: the 49 fast tokens, or a 1-frame keyframe pooled to 7x7)
    KEY = 2  # the "key" view (TimePerceiver: the keyframe's 196 tokens)
    FULL = 3  # everything stored (TimePerceiver: 245 for a segment of 2-4 frames)

    @property
    def view(self) -> str:
        return self.name.lower()


class Row(Protocol):
    """What selection needs to know about a stored segment (memory.SegmentRow satisfies it)."""

    id: int
    stream: str
    start: float
    end: float
    tokens: int
    slow: int
    views: str | None  # the compressor's views as JSON; None: keyframe-first layout (Views.legacy)


@functools.lru_cache(maxsize=1024)
def _parse_views(text: str | None, count: int, slow: int) -> Views:
    return Views.from_json(text, count) if text else Views.legacy(count, slow)


def views_of(row: Row) -> Views:
    """How `row` is shown at each level, as its compressor declared it."""
    return _parse_views(getattr(row, "views", None), row.tokens, row.slow)


def cost(row: Row, level: Level) -> int:
    """Visual tokens that `row` costs at `level`."""
    return views_of(row).cost(level.view)


@dataclass(frozen=True)
class SelectOptions:
    """Knobs of the selection; the defaults follow DESIGN.md."""

    budget: int = 6000  # visual tokens at most, Clapper's evaluation bound
    recent_seconds: float = 16.0  # live streams: the window before the newest segment that is always included
    candidates: int = 32  # FAISS candidates considered
    full_clips: int = 4  # top key clips whose segments get full resolution
    neighbours: int = 1  # segments on each side merged with a candidate into its key clip
    anchor_share: float = 0.2  # part of the budget held back for evenly spaced anchors over the whole range
    recent_share: float = 0.5  # part of the budget the live window leaves for retrieved evidence
    min_score_gap: float = 0.1  # candidates further than this below the best score get low resolution only


@dataclass(frozen=True)
class Pick:
    row: Row
    level: Level
    score: float  # retrieval score (0 for anchors and the recent window without a score)
    reason: str  # "recent", "clip" or "anchor"
    keep: int | None = None  # tokens shown after STC pruning at question time; None: all tokens of the level

    @property
    def tokens(self) -> int:
        return cost(self.row, self.level) if self.keep is None else self.keep


@dataclass
class Selection:
    picks: list[Pick] = field(default_factory=list)  # chronological
    budget: int = 0

    @property
    def visual_tokens(self) -> int:
        return sum(p.tokens for p in self.picks)


class _Ledger:
    """The picks made so far, keyed by segment id, with the tokens they cost; refuses what would not fit."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.picks: dict[int, Pick] = {}
        self.spent = 0

    def offer(self, row: Row, level: Level, score: float, reason: str, *, limit: int | None = None) -> bool:
        """Add `row` at `level`, or upgrade it; False when it does not fit under `limit` (default: the budget)."""
        limit = self.budget if limit is None else min(limit, self.budget)
        old = self.picks.get(row.id)
        if old is not None and old.level >= level:
            return True
        extra = cost(row, level) - (cost(row, old.level) if old else 0)
        if self.spent + extra > limit:
            return False
        self.picks[row.id] = Pick(row, level, max(score, old.score if old else score), old.reason if old else reason)
        self.spent += extra
        return True

    def offer_best(self, row: Row, levels: Sequence[Level], score: float, reason: str, *, limit: int | None = None) -> bool:
        return any(self.offer(row, level, score, reason, limit=limit) for level in levels)


def min_budget(rows: Sequence[Row]) -> int:
    """The smallest budget that holds one keyframe of these rows."""
    return min((cost(r, Level.KEY) for r in rows), default=0)


def select(
    timeline: Sequence[Row],
    candidates: Sequence[tuple[Row, float]],
    *,
    options: SelectOptions = SelectOptions(),
    live_streams: Sequence[str] = (),
) -> Selection:
    """Choose segments and their resolution for one question.

    timeline: every segment in the question's streams and time range, chronological.
    candidates: (segment, score) retrieved for the question, best first (a subset of `timeline`).
    live_streams: streams whose most recent window must always be included.
    """
    if not timeline:
        return Selection(budget=options.budget)
    need = min_budget(timeline)
    if options.budget < need:
        raise BudgetError(f"a budget of {options.budget} visual tokens cannot hold one keyframe ({need} tokens); use --budget {need} or more")
    ledger = _Ledger(options.budget)
    index = {row.id: i for i, row in enumerate(timeline)}

    ranked = [(row, score) for row, score in candidates if row.id in index][: options.candidates]
    windows = []
    for stream in live_streams:
        rows = [r for r in timeline if r.stream == stream]
        if rows:
            newest = rows[-1].end
            windows.append([r for r in reversed(rows) if r.end >= newest - options.recent_seconds] or [rows[-1]])

    # 0. What every answer shows whatever the budget: each live stream's newest segment and the best candidate,
    #    at low resolution for now (upgraded below when the budget allows).
    for window in windows:
        ledger.offer(window[0], Level.LOW, 0.0, "recent")
    if ranked:
        ledger.offer(ranked[0][0], Level.LOW, ranked[0][1], "clip")

    # 1. The recent window of each live stream, newest first, in as much detail as fits in its share.
    recent_limit = options.budget - (int(options.budget * options.recent_share) if ranked else 0)
    for window in windows:
        for row in window:
            ledger.offer_best(row, (Level.FULL, Level.KEY, Level.LOW), 0.0, "recent", limit=recent_limit)

    # 2. Key clips: each candidate with its neighbours (F2C), ranked by the candidate's score.
    evidence_limit = options.budget - int(options.budget * options.anchor_share)
    best = ranked[0][1] if ranked else 0.0
    for rank, (row, score) in enumerate(ranked):
        strong = rank < options.full_clips and score >= best - options.min_score_gap
        seed_levels = (Level.FULL, Level.KEY, Level.LOW) if strong else (Level.KEY, Level.LOW)
        # The best candidate may use the whole budget, so a budget of one keyframe still shows it in full detail.
        limit = options.budget if rank == 0 else evidence_limit
        if not ledger.offer_best(row, seed_levels, score, "clip", limit=limit):
            break
        i = index[row.id]
        for j in range(max(0, i - options.neighbours), min(len(timeline), i + options.neighbours + 1)):
            neighbour = timeline[j]
            if j != i and neighbour.stream == row.stream:
                ledger.offer_best(neighbour, (Level.KEY, Level.LOW) if strong else (Level.LOW,), score, "clip", limit=evidence_limit)

    # 3. Anchors: evenly spaced low-resolution segments over the whole range with whatever is left.
    free = [r for r in timeline if r.id not in ledger.picks]
    if free:
        low = sorted(cost(r, Level.LOW) for r in free)[len(free) // 2]  # the typical anchor's cost
        room = (options.budget - ledger.spent) // max(1, low)
    if free and room > 0:
        count = min(room, len(free))
        step = len(free) / count
        for k in range(count):
            ledger.offer(free[int(k * step + step / 2)], Level.LOW, 0.0, "anchor")

    # 4. What the budget still holds shows the picks in more detail, best first: a budget that holds the whole range
    #    in full shows all of it in full (as training shows it), instead of leaving tokens unspent.
    for pick in sorted(ledger.picks.values(), key=lambda p: (-p.score, p.row.start)):
        ledger.offer_best(pick.row, (Level.FULL, Level.KEY), pick.score, pick.reason)

    picks = sorted(ledger.picks.values(), key=lambda p: (p.row.start, p.row.stream, p.row.id))
    return Selection(picks=picks, budget=options.budget)
