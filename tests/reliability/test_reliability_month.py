"""A month in an hour (bench/soak.py): 8 streams over a simulated month, 2 real cameras flapping, a question every
few seconds, under a disk budget. The bounded run lasts a minute; `--soak` (or VIDMEM_SOAK=1) runs
VIDMEM_SOAK_MONTH_MIN minutes (default 60), the README's figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rel_support import cli_env

REPO = Path(__file__).resolve().parents[2]
BUDGET_MB = 8.0


@pytest.mark.slow
def test_a_simulated_month_stays_under_budget_answers_or_refuses_and_loses_no_camera(tmp_path, tiny_models, soak):
    minutes = float(os.environ.get("VIDMEM_SOAK_MONTH_MIN", "60")) if soak else 1.0
    command = [sys.executable, str(REPO / "bench" / "soak.py"), "--model", str(tiny_models.llava), "--embedder",
               str(tiny_models.clip), "--minutes", str(minutes), "--budget-mb", str(BUDGET_MB),
               "--max-outage", str(5.0 if not soak else 60.0), "--workdir", str(tmp_path / "soak")]
    done = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=minutes * 60 + 600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["crashed_tasks"] == [] and result["failed"] == [], result
    assert 0 < result["disk_max_bytes"] <= BUDGET_MB * 1e6, result  # never over the budget, sampled every second
    assert result["segments_written"] > result["segments_kept"] > 0  # the oldest went; the memory is not empty
    assert result["questions"] > 0 and result["answered"] > 0
    assert result["answered"] + result["refused"] == result["questions"]  # every question answered or refused
    assert result["sources_lost"] == [], result["cameras_state"]  # no camera was given up
    for name, state in result["cameras_state"].items():
        assert result["outages"][name] and state["reconnects"] >= 1, (name, state)  # down and back, again and again
    rss = result["rss_mb"]
    assert rss["last_quarter"] - rss["second_quarter"] < 256, rss  # a leak detector; the README has the figures
