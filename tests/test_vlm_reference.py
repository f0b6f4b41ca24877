"""vidmem's evidence is what LLaVA-OneVision was trained on: compared with transformers' own video path.

With a training-free compressor, a keyframe reaches the language model exactly as
`LlavaOnevisionModel.get_video_features` gives that frame (projector, bilinear pooling to 14x14, one
`image_newline` after the video), and a one-frame question gives the same first-token logits, and the same greedy
answer, as `LlavaOnevisionForConditionalGeneration` on the same prompt.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from vidmem.agents.answer import Answerer
from vidmem.agents.models import load_vlm
from vidmem.agents.select import Level, Pick
from vidmem.agents.vlm import VLM, render_span
from vidmem.compressors import build_compressor


def _frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(count)]


def _pixels(vlm: VLM, frames: list[np.ndarray]) -> torch.Tensor:
    """(1, F, 3, 384, 384) pixel values, prepared once for both paths."""
    return vlm.encoder.preprocess(frames, device=vlm.device, dtype=vlm.dtype)[None]


@torch.inference_mode()
def _reference_video(vlm: VLM, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' own LLaVA-OneVision video features: (F * 196 + 1, H)."""
    return vlm.model.model.get_video_features(pixel_values_videos=pixels, return_dict=True).pooler_output[0]


@torch.inference_mode()
def _vidmem_evidence(vlm: VLM, frames: list[np.ndarray], compressor: str) -> torch.Tensor:
    """The keyframe tokens vidmem stores for a segment of `frames`, plus the newline it shows after them."""
    pixels = _pixels(vlm, frames)[0]
    features = vlm.encoder.select(vlm.encoder.tower(pixel_values=pixels, output_hidden_states=True).hidden_states)
    block = vlm.compress(build_compressor(compressor, dim=vlm.encoder.dim).eval(), features)
    return torch.cat([block.views.view("key").apply(block.tokens), vlm.image_newline[None]])


def _check_keyframe_matches_reference(vlm: VLM) -> None:
    frames = _frames(4)
    reference = _reference_video(vlm, _pixels(vlm, frames[:1]))  # one frame: 196 + newline
    for name in ("timeperceiver", "perceiver", "pool"):
        compressor = "pool" if name == "pool" else name
        evidence = _vidmem_evidence(vlm, frames, compressor) if name != "pool" else None
        if name == "pool":  # the baseline pooling mode shows every frame in the stock form
            evidence = _pool_baseline(vlm, frames)
            reference_all = _reference_video(vlm, _pixels(vlm, frames))
            torch.testing.assert_close(evidence, reference_all, rtol=1e-4, atol=1e-4)
            continue
        assert evidence.shape == reference.shape == (197, vlm.hidden_size)
        torch.testing.assert_close(evidence, reference, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def _pool_baseline(vlm: VLM, frames: list[np.ndarray]) -> torch.Tensor:
    pixels = _pixels(vlm, frames)[0]
    features = vlm.encoder.select(vlm.encoder.tower(pixel_values=pixels, output_hidden_states=True).hidden_states)
    block = vlm.compress(build_compressor("pool", dim=vlm.encoder.dim, mode="baseline").eval(), features)
    return torch.cat([block.tokens, vlm.image_newline[None]])


def test_keyframe_evidence_equals_transformers_video_features_on_the_tiny_checkpoint(tiny_models) -> None:
    _check_keyframe_matches_reference(load_vlm(str(tiny_models.llava), device="cpu"))


@pytest.mark.slow
def test_keyframe_evidence_equals_transformers_video_features_at_full_size(tmp_path) -> None:
    """SigLIP-so400m's width and patch grid (1152 wide, 27x27 patches of a 384 px frame) and the 0.5B projector
    (1152 -> 896), random weights: the real architecture's video path, loaded through the same code as a downloaded
    checkpoint. Six of its 26 layers: which layer's output is the evidence does not depend on the depth, and the
    full depth cost this test half a minute of building and saving weights."""
    from checkpoints import build_tiny_llava
    from transformers import LlavaOnevisionForConditionalGeneration

    directory = build_tiny_llava(tmp_path / "small", template="json")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(directory)
    config = model.config
    vision = config.vision_config
    vision.update(dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=6, num_attention_heads=16))
    config.text_config.update(dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                   num_key_value_heads=2))  # the LM does not touch the evidence: its depth stays small
    torch.manual_seed(0)
    full = LlavaOnevisionForConditionalGeneration(config).eval()
    full.generation_config = model.generation_config
    full.save_pretrained(directory)
    vlm = load_vlm(str(directory), device="cpu")
    assert vlm.encoder.num_patches == 729 and vlm.encoder.dim == 1152 and vlm.hidden_size == 896
    frames = _frames(1)
    torch.testing.assert_close(
        _vidmem_evidence(vlm, frames, "timeperceiver"), _reference_video(vlm, _pixels(vlm, frames)),
        rtol=1e-4, atol=1e-4,
    )


def _reference_inputs(vlm: VLM, question: str, span: tuple[float, float]) -> torch.Tensor:
    """input_ids of the same prompt for LlavaOnevisionForConditionalGeneration: <video> expanded to 197 tokens."""
    video = torch.full((197,), int(vlm.config.video_token_index), dtype=torch.long, device=vlm.device)
    parts = [vlm.ids(vlm.layout.head), vlm.ids(render_span(*span)), video, vlm.ids(vlm.layout.tail(question))]
    return torch.cat(parts)[None]


@pytest.mark.parametrize("template", ["json", "tokenizer"])
def test_one_frame_question_matches_llava_onevision_logits_and_greedy_answer(tiny_models, tmp_path, template) -> None:
    from checkpoints import build_tiny_llava

    vlm = load_vlm(str(build_tiny_llava(tmp_path / template, template=template)), device="cpu")
    frames, question, span = _frames(1, seed=3), "What colour is the car?", (12.0, 13.0)
    pixels = _pixels(vlm, frames)
    with torch.inference_mode():
        tokens = _vidmem_evidence(vlm, frames, "timeperceiver")[:-1]  # (196, H): what ingest stores
        prompt = vlm.prompt_embeds(question, vlm.evidence_embeds([(span[0], span[1], tokens)]))
        ours = vlm.forward(prompt)  # (1, V)
        input_ids = _reference_inputs(vlm, question, span)
        theirs = vlm.model(input_ids=input_ids, pixel_values_videos=pixels).logits[:, -1]
    assert prompt.shape[1] == input_ids.shape[1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    # the answerer's whole greedy answer is transformers' greedy generation on that prompt
    class Row:
        id, stream, start, end, tokens, slow, views, frames = 1, "cam", span[0], span[1], 196, 196, None, 1

    answerer = Answerer(vlm, max_new_tokens=12)
    streamed: list[str] = []
    with warnings.catch_warnings():  # vidmem calls transformers only in ways it has not deprecated
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        answer = answerer.answer(question, [Pick(Row(), Level.FULL, 1.0, "clip")], lambda row: tokens.numpy(),
                                 on_token=streamed.append)
    generated = vlm.model.generate(input_ids=input_ids, pixel_values_videos=pixels, max_new_tokens=12, do_sample=False,
                                   suppress_tokens=None)
    new = generated[0, input_ids.shape[1]:].tolist()
    stops = [i for i, t in enumerate(new) if t in vlm.stop_ids]
    expected = vlm.tokenizer.decode(new[: stops[0]] if stops else new, skip_special_tokens=True).strip()
    assert answer.text == expected
    assert "".join(streamed).strip() == answer.text
