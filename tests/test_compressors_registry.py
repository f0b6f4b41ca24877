"""Every compressor is selectable by name and spends exactly the tokens its paper's token math says."""
from __future__ import annotations

import pytest
import torch

from vidmem.compressors import available, build_compressor
from vidmem.compressors.base import pool_grid
from vidmem.errors import ConfigError

DIM = 48  # a narrow feature width keeps the tests fast; the token math does not depend on it
PATCHES = 729  # SigLIP at 384 px / patch 14: a 27x27 grid

# tokens per segment of 1, 2, 3, 4 frames at the default options
EXPECTED = {
    "timeperceiver": [196, 245, 245, 245],  # Clapper 3.1: keyframe 196 (+ 49 TimePerceiver tokens from 2 frames on)
    "perceiver": [196, 245, 245, 245],  # Clapper's Perceiver ablation: same budget, learned queries
    "pool": [49, 98, 147, 196],  # Clapper's spatial pooling baseline (stride 4): 49 per frame
    "svc": [49, 49, 49, 49],  # SVC 4x4x4: (ceil(T/4), 7, 7)
    "weighted-sampler": [16, 32, 48, 64],  # FTFV S4-V16: K = 16 per frame
    "dynfocus": [113, 115, 117, 119],  # one Cone frame (1 + 64 + 32 + 16) and 2-token Rods for the rest
}


def test_every_compressor_is_registered():
    assert set(EXPECTED) <= set(available())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_token_count_matches_the_token_math_for_every_segment_length(name):
    torch.manual_seed(0)
    compressor = build_compressor(name, dim=DIM, num_patches=PATCHES).eval()
    for frames in range(1, 5):
        block = compressor(torch.randn(frames, PATCHES, DIM))
        assert compressor.token_count(frames) == EXPECTED[name][frames - 1]
        assert block.tokens.shape == (EXPECTED[name][frames - 1], DIM)
        assert 0 <= block.slow <= block.count
        assert torch.isfinite(block.tokens).all()


def test_clapper_default_costs_61_tokens_per_frame():
    compressor = build_compressor("timeperceiver", dim=DIM)
    assert compressor.tokens_per_frame(4) == 61.25
    assert compressor.compression_ratio(4) == pytest.approx(4 * 729 / 245)  # about 12x


@pytest.mark.parametrize(
    "mode, expected",
    [("baseline", [196, 392, 588, 784]), ("spatial", [49, 98, 147, 196]), ("temporal", [196, 196, 196, 196])],
)
def test_pool_modes_are_clappers_baselines(mode, expected):
    torch.manual_seed(0)
    compressor = build_compressor("pool", dim=DIM, mode=mode)
    features = torch.randn(4, PATCHES, DIM)
    assert [compressor.token_count(t) for t in range(1, 5)] == expected
    block = compressor(features)
    if mode == "temporal":  # 2x2 spatial pooling of every frame, then the mean of the 4 frames
        torch.testing.assert_close(block.tokens, pool_grid(features, 14).mean(dim=0))
    if mode == "spatial":  # stride 4 on every frame, frames in time order
        torch.testing.assert_close(block.tokens, pool_grid(features, 7).reshape(-1, DIM))
    if mode == "baseline":  # the first 196 tokens are the keyframe at full detail
        assert block.slow == 196
        torch.testing.assert_close(block.tokens[:196], pool_grid(features[0], 14))


def test_unknown_compressor_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="unknown compressor 'nope'.*timeperceiver"):
        build_compressor("nope", dim=DIM)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_rebuilds_the_same_module(name):
    torch.manual_seed(0)
    compressor = build_compressor(name, dim=DIM)
    rebuilt = build_compressor(**compressor.config())
    rebuilt.load_state_dict(compressor.state_dict())
    features = torch.randn(4, PATCHES, DIM)
    torch.testing.assert_close(rebuilt.eval()(features).tokens, compressor.eval()(features).tokens)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_runs_in_bfloat16(name):
    torch.manual_seed(0)
    compressor = build_compressor(name, dim=DIM).to(torch.bfloat16).eval()
    block = compressor(torch.randn(4, PATCHES, DIM, dtype=torch.bfloat16))
    assert block.tokens.dtype == torch.bfloat16
    assert block.count == EXPECTED[name][3]
    assert torch.isfinite(block.tokens.float()).all()


def test_fp32_module_accepts_bf16_features_and_returns_their_dtype():
    compressor = build_compressor("timeperceiver", dim=DIM)
    block = compressor(torch.randn(3, PATCHES, DIM, dtype=torch.bfloat16))
    assert block.tokens.dtype == torch.bfloat16 and block.count == 245


def test_wrong_feature_shape_is_refused():
    compressor = build_compressor("timeperceiver", dim=DIM)
    with pytest.raises(ValueError, match="expects features of shape"):
        compressor(torch.randn(4, 100, DIM))
