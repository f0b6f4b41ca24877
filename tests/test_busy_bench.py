"""Questions beside 8 live streams (bench/busy.py --quick): every figure is there, the streams encoded together."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "busy.py"


@pytest.mark.slow
def test_busy_bench_quick_reports_ttft_idle_and_beside_eight_live_streams(videos):
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--video", str(videos["test.mp4"]["file"])],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON line on stdout, progress on stderr
    result = json.loads(lines[0])
    assert result["bench"] == "busy" and result["streams"] == 8
    assert result["model"] and set(result["runtime"]) == {"vision_tower", "language_model"}
    assert result["machine"]["load_average"] is not None
    for phase in ("idle", "busy_batched", "busy_unbatched"):
        figures = result[phase]
        assert len(figures["ttft_s"]) == result["questions"] and figures["ttft_median_s"] > 0
        assert all(tokens > 0 for tokens in figures["prefill_tokens"])
    for phase in ("busy_batched", "busy_unbatched"):
        figures = result[phase]
        assert figures["segments"] > 0 and figures["segments_per_s"] > 0  # the live streams were ingested
        assert figures["frames_pushed"] == 8 * result["fps"] * result["seconds"]
        assert figures["refreshes"]["run"] > 0 and figures["refreshes"]["failed"] == 0
        assert result[f"{phase}_over_idle"] > 0
    batched, unbatched = result["busy_batched"]["encoding"], result["busy_unbatched"]["encoding"]
    assert batched["multi_stream_calls"] > 0 and batched["calls"] < batched["requests"]  # shared tower calls
    assert unbatched["calls"] == 0  # each stream encoded alone: the shared encoder was not used
