"""20 cameras at 2 fps against one live server: it stays up and every frame is accounted for (bench/live.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "live.py"


@pytest.mark.slow
def test_twenty_clients_at_two_fps_are_served_and_every_frame_is_accounted_for(tiny_models, videos):
    clients, fps, seconds = 20, 2, 10
    result = subprocess.run(
        [sys.executable, str(BENCH), "--clients", str(clients), "--fps", str(fps), "--seconds", str(seconds),
         "--streams", "10", "--model", str(tiny_models.llava), "--embedder", str(tiny_models.clip),
         "--video", str(videos["test.mp4"]["file"])],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    frames = figures["frames"]
    assert figures["server_up"] and figures["streams_finished"] == 10
    assert frames["sent"] == clients * fps * seconds == frames["received"]
    assert frames["received"] == frames["stored"] + frames["dropped"] and figures["accounted"]
    assert frames["in_segments"] > 0 and frames["segments"] > 0
    assert figures["ack_latency_ms"]["n"] > 0
    answer = figures["answer_under_load"]
    assert "error" not in answer, answer
    assert answer["segments"] > 0 and answer["ttft_s"] <= answer["answer_s"]
