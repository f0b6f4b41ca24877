"""One encoder shared by every stream (agents/encoding.py): batched across streams, fair, and the same features."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from vidmem.agents.app import Settings, Vidmem
from vidmem.agents.encoding import EncodeBatcher
from vidmem.errors import VidmemError
from vidmem.stream.ingest import IngestOptions
from vidmem.stream.sources import FileSource


def frame(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


class GatedTower:
    """A vision tower stand-in that records each call's frames; its first call waits until `release` is set."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        self.calls.append([int(image[0, 0, 0]) for image in images])
        self.entered.set()
        self.release.wait(10)
        return torch.stack([torch.full((2, 3), float(image[0, 0, 0])) for image in images])  # (B, L=2, D=3)


def embed(images: list[np.ndarray]) -> np.ndarray:
    return np.array([[float(image[0, 0, 0]), 1.0] for image in images], np.float32)  # (B, E=2)


def test_a_busy_stream_does_not_starve_a_quiet_one():
    tower = GatedTower()
    batcher = EncodeBatcher(tower, embed, max_frames=8, gather_seconds=0.0)
    try:
        first = batcher.submit("busy", [frame(1)] * 4, [frame(1)])
        assert tower.entered.wait(10)  # the worker is inside the first call: what follows queues up
        busy = [batcher.submit("busy", [frame(10 + i)] * 4, [frame(10 + i)]) for i in range(5)]
        quiet = batcher.submit("quiet", [frame(99)] * 4, [frame(99)])
        tower.release.set()
        features, embeddings = quiet.result(10)
        for future in [first, *busy]:
            future.result(10)
    finally:
        batcher.close()
    # the quiet stream, queued behind five busy requests, rides in the very next call, beside one busy request
    assert tower.calls[1] == [10] * 4 + [99] * 4
    assert [call.streams for call in batcher.recent][:2] == [("busy",), ("busy", "quiet")]
    assert torch.equal(features, torch.full((4, 2, 3), 99.0)) and embeddings.tolist() == [[99.0, 1.0]]
    stats = batcher.stats()
    assert stats["calls"] == 1 + 3 and stats["frames"] == 7 * 4 and stats["requests"] == 7
    assert stats["multi_stream_calls"] == 1


def test_a_failed_call_fails_every_request_in_it_and_the_batcher_carries_on():
    tower = GatedTower()
    broken = {"on": True}

    def flaky(images):
        out = tower(images)
        if broken["on"] and len(tower.calls) == 2:
            raise RuntimeError("the tower ran out of memory")
        return out

    batcher = EncodeBatcher(flaky, embed, max_frames=16, gather_seconds=0.0)
    try:
        first = batcher.submit("a", [frame(1)], [])
        assert tower.entered.wait(10)
        a, b = batcher.submit("a", [frame(2)], [frame(2)]), batcher.submit("b", [frame(3)], [frame(3)])
        tower.release.set()
        first.result(10)
        for future in (a, b):
            with pytest.raises(RuntimeError, match="out of memory"):
                future.result(10)
        features, embeddings = batcher.encode("b", [frame(4)], [frame(4)])
        assert features.shape == (1, 2, 3) and embeddings.shape == (1, 2)
    finally:
        batcher.close()
    with pytest.raises(VidmemError, match="shutting down"):
        batcher.submit("a", [frame(5)], [])


def _ingest(app: Vidmem, files: dict[str, object], *, together: bool) -> None:
    options = IngestOptions(fps=4.0, batch_segments=2)

    async def one(stream: str, path) -> None:
        await app.ingest(FileSource(path, max_side=160), stream=stream, options=options)

    async def run() -> None:
        if together:
            await asyncio.gather(*(one(stream, path) for stream, path in files.items()))
        else:
            for stream, path in files.items():
                await one(stream, path)

    asyncio.run(run())


def _stored(app: Vidmem, stream: str) -> list[tuple[float, float, np.ndarray]]:
    memory = app.memory
    return [(row.start, row.end, memory.read_tokens(row).astype(np.float32)) for row in memory.segments(stream=stream)]


@pytest.mark.parametrize("feature_cache", [False, True], ids=["plain", "stc-cache"])
def test_streams_ingested_together_store_what_each_stores_alone(tmp_path, tiny_models, videos, feature_cache):
    files = {name: videos[f"{name}.mp4"]["file"] for name in ("bikes", "test", "counter")}
    apps = {}
    # The tiny tower is quick next to decoding, so the streams' requests would rarely overlap: the encoder waits up
    # to 200 ms for the other open streams (as a busy deployment's queue would hold them).
    for name, batch in (("alone", 0), ("together", 32)):
        apps[name] = Vidmem(Settings(memory=tmp_path / name, model=str(tiny_models.llava),
                                     embedder=str(tiny_models.clip), device="cpu", feature_cache=feature_cache,
                                     encode_batch_frames=batch, encode_gather_ms=200))
    try:
        before = apps["alone"].encoder.calls  # frames through the vision tower so far (loading may run it)
        _ingest(apps["alone"], files, together=False)
        towered = apps["alone"].encoder.calls - before
        _ingest(apps["together"], files, together=True)
        assert apps["alone"].encoding is None
        stats = apps["together"].encoding.stats()
        # each stream's STC cache answers the same frames either way: the tower sees the same number of frames
        assert stats["frames"] == towered
        # shared calls carried frames of more than one stream, so fewer calls were made than requests
        assert stats["multi_stream_calls"] >= 2 and stats["streams_per_call"] > 1.0
        assert stats["calls"] < stats["requests"]
        assert stats["open_streams"] == 0  # every ingest that ended let go of the batcher
        for stream in files:
            alone, together = _stored(apps["alone"], stream), _stored(apps["together"], stream)
            assert len(alone) == len(together) > 0
            for (s1, e1, t1), (s2, e2, t2) in zip(alone, together):
                assert (s1, e1) == (s2, e2)
                np.testing.assert_allclose(t2, t1, rtol=1e-2, atol=1e-2)  # float16 storage of the same features
            query = apps["alone"].embedder.embed_texts(["a bicycle"])[0]
            hits = [[(row.start, round(score, 3)) for row, score in app.memory.search(query, k=50, streams=[stream])]
                    for app in (apps["alone"], apps["together"])]
            assert hits[0] == hits[1]  # the keyframes' embeddings match too
    finally:
        for app in apps.values():
            app.close()
