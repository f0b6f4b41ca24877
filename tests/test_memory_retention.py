"""Retention keeps each stream inside its limits while footage keeps arriving, and forgets for real."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from vidmem.errors import ConfigError
from vidmem.memory import Manifest, Memory, Retention

D, E = 1152, 32
MANIFEST = Manifest(encoder="cc" * 16, encoder_name="siglip-test", compressor="timeperceiver", dim=D,
                    embedder="clip-test", embed_dim=E)
SEGMENT_BYTES = 245 * D * 2  # the default 4 s segment: 245 fp16 tokens of width 1152


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(E).astype(np.float32)
    return v / np.linalg.norm(v)


def token_dir_bytes(memory: Memory, stream: str) -> int:
    return sum(f.stat().st_size for f in (memory.path / "tokens" / stream).glob("*.tok"))


def test_byte_limit_holds_during_a_long_ingest_and_deleted_segments_leave_search(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    limit = 12 << 20  # about 22 default segments
    tokens = rng.standard_normal((245, D)).astype(np.float16)
    with Memory.open(tmp_path / "mem") as memory:
        memory.bind(MANIFEST)
        memory.set_retention("cam", Retention(max_bytes=limit))
        memory.set_retention("other", Retention())
        embs = {}
        for i in range(150):  # 10 minutes of footage, ~85 MB unlimited
            emb = unit(rng)
            row = memory.add_segment(stream="cam", start=4.0 * i, end=4.0 * i + 4, frames=4, cut=False,
                                     tokens=tokens, slow=196, embedding=emb)
            embs[row.id] = emb
            assert token_dir_bytes(memory, "cam") <= limit  # on disk, at every step
            (cam,) = [info for info in memory.streams() if info.name == "cam"]
            assert cam.bytes <= limit
            if i % 10 == 0:
                memory.add_segment(stream="other", start=4.0 * i, end=4.0 * i + 4, frames=4, cut=False,
                                   tokens=tokens, slow=196, embedding=unit(rng))
        kept = memory.segments(stream="cam")
        assert 10 < len(kept) < 150
        assert kept[-1].start == 4.0 * 149  # the newest footage is what stays
        assert [r.start for r in kept] == [4.0 * i for i in range(150 - len(kept), 150)]
        kept_ids = {r.id for r in kept}
        for seg_id, emb in list(embs.items())[::7]:
            hits = memory.search(emb, k=5)
            if seg_id in kept_ids:
                assert hits[0][0].id == seg_id
            else:
                assert seg_id not in {r.id for r, _ in hits}
                assert hits[0][1] < 0.99
        assert memory.verify()["extra_in_index"] == []
        assert memory.segments(stream="other")  # other streams are untouched


def test_max_age_keeps_the_last_hour_of_a_recording_and_frees_its_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((49, D)).astype(np.float16)
    with Memory.open(tmp_path / "mem", chunk_bytes=1 << 20) as memory:
        memory.bind(MANIFEST)
        memory.set_retention("lecture", Retention(max_age_seconds=3600.0))
        items = [dict(stream="lecture", start=60.0 * i, end=60.0 * i + 60, frames=60, cut=False, tokens=tokens,
                      slow=49, embedding=unit(rng)) for i in range(180)]  # 3 hours, one segment a minute
        for start in range(0, 180, 20):
            memory.add_segments(items[start:start + 20])
        kept = memory.segments(stream="lecture")
        assert kept[0].end >= 180 * 60 - 3600 and kept[-1].end == 180 * 60
        assert len(kept) <= 61
        files = list((memory.path / "tokens" / "lecture").glob("*.tok"))
        assert token_dir_bytes(memory, "lecture") < 3 * len(kept) * 49 * D * 2  # old chunks were deleted
        assert len(files) >= 1


def test_live_streams_age_out_by_the_wall_clock(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    now = time.time()
    with Memory.open(tmp_path / "mem") as memory:
        memory.bind(MANIFEST)
        for age in (7200.0, 5000.0, 1000.0, 10.0):
            memory.add_segment(stream="door", start=now - age, end=now - age + 4, frames=4, cut=False,
                               tokens=np.zeros((1, D), np.float16), slow=1, embedding=unit(rng))
        memory.set_retention("door", Retention(max_age_seconds=3600.0))
        assert memory.apply_retention() == 2
        assert len(memory.segments(stream="door")) == 2
        assert memory.retention("door") == Retention(max_age_seconds=3600.0)
    with pytest.raises(ConfigError):
        Retention(max_bytes=0)


def test_disk_usage_is_read_while_index_saves_and_retention_replace_and_delete_files(tmp_path: Path) -> None:
    """`disk_usage` (the disk budget's measure, sampled by serve and monitor) lists folders whose files come and go
    under it: an index save's temporary files renamed away, token chunks deleted by retention. A file gone between
    the listing and its size counts nothing; it is not an error."""
    import threading

    from vidmem.memory.atomic import atomic_write

    with Memory.open(tmp_path / "mem") as memory:
        memory.bind(MANIFEST)
        (memory.path / "index").mkdir(exist_ok=True)
        stop, errors = threading.Event(), []

        def churn() -> None:  # what an index save does, as fast as it can
            while not stop.is_set():
                atomic_write(memory.path / "index" / "image.json", lambda p: p.write_text("{}" * 64))

        worker = threading.Thread(target=churn)
        worker.start()
        try:
            for _ in range(3000):
                try:
                    memory.disk_usage()
                except OSError as exc:
                    errors.append(exc)
        finally:
            stop.set()
            worker.join()
        assert errors == []
        assert memory.disk_usage() > 0
