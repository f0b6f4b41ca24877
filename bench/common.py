"""Helpers shared by the benches: full-size random-weight architectures, tiny checkpoints, timing, machine info.

Timing does not depend on the weights, so the CPU benches build the real architectures from configs in memory with
random weights (nothing is downloaded) and report ratios measured side by side in one run; absolute seconds only
count on a GPU (DESIGN.md "Performance").
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TESTDATA = Path(os.environ.get("VIDMEM_TESTDATA", REPO.parent / "shared" / "testdata"))

# LLaVA-OneVision 0.5B (llava-hf/llava-onevision-qwen2-0.5b-ov-hf): Qwen2-0.5B text model + SigLIP-so400m tower.
QWEN2_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)
SIGLIP_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    vision_use_head=False,
)
CLIP_EMBED_DIM = 512  # clip-ViT-B-32's embedding width


def logger(name: str) -> Callable[[str], None]:
    """A progress printer to stderr (stdout carries the one JSON line)."""

    def log(message: str) -> None:
        print(f"[bench/{name}] {message}", file=sys.stderr, flush=True)

    return log


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median_seconds(fn: Callable[[], object], repeats: int, *, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn)[0] for _ in range(repeats))


# ---------------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Where the figures come from: CPU, cores, GPU, library versions, date."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": _ram_gb(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for module in ("transformers", "faiss", "av"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # not installed, or no __version__
            info[module] = None
    try:
        info["git"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------------- models


def _tests_on_path() -> None:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def tiny_checkpoints(root: Path) -> dict[str, Path]:
    """The tests' tiny offline checkpoints (tests/checkpoints.py) built into `root`: {"llava", "clip", "minilm"}."""
    _tests_on_path()
    from checkpoints import build_tiny_clip, build_tiny_llava, build_tiny_minilm

    root = Path(root)
    return {
        "llava": build_tiny_llava(root / "llava", seed=0, vision_hidden=32),
        "clip": build_tiny_clip(root / "clip"),
        "minilm": build_tiny_minilm(root / "minilm"),
    }


def qwen2_tokenizer():
    """The tests' byte-level BPE with Qwen2's special tokens and chat template (ids < 700: fine for timing)."""
    _tests_on_path()
    from checkpoints import LLAVA_CHAT_TEMPLATE, QWEN2_SPECIALS, _bpe_tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(QWEN2_SPECIALS, vocab_size=700),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN2_SPECIALS[1:],
        model_max_length=QWEN2_05B["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE  # the processor's list-content template, as the real checkpoint's
    return tokenizer


def full_size_vlm(*, device: str = "cpu", vision_layers: int = 1, text_layers: int = 24, seed: int = 0):
    """LLaVA-OneVision 0.5B's architecture with random weights, as a `vidmem.agents.models.VLM`.

    The language model, embeddings, lm_head and the projector (1152 -> 896) are full size. The SigLIP tower keeps
    its full width but only `vision_layers` of its 27 layers: the answer path reads stored tokens and never runs
    it, and a tower-bound cost (the native path) is scaled up from the per-layer time by the caller.
    `text_layers` < 24 builds fewer (identical) decoder layers, for a quicker run whose times scale by 24/text_layers.
    bf16 + flash-attention 2 (when installed) on a GPU, float32 + SDPA on a CPU, as `load_vlm` loads real ones.
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    from vidmem.agents.models import _check_attention, resolve_device
    from vidmem.agents.vlm import VLM
    from vidmem.compressors.encoder import Preprocess

    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    attn = _check_attention(None, dev)
    tokenizer = qwen2_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", "<|im_end|>", "<image>", "<video>")}
    text = Qwen2Config(
        **{**QWEN2_05B, "num_hidden_layers": text_layers}, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )
    vision = SiglipVisionConfig(**{**SIGLIP_SO400M, "num_hidden_layers": vision_layers})
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(dev):
        model = LlavaOnevisionForConditionalGeneration(config)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    return VLM.wrap(model, tokenizer, name="llava-onevision-qwen2-0.5b-ov (architecture, random weights)",
                    preprocess=Preprocess(size=384))


def clip512_checkpoint(directory: Path, *, seed: int = 0) -> Path:
    """A small sentence-transformers CLIP directory with clip-ViT-B-32's 512-wide embeddings (tiny towers)."""
    _tests_on_path()
    from checkpoints import build_tiny_clip

    directory = Path(directory)
    build_tiny_clip(directory, seed=seed)
    module = directory / "0_CLIPModel"
    config_path = module / "config.json"
    config = json.loads(config_path.read_text())
    config["projection_dim"] = CLIP_EMBED_DIM
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}))\
        .eval().save_pretrained(module)
    return directory


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """(n, dim) float32 random unit vectors (stand-ins for CLIP embeddings)."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def emit(result: dict) -> None:
    """The bench's one JSON line on stdout."""
    print(json.dumps(result), flush=True)


def rss_mb() -> float:
    """This process's resident memory in MB (VmRSS; bench/memory.py keeps its own copy so as not to import torch)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def home_camera_scene(n: int, *, fps: float, width: int = 320, height: int = 180, seed: int = 0,
                      visits: tuple[tuple[float, float], ...] = ((20.0, 28.0),), noise: float = 2.0):
    """n frames of a mostly static home camera: a still picture with sensor noise, and during each (start, end)
    second of `visits` a person-sized block (a sixth of the height) walking across a third of the picture.

    The block changes a few blocks of the picture a lot and the whole picture's mean hardly at all.
    """
    from vidmem.stream.synth import _picture

    rng = np.random.default_rng(seed)
    base = _picture(width, height, rng)
    h, w = max(4, height // 6), max(2, height // 12)
    for i in range(n):
        t = i / fps
        frame = np.clip(base + rng.normal(0.0, noise, size=base.shape), 0, 255).astype(np.uint8)  # (H, W, 3)
        for start, end in visits:
            if start <= t < end:
                x = int(width / 3 + (t - start) / (end - start) * width / 3)
                y = height // 2
                frame[y:y + h, x:x + w] = (30, 30, 160)
        yield frame
