"""STC-Cacher: the vision tower runs only for frames that changed (real frames decoded from the test videos)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vidmem.compressors.stc import CachedEncoder
from vidmem.compressors.train import decode_frames

from checkpoints import build_tiny_llava


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from vidmem.agents.models import load_vlm

    return load_vlm(str(build_tiny_llava(tmp_path_factory.mktemp("llava"))), device="cpu").encoder


@pytest.fixture(scope="module")
def frames(videos):
    pool = decode_frames(videos["test.mp4"]["file"], fps=1.0, max_frames=4)
    arm = decode_frames(videos["demo.mp4"]["file"], fps=1.0, max_frames=1)
    return pool, arm[0]


def test_cacher_skips_the_tower_for_a_repeated_frame_and_encodes_a_changed_one(encoder, frames):
    pool, arm = frames
    cached = CachedEncoder(encoder, tolerance=2.0)
    first = cached([pool[0]])
    calls = encoder.calls
    again = cached([pool[0].copy()])  # the same picture again, as a static camera delivers it
    assert encoder.calls == calls and (cached.hits, cached.misses) == (1, 1)
    torch.testing.assert_close(again, first)

    # sensor noise of a couple of grey levels is still "the same frame"
    rng = np.random.default_rng(0)
    noisy = np.clip(pool[0].astype(np.int16) + rng.integers(-2, 3, pool[0].shape), 0, 255).astype(np.uint8)
    cached([noisy])
    assert encoder.calls == calls and cached.hits == 2

    # a different scene goes through the tower, and its features are the tower's own
    changed = cached([arm])
    assert encoder.calls == calls + 1 and cached.misses == 2
    torch.testing.assert_close(changed, encoder([arm]))


def test_cacher_sees_a_small_local_change(encoder, videos):
    # counter.mp4: consecutive frames differ only in the frame number printed on them
    frames = decode_frames(videos["counter.mp4"]["file"], fps=10.0, max_frames=None)[:3]
    cached = CachedEncoder(encoder)
    cached([frames[0]])
    cached([frames[1]])
    assert (cached.hits, cached.misses) == (0, 2)
    cached([frames[1].copy()])
    assert cached.hits == 1


def test_cacher_encodes_each_distinct_frame_of_a_batch_once(encoder, frames):
    pool, arm = frames
    cached = CachedEncoder(encoder, tolerance=2.0)
    calls = encoder.calls
    out = cached([pool[0], pool[0].copy(), arm, pool[0].copy()])
    assert encoder.calls == calls + 2 and (cached.hits, cached.misses) == (2, 2)
    assert out.shape == (4, encoder.num_patches, encoder.dim)
    torch.testing.assert_close(out[1], out[0])
    torch.testing.assert_close(out[3], out[0])
    assert not torch.allclose(out[2], out[0])
    # the wrapper stands in for the encoder: same identity for memory manifests
    assert cached.fingerprint == encoder.fingerprint and cached.dim == encoder.dim


def test_cacher_forgets_beyond_its_capacity(encoder, frames):
    pool, arm = frames
    cached = CachedEncoder(encoder, tolerance=0.0, capacity=1)
    cached([pool[0]])
    cached([arm])  # evicts pool[0]
    calls = encoder.calls
    cached([pool[0]])
    assert encoder.calls == calls + 1 and cached.hits == 0
