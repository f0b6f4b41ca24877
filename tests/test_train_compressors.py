"""`vidmem train`'s engine: Clapper stage 1 on video-caption pairs and SVC's video-only reconstruction pretraining,
on the real test videos and a tiny LLaVA-OneVision, and the checkpoints that ingest and ask load."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vidmem.compressors import build_compressor
from vidmem.compressors.base import pool_grid
from vidmem.compressors.train import (
    FeatureStore,
    TrainOptions,
    caption_loss,
    load_compressor,
    projector_of,
    read_jsonl,
    split_segments,
    train,
)
from vidmem.errors import ConfigError, EncoderMismatchError, ModelNotFoundError

from checkpoints import build_tiny_llava

TINY_TP = {"depth": 1, "heads": 2, "dim_head": 16}  # a narrow TimePerceiver keeps CPU training quick


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


def _vlm(path: Path):
    from vidmem.agents.models import load_vlm

    return load_vlm(str(path), device="cpu")


@pytest.fixture()
def captions(tmp_path, videos) -> Path:
    """test.mp4's two captions and demo.mp4's label; one line by a path relative to the JSONL's folder."""
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "test.mp4").symlink_to(videos["test.mp4"]["file"])
    rows = [{"video": "clips/test.mp4", "caption": text} for text in videos["test.mp4"]["captions"]]
    rows.append({"video": str(videos["demo.mp4"]["file"]), "caption": f"Two people are {videos['demo.mp4']['label']}."})
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


@pytest.mark.slow
def test_stage1_lowers_the_caption_loss_and_saves_a_loadable_checkpoint(llava_dir, captions, tmp_path):
    options = TrainOptions(
        data=captions, output=tmp_path / "tp.safetensors", model=str(llava_dir), compressor="timeperceiver",
        compressor_options=TINY_TP, steps=20, lr=1e-2, max_frames=8, device="cpu", log_every=0,
    )
    samples = read_jsonl(captions, need_captions=True)
    assert samples[0].video == (captions.parent / "clips" / "test.mp4").resolve()

    # the caption loss of every example before training (fresh compressor, stock projector)
    vlm = _vlm(llava_dir)
    features = FeatureStore(vlm.encoder, options)
    fresh = build_compressor("timeperceiver", dim=vlm.encoder.dim, **TINY_TP)
    with torch.no_grad():
        before = [caption_loss(vlm, fresh, projector_of(vlm.model), features(s.video), s.caption, options=options)[0]
                  for s in samples]

    report = train(options)  # loads the VLM through vidmem.agents.models.load_vlm, like `vidmem train`
    assert report.steps == 20 and len(report.losses) == 20 and report.samples == 3
    assert report.final_loss < report.first_loss - 0.1
    assert report.checkpoint.is_file() and report.to_json()["checkpoint"] == str(report.checkpoint)

    # the checkpoint restores the trained compressor and projector on a freshly loaded VLM
    vlm = _vlm(llava_dir)
    compressor, projector_state = load_compressor(
        report.checkpoint, encoder_fingerprint=vlm.encoder.fingerprint, dim=vlm.encoder.dim
    )
    assert compressor.name == "timeperceiver" and compressor.config()["depth"] == 1
    assert projector_state is not None and set(projector_state) == set(projector_of(vlm.model).state_dict())
    projector_of(vlm.model).load_state_dict(projector_state)
    with torch.no_grad():
        after = [caption_loss(vlm, compressor, projector_of(vlm.model), features(s.video), s.caption, options=options)[0]
                 for s in samples]
    assert sum(after) / 3 < sum(before) / 3 - 0.1

    # trained, the fast tokens are no longer just the pooled queries
    segment = split_segments(features(samples[0].video), 4)[0]
    with torch.no_grad():
        fast = compressor(segment).tokens[196:]
    assert not torch.allclose(fast, pool_grid(segment, 7).mean(dim=0), atol=1e-4)


@pytest.mark.slow
def test_svc_reconstruction_pretraining_learns_to_reconstruct_real_features(llava_dir, captions, tmp_path):
    vlm = _vlm(llava_dir)
    svc_options = {"bottleneck": 32, "depth": 1}
    options = TrainOptions(
        data=captions, output=tmp_path / "svc.safetensors", objective="reconstruction", compressor="svc",
        compressor_options=svc_options, steps=40, lr=5e-3, warmup=5, max_frames=8, log_every=0,
    )
    report = train(options, vlm=vlm)
    trained, projector_state = load_compressor(
        report.checkpoint, encoder_fingerprint=vlm.encoder.fingerprint, dim=vlm.encoder.dim
    )
    assert projector_state is None  # reconstruction trains no projector
    untrained = build_compressor("svc", dim=vlm.encoder.dim, **svc_options)  # decodes as nearest upsampling
    features = FeatureStore(vlm.encoder, options)
    gains = []
    with torch.no_grad():
        for sample in {s.video: s for s in read_jsonl(captions, need_captions=False)}.values():
            for segment in split_segments(features(sample.video), 4):
                base = float(untrained.reconstruction_loss(segment[None]))
                gains.append(base - float(trained.reconstruction_loss(segment[None])))
                assert gains[-1] > 0  # every segment is reconstructed better than from its average pool alone
    assert sum(gains) / len(gains) > 0.02  # L1 on features of mean magnitude ~0.9
    # the latent still honours the residual constraint: tokens = C(f) + avgpool3d(f)
    segment = split_segments(features(sample.video), 4)[0]
    with torch.no_grad():
        residual = trained.residual(segment[None])[0].flatten(1).T
        torch.testing.assert_close(trained(segment).tokens, residual + pool_grid(segment, 7).mean(0), rtol=1e-4, atol=1e-5)


def test_a_checkpoint_for_another_vision_encoder_is_refused(llava_dir, tmp_path):
    from vidmem.compressors.train import save_checkpoint

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
    data.write_text(json.dumps({"video": str(videos["demo.mp4"]["file"])}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1 needs a non-empty \"caption\""):
        read_jsonl(data, need_captions=True)
    data.write_text('{"video": "nowhere.mp4", "caption": "x"}\n')
    with pytest.raises(ConfigError, match="video not found"):
        read_jsonl(data, need_captions=True)
    data.write_text("{oops\n")
    with pytest.raises(ConfigError, match="bad.jsonl:1 is not valid JSON"):
        read_jsonl(data, need_captions=False)
    with pytest.raises(ConfigError, match="objective must be one of"):
        TrainOptions(data=data, output=tmp_path / "x", objective="dance").validate()
    assert TrainOptions(data=data, output=tmp_path / "x", objective="reconstruct").validate().objective == "reconstruction"


def test_training_frames_are_sampled_by_presentation_time(videos):
    from vidmem.compressors.train import decode_frames

    bikes = videos["bikes.mp4"]  # 10 s at 25 fps, 640x272
    assert len(decode_frames(bikes["file"], fps=1.0)) == 10
    assert len(decode_frames(bikes["file"], fps=2.0)) == 20
    few = decode_frames(bikes["file"], fps=2.0, max_frames=3)  # evenly spaced over the whole video
    assert len(few) == 3 and few[0].shape == (272, 640, 3)
    big = decode_frames(videos["counter.mp4"]["file"], fps=1.0)  # 1920x1080 is scaled to fit 768 px
    assert big[0].shape == (432, 768, 3)
