"""kill -9 at random instants: during `vidmem ingest`, retention, an index rebuild and `vidmem ask`.

DESIGN.md, Reliability: a crash at any instant loses at most the segment in flight and the memory reopens
consistent. Each scenario kills a real process with SIGKILL, reopens the memory, runs `Memory.verify()` and checks
that every segment a reader had seen committed is still there, byte for byte.
(tests/test_memory_crash.py kills a bare `Memory` writer; these kill the CLI and the other writers.)
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import pty
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from rel_support import WAIT, check_consistent, cli, cli_env, committed_ids, snapshot

from vidmem.memory import Manifest, Memory

KILLS_CI = 2  # CLI ingest kills in the bounded run (each costs a CLI start-up: ~10 s of CPU, ~30 s on 2 busy cores)
KILLS_SOAK = 10
MANIFEST = dict(encoder="7a" * 16, encoder_name="tiny-siglip", compressor="timeperceiver", dim=64,
                embedder="clip-test", embed_dim=32)


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


# ---- the real `vidmem ingest` ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vidmem_ingest_killed_at_random_instants_keeps_every_committed_segment(tmp_path, tiny_models, videos, soak):
    memory = tmp_path / "memory"
    video = videos["bikes.mp4"]["file"]  # 10 s with 5 cuts: 13 segments at 4 fps
    rnd = random.Random(9)
    kills, seen_before_kill = 0, set()
    for run in range(KILLS_SOAK if soak else KILLS_CI):
        process = subprocess.Popen(
            cli("ingest", str(video), "--stream", f"run{run}", "--fps", "4", "--no-progress", memory=memory,
                tiny=tiny_models), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env())
        try:
            started, first_commit = time.monotonic(), None
            # every other run dies at a random instant of start-up (models loading, the memory being created);
            # the others at a random instant after their first segment is committed (mid-ingest)
            early = run % 2 == 1
            delay = rnd.uniform(0.5, 6.0) if early else rnd.uniform(0.0, 1.5)
            seen: set[int] = set()
            while process.poll() is None and time.monotonic() - started < WAIT:
                seen = committed_ids(memory)
                if first_commit is None and seen - seen_before_kill:
                    first_commit = time.monotonic()
                anchor = started if early else first_commit
                if anchor is not None and time.monotonic() - anchor >= delay:
                    break
                time.sleep(0.02)
            assert process.poll() is None, "the ingest finished before it could be killed: " + process.stderr.read().decode()[-2000:]
            _kill(process)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        kills += 1
        if memory.joinpath("memory.sqlite").exists():
            check_consistent(memory)
        after = committed_ids(memory)
        assert seen <= after, f"committed segments lost: {sorted(seen - after)}"
        seen_before_kill = after
    assert kills == (KILLS_SOAK if soak else KILLS_CI)
    assert seen_before_kill, "no kill happened after a commit"

    # the memory stays usable: an uninterrupted ingest (in-process, same code as the CLI's) adds its segments
    from vidmem.agents.app import Settings, Vidmem
    from vidmem.stream import IngestOptions, open_source

    app = Vidmem(Settings(memory=memory, model=str(tiny_models.llava), embedder=str(tiny_models.clip), device="cpu"))
    try:
        asyncio.run(app.ingest(open_source(video), stream="whole", options=IngestOptions(fps=4)))
    finally:
        app.close()
    report = check_consistent(memory)
    assert seen_before_kill <= committed_ids(memory)
    assert len(committed_ids(memory, "whole")) == 13 and report["segments"] >= 13


# ---- `vidmem ask`: a reader killed mid-answer changes nothing ----------------------------------------------------
@pytest.mark.slow
def test_vidmem_ask_killed_mid_answer_leaves_the_memory_unchanged(tmp_path, tiny_models, talking_llava, videos):
    from vidmem.agents.app import Settings, Vidmem
    from vidmem.stream import open_source

    talking = dataclasses.replace(tiny_models, llava=talking_llava)  # a model that answers at length
    memory = tmp_path / "memory"
    app = Vidmem(Settings(memory=memory, model=str(talking.llava), embedder=str(tiny_models.clip), device="cpu"))
    try:
        asyncio.run(app.ingest(open_source(videos["test.mp4"]["file"]), stream="cam"))
    finally:
        app.close()
    before = snapshot(memory)

    # a terminal on stdout makes `vidmem ask` stream tokens as they come: kill it on the first ones
    leader, follower = pty.openpty()
    process = subprocess.Popen(cli("ask", "What happens in the video?", "--max-new-tokens", "2000", memory=memory,
                                   tiny=talking), stdout=follower, stderr=subprocess.PIPE, env=cli_env())
    os.close(follower)
    try:
        received = b""
        deadline = time.monotonic() + WAIT
        while len(received) < 8 and time.monotonic() < deadline and process.poll() is None:
            try:
                received += os.read(leader, 1024)
            except OSError:
                break
        assert process.poll() is None and received, "no answer was streaming when the kill was due"
        _kill(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    assert snapshot(memory) == before
    check_consistent(memory)


# ---- retention and index rebuilds, killed in child processes ----------------------------------------------------
CHILD_PRELUDE = textwrap.dedent("""
    import sys
    import numpy as np
    from vidmem.memory import Manifest, Memory, Retention

    MANIFEST = Manifest(**%r)

    def segment(seed, at=None):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(49, 2500))
        emb = rng.standard_normal(32).astype(np.float32)
        start = float(seed) if at is None else at
        return dict(stream="cam", start=start, end=start + 4.0, frames=4, cut=False, slow=min(n, 49), caption=str(seed),
                    tokens=rng.standard_normal((n, 64)).astype(np.float16), embedding=emb / np.linalg.norm(emb),
                    keyframe_jpeg=rng.bytes(int(rng.integers(0, 4000))))
""" % MANIFEST)

RETENTION_CHILD = CHILD_PRELUDE + textwrap.dedent("""
    path, run = sys.argv[1], int(sys.argv[2])
    memory = Memory.open(path, chunk_bytes=1 << 20)
    memory.bind(MANIFEST)
    memory.set_retention("cam", Retention(max_bytes=3 << 20, max_age_seconds=80.0))
    last = memory.last_segment("cam") if memory.has_stream("cam") else None
    t0 = last.end if last else 0.0  # the footage goes on where the killed run left it
    print("ready", flush=True)
    i = 0
    while True:
        seed = run * 10_000 + i
        row = memory.add_segment(**segment(seed, t0 + 4.0 * i))
        print(row.id, seed, flush=True)
        memory.apply_retention("cam")
        i += 1
""")


def expected_tokens(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(49, 2500))
    rng.standard_normal(32)
    return rng.standard_normal((n, 64)).astype(np.float16)


@pytest.mark.slow
def test_retention_killed_at_random_instants_keeps_the_newest_segments_whole(tmp_path, soak):
    script = tmp_path / "retention_child.py"
    script.write_text(RETENTION_CHILD)
    path = tmp_path / "memory"
    rnd = random.Random(3)
    committed: list[int] = []
    kills = 0
    for run in range(30 if soak else 10):
        child = subprocess.Popen([sys.executable, str(script), str(path), str(run)], stdout=subprocess.PIPE, text=True,
                                 env=cli_env())
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.05, 1.0))
        _kill(child)
        kills += 1
        committed += [int(line.split()[0]) for line in child.stdout.read().splitlines()]
        check_consistent(path)
        with Memory.open(path, readonly=True) as memory:
            rows = memory.segments(stream="cam")
            ids = [r.id for r in rows]
            # retention deletes the oldest whole chunks: the survivors are the newest committed segments, with at
            # most the one in flight added, and the newest committed one is always among them
            assert committed[-1] in ids if committed else True  # never aged out: it is the newest
            survivors = [i for i in ids if i in set(committed)]
            assert survivors == [i for i in committed if i >= min(survivors)] if survivors else True
            assert len(set(ids) - set(committed)) <= 1
            committed = sorted(set(committed) | set(ids))  # the one in flight was committed after all: it counts
            for row in rows[-5:]:
                np.testing.assert_array_equal(memory.read_tokens(row), expected_tokens(int(row.caption)))
            assert memory.disk_bytes("cam") <= (3 << 20) + (1 << 20)  # the limit, plus the chunk in flight
    assert kills >= 10 and len(committed) > 20
    assert len(Memory.open(path, readonly=True).segments(stream="cam")) < len(committed)  # retention did delete


REBUILD_CHILD = CHILD_PRELUDE + textwrap.dedent("""
    path = sys.argv[1]
    memory = Memory.open(path)
    print("ready", flush=True)
    while True:
        memory.rebuild_index()
        print("rebuilt", flush=True)
""")


@pytest.mark.slow
def test_index_rebuild_killed_at_random_instants_leaves_a_searchable_consistent_index(tmp_path, soak):
    path = tmp_path / "memory"
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((12_000, 32)).astype(np.float32)  # past flat_max: an IVF index is trained
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    with Memory.open(path) as memory:
        memory.bind(Manifest(**MANIFEST))
        token = np.ones((1, 64), np.float16)
        for lo in range(0, len(embeddings), 2000):
            memory.add_segments([dict(stream="cam", start=float(i), end=i + 1.0, frames=1, cut=False, tokens=token,
                                      slow=1, embedding=embeddings[i]) for i in range(lo, lo + 2000)])
        memory.rebuild_index()
    script = tmp_path / "rebuild_child.py"
    script.write_text(REBUILD_CHILD)
    rnd = random.Random(4)
    kills = 0
    for _ in range(12 if soak else 4):
        child = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True, env=cli_env())
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.0, 2.0))
        _kill(child)
        kills += 1
        check_consistent(path)
        with Memory.open(path, readonly=True) as memory:
            for probe in (0, 5_000, 11_999):
                best, score = memory.search(embeddings[probe], k=1)[0]
                assert int(best.start) == probe and score == pytest.approx(1.0, abs=1e-2)  # IVF: approximate
    assert kills >= 4
