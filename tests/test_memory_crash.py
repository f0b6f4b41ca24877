"""A writer killed with SIGKILL at random instants never costs a committed segment or leaves the memory broken."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from vidmem.memory import Manifest, Memory

MANIFEST = Manifest(encoder="5e" * 16, encoder_name="tiny-siglip", compressor="timeperceiver", dim=96,
                    embedder="clip-test", embed_dim=32)

# The child adds segments forever and prints each id once add_segment has returned (so it is committed).
# Tokens and embeddings derive from a seed it also prints, so the parent can check the bytes it reads back.
CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from vidmem.memory import Manifest, Memory

    path, run = sys.argv[1], int(sys.argv[2])
    memory = Memory.open(path, chunk_bytes=2 << 20)  # small chunks: rotation happens under the kill
    memory.bind(Manifest(encoder="5e" * 16, encoder_name="tiny-siglip", compressor="timeperceiver", dim=96,
                         embedder="clip-test", embed_dim=32))
    print("ready", flush=True)
    i = 0
    while True:
        seed = run * 1_000_000 + i
        rng = np.random.default_rng(seed)
        n = int(rng.integers(49, 3000))
        emb = rng.standard_normal(32).astype(np.float32)
        row = memory.add_segment(stream="cam", start=float(seed), end=float(seed) + 4.0, frames=4, cut=False,
                                 tokens=rng.standard_normal((n, 96)).astype(np.float16), slow=min(n, 49),
                                 embedding=emb / np.linalg.norm(emb), keyframe_jpeg=rng.bytes(int(rng.integers(0, 5000))))
        print(row.id, seed, flush=True)
        i += 1
""")


def expected(seed: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(49, 3000))
    emb = rng.standard_normal(32).astype(np.float32)
    tokens = rng.standard_normal((n, 96)).astype(np.float16)
    jpeg = rng.bytes(int(rng.integers(0, 5000)))
    return tokens, emb / np.linalg.norm(emb), jpeg


def check_readers_view(path: Path) -> int:
    """What a concurrent reader sees must be whole: every listed segment reads back and passes its checksum."""
    with Memory.open(path, readonly=True) as reader:
        rows = reader.segments(stream="cam") if reader.has_stream("cam") else []
        for row in rows[-20:]:
            tokens, _, _ = expected(int(row.start))
            np.testing.assert_array_equal(reader.read_tokens(row), tokens)
        return len(rows)


@pytest.mark.slow
def test_sigkill_during_ingest_loses_nothing_committed(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = tmp_path / "memory"
    committed: dict[int, int] = {}  # segment id -> seed
    compared: set[int] = set()  # segments whose bytes were compared with what the child wrote
    rnd = random.Random(5)
    kills = 0
    runs = 12
    for run in range(runs):
        child = subprocess.Popen([sys.executable, str(script), str(path), str(run)], stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + rnd.uniform(0.05, 0.8)
        seen_by_reader = 0
        while time.monotonic() < deadline:
            if path.joinpath("memory.sqlite").exists():
                seen_by_reader = check_readers_view(path)
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        assert child.returncode == -signal.SIGKILL
        kills += 1
        for line in out.splitlines():
            seg_id, seed = line.split()
            committed[int(seg_id)] = int(seed)

        with Memory.open(path) as memory:
            rows = {row.id: row for row in memory.segments(stream="cam")} if memory.has_stream("cam") else {}
            # Nothing the child reported committed is lost; at most the segment in flight is extra.
            assert set(committed) <= set(rows)
            assert len(set(rows) - set(committed)) <= 1
            assert len(rows) >= seen_by_reader
            assert all(int(rows[i].start) == seed for i, seed in committed.items())  # the times it was given
            # Byte for byte against what the child wrote: each run the segments new since the last, the last run all
            # of them again; verify() re-reads every segment's tokens and keyframe against their checksums each run.
            for seg_id, row in rows.items():
                if seg_id in compared and run < runs - 1:
                    continue
                tokens, emb, jpeg = expected(int(row.start))
                np.testing.assert_array_equal(memory.read_tokens(row), tokens)  # also checks the CRC
                assert memory.keyframe_jpeg(row) == (jpeg or None)
                compared.add(seg_id)
            report = memory.verify()
            assert report["bad"] == [] and report["missing_from_index"] == [] and report["extra_in_index"] == []
            if rows:
                probe = max(rows)
                _, emb, _ = expected(int(rows[probe].start))
                best, score = memory.search(emb, k=1)[0]
                assert best.id == probe and score == pytest.approx(1.0, abs=1e-5)
            committed = {i: int(rows[i].start) for i in rows}
    assert kills >= 10
    assert len(committed) > 20
