"""The CLI contract end to end: a real video in, a cited answer out, and one clear line for every bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONTRACT_INGEST = {"stream", "segments", "frames", "visual_tokens", "video_seconds", "wall_seconds", "dropped_frames", "cuts"}
CONTRACT_ASK = {"answer", "segments", "visual_tokens", "ttft_seconds", "seconds"}


def vidmem(*args: str, memory: Path, models=None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vidmem", *args, "--memory", str(memory)]
    if models is not None:
        command += ["--model", str(models.llava), "--embedder", str(models.clip), "--device", "cpu"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    environment.pop("VIDMEM_DEBUG", None)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def vidmem_in_process(capfd: pytest.CaptureFixture, *args: str, memory: Path,
                      models=None) -> subprocess.CompletedProcess:
    """`vidmem ARGS` through `vidmem.agents.cli.main`, the function the `vidmem` script calls, in this process: the
    same parsing, output and exit status, without a Python start-up (seconds of imports per call on two cores).
    For the tests whose subject is what a command does; the tests here run the script itself. stdout and stderr are
    read at the file-descriptor level; the environment variables main() sets are put back afterwards."""
    from vidmem.agents.cli import main

    argv = [*args, "--memory", str(memory)]
    if models is not None:
        argv += ["--model", str(models.llava), "--embedder", str(models.clip), "--device", "cpu"]
    saved = dict(os.environ)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.pop("VIDMEM_DEBUG", None)
    capfd.readouterr()  # what came before is not this command's output
    try:
        code = main(argv)
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)
    out, err = capfd.readouterr()
    # the exit status `sys.exit(main())` gives: None is 0
    return subprocess.CompletedProcess(["vidmem", *argv], 0 if code is None else code, out, err)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("vidmem: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def ingested(testvideo_ingested):
    """testvideo.mp4 ingested once through the CLI into a fresh memory (once per session: conftest.py)."""
    return testvideo_ingested


def test_ingest_reports_the_contract_json(ingested, videos):
    _, report = ingested
    assert CONTRACT_INGEST <= set(report)
    assert report["stream"] == "testvideo"
    duration = videos["testvideo.mp4"]["probe"]["container_duration_s"]
    assert abs(report["video_seconds"] - duration) < 1.5
    assert report["segments"] >= 6, "24 s at 1 fps in segments of at most 4 frames"
    assert 196 * report["segments"] <= report["visual_tokens"] <= 245 * report["segments"]
    assert report["visual_tokens"] / report["frames"] <= 196, "slow-fast tokens per frame stay far below 729"
    assert all(0 < cut < duration for cut in report["cuts"])


def test_the_feature_cache_is_on_by_default_and_stores_the_same_segments(ingested, tiny_models, videos, tmp_path,
                                                                          capfd):
    """testvideo.mp4 holds still stretches: by default the STC cacher reuses their frames' vision features instead of
    running the tower again; `--no-feature-cache` runs the tower on every frame and stores the same segments."""
    memory, cached = ingested
    assert 0 < cached["cached_frames"] < cached["frames"]
    result = vidmem_in_process(capfd, "ingest", str(videos["testvideo.mp4"]["file"]), "--no-feature-cache", "--json",
                               memory=tmp_path / "memory", models=tiny_models)
    assert result.returncode == 0, result.stderr
    plain = json.loads(result.stdout)
    assert plain["cached_frames"] == 0
    assert [plain[k] for k in ("segments", "frames", "visual_tokens", "cuts")] == \
        [cached[k] for k in ("segments", "frames", "visual_tokens", "cuts")]


def test_ask_answers_with_cited_segments_within_the_budget(ingested, tiny_models, videos):
    memory, _ = ingested
    result = vidmem("ask", "what happens?", "--json", memory=memory, models=tiny_models)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert CONTRACT_ASK <= set(answer)
    assert isinstance(answer["answer"], str)
    assert 0 < answer["visual_tokens"] <= 6000
    assert answer["visual_tokens"] == sum(s["tokens"] for s in answer["segments"])
    duration = videos["testvideo.mp4"]["probe"]["container_duration_s"]
    for segment in answer["segments"]:
        assert {"stream", "start", "end", "tokens", "score"} <= set(segment)
        assert segment["stream"] == "testvideo" and 0 <= segment["start"] < segment["end"] <= duration + 1
    starts = [s["start"] for s in answer["segments"]]
    assert starts == sorted(starts)
    assert 245 in {s["tokens"] for s in answer["segments"]}, "a 4-frame segment in full detail costs 245 tokens"
    assert answer["ttft_seconds"] <= answer["seconds"]


def test_a_small_budget_and_a_time_range_are_respected(ingested, tiny_models):
    memory, _ = ingested
    result = vidmem("ask", "what is on screen?", "--json", "--budget", "500", "--since", "5", "--until", "0:15",
                    memory=memory, models=tiny_models)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert 0 < answer["visual_tokens"] <= 500
    assert all(s["end"] >= 5 and s["start"] <= 15 for s in answer["segments"])


def test_stats_reports_what_the_memory_holds(ingested):
    memory, report = ingested
    result = vidmem("stats", "--json", memory=memory)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["segments"] >= report["segments"]
    assert [s["name"] for s in stats["streams"]] == ["testvideo"]
    assert stats["bytes"] > 0


def test_bad_inputs_get_one_clear_line_and_leave_no_memory(tmp_path, tiny_models, ingested):
    memory = tmp_path / "memory"
    missing = one_line_error(vidmem("ingest", str(tmp_path / "nope.mp4"), memory=memory, models=tiny_models))
    assert "nope.mp4" in missing
    text_file = tmp_path / "notes.mp4"
    text_file.write_text("this is not a video\n" * 50)
    one_line_error(vidmem("ingest", str(text_file), memory=memory, models=tiny_models))
    assert not memory.exists() or not any(memory.iterdir()), "a failed ingest leaves no memory behind"
    one_line_error(vidmem("ask", "anything?", memory=memory, models=tiny_models))

    populated, _ = ingested
    unknown = one_line_error(vidmem("ask", "what?", "--stream", "garage", memory=populated, models=tiny_models))
    assert "garage" in unknown and "testvideo" in unknown
    small = one_line_error(vidmem("ask", "what?", "--budget", "50", memory=populated, models=tiny_models))
    assert "budget" in small
    batch = one_line_error(vidmem("serve", "--encode-batch", "-1", memory=memory, models=tiny_models))
    assert "--encode-batch" in batch and not memory.exists()
    # a server whose memory cannot be opened says so at start, instead of serving and failing its first client
    text_file.rename(memory)
    not_a_dir = one_line_error(vidmem("serve", "--port", "0", memory=memory, models=tiny_models))
    assert "is a file" in not_a_dir


def test_missing_model_offline_says_how_to_point_at_a_local_checkpoint(tmp_path, videos):
    memory = tmp_path / "memory"
    result = vidmem("ingest", str(videos["bikes.mp4"]["file"]), "--model", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
                    memory=memory, timeout=120)
    line = one_line_error(result)
    assert "--model" in line
    assert not memory.exists() or not any(memory.iterdir())
