"""Shared fixtures: the real test videos and tiny offline checkpoints built from transformers configs."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vidmem reliability")
    group.addoption("--soak", action="store_true", default=False,
                    help="long reliability runs: a 10-minute soak (VIDMEM_SOAK_S), more kills and fuzzed inputs")


def _testdata_dir() -> Path:
    return Path(os.environ.get("VIDMEM_TESTDATA", REPO.parent / "shared" / "testdata")).resolve()


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The folder of real test videos (`VIDMEM_TESTDATA`, default ../shared/testdata)."""
    folder = _testdata_dir()
    if not (folder / "videos.json").is_file():
        pytest.skip(f"test videos not found at {folder}; set VIDMEM_TESTDATA to the folder holding videos.json")
    return folder


@pytest.fixture(scope="session")
def videos(testdata: Path) -> dict:
    """videos.json's entries keyed by file name, each with an absolute `file` path added."""
    entries = json.loads((testdata / "videos.json").read_text())["videos"]
    for entry in entries.values():
        entry["file"] = testdata / entry["path"]
    return entries


# ---- tiny offline checkpoints (tests/checkpoints.py), built once per session --------------------------------


@dataclasses.dataclass(frozen=True)
class TinyModels:
    """Directories of tiny random checkpoints laid out like the real ones; load them with vidmem.agents.models."""

    llava: Path  # LLaVA-OneVision like llava-onevision-qwen2-0.5b-ov-hf: SigLIP 384/14 (729 patches), width 32
    llava_other: Path  # the same architecture with a different vision width (48) and seed: another encoder
    clip: Path  # sentence-transformers CLIP like clip-ViT-B-32 (embedding width 32)
    minilm: Path  # sentence-transformers text model like all-MiniLM-L6-v2 (embedding width 32)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Builds the tiny checkpoints into a session temporary directory (a few seconds, nothing downloaded)."""
    from checkpoints import build_tiny_clip, build_tiny_llava, build_tiny_minilm

    root = tmp_path_factory.mktemp("tiny-models")
    return TinyModels(
        llava=build_tiny_llava(root / "llava", seed=0, vision_hidden=32),
        llava_other=build_tiny_llava(root / "llava-other", seed=1, vision_hidden=48),
        clip=build_tiny_clip(root / "clip"),
        minilm=build_tiny_minilm(root / "minilm"),
    )


@pytest.fixture(scope="session")
def testvideo_ingested(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels,
                       videos: dict) -> tuple[Path, dict]:
    """testvideo.mp4 ingested through the `vidmem` script into a fresh memory, and its JSON report: once for the
    tests that only read it (test_cli.py, test_chat_cli.py)."""
    from test_cli import vidmem

    memory = tmp_path_factory.mktemp("cli") / "memory"
    result = vidmem("ingest", str(videos["testvideo.mp4"]["file"]), "--json", memory=memory, models=tiny_models)
    assert result.returncode == 0, result.stderr
    return memory, json.loads(result.stdout)


TALKING_ANSWER = (
    "The camera shows a person who walks into the room, looks around, picks up a cup from the table and then "
    "leaves through the door on the left."
)


@pytest.fixture(scope="session")
def talking_llava(tiny_models: TinyModels, videos: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-OneVision taught, through `vidmem train --objective qa --train-llm`, to describe footage in one
    long sentence: for the tests that need an answer that streams for a while (a browser showing it, a kill in the
    middle of it). Random weights stop at once under the checkpoint's plain generation config; this model has
    learned to talk, so nothing about decoding is rigged."""
    from vidmem.agents.models import load_vlm
    from vidmem.compressors.train import TrainOptions, train

    root = tmp_path_factory.mktemp("talking")
    questions = ["What happens in the video?", "What do you see right now?", "What happens?", "Is anyone there?"]
    lines = [{"video": str(videos[name]["file"]), "question": q, "answer": TALKING_ANSWER}
             for name in ("test.mp4", "demo.mp4") for q in questions]
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    options = TrainOptions(data=data, output=root / "talk.safetensors", objective="qa", compressor="pool",
                           train_llm=True, output_model=root / "model", steps=40, lr=3e-3, max_frames=8,
                           cache_dir=root / "cache", log_every=0)
    train(options, vlm=load_vlm(str(tiny_models.llava), device="cpu"))
    return root / "model"
