"""The shared memory (PostgreSQL + Milvus + shared token files) behaves as the embedded one, across processes.

Real services: PostgreSQL from Debian's binaries and Milvus Lite's gRPC server, on free loopback ports.
"""
from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cluster_support import milvus, postgres, memory_url, start_milvus  # noqa: F401 - fixtures
from vidmem.errors import EncoderMismatchError, MemoryStoreError
from vidmem.memory import Manifest, Memory, Retention
from vidmem.memory.shared import SharedMemory

D, E = 64, 16
MANIFEST = Manifest(encoder="aa" * 16, encoder_name="siglip-test", compressor="timeperceiver", dim=D,
                    embedder="clip-test", embed_dim=E)
REPO = Path(__file__).resolve().parents[1]


def unit(rng: np.random.Generator, dim: int = E) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def fill(memory, seed: int, streams: tuple[str, ...] = ("kitchen", "porch"), n: int = 12) -> dict:
    """n segments per stream, interleaved in time, with keyframes; returns {(stream, start): (tokens, embedding)}."""
    rng = np.random.default_rng(seed)
    memory.bind(MANIFEST)
    stored = {}
    for i in range(n):
        for stream in streams:
            tokens = rng.standard_normal((245, D)).astype(np.float16)
            emb = unit(rng)
            memory.add_segment(stream=stream, start=4.0 * i, end=4.0 * i + 4, frames=4, cut=i % 5 == 0,
                               tokens=tokens, slow=196, embedding=emb, keyframe_jpeg=b"\xff\xd8%s%d" % (stream.encode(), i))
            stored[stream, 4.0 * i] = (tokens, emb)
    return stored


def test_the_shared_memory_offers_every_method_of_the_embedded_one() -> None:
    for name, method in inspect.getmembers(Memory, inspect.isfunction):
        if name.startswith("_") and name not in ("__enter__", "__exit__"):
            continue
        assert hasattr(SharedMemory, name), f"SharedMemory lacks {name}"
        mine = inspect.signature(getattr(SharedMemory, name)).parameters
        for param in inspect.signature(method).parameters.values():
            if param.kind is param.VAR_KEYWORD:
                continue
            assert param.name in mine or any(p.kind is p.VAR_KEYWORD for p in mine.values()), \
                f"SharedMemory.{name} lacks the parameter {param.name}"


def test_segments_search_and_filters_match_the_embedded_memory(memory_url: str, tmp_path: Path) -> None:
    with Memory.open(tmp_path / "embedded") as embedded, Memory.open(memory_url) as shared:
        assert isinstance(shared, SharedMemory)
        stored = fill(embedded, 0)
        assert fill(shared, 0).keys() == stored.keys()
        for memory in (embedded, shared):
            memory.set_caption(memory.segments(stream="porch")[3].id, "a parcel on the step", stored["kitchen", 0.0][1])
            memory.put_rule("porch", {"id": "parcel", "question": "is there a parcel?"})
            memory.add_event({"id": "e1", "stream": "porch", "start_time": 12.0, "label": "parcel"})
            memory.update_event("e1", end_time=16.0)
        # A second process opening the URL read-only sees exactly what the writer committed.
        with Memory.open(memory_url, readonly=True) as reader:
            assert reader.manifest == MANIFEST
            for (stream, start), (tokens, _) in stored.items():
                row = [r for r in reader.segments(stream=stream) if r.start == start][0]
                np.testing.assert_array_equal(reader.read_tokens(row), tokens)
            assert reader.keyframe_jpeg(reader.segments(stream="porch")[2]) == b"\xff\xd8porch2"

            def same_hits(query, **kw) -> None:
                # The embedded memory scores small filtered sets from an int8 copy: scores agree to about 1%.
                ours, theirs = reader.search(query, **kw), embedded.search(query, **kw)
                assert [(r.stream, r.start, r.caption) for r, _ in ours] == \
                    [(r.stream, r.start, r.caption) for r, _ in theirs]
                np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], atol=0.01)

            for _, emb in list(stored.values())[::5]:
                same_hits(emb, k=5)
                same_hits(emb, k=4, streams=["porch"], since=10, until=30)
            query = stored["kitchen", 0.0][1]
            hits = reader.search(query, k=2, kinds=["caption"])
            assert [(r.stream, r.start, r.caption) for r, _ in hits] == [("porch", 12.0, "a parcel on the step")]
            assert [(r.stream, r.start, r.cut) for r in reader.segments(since=20, until=30)] == \
                [(r.stream, r.start, r.cut) for r in embedded.segments(since=20, until=30)]
            # disk_bytes: the embedded directory also counts its database and index files
            assert {k: v for k, v in reader.stats().items() if k not in ("path", "disk_bytes")} == \
                {k: v for k, v in embedded.stats().items() if k not in ("path", "disk_bytes")}
            assert reader.rules() == embedded.rules() and reader.events() == embedded.events()
            assert reader.last_segment("kitchen").start == 44.0
            with pytest.raises(MemoryStoreError, match="read-only"):
                reader.put_rule("porch", {"id": "x"})


def test_a_memory_refuses_another_encoder_and_a_foreign_token_directory(memory_url: str, postgres) -> None:
    with Memory.open(memory_url) as memory:
        fill(memory, 1, n=1)
        with pytest.raises(EncoderMismatchError, match="vision encoder"):
            memory.bind(Manifest(**{**MANIFEST.to_dict(), "encoder": "bb" * 16}))
    same_tokens = f"{postgres.create_database(f'other_{os.getpid()}')}?index={memory_url.split('index=')[1]}"
    with pytest.raises(MemoryStoreError, match="belongs to another vidmem memory"):
        Memory.open(same_tokens)


def test_the_index_is_rebuilt_from_postgresql_when_milvus_loses_it(postgres, tmp_path: Path) -> None:
    server = start_milvus()
    url = f"{postgres.create_database(f'rebuild_{os.getpid()}')}?index={server.url}&tokens={tmp_path / 'tokens'}"
    try:
        with Memory.open(url) as memory:
            stored = fill(memory, 2)
        server.stop()  # Milvus and all its data gone
        server = start_milvus(port=server.port)
        with Memory.open(url, readonly=True) as memory:
            for (stream, start), (_, emb) in list(stored.items())[::7]:
                row, score = memory.search(emb, k=1)[0]
                assert (row.stream, row.start) == (stream, start) and score == pytest.approx(1.0, abs=1e-5)
            assert memory.verify() == {"segments": 24, "bad": [], "missing_from_index": [], "extra_in_index": []}
    finally:
        server.stop()


def test_retention_deletes_rows_index_entries_and_files(memory_url: str) -> None:
    rng = np.random.default_rng(3)
    with Memory.open(memory_url, chunk_bytes=64 << 10) as memory:
        memory.bind(MANIFEST)
        memory.set_retention("cam", Retention(max_bytes=200 << 10))
        memory.set_retention("hall", Retention(max_age_seconds=40))
        embs = {}
        for i in range(40):
            for stream in ("cam", "hall"):
                emb = unit(rng)
                row = memory.add_segment(stream=stream, start=4.0 * i, end=4.0 * i + 4, frames=4, cut=False,
                                         tokens=rng.standard_normal((245, D)).astype(np.float16), slow=196,
                                         embedding=emb)
                embs[row.id] = emb
                assert memory.disk_bytes("cam") <= 200 << 10
        hall = memory.segments(stream="hall")
        assert hall[0].start >= 160 - 40 - 4 and hall[-1].start == 156.0  # the last 40 s of the recording
        cam = memory.segments(stream="cam")
        assert 0 < len(cam) < 40 and cam[-1].start == 156.0
        live = {r.id for r in memory.segments()}
        gone = [i for i in embs if i not in live]
        for seg in gone[::9]:
            assert all(r.id != seg for r, _ in memory.search(embs[seg], k=5))
        check = memory.verify()
        assert check["bad"] == [] and check["missing_from_index"] == [] and check["extra_in_index"] == []
        assert memory.retention("hall") == Retention(max_age_seconds=40)
        assert memory.delete_stream("hall") > 0 and not memory.has_stream("hall")


def measured_usage(url: str) -> tuple[int, int]:
    """(token files, PostgreSQL tables) of a shared memory, measured apart from vidmem: every .tok file under its
    token directory, and pg_total_relation_size of every table in its database."""
    import psycopg

    files = sum(f.stat().st_size for f in Path(url.split("tokens=")[1]).rglob("*.tok"))
    with psycopg.connect(url.split("?")[0]) as conn:
        tables = conn.execute("SELECT SUM(pg_total_relation_size(c.oid))::bigint FROM pg_class c JOIN pg_namespace n "
                              "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'").fetchone()[0]
    return files, tables


def test_a_memory_wide_disk_budget_holds_across_writers_oldest_footage_first(memory_url: str) -> None:
    rng = np.random.default_rng(11)
    with Memory.open(memory_url, chunk_bytes=64 << 10) as memory:  # two segments a chunk
        memory.bind(MANIFEST)
        files, tables = measured_usage(memory_url)
        assert files == 0 and abs(memory.disk_usage() - tables) <= 4 * 8192  # PostgreSQL's tables count
        budget = tables + 400_000  # about a dozen segments of footage, two streams
        memory.set_retention(None, Retention(max_bytes=budget))
        assert memory.retention() == Retention(max_bytes=budget)
        with Memory.open(memory_url, chunk_bytes=64 << 10) as other:  # a second writer on the same memory
            for i in range(20):
                for writer, stream in ((memory, "cam"), (other, "porch")):
                    writer.add_segment(stream=stream, start=4.0 * i, end=4.0 * i + 4, frames=4, cut=False,
                                       tokens=rng.standard_normal((245, D)).astype(np.float16), slow=196,
                                       embedding=unit(rng), keyframe_jpeg=b"\xff\xd8%d" % i)
                    assert sum(measured_usage(memory_url)) <= budget, f"over budget after {stream} {i}"
        kept = {stream: [r.start for r in memory.segments(stream=stream)] for stream in ("cam", "porch")}
        for stream, starts in kept.items():  # each stream keeps its newest footage, without holes
            assert 0 < len(starts) < 20 and starts == [4.0 * i for i in range(20 - len(starts), 20)], (stream, starts)
        # Oldest first across streams: the two (written in step) kept the same footage, give or take one chunk.
        assert abs(kept["cam"][0] - kept["porch"][0]) <= 8.0, kept
        assert memory.stats()["retention"] == {"max_age_seconds": None, "max_bytes": budget}
        files, tables = measured_usage(memory_url)
        assert files > 0 and abs(memory.disk_usage() - files - tables) <= 4 * 8192
        check = memory.verify()
        assert check["bad"] == [] and check["missing_from_index"] == [] and check["extra_in_index"] == []


def test_a_memory_wide_default_age_ages_out_streams_without_their_own(memory_url: str) -> None:
    rng = np.random.default_rng(12)
    with Memory.open(memory_url) as memory:
        memory.bind(MANIFEST)
        memory.set_retention(None, Retention(max_age_seconds=20))
        memory.set_retention("cam", Retention(max_age_seconds=1000))  # its own limit wins
        for i in range(15):
            for stream in ("hall", "cam"):
                memory.add_segment(stream=stream, start=4.0 * i, end=4.0 * i + 4, frames=4, cut=False,
                                   tokens=rng.standard_normal((245, D)).astype(np.float16), slow=196,
                                   embedding=unit(rng))
        # A recording keeps its last 20 s: segments ending before 60 - 20 went after each write.
        assert [r.start for r in memory.segments(stream="hall")] == [36.0, 40.0, 44.0, 48.0, 52.0, 56.0]
        assert len(memory.segments(stream="cam")) == 15
    with Memory.open(memory_url, readonly=True) as reader:  # stored in PostgreSQL, seen by every process
        assert reader.retention() == Retention(max_age_seconds=20)
        assert reader.retention("hall") == Retention()


def test_vidmem_retention_and_stats_on_a_shared_memory(memory_url: str, capfd) -> None:
    from test_cli import vidmem_in_process

    with Memory.open(memory_url) as memory:
        fill(memory, 13, n=6)
    result = vidmem_in_process(capfd, "retention", "--max-age", "7d", "--max-bytes", "20GB", "--json",
                               memory=memory_url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) | {"disk_bytes": 0} == {"stream": None, "max_age_seconds": 7 * 86400.0,
                                                              "max_bytes": 20 * 10**9, "deleted_segments": 0,
                                                              "disk_bytes": 0}
    result = vidmem_in_process(capfd, "stats", memory=memory_url)
    assert result.returncode == 0, result.stderr
    assert "retention: max age 604800 s, disk budget 20.0 GB" in result.stdout.splitlines()[0]
    # A budget under what the memory takes deletes its oldest footage at once.
    result = vidmem_in_process(capfd, "stats", "--json", memory=memory_url)
    stats = json.loads(result.stdout)
    assert stats["retention"] == {"max_age_seconds": 7 * 86400.0, "max_bytes": 20 * 10**9}
    files, tables = measured_usage(memory_url)
    assert files > 0 and abs(stats["disk_bytes"] - files - tables) <= 4 * 8192
    budget = tables + files // 2
    result = vidmem_in_process(capfd, "retention", "--max-bytes", str(budget), "--json", memory=memory_url)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["max_age_seconds"] == 7 * 86400.0 and report["deleted_segments"] > 0
    assert report["disk_bytes"] <= budget and sum(measured_usage(memory_url)) <= budget
    stats = json.loads(vidmem_in_process(capfd, "stats", "--json", memory=memory_url).stdout)
    assert stats["segments"] == 12 - report["deleted_segments"] and stats["retention"]["max_bytes"] == budget


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from vidmem.memory import Manifest, Memory
    url, stream, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    manifest = Manifest(encoder="aa" * 16, encoder_name="siglip-test", compressor="timeperceiver", dim=64,
                        embedder="clip-test", embed_dim=16)
    rng = np.random.default_rng(seed)
    with Memory.open(url, chunk_bytes=96 << 10) as memory:
        memory.bind(manifest)
        for i in range(10_000):
            emb = rng.standard_normal(16).astype(np.float32)
            memory.add_segment(stream=stream, start=seed * 1e6 + i, end=seed * 1e6 + i + 1, frames=4, cut=False,
                               tokens=np.full((245, 64), i % 251, np.float16), slow=196, embedding=emb / np.linalg.norm(emb))
            print(i, flush=True)
""")


def test_writers_in_several_processes_share_a_stream_and_a_killed_one_loses_nothing_committed(memory_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO.parent)]))}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, memory_url, "shared", str(seed)], env=env,
                                stdout=subprocess.PIPE, text=True) for seed in (1, 2, 3)]
    try:
        for writer in writers:  # each has committed a few segments
            for _ in range(6):
                assert writer.stdout.readline(), "a writer died"
        writers[0].send_signal(signal.SIGKILL)  # mid-write, without closing anything
        writers[0].wait()
        for writer in writers[1:]:
            for _ in range(4):
                writer.stdout.readline()
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
    with Memory.open(memory_url) as memory:
        rows = memory.segments(stream="shared")
        by_writer = {seed: sorted(r.start - seed * 1e6 for r in rows if int(r.start // 1e6) == seed) for seed in (1, 2, 3)}
        for seed, starts in by_writer.items():
            assert starts == list(range(len(starts))) and len(starts) >= 6, f"writer {seed} lost or reordered segments"
        for row in rows:  # the three writers interleaved in one token file without overwriting each other
            i = int(row.start) % 1_000_000
            assert np.all(memory.read_tokens(row) == i % 251)
        check = memory.verify()
        assert check["bad"] == [] and check["missing_from_index"] == [] and check["extra_in_index"] == []
        # The stream goes on after the kill: a new writer appends past whatever the killed one left.
        row = memory.add_segment(stream="shared", start=9e6, end=9e6 + 1, frames=4, cut=False,
                                 tokens=np.full((245, D), 7, np.float16), slow=196, embedding=unit(np.random.default_rng(9)))
        assert np.all(memory.read_tokens(row) == 7) and memory.verify()["bad"] == []


def _vidmem(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO.parent)]))}
    return subprocess.run([sys.executable, "-m", "vidmem", *args], capture_output=True, text=True, env=env, timeout=300)


def test_unreachable_services_fail_with_one_clear_line(memory_url: str, tmp_path: Path, tiny_models) -> None:
    from services import free_port

    dead_pg = f"postgresql://vidmem@127.0.0.1:{free_port()}/x?index=milvus://127.0.0.1:1&tokens={tmp_path}"
    models = ("--model", str(tiny_models.llava), "--embedder", str(tiny_models.clip))
    for command in (("stats",), ("serve", "--port", "0", *models)):  # a server says so at start, not at a client
        result = _vidmem(*command, "--memory", dead_pg)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.startswith("vidmem: error: cannot reach PostgreSQL at 127.0.0.1:") and \
            result.stderr.count("\n") == 1, result.stderr
    Memory.open(memory_url).close()  # the tables exist: what is missing is Milvus
    dead_milvus = memory_url.replace(memory_url.split("index=")[1].split("&")[0], f"milvus://127.0.0.1:{free_port()}")
    result = _vidmem("stats", "--memory", dead_milvus)
    assert result.returncode == 2 and result.stderr.startswith("vidmem: error: cannot reach Milvus at") and \
        result.stderr.count("\n") == 1, result.stderr
    result = _vidmem("stats", "--memory", "postgresql://vidmem@127.0.0.1:5/x?tokens=/tmp")
    assert result.returncode == 2 and "needs index=milvus://HOST:PORT" in result.stderr
    result = _vidmem("stats", "--memory", memory_url.replace("vidmem@", "vidmem:secret@"))
    assert "secret" not in result.stderr


def test_migrate_copies_an_embedded_memory_and_verifies_it(memory_url: str, tmp_path: Path) -> None:
    source = tmp_path / "embedded"
    with Memory.open(source) as embedded:
        stored = fill(embedded, 4, n=10)
        embedded.set_caption(embedded.segments(stream="porch")[1].id, "a cat", unit(np.random.default_rng(5), 8))
        embedded.set_retention("porch", Retention(max_age_seconds=3600))
        embedded.set_retention(None, Retention(max_age_seconds=30 * 86400, max_bytes=10**12))
        embedded.put_rule("porch", {"id": "cat", "question": "is there a cat?"})
        embedded.add_event({"id": "e1", "stream": "porch", "start_time": 4.0})
    with Memory.open(tmp_path / "int8", token_dtype="int8") as other:
        fill(other, 6, streams=("attic",), n=3)
    result = _vidmem("migrate", str(source), memory_url, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["segments"] == 20 and report["streams"] == 2 and report["verified"] and report["rules"] == 1
    with Memory.open(memory_url, readonly=True) as shared:
        for (stream, start), (tokens, emb) in stored.items():
            row, score = shared.search(emb, k=1)[0]
            assert (row.stream, row.start) == (stream, start)
            np.testing.assert_array_equal(shared.read_tokens(row), tokens)
        assert shared.retention("porch") == Retention(max_age_seconds=3600)
        assert shared.retention() == Retention(max_age_seconds=30 * 86400, max_bytes=10**12)
        assert [r["id"] for r in shared.rules()] == ["cat"] and shared.events()[0]["id"] == "e1"
        assert shared.search(unit(np.random.default_rng(5), 8), k=1, kinds=["caption"])[0][0].caption == "a cat"
    result = _vidmem("migrate", str(tmp_path / "int8"), memory_url, "--json")
    assert result.returncode == 0, result.stderr  # int8 records stay int8 and verify
    again = _vidmem("migrate", str(source), memory_url)
    assert again.returncode == 2 and "already holds stream(s) kitchen, porch" in again.stderr
    missing = _vidmem("migrate", str(tmp_path / "nothing"), memory_url)
    assert missing.returncode == 2 and missing.stderr.startswith("vidmem: error: no vidmem memory at")
