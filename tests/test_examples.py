"""examples/recorded_footage keeps working: the script runs end to end and prints the contract's JSON."""
from __future__ import annotations

import json
import os
import subprocess

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_recorded_footage_example_ingests_asks_and_reports(tmp_path, tiny_models, videos):
    env = {**os.environ, "VIDMEM_MODEL": str(tiny_models.llava), "VIDMEM_EMBEDDER": str(tiny_models.clip),
           "HF_HUB_OFFLINE": "1"}
    script = REPO / "examples" / "recorded_footage" / "run.sh"
    result = subprocess.run(["bash", str(script), str(videos["bikes.mp4"]["file"]), str(tmp_path / "memory")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    ingest, first, ranged, stats = (json.loads(line) for line in result.stdout.splitlines() if line.startswith("{"))
    assert ingest["stream"] == "footage" and ingest["segments"] > 0
    assert len(ingest["cuts"]) >= 4, "bikes.mp4 has five hard cuts"
    assert isinstance(first["answer"], str) and first["visual_tokens"] <= 6000
    assert ranged["visual_tokens"] <= 1000 and all(s["start"] <= 10 for s in ranged["segments"])
    assert stats["segments"] == ingest["segments"]
