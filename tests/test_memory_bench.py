"""`python bench/memory.py --quick` runs and reports the figures the README quotes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_memory_bench_prints_one_json_line_of_figures(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "memory.py"), "--quick", "--queries", "60",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = done.stdout.strip().splitlines()
    figures = json.loads(line)
    at_10k = figures["search"]["10000"]
    for name in ("none", "one_of_4_streams", "last_hour", "one_stream_last_day"):
        assert at_10k[name]["p50_ms"] > 0 and at_10k[name]["p99_ms"] >= at_10k[name]["p50_ms"]
        assert at_10k[name]["recall_at_10"] >= 0.9
    # 245 fp16 tokens x 1152 per 4 s segment is 141 KB/s before the keyframe JPEG and the SQLite rows.
    assert 141_000 < figures["disk"]["float16"]["bytes_per_second"] < 160_000
    assert figures["disk"]["int8"]["bytes_per_second"] < figures["disk"]["float16"]["bytes_per_second"] * 0.6
    assert len(figures["ram"]["rss_mb"]) == len(figures["ram"]["segments"]) > 5
