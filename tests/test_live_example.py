"""examples/live_camera keeps working: run.sh starts `vidmem serve`, client.py streams a real video and asks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from services import free_port

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "live_camera"


def test_the_live_camera_example_streams_a_video_and_gets_a_cited_answer(tiny_models, talking_llava, videos, tmp_path):
    env = {
        **os.environ, "PORT": str(free_port()), "VIDMEM_TOKEN": "example-token", "VIDMEM_MEMORY": str(tmp_path / "memory"),
        "VIDMEM_MODEL": str(talking_llava), "VIDMEM_EMBEDDER": str(tiny_models.clip), "VIDMEM_DEVICE": "cpu",
        "PYTHON": sys.executable, "JSON": "1", "SECONDS_OF_VIDEO": "4",
    }
    result = subprocess.run(["bash", str(EXAMPLE / "run.sh"), str(videos["demo.mp4"]["file"]), "Who is winning?"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["type"] == "answer" and answer["id"] == "q1" and answer["text"].strip()
    assert answer["sent"] >= 8 and answer["ack"]["frames"] == answer["sent"]
    assert answer["segments"] and all(s["stream"] == "example" and s["start"] <= s["end"] for s in answer["segments"])
    assert "vidmem: serving http://127.0.0.1:" in result.stderr  # the server printed where to find it
