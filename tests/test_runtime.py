"""The CPU runtime (agents/runtime.py, compressors/runtime.py) and motion-gated sampling (stream/motion.py).

The fast paths must stay within their stated tolerance of eager fp32 on the tiny checkpoints, keep the language
model's `inputs_embeds` + kept-KV-cache calls working, and be switched off by one flag.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vidmem.agents.answer import ReservedCache
from vidmem.agents.models import load_vlm
from vidmem.agents.runtime import LM_TOLERANCE, apply_runtime, describe, optimize_language_model
from vidmem.compressors.runtime import TOWER_TOLERANCE, optimize_tower, resolve_runtime
from vidmem.errors import ConfigError
from vidmem.stream import IngestOptions, ingest, open_source
from vidmem.stream.motion import MotionGate, MotionOptions
from vidmem.stream.synth import busy_scene, write_video

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import home_camera_scene  # noqa: E402


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return list(busy_scene(3, fps=1.0, width=320, height=180))


def test_fast_tower_features_stay_within_tolerance_of_eager(tiny_models, frames) -> None:
    vlm = load_vlm(str(tiny_models.llava), device="cpu")
    encoder = vlm.encoder
    eager_tower = encoder.tower
    eager = encoder(frames)  # (3, 729, D)
    fingerprint = encoder.fingerprint
    assert apply_runtime(vlm, "fast") == "fast"
    assert encoder.tower is not eager_tower  # a quantized copy; the model's own tower stays fp32
    assert describe(vlm)["vision_tower"].startswith("fast")
    assert vlm.model.model.vision_tower is eager_tower
    fast = encoder(frames)
    assert fast.shape == eager.shape
    error = relative_error(fast, eager)
    assert 0.0 < error < TOWER_TOLERANCE, error  # it really changed, and stays close
    # the encoder keeps its identity: memories written on one runtime are read on the other
    from vidmem.compressors.encoder import _fingerprint

    assert _fingerprint(encoder.tower) == fingerprint


def test_eager_runtime_and_non_fp32_towers_are_left_alone(tiny_models) -> None:
    vlm = load_vlm(str(tiny_models.llava), device="cpu")
    tower = vlm.encoder.tower
    assert apply_runtime(vlm, "eager") == "eager"
    assert vlm.encoder.tower is tower
    assert describe(vlm) == {"vision_tower": "eager float32", "language_model": "eager float32"}
    half = tower.to(torch.bfloat16)
    assert optimize_tower(half, "fast") is half  # the int8 kernels are fp32 CPU kernels: nothing to gain


def test_fast_lm_keeps_inputs_embeds_and_the_kept_cache(tiny_models) -> None:
    eager_vlm = load_vlm(str(tiny_models.llava), device="cpu")
    fast_vlm = load_vlm(str(tiny_models.llava), device="cpu")
    assert apply_runtime(fast_vlm, "fast-lm") == "fast-lm"
    assert describe(fast_vlm)["language_model"].startswith("fast")
    hidden = eager_vlm.model.config.text_config.hidden_size
    torch.manual_seed(0)
    prompt = torch.randn(1, 40, hidden) * 0.5  # (1, S, H) evidence embeddings
    question = torch.randn(1, 6, hidden) * 0.5

    def run(vlm) -> tuple[torch.Tensor, torch.Tensor, int]:
        lm = vlm.model.model.language_model
        cache = ReservedCache()
        with torch.inference_mode():
            first = lm(inputs_embeds=prompt, cache=cache, use_cache=True).last_hidden_state
            positions = torch.arange(40, 46)[None]  # (1, 6): a follow-up on the kept prefix
            second = lm(inputs_embeds=question, cache=cache, use_cache=True,
                        position_ids=positions).last_hidden_state
        return first, second, cache.get_seq_length()

    e1, e2, e_len = run(eager_vlm)
    f1, f2, f_len = run(fast_vlm)
    assert e_len == f_len == 46
    assert 0.0 < relative_error(f1, e1) < LM_TOLERANCE
    assert 0.0 < relative_error(f2, e2) < LM_TOLERANCE
    # and the next token the model would pick after the follow-up mostly agrees
    head = eager_vlm.model.lm_head
    with torch.inference_mode():
        agree = (head(f2).argmax(-1) == head(e2).argmax(-1)).float().mean().item()
    assert agree >= 0.5, agree


def test_optimize_language_model_leaves_other_runtimes_alone(tiny_models) -> None:
    vlm = load_vlm(str(tiny_models.llava), device="cpu")
    lm = vlm.model.model.language_model
    before = type(lm.layers[0].mlp.up_proj)
    assert optimize_language_model(lm, "fast") is lm
    assert type(lm.layers[0].mlp.up_proj) is before


def test_runtime_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIDMEM_RUNTIME", raising=False)
    assert resolve_runtime(None, device="cpu") == "fast"
    assert resolve_runtime(None, device="cuda") == "eager"
    assert resolve_runtime("EAGER", device="cpu") == "eager"
    monkeypatch.setenv("VIDMEM_RUNTIME", "eager")
    assert resolve_runtime(None, device="cpu") == "eager"
    assert resolve_runtime("fast", device="cpu") == "fast"  # the flag wins over the environment
    with pytest.raises(ConfigError, match="runtime 'turbo' is not known"):
        resolve_runtime("turbo")


def test_cli_refuses_an_unknown_runtime_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "VIDMEM_RUNTIME": "turbo"}
    done = subprocess.run([sys.executable, "-m", "vidmem", "ask", "anything", "--memory", str(tmp_path / "m")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("vidmem: error: runtime 'turbo' is not known")
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------------- motion


class Recorder:
    """A sink that keeps the segments it is given (no model)."""

    def __init__(self) -> None:
        self.segments: list = []
        self.extended: list = []  # the segments the static check folded into their predecessor

    def encode(self, segments: list) -> list[object]:
        self.segments += segments
        return [None] * len(segments)

    def commit(self, segment, encoded: object) -> int:  # noqa: ANN001
        return 0

    def extend(self, segment) -> None:  # noqa: ANN001
        self.segments.append(segment)
        self.extended.append(segment)


def sampled_times(path: Path, options: IngestOptions) -> list[float]:
    sink = Recorder()
    asyncio.run(ingest(open_source(path), sink, stream="cam", options=options))
    return [f.ts for s in sink.segments for f in s.frames]


@pytest.fixture(scope="module")
def home_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 s at 5 fps: still, with someone walking through from 20 s to 28 s."""
    path = tmp_path_factory.mktemp("motion") / "home.mp4"
    write_video(path, home_camera_scene(300, fps=5.0, visits=((20.0, 28.0),)), fps=5.0)
    return path


def test_motion_gate_samples_movement_at_the_cap_and_stillness_every_keyframe_interval(home_clip: Path) -> None:
    cap = 2.0
    plain = IngestOptions(fps=cap, static_threshold=0)
    gated = IngestOptions(fps=cap, static_threshold=0, motion=MotionOptions(keyframe_seconds=10.0))
    every = sampled_times(home_clip, plain)
    kept = sampled_times(home_clip, gated)
    assert len(every) == pytest.approx(120, abs=2)
    # never above the fps cap: only frames the fps grid offers, at most `cap` in any second
    assert set(kept) <= set(every)
    assert max(sum(t <= u < t + 1.0 for u in kept) for t in kept) <= cap
    # at least one keyframe every 10 s while nothing moves
    assert max(np.diff(kept)) <= 10.0 + 1e-3
    assert kept[0] == 0.0
    walking = [t for t in kept if 20.0 <= t < 28.0]
    assert len(walking) >= 0.9 * 8 * cap  # the walk is sampled at (about) the cap
    still = [t for t in kept if t < 19.5 or t >= 29.0]
    assert len(still) <= 7  # 0 s .. 19.5 s and 29 s .. 60 s: keyframes only
    assert len(kept) < len(every) / 3


def test_someone_walking_through_a_still_picture_is_stored_not_folded(home_clip: Path) -> None:
    """With motion gating the walk is sampled at the cap and encoded, marked as motion; stillness stays folded."""
    def encoded(options: IngestOptions) -> list:
        sink = Recorder()
        report = asyncio.run(ingest(open_source(home_clip), sink, stream="cam", options=options))
        assert report.video_seconds >= 59.0  # the whole minute is covered, skipped frames included
        return [s for s in sink.segments if s not in sink.extended]

    plain = encoded(IngestOptions())
    gated = encoded(IngestOptions(motion=MotionOptions()))
    walk = [s for s in gated if 20.0 <= s.start < 28.0]
    assert walk and all(s.extra.get("motion") for s in walk)
    assert len(gated) <= 8  # the still minutes stay folded: the first segment, the walk, nothing more
    # the walk is seen in more frames than the default sampling keeps folded into one stored segment
    assert sum(len(s.frames) for s in walk) >= sum(len(s.frames) for s in plain if 20.0 <= s.start < 28.0)


def test_motion_gate_sees_a_small_change_the_whole_picture_mean_hides() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (180, 320, 3), dtype=np.uint8)
    moved = base.copy()
    moved[90:120, 150:165] = 0  # a person-sized patch: under 1% of the picture
    assert float(np.abs(moved.astype(float) - base).mean()) < 3.0  # the static check's threshold would not see it
    gate = MotionGate(MotionOptions(keyframe_seconds=100.0))
    assert gate.offer(0.0, base)
    assert not gate.offer(1.0, base)
    assert gate.offer(2.0, moved)
    assert not gate.offer(3.0, moved)
    assert gate.offer(4.0, moved, cut=True)
    gate.reset()
    assert gate.offer(5.0, moved)
    assert (gate.kept, gate.skipped) == (4, 2)


def test_motion_options_are_checked() -> None:
    with pytest.raises(ValueError):
        MotionOptions(keyframe_seconds=0)
    with pytest.raises(ValueError):
        MotionOptions(grid=(0, 3))


# ---------------------------------------------------------------------------------------------------- GPU path


def test_the_gpu_extra_never_installs_faiss_cpu_beside_faiss_gpu() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = lambda deps: {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in deps}  # noqa: E731
    extras = project["optional-dependencies"]
    assert not names(project["dependencies"]) & {"faiss-cpu", "faiss-gpu-cu12"}
    assert "faiss-cpu" in names(extras["cpu"]) and "faiss-gpu-cu12" not in names(extras["cpu"])
    assert "faiss-gpu-cu12" in names(extras["gpu"]) and "faiss-cpu" not in names(extras["gpu"])
    assert not any("faiss" in name for extra in ("test", "bench") for name in names(extras.get(extra, [])))


def test_device_cuda_reaches_the_memory_search(tmp_path: Path) -> None:
    """--device cuda asks the memory for FAISS on the GPU; without GPUs in faiss it searches on the CPU."""
    from vidmem.agents.app import Settings, Vidmem
    from vidmem.memory import Manifest

    for device, expected in (("cuda", "cuda"), ("cpu", "cpu")):
        app = Vidmem(Settings(memory=tmp_path / device, device=device))
        try:
            memory = app.memory
            assert memory._index_options.device == expected
            memory.bind(Manifest(encoder="e", encoder_name="e", compressor="c", dim=8, embedder="x", embed_dim=4))
            vectors = np.eye(4, dtype=np.float32)
            for i in range(4):
                memory.add_segment(stream="cam", start=4.0 * i, end=4.0 * (i + 1), frames=1, cut=False,
                                   tokens=np.zeros((2, 8), np.float16), slow=2, embedding=vectors[i])
            hits = memory.search(vectors[2], k=1)
            assert [row.start for row, _ in hits] == [8.0]
        finally:
            app.close()
