"""`vidmem train` on real captioned videos, then `ingest` and `ask` with the checkpoint it wrote."""
from __future__ import annotations

import json

import pytest

from test_cli import one_line_error, vidmem


@pytest.mark.slow
def test_train_then_ingest_and_ask_with_the_checkpoint(tmp_path, tiny_models, videos):
    data = tmp_path / "captions.jsonl"
    pairs = [(videos["test.mp4"]["file"], caption) for caption in videos["test.mp4"]["captions"]]
    pairs.append((videos["demo.mp4"]["file"], f"Two people are {videos['demo.mp4']['label']} at a table."))
    data.write_text("".join(json.dumps({"video": str(path), "caption": text}) + "\n" for path, text in pairs))
    checkpoint = tmp_path / "timeperceiver.safetensors"
    memory = tmp_path / "memory"

    result = vidmem("train", str(data), "--output", str(checkpoint), "--steps", "30", "--lr", "3e-3",
                    "--max-frames", "8", "--json", memory=memory, models=tiny_models)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["last_loss"] < report["first_loss"], "training lowers the caption loss"
    assert checkpoint.is_file()

    ingest = vidmem("ingest", str(videos["test.mp4"]["file"]), "--compressor-weights", str(checkpoint), "--json",
                    memory=memory, models=tiny_models)
    assert ingest.returncode == 0, ingest.stderr
    assert json.loads(ingest.stdout)["segments"] > 0

    # The memory remembers which weights made its tokens: asking without them is a clear error ...
    line = one_line_error(vidmem("ask", "what is the person cleaning?", memory=memory, models=tiny_models))
    assert "--compressor-weights" in line
    # ... and with them, the trained projector reads the trained tokens.
    ask = vidmem("ask", "what is the person cleaning?", "--compressor-weights", str(checkpoint), "--json",
                 memory=memory, models=tiny_models)
    assert ask.returncode == 0, ask.stderr
    answer = json.loads(ask.stdout)
    assert isinstance(answer["answer"], str) and answer["segments"]
