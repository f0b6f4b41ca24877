"""`vidmem train` from the command line: on real captioned videos with validation, then `ingest` and `ask` with the
checkpoint it wrote; question answering with `--train-llm`, then `ask` with the language model it trained;
resuming, and bad input refused in one line.

Commands that do their work run through the CLI's main in-process (the function the `vidmem` script calls: each
costs a model load, not a Python start-up); the refusals run the `vidmem` script itself, as a user sees them."""
from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_cli import one_line_error, vidmem, vidmem_in_process
from test_train_compressors import BLUE, RED, square_video, write_jsonl

TINY_TP = ["--compressor-option", "depth=1", "--compressor-option", "heads=2", "--compressor-option", "dim_head=16"]


@pytest.mark.slow
def test_train_with_validation_then_ingest_and_ask_with_the_checkpoint(tmp_path, tiny_models, videos, capfd):
    from vidmem.compressors.dataset import video_digest
    from vidmem.memory import Memory

    pairs = [(videos["test.mp4"]["file"], caption) for caption in videos["test.mp4"]["captions"]]
    pairs.append((videos["demo.mp4"]["file"], f"Two people are {videos['demo.mp4']['label']} at a table."))
    data = write_jsonl(tmp_path / "captions.jsonl", [{"video": str(path), "caption": text} for path, text in pairs])
    checkpoint = tmp_path / "timeperceiver.safetensors"
    memory, cache = tmp_path / "memory", tmp_path / "cache"

    result = vidmem_in_process(capfd, "train", str(data), "--output", str(checkpoint), "--steps", "6", "--lr", "3e-3",
                               "--max-frames", "8", "--val-split", "0.5", "--cache-dir", str(cache), *TINY_TP, "--json",
                               memory=memory, models=tiny_models)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["last_loss"] < report["first_loss"], "training lowers the caption loss"
    assert report["samples"] + report["val_samples"] == 3 and report["val_samples"] >= 1  # whole videos held out
    assert report["epochs"] and all(isinstance(e["val_loss"], float) for e in report["epochs"])
    assert report["val_loss"] == report["epochs"][-1]["val_loss"] and report["epochs"][-1]["step"] == 6
    assert checkpoint.is_file() and (tmp_path / "timeperceiver.state.safetensors").is_file()

    ingest = vidmem_in_process(capfd, "ingest", str(videos["test.mp4"]["file"]), "--compressor-weights",
                               str(checkpoint), "--json", memory=memory, models=tiny_models)
    assert ingest.returncode == 0, ingest.stderr
    assert json.loads(ingest.stdout)["segments"] > 0

    # training saw the segments ingest stored, with the same times
    index = next(cache.glob(f"{video_digest(videos['test.mp4']['file'])}-*"))
    trained_on = [(r["start"], r["end"], r["frames"]) for r in json.loads((index / "segments.json").read_text())]
    with Memory.open(memory, readonly=True) as stored:
        assert [(s.start, s.end, s.frames) for s in stored.segments(stream="test")] == trained_on

    # The memory remembers which weights made its tokens: asking without them is a clear error (the script, run
    # while the next ask runs here: asking reads the memory, it does not write it) ...
    with ThreadPoolExecutor(max_workers=1) as pool:
        refused = pool.submit(vidmem, "ask", "what is the person cleaning?", memory=memory, models=tiny_models)
        # ... and with them, the trained projector reads the trained tokens.
        ask = vidmem_in_process(capfd, "ask", "what is the person cleaning?", "--compressor-weights", str(checkpoint),
                                "--json", memory=memory, models=tiny_models)
    assert "--compressor-weights" in one_line_error(refused.result())
    assert ask.returncode == 0, ask.stderr
    assert json.loads(ask.stdout)["segments"]


@pytest.mark.slow
def test_train_llm_on_questions_then_ask_answers_with_the_trained_language_model(tmp_path, tiny_models, capfd):
    video = square_video(tmp_path / "red.mp4", RED)
    square_video(tmp_path / "blue.mp4", BLUE, seed=1)
    question = "What colour is the square?"
    data = write_jsonl(tmp_path / "qa.jsonl", [{"video": "red.mp4", "question": question, "answer": "red"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"video": "blue.mp4", "question": question, "answer": "blue"}])
    checkpoint, model = tmp_path / "qa.safetensors", tmp_path / "qa-model"
    memory, cache = tmp_path / "memory", tmp_path / "cache"
    train = ["train", str(data), "--objective", "qa", "--train-llm", "--output", str(checkpoint),
             "--output-model", str(model), "--lr", "1e-2", "--val", str(val), "--cache-dir", str(cache), *TINY_TP]

    result = vidmem_in_process(capfd, *train, "--steps", "20", "--json", memory=memory, models=tiny_models)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model_dir"] == str(model) and (model / "config.json").is_file()
    assert len(report["epochs"]) == 20 and report["val_samples"] == 1
    assert report["last_loss"] < 0.5 * report["first_loss"]

    # ask with the model directory it wrote: the trained language model answers what it was taught
    trained = ["--model", str(model), "--embedder", str(tiny_models.clip), "--device", "cpu"]
    ingest = vidmem_in_process(capfd, "ingest", str(video), *trained, "--compressor-weights", str(checkpoint),
                               memory=memory)
    assert ingest.returncode == 0, ingest.stderr
    with ThreadPoolExecutor(max_workers=1) as pool:  # the refusal below, by the script, while this ask runs here
        refused = pool.submit(vidmem, "ask", question, "--compressor-weights", str(checkpoint), memory=memory,
                              models=tiny_models)
        ask = vidmem_in_process(capfd, "ask", question, *trained, "--compressor-weights", str(checkpoint), "--json",
                                "--max-new-tokens", "8", memory=memory)
    assert ask.returncode == 0, ask.stderr
    assert "red" in json.loads(ask.stdout)["answer"].lower()
    # the stock model with those weights would answer with an untrained language model: refused, naming the directory
    assert f"--model {model.resolve()}" in one_line_error(refused.result())

    # resume: more steps continue from step 20 (the trained model directory is found from the state) ...
    more = vidmem_in_process(capfd, *train, "--steps", "22", "--resume", str(checkpoint), "--device", "cpu", "--json",
                             memory=memory)
    assert more.returncode == 0, more.stderr
    resumed = json.loads(more.stdout)
    assert resumed["start_step"] == 20 and resumed["steps"] == 22 and len(resumed["losses"]) == 22
    assert resumed["losses"][:20] == report["losses"]
    # ... and a run that does not match (here: the stock language model) is refused in one line
    line = one_line_error(vidmem(*train, "--steps", "30", "--resume", str(checkpoint), memory=memory,
                                 models=tiny_models))  # the stock model, not the one that run trained
    assert "cannot resume from" in line and "language model" in line


def test_train_refuses_bad_input_with_one_line(tmp_path, tiny_models, videos):
    demo = str(videos["demo.mp4"]["file"])
    good = write_jsonl(tmp_path / "good.jsonl", [{"video": demo, "question": "Who?", "answer": "two people"}])
    bad = {
        "missing.jsonl": ([str(tmp_path / "missing.jsonl")], "training data not found"),
        "no answer": ([str(write_jsonl(tmp_path / "a.jsonl", [{"video": demo, "question": "Who?"}])), "--objective", "qa"],
                      'needs a non-empty "answer"'),
        "both validations": ([str(good), "--objective", "qa", "--val", str(good), "--val-split", "0.2"],
                             "either a validation file or val_split"),
        "one video to split": ([str(good), "--objective", "qa", "--val-split", "0.2"], "at least two videos"),
        "no state": ([str(good), "--objective", "qa", "--resume", str(tmp_path / "nothing.safetensors")],
                     "checkpoint not found"),
        "llm without text": ([str(good), "--objective", "reconstruction", "--compressor", "svc", "--train-llm"],
                             "train_llm needs the caption or qa objective"),
    }

    def refuse(args: list[str]) -> subprocess.CompletedProcess:
        return vidmem("train", *args, "--output", str(tmp_path / "x.safetensors"), "--cache-dir",
                      str(tmp_path / "cache"), memory=tmp_path / "m", models=tiny_models)

    # separate processes, two at a time: the refusals are independent and none may write the output
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(bad, pool.map(refuse, [args for args, _ in bad.values()])))
    for name, (_, message) in bad.items():
        assert message in one_line_error(results[name]), name
    assert not (tmp_path / "x.safetensors").exists()
