"""Selection under a visual-token budget: the properties every answer relies on."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vidmem.agents.select import Level, SelectOptions, cost, select
from vidmem.errors import BudgetError


@dataclass(frozen=True)
class Row:
    id: int
    stream: str
    start: float
    end: float
    tokens: int
    slow: int


def timeline(lengths: list[int], streams: int = 1, seconds: float = 4.0) -> list[Row]:
    """Segments of 1-4 frames (196 or 245 tokens), back to back, round-robin over `streams` streams."""
    rows = []
    for i, frames in enumerate(lengths):
        tokens = 196 if frames == 1 else 245
        rows.append(Row(i, f"cam{i % streams}", i * seconds, (i + 1) * seconds, tokens, 196))
    return rows


@st.composite
def memories(draw):
    lengths = draw(st.lists(st.integers(1, 4), min_size=1, max_size=400))
    streams = draw(st.integers(1, 3))
    rows = timeline(lengths, streams)
    picked = draw(st.lists(st.integers(0, len(rows) - 1), max_size=40, unique=True))
    scores = sorted((draw(st.floats(-1, 1)) for _ in picked), reverse=True)
    candidates = [(rows[i], s) for i, s in zip(picked, scores)]
    budget = draw(st.integers(196, 20000))
    live = draw(st.lists(st.sampled_from([f"cam{k}" for k in range(streams)]), max_size=2, unique=True))
    return rows, candidates, budget, live


@settings(max_examples=300, deadline=None)
@given(memories())
def test_selection_never_exceeds_budget_keeps_recent_window_and_time_order(memory):
    rows, candidates, budget, live = memory
    selection = select(rows, candidates, options=SelectOptions(budget=budget), live_streams=live)
    assert selection.visual_tokens <= budget
    assert selection.visual_tokens == sum(cost(p.row, p.level) for p in selection.picks)
    starts = [p.row.start for p in selection.picks]
    assert starts == sorted(starts), "evidence must be in time order"
    assert len({p.row.id for p in selection.picks}) == len(selection.picks), "no segment twice"
    chosen = {p.row.id for p in selection.picks}
    for stream in live:
        newest = max((r for r in rows if r.stream == stream), key=lambda r: r.end, default=None)
        if newest is not None:
            assert newest.id in chosen, f"the newest segment of live stream {stream} must always be included"
    if candidates:
        assert candidates[0][0].id in chosen, "the best candidate is always shown"


def test_best_candidate_gets_full_detail_and_anchors_span_the_whole_range():
    rows = timeline([4] * 900)  # an hour at 1 fps in 4-second segments
    planted = rows[613]
    selection = select(rows, [(planted, 0.9), (rows[10], 0.2)], options=SelectOptions(budget=6000))
    levels = {p.row.id: p.level for p in selection.picks}
    assert levels[planted.id] is Level.FULL
    anchors = [p for p in selection.picks if p.reason == "anchor"]
    assert anchors and anchors[0].row.start < 600 and anchors[-1].row.start > 3000, "anchors cover the storyline"
    assert 5500 <= selection.visual_tokens <= 6000, "the budget is used, not wasted"


def test_budget_below_one_keyframe_is_a_clear_error():
    rows = timeline([4] * 10)
    with pytest.raises(BudgetError, match="cannot hold one keyframe"):
        select(rows, [(rows[0], 0.5)], options=SelectOptions(budget=100))


def test_one_keyframe_budget_still_shows_the_best_candidate():
    rows = timeline([4] * 10)
    selection = select(rows, [(rows[7], 0.5)], options=SelectOptions(budget=196))
    assert [(p.row.id, p.level) for p in selection.picks] == [(7, Level.KEY)]


def test_a_budget_that_holds_everything_shows_everything_in_full() -> None:
    rows = timeline([4, 1, 3, 4, 2, 4, 4, 1])
    total = sum(row.tokens for row in rows)
    selection = select(rows, [(rows[5], 0.9), (rows[2], 0.4)], options=SelectOptions(budget=total))
    assert [p.level for p in selection.picks] == [Level.FULL] * len(rows)
    assert selection.visual_tokens == total
    # one token less: everything is still shown, and only the weakest pick gives up detail
    tight = select(rows, [(rows[5], 0.9), (rows[2], 0.4)], options=SelectOptions(budget=total - 1))
    assert len(tight.picks) == len(rows) and tight.visual_tokens <= total - 1
    assert {p.row.id for p in tight.picks if p.level is Level.FULL} >= {5, 2}
