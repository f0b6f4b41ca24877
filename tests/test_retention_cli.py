"""`vidmem retention`: limits stored in the memory, shown by `vidmem stats`, enforced by every ingest, oldest first."""
from __future__ import annotations

import json

import pytest
from test_cli import one_line_error, vidmem, vidmem_in_process

from vidmem.agents.cli import parse_duration, parse_size
from vidmem.errors import ConfigError
from vidmem.memory import Memory


def _stats(capfd, memory) -> dict:
    result = vidmem_in_process(capfd, "stats", "--json", memory=memory)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_a_disk_budget_keeps_stats_under_it_across_three_ingests(tmp_path, tiny_models, videos, capfd):
    """The CLI's main in-process (each command costs a model load, not a Python start-up); the refusals below run the
    `vidmem` script itself."""
    video = str(videos["test.mp4"]["file"])  # 10 s: five or more segments of at most 4 frames at 2 fps
    # How much one ingest takes (it depends on the checkpoint's widths): the budget holds one and a half of them.
    scratch = tmp_path / "scratch"
    assert vidmem_in_process(capfd, "ingest", video, "--fps", "2", memory=scratch, models=tiny_models).returncode == 0
    measured = _stats(capfd, scratch)
    one, whole = measured["disk_bytes"], measured["segments"]
    assert whole >= 4
    memory = tmp_path / "memory"
    budget = int(one * 1.5)
    result = vidmem_in_process(capfd, "retention", "--max-bytes", str(budget), "--json", memory=memory)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["max_bytes"] == budget
    kept = []
    for stream in ("first", "second", "third"):
        result = vidmem_in_process(capfd, "ingest", video, "--stream", stream, "--fps", "2", "--json", memory=memory,
                                   models=tiny_models)
        assert result.returncode == 0, result.stderr
        stats = _stats(capfd, memory)
        assert stats["retention"]["max_bytes"] == budget  # stored in the memory, shown by stats
        assert 0 < stats["disk_bytes"] <= budget, stats
        kept.append({s["name"]: s["segments"] for s in stats["streams"]})
    assert kept[0]["first"] == whole  # one ingest fits
    # Over budget, the footage stored first went first: the first stream lost segments before the others did.
    assert kept[2].get("first", 0) < whole
    assert kept[2]["third"] == whole  # the newest ingest is whole
    assert kept[2].get("first", 0) <= kept[2]["second"] <= kept[2]["third"]
    # The memory stays consistent after deleting: every kept segment reads back, the index matches SQLite.
    with Memory.open(memory, readonly=True) as opened:
        report = opened.verify()
    assert report["bad"] == [] and report["missing_from_index"] == [] and report["extra_in_index"] == [], report

    # A stream's own age limit, shown per stream and enforced at once (recordings: keep the last N seconds).
    result = vidmem_in_process(capfd, "retention", "--stream", "third", "--max-age", "4s", "--json", memory=memory)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["deleted_segments"] > 0
    third = next(s for s in _stats(capfd, memory)["streams"] if s["name"] == "third")
    assert third["retention"] == {"max_age_seconds": 4.0, "max_bytes": None}
    assert third["end"] - third["start"] < 4.0 + 4.0  # the last 4 s of the 10, to whole segments
    assert third["segments"] < whole


def test_retention_refuses_bad_values_with_one_line(tmp_path):
    memory = tmp_path / "memory"
    assert "size" in one_line_error(vidmem("retention", "--max-bytes", "12xb", memory=memory))
    assert "age" in one_line_error(vidmem("retention", "--max-age", "soon", memory=memory))
    assert "stream" in one_line_error(vidmem("retention", "--stream", "a..b", "--max-age", "7d", memory=memory))


def test_sizes_and_ages_read_as_people_write_them():
    assert parse_size("20GB") == 20 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("500 mb") == 500 * 10**6
    assert parse_size("4096") == 4096
    assert parse_size("none") is None
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("90") == 90
    assert parse_duration("12h") == 43200
    for bad in ("-1GB", "GB", "1 parsec"):
        with pytest.raises(ConfigError):
            parse_size(bad)
