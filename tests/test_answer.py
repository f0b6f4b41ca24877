"""Answering from the memory: planted evidence is found, answers stream, caches spare prefill, errors are clear."""
from __future__ import annotations

import time

import av
import numpy as np
import pytest

from vidmem.agents.answer import render_span, render_time
from vidmem.agents.app import Settings, Vidmem
from vidmem.agents.native import native_answer
from vidmem.agents.select import Level
from vidmem.errors import BudgetError, UnknownStreamError, VidmemError

HOUR_SEGMENTS = 900  # one hour at 1 fps in 4-frame segments


def decoded_frames(path, count: int, *, every: int = 1) -> list[np.ndarray]:
    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % every == 0:
                frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == count:
                break
    return frames


def checkerboard(side: int = 224, cell: int = 28) -> np.ndarray:
    """A distinct image that appears nowhere in the test footage."""
    y, x = np.mgrid[:side, :side]
    board = ((y // cell + x // cell) % 2).astype(np.uint8)
    return np.stack([board * 255, np.zeros_like(board), (1 - board) * 255], axis=-1)


@pytest.fixture(scope="module")
def app_factory(tmp_path_factory, tiny_models):
    apps = []

    def make(**overrides) -> Vidmem:
        memory = tmp_path_factory.mktemp("answer") / "memory"
        settings = Settings(memory=memory, model=str(tiny_models.llava), embedder=str(tiny_models.clip), device="cpu",
                            max_new_tokens=overrides.pop("max_new_tokens", 12), **overrides)
        app = Vidmem(settings)
        app.memory.bind(app.manifest())
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture(scope="module")
def background(videos, app_factory) -> np.ndarray:
    """CLIP embeddings of real frames from two test videos, to fill a long memory with."""
    app = app_factory()
    frames = decoded_frames(videos["bikes.mp4"]["file"], 60, every=4) + decoded_frames(videos["test.mp4"]["file"], 60, every=5)
    return app.embedder.embed_images(frames)


def fill(app: Vidmem, embeddings: np.ndarray, *, stream: str = "cam", start: float = 0.0, seconds: float = 4.0) -> list:
    """Store one segment per embedding, back to back, with random tokens of the encoder's width."""
    rng = np.random.default_rng(0)
    dim = app.vlm.hidden_size  # stored tokens are language-model input embeddings
    items = [
        dict(stream=stream, start=start + i * seconds, end=start + (i + 1) * seconds, frames=4, cut=False,
             tokens=rng.standard_normal((245, dim)).astype(np.float16), slow=196, embedding=e)
        for i, e in enumerate(embeddings)
    ]
    return app.memory.add_segments(items)


@pytest.mark.parametrize("position", [0, 437, HOUR_SEGMENTS - 1])
def test_a_planted_moment_is_found_anywhere_in_an_hour(app_factory, background, position):
    app = app_factory()
    planted = app.embedder.embed_images([checkerboard()])[0]
    embeddings = background[np.arange(HOUR_SEGMENTS) % len(background)].copy()
    embeddings[position] = planted
    rows = fill(app, embeddings)
    selection = app.select("the checkerboard", budget=6000, query=planted)
    levels = {p.row.id: p.level for p in selection.picks}
    assert levels.get(rows[position].id) is Level.FULL, "the planted segment is shown in full detail"
    assert selection.visual_tokens <= 6000
    assert len(selection.picks) > 20, "anchors keep the rest of the hour in view"


def test_answers_stream_cite_their_segments_and_follow_ups_reuse_the_cache(app_factory, background):
    app = app_factory()
    fill(app, background[:40])
    pieces: list[str] = []
    first = app.ask("What happens in the video?", on_token=pieces.append)
    assert "".join(pieces).strip() == first.text, "the streamed tokens are the answer"
    assert first.cached_tokens == 0 and first.visual_tokens <= 6000
    assert [p.row.start for p in first.picks] == sorted(p.row.start for p in first.picks)
    follow = app.ask("And after that?", follow_up=True)
    assert follow.cached_tokens > 0 and follow.picks == first.picks
    assert follow.prefill_tokens * 5 < first.prefill_tokens, "a follow-up prefills only its question"


def test_a_live_question_about_now_prefills_only_itself(app_factory, background):
    app = app_factory()
    question = "Is the door open now?"
    now_like = app.embedder.embed_texts([question])  # the recent window is what the question is about
    now = time.time()
    fill(app, background[:30], stream="door", start=now - 30 * 4)
    cold = app.ask(question, streams=["door"])
    app.refresh_live("door")
    fill(app, np.repeat(now_like, 2, axis=0), stream="door", start=now)  # new segments arrive ...
    app.refresh_live("door")  # ... and are appended to the kept window, as the ingest loop does
    warm = app.ask(question, streams=["door"], live=True)
    newest = app.memory.last_segment("door")
    assert newest.id in {p.row.id for p in warm.picks}, "the newest segment is part of a live answer"
    assert warm.cached_tokens > 0
    question_tokens = len(app.vlm.tokenizer(question).input_ids)
    assert warm.prefill_tokens < question_tokens + 20, "only the question (and the chat template's tail) is prefilled"
    assert cold.prefill_tokens > 20 * warm.prefill_tokens
    assert render_time(newest.start)[:4] == time.strftime("%Y"), "live evidence is stamped with wall-clock time"


def test_a_live_question_about_the_past_brings_in_the_older_moment(app_factory, background):
    app = app_factory()
    planted = app.embedder.embed_images([checkerboard()])[0]
    now = time.time()
    older = background[:30].copy()
    older[7] = planted
    rows = fill(app, older, stream="yard", start=now - 30 * 4)
    fill(app, background[40:44], stream="yard", start=now)
    app.refresh_live("yard")
    warm = app.ask("Where is the checkerboard?", streams=["yard"], live=True, query=planted)
    assert rows[7].id in {p.row.id for p in warm.picks}, "the older matching moment joins the kept window"


def test_clear_errors_for_empty_memory_unknown_stream_tiny_budget_and_huge_question(app_factory, background):
    app = app_factory()
    with pytest.raises(VidmemError, match="holds no segments"):
        app.ask("anything there?")
    fill(app, background[:5])
    with pytest.raises(UnknownStreamError, match="garage"):
        app.ask("what?", streams=["garage"])
    with pytest.raises(BudgetError, match="one keyframe"):
        app.ask("what?", budget=100)
    with pytest.raises(BudgetError, match="question"):
        app.ask("why " * 9000)


def test_times_are_rendered_for_files_and_live_streams():
    assert render_span(83.2, 87.9) == "[00:01:23-00:01:27]"
    assert render_time(3 * 3600 + 5) == "03:00:05"
    live = render_span(1_700_000_000.0, 1_700_000_004.0)
    assert live.startswith("[2023-11-") and live.count("2023") == 1


def test_native_path_spends_196_tokens_per_frame(app_factory, videos):
    app = app_factory()
    frames = decoded_frames(videos["demo.mp4"]["file"], 4, every=30)
    answer = native_answer(app.answerer, frames, "What are they doing?")
    assert answer.visual_tokens == 4 * 196 + 1
    assert answer.prefill_tokens > answer.visual_tokens, "the frames are prefilled inside the chat template"


def test_captions_are_written_at_ingest_and_join_retrieval(tiny_models, videos, tmp_path):
    import asyncio

    from vidmem.stream import open_source

    settings = Settings(memory=tmp_path / "memory", model=str(tiny_models.llava), embedder=str(tiny_models.clip),
                        caption_embedder=str(tiny_models.minilm), device="cpu", captions=True, max_new_tokens=8)
    app = Vidmem(settings)
    try:
        report = asyncio.run(app.ingest(open_source(str(videos["counter.mp4"]["file"])), stream="counter"))
        rows = app.memory.segments(stream="counter")
        assert len(rows) == report.segments and all(row.caption is not None for row in rows), "every segment is described"
        assert app.memory.caption_dim, "caption embeddings are indexed"
        answer = app.ask("what number is shown?")
        assert {p.row.id for p in answer.picks} <= {r.id for r in rows}
    finally:
        app.close()


def test_pruning_covers_more_segments_within_the_same_budget(app_factory, background):
    plain = app_factory()
    pruned = app_factory(prune=0.5)
    for app in (plain, pruned):
        fill(app, background[:60])
    full = plain.ask("What happens?", budget=2000)
    half = pruned.ask("What happens?", budget=2000)
    assert half.visual_tokens <= 2000 and full.visual_tokens <= 2000
    assert len(half.picks) > 1.5 * len(full.picks), "pruned segments leave room for more of them"
    assert all(p.tokens < 245 for p in half.picks)
    assert half.visual_tokens == sum(s["tokens"] for s in half.segments())
