"""Every compressor is whole: whatever it stores, `ask` shows it within the budget and accounts for every token.

Selection budgets from each segment's declared views (full, key, low), never from TimePerceiver's constants, so
any registered compressor, any segment length and any budget from one keyframe to 32,000 gives an answer whose
`visual_tokens` stays within the budget and equals the sum of its segments' tokens.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import vidmem_in_process

from vidmem.agents.app import Settings, Vidmem
from vidmem.agents.select import Level, cost
from vidmem.compressors import available, build_compressor
from vidmem.errors import BudgetError

COMPRESSORS = available()


@pytest.fixture(scope="module")
def apps(tmp_path_factory, tiny_models):
    """One app per compressor over a memory of segments of 1-4 frames that compressor really made."""
    made = {}
    rng = torch.Generator().manual_seed(0)
    for name in COMPRESSORS:
        settings = Settings(memory=tmp_path_factory.mktemp(name) / "memory", model=str(tiny_models.llava),
                            embedder=str(tiny_models.clip), device="cpu", compressor=name, max_new_tokens=2)
        app = Vidmem(settings)
        app.memory.bind(app.manifest())
        compressor = build_compressor(name, dim=app.encoder.dim).eval()
        items = []
        for i in range(24):
            frames = 1 + i % 4
            features = torch.randn(frames, 729, app.encoder.dim, generator=rng)
            with torch.inference_mode():
                block = app.vlm.compress(compressor, features)
            embedding = np.random.default_rng(i).standard_normal(app.embedder.dim).astype(np.float32)
            items.append(dict(stream="cam", start=4.0 * i, end=4.0 * i + frames, frames=frames, cut=False,
                              tokens=block.tokens.numpy().astype(np.float16), slow=block.slow,
                              views=block.views.to_json(), embedding=embedding / np.linalg.norm(embedding)))
        app.memory.add_segments(items)
        made[name] = app
    yield made
    for app in made.values():
        app.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(COMPRESSORS), budget=st.integers(min_value=1, max_value=32_000), follow=st.booleans())
def test_any_compressor_answers_within_any_budget_and_counts_every_token(apps, name, budget, follow) -> None:
    app = apps[name]
    rows = app.memory.segments()
    smallest = min(cost(row, Level.KEY) for row in rows)
    if budget < smallest:
        with pytest.raises(BudgetError, match="one keyframe"):
            app.ask("what happens?", budget=budget)
        return
    answer = app.ask("what happens?", budget=budget)
    assert 0 < answer.visual_tokens <= budget
    assert answer.visual_tokens == sum(segment["tokens"] for segment in answer.segments())
    for pick in answer.picks:  # each segment is shown exactly at the cost its compressor declared
        assert pick.tokens == cost(pick.row, pick.level)
    if follow:
        again = app.ask("and then?", follow_up=True)
        assert again.visual_tokens == answer.visual_tokens and again.cached_tokens > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPRESSORS)
def test_every_compressor_ingests_real_video_and_answers_at_every_budget(tmp_path, tiny_models, videos, name,
                                                                          capfd) -> None:
    """`vidmem ingest --compressor NAME` on a real video, then `vidmem ask --budget B --json` at three budgets, through
    the CLI's main in-process (test_cli.py runs the script; here each command costs a model load, not a start-up)."""
    memory = tmp_path / "memory"
    ingest = vidmem_in_process(capfd, "ingest", str(videos["testvideo.mp4"]["file"]), "--compressor", name, "--json",
                               memory=memory, models=tiny_models)
    assert ingest.returncode == 0, ingest.stderr
    report = json.loads(ingest.stdout)
    for budget in (300, 1000, 6000):
        result = vidmem_in_process(capfd, "ask", "what happens in the video?", "--budget", str(budget), "--json",
                                   memory=memory, models=tiny_models)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert 0 < answer["visual_tokens"] <= budget
        assert answer["visual_tokens"] == sum(segment["tokens"] for segment in answer["segments"])
    assert answer["visual_tokens"] <= report["visual_tokens"], "at 6,000 the whole 24 s clip fits"
