"""Index upkeep off the query path, and question evidence found without loading the timeline."""
from __future__ import annotations

import numpy as np

from vidmem.memory import IndexOptions, Manifest, Memory

E = 16
MANIFEST = Manifest(encoder="e", encoder_name="e", compressor="c", dim=8, embedder="m", embed_dim=E)


def _add(memory: Memory, first: int, n: int, *, stream: str = "cam") -> np.ndarray:
    rng = np.random.default_rng(first)
    vecs = rng.standard_normal((n, E)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)  # (n, E)
    memory.add_segments([dict(stream=stream, start=4.0 * i, end=4.0 * i + 4.0, frames=4, cut=False,
                              tokens=np.ones((2, 8), np.float16), slow=1, embedding=vecs[j])
                         for j, i in enumerate(range(first, first + n))])
    return vecs


def test_a_reader_loads_the_index_its_writer_saved_instead_of_rebuilding_it(tmp_path):
    with Memory.open(tmp_path / "m") as writer:
        writer.bind(MANIFEST)
        vecs = _add(writer, 0, 300)
    assert (tmp_path / "m" / "index" / "image.faiss").is_file()  # the writer left its index for readers
    with Memory.open(tmp_path / "m", readonly=True) as reader:
        hits = reader.search(vecs[-1], k=1)
        assert hits[0][0].start == 4.0 * 299  # the newest segment, found
        assert reader._indexes.rebuilds == 0  # loaded and replayed, never rebuilt


def test_a_rebuild_runs_in_the_background_while_the_old_index_serves(tmp_path):
    options = IndexOptions(flat_max=200)  # past 200 vectors the flat index is replaced by an IVF
    with Memory.open(tmp_path / "m", index_options=options) as memory:
        memory.bind(MANIFEST)
        _add(memory, 0, 150)
        memory.search(np.ones(E, np.float32), k=1)
        indexes = memory._indexes
        assert not indexes.indexes["image"].ivf
        vecs = _add(memory, 150, 450)
        hits = memory.search(vecs[-1], k=1)  # served at once by the old (flat) index, caught up by replay
        assert hits[0][0].start == 4.0 * 599  # it already holds the newest segment
        assert not indexes.indexes["image"].ivf
        indexes.wait(60)  # the IVF was being built meanwhile ...
        hits = memory.search(vecs[-2], k=1)
        assert indexes.indexes["image"].ivf  # ... and is swapped in by the next search
        assert hits[0][0].start == 4.0 * 598


def test_evidence_windows_come_from_index_lookups(tmp_path):
    with Memory.open(tmp_path / "m") as memory:
        memory.bind(MANIFEST)
        _add(memory, 0, 1000)
        _add(memory, 0, 10, stream="other")
        assert memory.span(stream="cam") == (0.0, 4000.0)
        assert memory.span(stream="cam", since=100.0, until=200.0) == (96.0, 204.0)
        assert memory.span(stream="cam", since=5000.0) is None
        row = memory.segments(stream="cam", since=400.0, until=400.0)[-1]
        near = memory.neighbours(row, 2)
        assert [r.start for r in near] == [row.start - 8, row.start - 4, row.start + 4, row.start + 8]
        spread = memory.spread(10, stream="cam")
        assert len(spread) == 10 and [r.start for r in spread] == [400.0 * k for k in range(10)]
        assert all(r.stream == "cam" for r in spread)
        inside = memory.spread(5, stream="cam", since=1000.0, until=2000.0)
        assert inside[0].end >= 1000.0 and inside[-1].start <= 2000.0 and len(inside) == 5
