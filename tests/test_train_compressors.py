"""`vidmem train`'s engine on real and synthesized video with a tiny LLaVA-OneVision: video read as ingest reads it
(a rotated video upright), features cached on disk, the answering prompt, validation, resume, the saved language
model, and the checkpoints that ingest and ask load."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from vidmem.compressors import build_compressor
from vidmem.compressors.checkpoint import load_compressor, load_state, save_checkpoint, state_path
from vidmem.compressors.dataset import FeatureCache, read_examples, sampled_frames, split_validation
from vidmem.compressors.train import TrainOptions, answer_loss, train
from vidmem.errors import ConfigError, EncoderMismatchError, ModelNotFoundError
from vidmem.stream.synth import static_scene, write_video

from checkpoints import build_tiny_llava

TINY_TP = {"depth": 1, "heads": 2, "dim_head": 16}  # a narrow TimePerceiver keeps CPU training quick
RED = (220, 20, 20)
BLUE = (20, 40, 220)


def _vlm(path: Path):
    from vidmem.agents.models import load_vlm

    return load_vlm(str(path), device="cpu")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


def square_video(path: Path, colour: tuple[int, int, int], *, seconds: float = 3.0, seed: int = 0) -> Path:
    """A still scene with a coloured square in the middle: one segment at 1 fps."""
    frames = list(static_scene(round(25 * seconds), seed=seed))
    for frame in frames:
        frame[60:120, 130:190] = colour
    write_video(path, frames, fps=25)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# -- video as ingest reads it --------------------------------------------------------------------------------
def test_a_rotated_training_video_is_seen_upright_and_its_features_are_cached_on_disk(llava_dir, tmp_path, caplog):
    upright = list(static_scene(50, seed=3, noise=0.0))  # 2 s, 320x180
    for frame in upright:
        frame[:40] = RED  # the top of the picture
    write_video(tmp_path / "upright.mp4", upright, fps=25)
    # stored turned a quarter clockwise, with display matrix side data saying to turn it back (as phones record)
    write_video(tmp_path / "rotated.mp4", [np.rot90(f, -1) for f in upright], fps=25, rotation=90)

    vlm = _vlm(llava_dir)
    cache = FeatureCache(tmp_path / "cache", vlm.encoder, fps=2.0)
    straight, turned = cache.segments(tmp_path / "upright.mp4"), cache.segments(tmp_path / "rotated.mp4")
    assert [(s.start, s.end) for s in turned] == [(s.start, s.end) for s in straight] == [(0.0, 2.0)]

    # the frames training encodes are the upright ones stream/ decodes, sampled at 2 fps
    frames = sampled_frames(tmp_path / "rotated.mp4", fps=2.0)
    assert len(frames) == 4 and frames[0].shape == (180, 320, 3)
    assert np.abs(frames[0].astype(float) - upright[0]).mean() < 8  # the picture as filmed, red band on top
    with torch.no_grad():
        expected = vlm.encoder(frames).to(torch.float16).float()  # (4, 729, D)
    features = turned[0].features()
    torch.testing.assert_close(features, expected, rtol=0, atol=0)

    # and they describe the upright picture: close to the upright file's (codec noise apart), far from the pixels
    # as stored
    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    with torch.no_grad():
        as_stored = vlm.encoder([np.rot90(frames[i], -1) for i in range(4)]).float()
    assert distance(features, straight[0].features()) < 0.2
    assert distance(as_stored, straight[0].features()) > 3 * distance(features, straight[0].features())

    # on disk, keyed by content, encoder and fps: a second cache over the same folder reads, never re-extracts
    folders = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(folders) == 2 and all(vlm.encoder.fingerprint in name and "fps2" in name for name in folders)
    (tmp_path / "copy.mp4").write_bytes((tmp_path / "rotated.mp4").read_bytes())
    with caplog.at_level(logging.INFO, logger="vidmem.compressors.dataset"):
        again = FeatureCache(tmp_path / "cache", vlm.encoder, fps=2.0).segments(tmp_path / "copy.mp4")
    assert "extracting" not in caplog.text
    torch.testing.assert_close(again[0].features(), features, rtol=0, atol=0)


# -- question answering, validation and the saved language model ---------------------------------------------
@pytest.mark.slow
def test_qa_training_reports_validation_and_saves_the_language_model_it_trained(llava_dir, tmp_path):
    square_video(tmp_path / "red.mp4", RED)
    square_video(tmp_path / "blue.mp4", BLUE, seed=1)
    question = "What colour is the square?"
    data = write_jsonl(tmp_path / "qa.jsonl", [
        {"video": "red.mp4", "question": question, "answer": "red"},
        {"video": "blue.mp4", "question": question, "answer": "blue", "since": 0, "until": 2.5},
    ])
    options = TrainOptions(
        data=data, output=tmp_path / "tp.safetensors", objective="qa", compressor_options=TINY_TP, steps=6, lr=1e-2,
        val_split=0.5, train_llm=True, cache_dir=tmp_path / "cache", log_every=0,
    )
    base = _vlm(llava_dir)
    vlm = _vlm(llava_dir)
    report = train(options, vlm=vlm)

    # one video trains, the other is held out: an epoch is one step, each followed by a validation loss
    assert (report.samples, report.val_samples) == (1, 1)
    assert [e["step"] for e in report.epochs] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(e["val_loss"], float) and e["val_loss"] > 0 for e in report.epochs)
    assert report.final_loss < report.first_loss
    assert report.to_json()["val_loss"] == report.epochs[-1]["val_loss"]

    # the model directory holds the language model as trained: loaded back, it scores answers exactly as the
    # trained module does, and not as the untrained model does
    assert report.model_dir == tmp_path / "tp-model" and (report.model_dir / "config.json").is_file()
    saved = _vlm(report.model_dir)
    compressor, projector_state = load_compressor(
        report.checkpoint, encoder_fingerprint=saved.encoder.fingerprint, dim=saved.encoder.dim,
        language_model=saved.language_model,
    )
    cache = FeatureCache(tmp_path / "cache", saved.encoder, fps=1.0)
    segments = cache.segments((tmp_path / "red.mp4").resolve())
    with torch.no_grad():
        losses = {}
        for name, model in (("trained", vlm), ("saved", saved), ("base", base)):
            model.projector.load_state_dict(projector_state)  # same compressor and projector for all three
            losses[name] = float(answer_loss(model, compressor, segments, question, "red", device=torch.device("cpu")))
    assert losses["saved"] == pytest.approx(losses["trained"], abs=1e-5)
    assert losses["trained"] < losses["base"] - 1.0

    # the checkpoint remembers that language model: the stock one is refused with the directory to load
    with pytest.raises(ConfigError, match=f"--model {report.model_dir.resolve()}"):
        load_compressor(report.checkpoint, encoder_fingerprint=base.encoder.fingerprint, dim=base.encoder.dim,
                        language_model=base.language_model)


# -- resume --------------------------------------------------------------------------------------------------
class _Interrupt(logging.Handler):
    """Ctrl-C after a given step: raises KeyboardInterrupt where the training loop logs that step."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.message = f"step {step}/"

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.message):
            raise KeyboardInterrupt


@pytest.mark.slow
def test_an_interrupted_run_keeps_its_work_and_resumes_to_the_same_weights(llava_dir, tmp_path):
    square_video(tmp_path / "red.mp4", RED)
    square_video(tmp_path / "blue.mp4", BLUE, seed=1)
    data = write_jsonl(tmp_path / "captions.jsonl", [
        {"video": "red.mp4", "caption": "A red square."}, {"video": "blue.mp4", "caption": "A blue square."},
    ])
    common = dict(data=data, compressor_options=TINY_TP, steps=6, lr=1e-2, cache_dir=tmp_path / "cache", log_every=1)
    whole = train(TrainOptions(output=tmp_path / "whole.safetensors", **common), vlm=_vlm(llava_dir))

    broken = TrainOptions(output=tmp_path / "broken.safetensors", **common)
    logger, handler = logging.getLogger("vidmem.compressors.train"), _Interrupt(4)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(broken, vlm=_vlm(llava_dir))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    state = load_state(broken.output)
    assert state.step == 4 and len(state.history["losses"]) == 4

    resumed = train(dataclasses.replace(broken, resume=broken.output), vlm=_vlm(llava_dir))
    assert resumed.start_step == 4 and resumed.steps == 6
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-6)  # the same batches in the same order
    assert [e["step"] for e in resumed.epochs] == [e["step"] for e in whole.epochs] == [2, 4, 6]
    vlm = _vlm(llava_dir)
    a, pa = load_compressor(whole.checkpoint, encoder_fingerprint=vlm.encoder.fingerprint, dim=vlm.encoder.dim)
    b, pb = load_compressor(resumed.checkpoint, encoder_fingerprint=vlm.encoder.fingerprint, dim=vlm.encoder.dim)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=1e-6)
    for key, value in pa.items():
        torch.testing.assert_close(pb[key], value, rtol=0, atol=1e-6)
    assert not torch.equal(pa["linear_1.weight"], vlm.projector.state_dict()["linear_1.weight"])  # it did train

    # a finished run asked for no more steps, and runs that differ, are refused with one sentence each
    with pytest.raises(ConfigError, match="already took 6 steps"):
        train(dataclasses.replace(broken, resume=broken.output), vlm=_vlm(llava_dir))
    refusals = {
        "compressor options": dataclasses.replace(broken, resume=broken.output, steps=8, compressor_options={**TINY_TP, "depth": 2}),
        "this run trains 'perceiver'": dataclasses.replace(broken, resume=broken.output, steps=8, compressor="perceiver", compressor_options={}),
        "objective": dataclasses.replace(broken, resume=broken.output, steps=8, objective="qa"),
    }
    for reason, options in refusals.items():
        if options.objective == "qa":
            options = dataclasses.replace(options, data=write_jsonl(tmp_path / "qa.jsonl", [
                {"video": "red.mp4", "question": "What colour?", "answer": "red"}]))
        with pytest.raises(ConfigError, match=f"cannot resume from .*{reason}") as error:
            train(options, vlm=_vlm(llava_dir))
        assert "\n" not in str(error.value)
    other = _vlm(build_tiny_llava(tmp_path / "other", seed=1, vision_hidden=48))
    with pytest.raises(ConfigError, match="cannot resume from .*vision encoder"):
        train(dataclasses.replace(broken, resume=broken.output, steps=8), vlm=other)
    state_path(broken.output).unlink()
    with pytest.raises(ConfigError, match="training state broken.state.safetensors is missing"):
        train(dataclasses.replace(broken, resume=broken.output, steps=8), vlm=_vlm(llava_dir))


# -- SVC reconstruction --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_svc_reconstruction_pretraining_learns_to_reconstruct_real_features(llava_dir, videos, tmp_path):
    vlm = _vlm(llava_dir)
    svc_options = {"bottleneck": 32, "depth": 1}
    data = write_jsonl(tmp_path / "videos.jsonl", [{"video": str(videos[name]["file"])} for name in ("test.mp4", "demo.mp4")])
    options = TrainOptions(
        data=data, output=tmp_path / "svc.safetensors", objective="reconstruction", compressor="svc",
        compressor_options=svc_options, steps=40, lr=5e-3, warmup=5, cache_dir=tmp_path / "cache", log_every=0,
    )
    report = train(options, vlm=vlm)
    trained, projector_state = load_compressor(report.checkpoint, encoder_fingerprint=vlm.encoder.fingerprint,
                                               dim=vlm.encoder.dim)
    assert projector_state is None  # reconstruction trains no projector
    untrained = build_compressor("svc", dim=vlm.encoder.dim, **svc_options)  # decodes as nearest upsampling
    cache = FeatureCache(tmp_path / "cache", vlm.encoder, fps=1.0)
    gains = []
    with torch.no_grad():
        for name in ("test.mp4", "demo.mp4"):
            for segment in cache.segments(Path(videos[name]["file"]).resolve()):
                features = segment.features()[None]  # (1, T, L, D)
                gains.append(float(untrained.reconstruction_loss(features)) - float(trained.reconstruction_loss(features)))
    assert all(gain > 0 for gain in gains)  # every segment is reconstructed better than from its average pool alone
    assert sum(gains) / len(gains) > 0.02


# -- checkpoints and data ------------------------------------------------------------------------------------
def test_a_checkpoint_for_another_vision_encoder_is_refused(llava_dir, tmp_path):
    vlm = _vlm(llava_dir)
    other = _vlm(build_tiny_llava(tmp_path / "other", seed=1))
    assert other.encoder.fingerprint != vlm.encoder.fingerprint
    path = save_checkpoint(
        tmp_path / "c.safetensors", build_compressor("pool", dim=vlm.encoder.dim), encoder_fingerprint=vlm.encoder.fingerprint
    )
    compressor, _ = load_compressor(path, encoder_fingerprint=vlm.encoder.fingerprint, dim=vlm.encoder.dim)
    assert compressor.name == "pool"
    with pytest.raises(EncoderMismatchError, match="trained on vision encoder"):
        load_compressor(path, encoder_fingerprint=other.encoder.fingerprint, dim=vlm.encoder.dim)
    with pytest.raises(EncoderMismatchError, match="width"):
        load_compressor(path, encoder_fingerprint=vlm.encoder.fingerprint, dim=vlm.encoder.dim * 2)
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_compressor(tmp_path / "missing.safetensors", encoder_fingerprint="x", dim=1)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelNotFoundError, match="not a vidmem compressor checkpoint"):
        load_compressor(tmp_path / "junk.safetensors", encoder_fingerprint="x", dim=1)


def test_bad_training_data_is_a_clear_error(tmp_path, videos):
    data = tmp_path / "bad.jsonl"
    demo = str(videos["demo.mp4"]["file"])
    cases = [
        ({"video": demo}, "caption", r"bad.jsonl:1 needs a non-empty \"caption\""),
        ({"video": demo, "question": "What?"}, "qa", r"bad.jsonl:1 needs a non-empty \"answer\" for the qa objective"),
        ({"video": demo, "question": "What?", "answer": "x", "since": "soon"}, "qa", r"\"since\" must be seconds"),
        ({"video": demo, "question": "What?", "answer": "x", "since": 5, "until": 2}, "qa", r"must come after"),
        ({"video": "nowhere.mp4", "caption": "x"}, "caption", "video not found"),
        ({"video": demo, "caption": "x", "since": 3, "until": 1}, "caption", r"must come after"),
    ]
    for row, objective, message in cases:
        write_jsonl(data, [row])
        with pytest.raises(ConfigError, match=message):
            read_examples(data, objective)
    # a caption may describe one stretch of its video
    write_jsonl(data, [{"video": demo, "caption": "a stretch", "since": 1, "until": 3}])
    assert [(e.caption, e.since, e.until) for e in read_examples(data, "caption")] == [("a stretch", 1.0, 3.0)]
    data.write_text("{oops\n")
    with pytest.raises(ConfigError, match="bad.jsonl:1 is not valid JSON"):
        read_examples(data, "reconstruction")
    with pytest.raises(ConfigError, match="objective must be one of"):
        TrainOptions(data=data, output=tmp_path / "x", objective="dance").validate()
    with pytest.raises(ConfigError, match="either a validation file or val_split"):
        TrainOptions(data=data, output=tmp_path / "x", val=data, val_split=0.2).validate()
    with pytest.raises(ConfigError, match="train_llm needs the caption or qa objective"):
        TrainOptions(data=data, output=tmp_path / "x", objective="reconstruction", train_llm=True).validate()
    assert TrainOptions(data=data, output=tmp_path / "x", objective="reconstruct").validate().objective == "reconstruction"


def test_the_validation_split_holds_out_whole_videos(tmp_path, videos):
    rows = [{"video": str(videos[name]["file"]), "caption": f"{name} {i}"}
            for name in ("test.mp4", "demo.mp4", "bikes.mp4", "counter.mp4") for i in range(3)]
    examples = read_examples(write_jsonl(tmp_path / "c.jsonl", rows), "caption")
    kept, held = split_validation(examples, 0.25, seed=0)
    assert len(held) == 3 and len(kept) == 9
    assert not {e.video for e in kept} & {e.video for e in held}
    assert split_validation(examples, 0.25, seed=0) == (kept, held)  # seeded
    assert len(split_validation(examples, 0.01, seed=0)[1]) == 3  # at least one video
    with pytest.raises(ConfigError, match="at least two videos"):
        split_validation(examples[:3], 0.5, seed=0)


def test_evidence_is_the_window_asked_for_thinned_to_whole_segments_evenly_spread(tmp_path):
    from vidmem.compressors.dataset import CachedSegment, batches, in_window, thin

    segments = [CachedSegment(4.0 * i, 4.0 * (i + 1), 4, 4, False, tmp_path / f"{i}.safetensors") for i in range(30)]
    assert in_window(segments, 10.0, 17.0) == segments[2:5]  # overlapping [10, 17]: 8-12, 12-16, 16-20
    assert in_window(segments, None, None) == segments
    shown = thin(segments, 24)  # 120 frames in all, at most 24 shown: 6 whole segments across the video
    assert len(shown) == 6 and shown[0] is segments[0] and shown[-1].start >= 80.0
    assert [s.start for s in shown] == sorted(s.start for s in shown)
    assert thin(segments, 2) == [segments[0]]  # never less than one segment
    # the batch order of a run resumed at any position is the order an unbroken run draws
    whole = [b for _, b in zip(range(12), batches(5, 2, seed=3))]
    assert whole[7:] == [b for _, b in zip(range(5), batches(5, 2, seed=3, start=14))]
    assert sorted(i for b in whole[:5] for i in b) == sorted(list(range(5)) * 2)  # every example once per epoch
