"""The ingest benchmark runs and reports what the README quotes: real-time factors and static-scene savings.

Its tower and whole-ingest runtime figures (`bench_tower`, `bench_live_rtf`) run in test_bench.py's report run, which
calls the same `bench/ingest.py --quick` and draws them; here `--no-runtime` leaves them out, and this checks the
decode and static-scene figures and the one JSON line.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ingest_bench_quick_prints_one_json_line(testdata):
    run = subprocess.run([sys.executable, str(REPO / "bench" / "ingest.py"), "--quick", "--no-runtime"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    videos = result["decode"]["videos"]
    assert set(videos) == {"bikes.mp4", "test.mp4", "testvideo.mp4"}
    assert all(v["decode_rtf"] > 0 and v["decode_sample_rtf"] > 0 for v in videos.values())
    assert videos["bikes.mp4"]["cuts"] == pytest.approx([1.2, 3.04, 5.48, 7.48, 9.68], abs=0.05)
    assert result["static_vs_busy"]["busy_over_static"] >= 10
    assert "skipped" in result["full"] and "--model" in result["full"]["skipped"]
