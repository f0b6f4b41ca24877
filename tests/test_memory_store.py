"""The memory as the ingest loop, the answerer and the CLI use it: store, read back, search, filter, refuse."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from vidmem.errors import ConfigError, EncoderMismatchError, MemoryStoreError, UnknownStreamError
from vidmem.memory import IndexOptions, Manifest, Memory, Retention

D, E = 64, 16
MANIFEST = Manifest(encoder="aa" * 16, encoder_name="siglip-test", compressor="timeperceiver", dim=D,
                    embedder="clip-test", embed_dim=E)


def unit(rng: np.random.Generator, dim: int = E) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def add(memory: Memory, rng: np.random.Generator, stream: str, start: float, n: int = 245, **kw):
    tokens = rng.standard_normal((n, D)).astype(np.float16)
    emb = kw.pop("embedding", None)
    emb = unit(rng) if emb is None else emb
    row = memory.add_segment(stream=stream, start=start, end=start + 4.0, frames=4, cut=kw.pop("cut", False),
                             tokens=tokens, slow=min(196, n), embedding=emb, **kw)
    return row, tokens, emb


@pytest.fixture()
def memory(tmp_path: Path):
    with Memory.open(tmp_path / "mem") as m:
        m.bind(MANIFEST)
        yield m


def test_segments_read_back_exactly_and_survive_reopening(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stored = {}
    with Memory.open(tmp_path / "mem") as memory:
        memory.bind(MANIFEST)
        for i in range(10):
            row, tokens, _ = add(memory, rng, "lecture", 4.0 * i, keyframe_jpeg=b"\xff\xd8jpeg%d" % i,
                                 cut=i == 3)
            stored[row.id] = (row, tokens)
    with Memory.open(tmp_path / "mem", readonly=True) as memory:
        assert memory.manifest == MANIFEST
        rows = memory.segments(stream="lecture")
        assert [r.start for r in rows] == [4.0 * i for i in range(10)]
        for row in rows:
            assert row == stored[row.id][0]
            tokens = memory.read_tokens(row)
            assert tokens.dtype == np.float16 and tokens.shape == (245, D)
            np.testing.assert_array_equal(tokens, stored[row.id][1])
        assert memory.keyframe_jpeg(rows[2]) == b"\xff\xd8jpeg2"
        assert rows[3].cut and not rows[2].cut and rows[0].slow == 196
        assert memory.last_segment("lecture").start == 36.0


def test_int8_tokens_come_back_close_as_float16(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    with Memory.open(tmp_path / "mem", token_dtype="int8") as memory:
        memory.bind(MANIFEST)
        row, tokens, _ = add(memory, rng, "cam", 0.0)
        back = memory.read_tokens(row)
        assert back.dtype == np.float16 and back.shape == tokens.shape
        scale = np.abs(tokens.astype(np.float32)).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(back.astype(np.float32) - tokens.astype(np.float32)) <= scale * 0.51 + 1e-3)
        assert memory.stats()["bytes"] < 245 * D * 2  # about half of fp16


def test_search_finds_the_matching_keyframe_within_stream_and_time_filters(memory: Memory) -> None:
    rng = np.random.default_rng(2)
    rows = {}
    for i in range(60):
        stream = ("front", "back")[i % 2]
        row, _, emb = add(memory, rng, stream, 10.0 * i)
        rows[row.id] = (row, emb)
    target, emb = rows[31]
    hits = memory.search(emb, k=5)
    assert hits[0][0] == target and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    # Another stream or another time never leaks into filtered results.
    other = memory.search(emb, k=10, streams=["front" if target.stream == "back" else "back"])
    assert other and all(r.stream != target.stream for r, _ in other)
    window = memory.search(emb, k=10, since=100.0, until=200.0)
    assert window and all(r.end >= 100.0 and r.start <= 200.0 for r, _ in window)
    assert target not in [r for r, _ in window]
    assert memory.search(emb, k=1, since=target.start, until=target.end, streams=[target.stream])[0][0] == target
    with pytest.raises(UnknownStreamError):
        memory.search(emb, streams=["garage"])
    with pytest.raises(ConfigError):
        memory.search(np.ones(E + 1, np.float32))


def test_segments_lists_a_time_range_chronologically(memory: Memory) -> None:
    rng = np.random.default_rng(3)
    for start in (40.0, 0.0, 20.0, 60.0, 80.0):  # out of order on purpose
        add(memory, rng, "cam", start)
    assert [r.start for r in memory.segments(stream="cam")] == [0.0, 20.0, 40.0, 60.0, 80.0]
    assert [r.start for r in memory.segments(stream="cam", since=22.0, until=61.0)] == [20.0, 40.0, 60.0]
    assert [r.start for r in memory.segments(limit=2)] == [0.0, 20.0]
    with pytest.raises(UnknownStreamError):
        memory.segments(stream="nope")


def test_extending_a_static_segment_grows_its_time_range_everywhere(memory: Memory) -> None:
    rng = np.random.default_rng(4)
    row, _, emb = add(memory, rng, "cam", 0.0)
    memory.search(emb, k=1)  # the index exists before the extension
    memory.extend_segment(row.id, end=600.0, frames=150)
    (grown,) = memory.segments(stream="cam")
    assert grown.end == 600.0 and grown.frames == 150
    assert memory.search(emb, k=1, since=500.0)[0][0].id == row.id
    assert memory.stats()["seconds_covered"] == 600.0


def test_stats_and_streams_summarise_what_is_stored(memory: Memory) -> None:
    rng = np.random.default_rng(5)
    for i in range(3):
        add(memory, rng, "a", 4.0 * i)
    add(memory, rng, "b", 100.0, n=196)
    stats = memory.stats()
    assert stats["segments"] == 4 and stats["seconds_covered"] == 16.0
    by_name = {s["name"]: s for s in stats["streams"]}
    assert by_name["a"]["segments"] == 3 and by_name["a"]["start"] == 0.0 and by_name["a"]["end"] == 12.0
    assert by_name["b"]["bytes"] >= 196 * D * 2
    assert stats["bytes"] == sum(s["bytes"] for s in stats["streams"]) == memory.disk_bytes()
    assert memory.has_stream("a") and not memory.has_stream("c")


def test_a_memory_refuses_tokens_from_another_encoder(tmp_path: Path) -> None:
    with Memory.open(tmp_path / "mem") as memory:
        memory.bind(MANIFEST)
    with Memory.open(tmp_path / "mem") as memory:
        memory.bind(MANIFEST)  # the same encoder is welcome back
        other = Manifest(encoder="bb" * 16, encoder_name="clip-vit-l", compressor="timeperceiver", dim=D,
                         embedder="clip-test", embed_dim=E)
        with pytest.raises(EncoderMismatchError, match="siglip-test.*clip-vit-l"):
            memory.bind(other)
        with pytest.raises(EncoderMismatchError, match="compressor timeperceiver, not pool"):
            memory.bind(Manifest(**{**MANIFEST.to_dict(), "compressor": "pool"}))
        with pytest.raises(EncoderMismatchError, match="width"):
            memory.add_segment(stream="cam", start=0, end=4, frames=4, cut=False,
                               tokens=np.zeros((245, D * 2), np.float16), slow=196, embedding=np.ones(E) / 4)
        assert memory.segments() == []


def test_bad_names_and_paths_are_refused(memory: Memory, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    for name in ("../escape", "a/b", ".hidden", "", "x" * 65, "sp ace"):
        with pytest.raises(ConfigError, match="stream name"):
            add(memory, rng, name, 0.0)
    assert not (tmp_path / "escape").exists()
    with pytest.raises(MemoryStoreError, match="no vidmem memory at .*vidmem ingest"):
        Memory.open(tmp_path / "missing", readonly=True)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ConfigError):
        memory.add_segment(stream="cam", start=5.0, end=1.0, frames=1, cut=False, tokens=np.zeros((1, D)),
                           slow=1, embedding=unit(rng))


def test_a_damaged_token_file_is_reported_not_returned(memory: Memory) -> None:
    rng = np.random.default_rng(7)
    row, _, _ = add(memory, rng, "cam", 0.0)
    (token_file,) = (memory.path / "tokens" / "cam").iterdir()
    with open(token_file, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x13\x37")
    memory._files._maps.clear()  # as a fresh process would map it
    with pytest.raises(MemoryStoreError, match="checksum"):
        memory.read_tokens(row)
    assert memory.verify()["bad"] == [row.id]


def test_captions_are_searchable_through_their_own_index(memory: Memory) -> None:
    rng = np.random.default_rng(8)
    rows = [add(memory, rng, "cam", 4.0 * i)[0] for i in range(5)]
    caption_emb = unit(rng, 24)
    memory.set_caption(rows[2].id, "a person opens the fridge", caption_emb)
    assert memory.segments()[2].caption == "a person opens the fridge"
    hit, score = memory.search(caption_emb, k=1)[0]
    assert hit.id == rows[2].id and score == pytest.approx(1.0, abs=1e-5)
    memory.set_caption(rows[2].id, "the fridge is closed", -caption_emb)  # replaces the old embedding
    assert memory.search(-caption_emb, k=1)[0][0].id == rows[2].id
    assert memory.search(caption_emb, k=1)[0][1] == pytest.approx(-1.0, abs=1e-5)


def test_the_index_is_rebuilt_when_missing_or_stale(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    with Memory.open(tmp_path / "mem") as memory:
        memory.bind(MANIFEST)
        first = [add(memory, rng, "cam", 4.0 * i) for i in range(20)]
        memory.search(first[0][2], k=1)  # builds and (on close) saves the index
    assert (tmp_path / "mem" / "index" / "image.faiss").is_file()
    with Memory.open(tmp_path / "mem") as memory:  # the saved index is now stale by 5 segments
        later = [add(memory, rng, "cam", 100.0 + 4.0 * i) for i in range(5)]
    with Memory.open(tmp_path / "mem") as memory:
        assert memory.search(later[-1][2], k=1)[0][0] == later[-1][0]
        assert memory.verify()["missing_from_index"] == []
    for name in ("image.faiss", "image.npz"):
        (tmp_path / "mem" / "index" / name).write_bytes(b"garbage")
    with Memory.open(tmp_path / "mem") as memory:
        assert memory.search(first[3][2], k=1)[0][0] == first[3][0]
        memory.rebuild_index()
        assert memory.index_ids() == {r.id for r in memory.segments()}


def test_large_index_switches_to_ivf_and_keeps_filters_and_deletions(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    options = IndexOptions(flat_max=300, exact_max=50, nprobe=64)
    with Memory.open(tmp_path / "mem", index_options=options) as memory:
        memory.bind(MANIFEST)
        items, embs = [], []
        for i in range(1200):
            emb = unit(rng)
            embs.append(emb)
            items.append(dict(stream=("a", "b", "c")[i % 3], start=float(i), end=i + 1.0, frames=1, cut=False,
                              tokens=np.zeros((1, D), np.float16), slow=1, embedding=emb))
        rows = memory.add_segments(items)
        assert memory.search(embs[500], k=1)[0][0] == rows[500]
        assert memory._indexes.indexes["image"].ivf
        # A filter broad enough for the IVF selector path, and one small enough to score exactly.
        hits = memory.search(embs[500], k=5, streams=["c"], since=300.0)
        assert hits[0][0] == rows[500] and all(r.stream == "c" and r.end >= 300 for r, _ in hits)
        hits = memory.search(embs[500], k=5, since=480.0, until=520.0)
        assert hits[0][0] == rows[500] and all(479 <= r.start <= 520 for r, _ in hits)
        memory.set_retention("c", Retention(max_age_seconds=100.0))
        assert memory.apply_retention("c") > 0
        assert memory.search(embs[500], k=1)[0][0] != rows[500]
        assert memory.verify()["extra_in_index"] == []


def test_a_reader_process_sees_new_segments_while_the_writer_runs(memory: Memory, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    reader_script = textwrap.dedent("""
        import sys
        import numpy as np
        from vidmem.memory import Memory
        with Memory.open(sys.argv[1], readonly=True) as memory:
            for line in sys.stdin:
                emb = np.array([float(x) for x in line.split()], dtype=np.float32)
                hits = memory.search(emb, k=1)
                print(hits[0][0].id if hits else -1, len(memory.segments()), flush=True)
    """)
    add(memory, rng, "cam", 0.0)
    reader = subprocess.Popen([sys.executable, "-c", reader_script, str(memory.path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for i in range(1, 4):
            row, _, emb = add(memory, rng, "cam", 4.0 * i)
            reader.stdin.write(" ".join(str(x) for x in emb) + "\n")
            reader.stdin.flush()
            seen, count = reader.stdout.readline().split()
            assert int(seen) == row.id and int(count) == i + 1
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)


def test_threads_can_add_and_search_at_the_same_time(memory: Memory) -> None:
    errors: list[BaseException] = []

    def writer(stream: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for i in range(30):
                add(memory, rng, stream, float(i), n=16)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"s{i}", i)) for i in range(3)]
    for t in threads:
        t.start()
    probe = np.random.default_rng(99)
    while any(t.is_alive() for t in threads):
        memory.search(unit(probe), k=3)
    for t in threads:
        t.join()
    assert errors == []
    assert memory.stats()["segments"] == 90
    assert memory.verify() == {"segments": 90, "bad": [], "missing_from_index": [], "extra_in_index": []}


def test_rules_and_events_round_trip(memory: Memory) -> None:
    rule = {"id": "door", "condition": "a person is at the front door", "threshold": 0.3, "min_duration": 2,
            "cooldown": 60, "verify": True}
    memory.put_rule("front", rule)
    memory.put_rule("front", {**rule, "threshold": 0.4})
    memory.put_rule("back", {"id": "cat", "condition": "a cat"})
    assert [r["threshold"] for r in memory.rules("front")] == [0.4]
    assert {r["id"] for r in memory.rules()} == {"door", "cat"}
    assert memory.delete_rule("front", "door") and not memory.delete_rule("front", "door")
    memory.add_event({"id": "e1", "stream": "front", "rule": "door", "start_time": 10.0, "end_time": None})
    memory.add_event({"id": "e2", "stream": "back", "rule": "cat", "start_time": 20.0})
    memory.update_event("e1", end_time=14.0, verified=True)
    (e1,) = memory.events(stream="front")
    assert e1["end_time"] == 14.0 and e1["verified"] and e1["rule"] == "door"
    assert [e["id"] for e in memory.events(since=15.0)] == ["e2"]
    with pytest.raises(ConfigError):
        memory.put_rule("front", {"condition": "no id"})


def test_time_filters_hold_when_footage_arrives_out_of_order(memory: Memory) -> None:
    rng = np.random.default_rng(12)
    late, _, emb_late = add(memory, rng, "cam", 1000.0)
    early, _, emb_early = add(memory, rng, "cam", 0.0)  # a recording re-ingested from its start
    middle, _, _ = add(memory, rng, "cam", 500.0)
    assert [r.id for r, _ in memory.search(emb_late, k=5, since=900.0)] == [late.id]
    assert [r.id for r, _ in memory.search(emb_early, k=5, until=100.0)] == [early.id]
    assert {r.id for r, _ in memory.search(emb_early, k=5, since=400.0, until=600.0)} == {middle.id}
    memory.extend_segment(early.id, end=2000.0, frames=500)
    assert early.id in {r.id for r, _ in memory.search(emb_early, k=5, since=1500.0)}


def test_readonly_and_closed_memories_refuse_writes_clearly(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    with Memory.open(tmp_path / "mem") as memory:
        memory.bind(MANIFEST)
        add(memory, rng, "cam", 0.0)
    with Memory.open(tmp_path / "mem", readonly=True) as reader:
        with pytest.raises(MemoryStoreError, match="read-only"):
            add(reader, rng, "cam", 4.0)
        assert len(reader.segments()) == 1
    with pytest.raises(MemoryStoreError, match="closed"):
        reader.segments()
    (tmp_path / "file").write_text("not a memory")
    with pytest.raises(MemoryStoreError, match="is a file"):
        Memory.open(tmp_path / "file")


def test_search_can_be_limited_to_keyframes_or_captions_of_the_same_width(memory: Memory) -> None:
    rng = np.random.default_rng(14)
    rows = [add(memory, rng, "cam", 4.0 * i)[0] for i in range(6)]
    query = unit(rng)
    assert memory.caption_dim is None and memory.search(query, kinds=["caption"]) == []
    memory.set_caption(rows[4].id, "a dog on the sofa", query)  # caption embeddings as wide as keyframe ones
    assert memory.caption_dim == E
    assert [r.id for r, _ in memory.search(query, k=5, kinds=["caption"])] == [rows[4].id]
    assert rows[4].id not in [r.id for r, _ in memory.search(query, k=1, kinds=["image"])]
    assert memory.search(query, k=1)[0][0].id == rows[4].id  # both indexes, best score per segment
    with pytest.raises(ConfigError):
        memory.search(query, kinds=["audio"])
