"""Verification asks the VLM about exactly the event's segments and decides from P(yes) against P(no)."""
from __future__ import annotations

import asyncio

import pytest

from vidmem.agents.app import Settings, Vidmem
from vidmem.agents.monitor import VERIFY_PROMPT, Monitor, yes_probability
from vidmem.agents.rules import Rule, RuleTracker
from vidmem.agents.select import Level, Pick
from vidmem.stream import IngestOptions, open_source


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, tiny_models, videos):
    memory = tmp_path_factory.mktemp("verify") / "memory"
    app = Vidmem(Settings(memory=memory, model=str(tiny_models.llava), embedder=str(tiny_models.clip), device="cpu"))
    asyncio.run(app.ingest(open_source(videos["testvideo.mp4"]["file"]), stream="door",
                           options=IngestOptions(fps=1, static_threshold=0)))
    yield app
    app.close()


def test_verification_sees_exactly_the_events_segments(ingested):
    app = ingested
    rows = app.memory.segments(stream="door")
    assert len(rows) >= 5
    monitor = Monitor(app, "mqtt://127.0.0.1:1883")  # not connected: only its verification is used here
    tracker = RuleTracker(Rule("person", "a person at the door", threshold=0.0, verify=False), stream="door")
    assert [r.id for r in monitor.event_rows(tracker, rows[3])] == [rows[3].id]  # nothing holds yet: the segment
    tracker.observe(rows[1].start, 0.5, end=rows[1].end, ref=rows[1].id)  # the condition starts holding at rows[1]
    tracker.observe(rows[2].start, 0.5, end=rows[2].end, ref=rows[2].id)
    shown = monitor.event_rows(tracker, rows[3])
    assert [r.id for r in shown] == [rows[1].id, rows[2].id, rows[3].id]  # not rows[0], not rows[4]: no neighbours


def test_the_verdict_comes_from_the_two_answers_probabilities(ingested):
    app = ingested
    rows = app.memory.segments(stream="door")
    question = VERIFY_PROMPT.format(condition="a person at the door")
    picks = [Pick(rows[0], Level.FULL, 0.0, "verify")]
    p = yes_probability(app, question, picks)
    assert 0.0 < p < 1.0
    assert yes_probability(app, question, picks) == pytest.approx(p)  # no sampling: the same evidence, the same p
    other = yes_probability(app, question, [Pick(rows[-1], Level.FULL, 0.0, "verify")])
    assert other != pytest.approx(p, abs=1e-7)  # it depends on what the model is shown
