"""`vidmem chat`: a conversation in the terminal, follow-ups reusing the kept cache, commands to change the scope."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from test_cli import ingested  # noqa: F401 - the module's fixture: testvideo.mp4 ingested through the CLI


def chat(memory, models, lines: list[str], *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vidmem", "chat", "--memory", str(memory), "--model", str(models.llava),
               "--embedder", str(models.clip), "--device", "cpu", "--max-new-tokens", "8", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VIDMEM_DEBUG", None)
    return subprocess.run(command, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300,
                          env=env)


def test_a_follow_up_reuses_the_cache_and_commands_change_the_scope(ingested, tiny_models):  # noqa: F811
    memory, _ = ingested
    result = chat(memory, tiny_models, ["What happens?", "And after that?", "/since 12", "What happens now?",
                                        "/stream nowhere", "Still there?", "/quit", "Never asked"], "--json")
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["question"] for a in answers] == ["What happens?", "And after that?", "What happens now?",
                                                "Still there?"]
    first, follow_up, ranged, still = answers
    assert first["cached_tokens"] == 0 and follow_up["cached_tokens"] > 0  # the follow-up prefills only itself
    assert follow_up["prefill_tokens"] < first["prefill_tokens"]
    assert follow_up["conversation"] == first["conversation"] and follow_up["segments"] == first["segments"]
    assert ranged["conversation"] != first["conversation"] and ranged["cached_tokens"] == 0  # a new range, anew
    assert all(s["end"] >= 12.0 for s in ranged["segments"])
    assert still["conversation"] == ranged["conversation"]  # the unknown stream was refused, the scope kept
    errors = [line for line in result.stderr.splitlines() if line.startswith("vidmem: error: ")]
    assert len(errors) == 1 and "nowhere" in errors[0] and "Traceback" not in result.stderr


def test_chat_on_a_missing_memory_is_one_clear_line(tmp_path, tiny_models):
    result = chat(tmp_path / "none", tiny_models, ["hello"])
    assert result.returncode == 2
    assert result.stderr.strip().startswith("vidmem: error: ") and "Traceback" not in result.stderr
