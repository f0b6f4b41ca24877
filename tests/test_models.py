"""Loading the VLM and the embedders: tiny checkpoints go through the same path as real hub models."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vidmem.agents.models import (
    VLM,
    Embedder,
    load_caption_embedder,
    load_embedder,
    load_vlm,
    resolve_device,
)
from vidmem.errors import ConfigError, ModelNotFoundError


def _frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """RGB uint8 frames of assorted sizes, as the decoder hands them over."""
    rng = np.random.default_rng(seed)
    shapes = [(240, 320, 3), (480, 640, 3), (384, 384, 3), (90, 160, 3)]
    return [rng.integers(0, 256, shapes[i % len(shapes)], dtype=np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def vlm(tiny_models) -> VLM:
    return load_vlm(str(tiny_models.llava), device="cpu")


def test_tiny_llava_encodes_frames_into_729_patch_tokens(vlm: VLM) -> None:
    features = vlm.encoder(_frames(3))
    assert features.shape == (3, 729, 32)  # 384 px / patch 14 -> 27 x 27 patches of the tower's width
    assert vlm.encoder.num_patches == 729 and vlm.encoder.dim == 32
    assert vlm.dtype == torch.float32 and vlm.device.type == "cpu"
    assert vlm.context_length == 8192
    assert vlm.model.config._attn_implementation == "sdpa"
    # different frames give different tokens; the same frame gives the same tokens
    assert not torch.allclose(features[0], features[1])
    assert torch.equal(vlm.encoder(_frames(1))[0], features[0])


def test_project_maps_vision_tokens_to_language_model_width(vlm: VLM) -> None:
    tokens = vlm.encoder(_frames(1))[0]  # (729, 32)
    embedded = vlm.project(tokens)
    assert embedded.shape == (729, vlm.hidden_size) == (729, 64)
    assert embedded.dtype == vlm.dtype and torch.isfinite(embedded).all()
    assert vlm.image_newline.shape == (64,)
    ids = torch.tensor([1, 2, 3])
    assert vlm.embed_ids(ids).shape == (3, 64)


def test_checkpoints_are_deterministic_and_other_encoder_differs(tiny_models, tmp_path: Path, vlm: VLM) -> None:
    from checkpoints import build_tiny_llava

    again = load_vlm(str(build_tiny_llava(tmp_path / "again", seed=0, vision_hidden=32)), device="cpu")
    assert again.encoder.fingerprint == vlm.encoder.fingerprint
    assert torch.equal(again.encoder(_frames(1)), vlm.encoder(_frames(1)))
    other = load_vlm(str(tiny_models.llava_other), device="cpu")
    assert other.encoder.dim == 48 and other.encoder.num_patches == 729
    assert other.encoder.fingerprint != vlm.encoder.fingerprint
    assert other.project(other.encoder(_frames(1))[0]).shape == (729, 64)


def test_clip_embedder_gives_unit_vectors_for_images_and_texts(tiny_models) -> None:
    embedder = load_embedder(str(tiny_models.clip), device="cpu")
    assert isinstance(embedder, Embedder) and embedder.dim == 32
    images = embedder.embed_images(_frames(5))
    texts = embedder.embed_texts(["a red car parks in the driveway", "a dog runs across the lawn"])
    assert images.shape == (5, 32) and texts.shape == (2, 32)
    assert images.dtype == np.float32 and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedder.embed_images(_frames(1)), images[:1], atol=1e-6)
    assert embedder.embed_texts(["word " * 300]).shape == (1, 32)  # longer than CLIP's 77 tokens: truncated
    assert embedder.embed_images([]).shape == (0, 32)


def test_caption_embedder_embeds_text_only(tiny_models) -> None:
    embedder = load_caption_embedder(str(tiny_models.minilm), device="cpu")
    vectors = embedder.embed_texts(["a woman picks up the box", "a woman picks up the box", "rain on the roof"])
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    with pytest.raises(ConfigError, match="text only"):
        embedder.embed_images(_frames(1))
    with pytest.raises(ModelNotFoundError, match="CLIP-style"):
        load_embedder(str(tiny_models.minilm), device="cpu")  # a text model cannot embed keyframes


def test_missing_hub_model_fails_at_once_with_download_guidance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the offline machine, also where CI has network
    with pytest.raises(ModelNotFoundError) as caught:
        load_vlm("vidmem-tests/no-such-model", device="cpu")
    message = str(caught.value)
    assert "vidmem-tests/no-such-model" in message and "hf download" in message
    assert "\n" not in message
    with pytest.raises(ModelNotFoundError, match="sentence-transformers/no-such-embedder"):
        load_embedder("no-such-embedder", device="cpu")  # bare names live under sentence-transformers/


def test_broken_local_directories_give_clear_errors(tiny_models, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        load_vlm(str(tmp_path / "missing" / "dir"), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_vlm(str(empty), device="cpu")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_models.llava, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelNotFoundError, match="not a valid checkpoint") as caught:
        load_vlm(str(truncated), device="cpu")
    assert str(truncated) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ModelNotFoundError, match="'bert' checkpoint, not LLaVA-OneVision"):
        load_vlm(str(tiny_models.minilm), device="cpu")
    garbled = tmp_path / "garbled"
    shutil.copytree(tiny_models.clip, garbled)
    bogus = [{"idx": 0, "name": "0", "path": "nowhere", "type": "nope.Module"}]
    (garbled / "modules.json").write_text(json.dumps(bogus))
    with pytest.raises(ModelNotFoundError, match="not a valid checkpoint"):
        load_embedder(str(garbled), device="cpu")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="not valid"):
        resolve_device("tpu:banana")


def test_attention_choice_is_checked_before_loading(tiny_models) -> None:
    with pytest.raises(ConfigError, match="flash-attn"):
        load_vlm(str(tiny_models.llava), device="cpu", attn="flash_attention_2")
    with pytest.raises(ConfigError, match="attention 'fast'"):
        load_vlm(str(tiny_models.llava), device="cpu", attn="fast")
    eager = load_vlm(str(tiny_models.llava), device="cpu", attn="eager")
    assert eager.model.config._attn_implementation == "eager"
    assert eager.encoder(_frames(1)).shape == (1, 729, 32)


def test_importing_agents_loads_no_model_libraries() -> None:
    heavy = ("torch", "transformers", "sentence_transformers")
    code = f"import sys, vidmem.agents; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
