"""Training compressors: Clapper's stage 1 and SVC's reconstruction pretraining, and their checkpoints.

- objective "caption" (clapper-timeperceiver.txt, sections 3.2 and 4.1, stage 1): video-caption pairs; the vision
  encoder is frozen, the compressor and the VLM's projector are trained (the language model stays frozen unless
  `train_llm`); the loss is the next-token loss of the caption given the chat-templated prompt with the visual
  tokens opening the user turn, the layout the answering VLM uses at question time. Departure: Clapper also
  trains the language model in stage 1 (section 4.1); here it stays frozen by default, which keeps a stock VLM's
  language ability and makes training affordable on one GPU or a CPU.
- objective "reconstruction" (avs-svc-adaptive-sampler-and-compressor.txt, section 3.2.2, eq. 11): video only; the
  SVC compressor and its decoder minimise |f - D(C(f) + avgpool3d(f))| on frozen vision features.

Data is JSONL, one object per line: {"video": path, "caption": text}; relative paths are resolved against the
JSONL file's folder; "reconstruction" ignores captions. Frames are decoded with PyAV at `fps` (uniformly, by
presentation time), at most `max_frames` per video (evenly spaced, as Clapper samples 96 frames of long videos),
and cut into segments of `segment_frames`.

Checkpoints are one safetensors file: the compressor's weights under "compressor.", the projector's under
"projector." when it was trained, and a JSON config in the file's metadata (key "vidmem") naming the compressor
config and the fingerprint of the vision encoder the compressor was trained on.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vidmem.compressors.base import Compressor
from vidmem.compressors.registry import build_compressor
from vidmem.errors import ConfigError, EncoderMismatchError, ModelNotFoundError, SourceError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vidmem-compressor"  # metadata "format" of a vidmem compressor checkpoint
CHECKPOINT_VERSION = 1
OBJECTIVES = ("caption", "reconstruction")
SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2's default system turn, used around the caption prompt
_ALIASES = {"reconstruct": "reconstruction", "svc": "reconstruction", "stage1": "caption"}


@dataclass(frozen=True)
class TrainOptions:
    """Everything `train` needs; checked once by `validate`."""

    data: Path  # JSONL of {"video": path, "caption": text}, relative paths against its folder
    output: Path  # checkpoint file to write (.safetensors)
    model: str | None = None  # the VLM (hub id or local directory); None: load_vlm's default for the device
    objective: str = "caption"  # "caption" (Clapper stage 1) or "reconstruction" (SVC pretraining)
    compressor: str = "timeperceiver"  # registered compressor name
    compressor_options: dict = field(default_factory=dict)  # keyword options for build_compressor
    init: Path | None = None  # start from this checkpoint instead of a fresh compressor
    steps: int = 100  # optimiser steps
    batch_size: int = 1  # videos (caption) or segments (reconstruct) per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4  # peak learning rate (AdamW), linear warm-up then cosine decay to 10%
    warmup: int = 0  # warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    fps: float = 1.0  # frames sampled per second of video
    max_frames: int = 96  # at most this many frames per video, evenly spaced (Clapper: 96)
    segment_frames: int = 4  # frames per segment (Clapper: 4)
    prompt: str = "Describe the video."  # text before the visual tokens in the caption objective
    train_projector: bool = True  # train the VLM's multi_modal_projector with the compressor (caption)
    train_llm: bool = False  # also train the language model (Clapper trains it; off by default)
    device: str = "auto"  # "auto", "cpu" or "cuda"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16"
    seed: int = 0  # seeds data order and initialisation
    feature_cache: int = 64  # videos whose frozen vision features stay in RAM between epochs
    log_every: int = 10  # log the loss every this many steps
    progress: bool = False  # show a progress bar on stderr

    def validate(self) -> "TrainOptions":
        if self.objective in _ALIASES:
            return dataclasses.replace(self, objective=_ALIASES[self.objective]).validate()
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got '{self.objective}'")
        for key in ("steps", "batch_size", "grad_accum", "segment_frames", "max_frames"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.lr <= 0 or self.fps <= 0:
            raise ConfigError("lr and fps must be positive")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, got '{self.device}'")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got '{self.precision}'")
        if not Path(self.data).is_file():
            raise ConfigError(f"training data not found: {self.data}")
        return self


@dataclass
class TrainReport:
    """What a training run did."""

    objective: str  # "caption" or "reconstruction"
    compressor: str  # compressor name
    checkpoint: Path  # the file written
    steps: int  # optimiser steps taken
    losses: list[float]  # mean loss of every optimiser step
    samples: int  # training examples (videos) read
    segments: int  # segments seen in total
    trainable_parameters: int  # parameters updated
    device: str  # where it ran
    seconds: float  # wall time

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        """Mean of the last few steps, less noisy than the last one."""
        tail = self.losses[-max(1, min(5, len(self.losses) // 5)) :]
        return sum(tail) / len(tail)

    def to_json(self) -> dict:
        out = asdict(self)
        out["checkpoint"] = str(self.checkpoint)
        out.update(first_loss=self.first_loss, final_loss=self.final_loss, last_loss=self.final_loss)
        return out


# -- data ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    video: Path  # absolute path
    caption: str | None  # None when the line has no caption


def read_jsonl(path: Path, *, need_captions: bool) -> list[Sample]:
    """Parse the training JSONL; every problem is a `ConfigError` naming the line."""
    path = Path(path)
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("video"), str):
            raise ConfigError(f"{path}:{number} needs a \"video\" path")
        caption = row.get("caption")
        if need_captions and not (isinstance(caption, str) and caption.strip()):
            raise ConfigError(f"{path}:{number} needs a non-empty \"caption\" for the caption objective")
        video = Path(row["video"])
        video = video if video.is_absolute() else (path.parent / video)
        if not video.is_file():
            raise ConfigError(f"{path}:{number}: video not found: {video}")
        samples.append(Sample(video=video.resolve(), caption=caption))
    if not samples:
        raise ConfigError(f"{path} holds no training examples")
    return samples


def decode_frames(
    path: Path, *, fps: float = 1.0, max_frames: int | None = None, max_side: int = 768
) -> list[np.ndarray]:
    """Decode `path` with PyAV, one frame per 1/fps seconds of presentation time, as (H, W, 3) uint8 RGB.

    With `max_frames`, at most that many frames come back, evenly spaced over the video (Clapper 4.1); memory stays
    bounded on long videos because the sampling interval doubles whenever 2 * max_frames frames are held. Frames
    larger than `max_side` are scaled down (the vision encoder resizes to 384 px anyway).
    """
    import av

    frames: list[np.ndarray] = []
    interval = 1.0 / fps
    next_time = 0.0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if frame.pts is None or frame.time_base is None:
                    continue
                seconds = float(frame.pts * frame.time_base)
                if seconds + 1e-6 < next_time:
                    continue
                scale = max_side / max(frame.width, frame.height)
                if scale < 1:
                    width, height = round(frame.width * scale) // 2 * 2, round(frame.height * scale) // 2 * 2
                    frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
                else:
                    frames.append(frame.to_ndarray(format="rgb24"))
                next_time = seconds + interval
                if max_frames is not None and len(frames) >= 2 * max_frames:
                    frames, interval = frames[::2], interval * 2  # keep every other frame from now on
    except (av.error.FFmpegError, IndexError, OSError) as exc:
        raise SourceError(f"cannot decode video {path}: {exc}") from exc
    if not frames:
        raise SourceError(f"no frames decoded from {path}")
    if max_frames is not None and len(frames) > max_frames:
        keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
    return frames


def split_segments(features: torch.Tensor, size: int) -> list[torch.Tensor]:
    """(F, L, D) -> consecutive (T, L, D) segments of `size` frames (the last may be shorter)."""
    return list(features.split(size, dim=0))


class FeatureStore:
    """Frozen vision features per video, computed once and kept for up to `capacity` videos (LRU)."""

    def __init__(self, encoder: Any, options: TrainOptions) -> None:
        self.encoder = encoder
        self.options = options
        self._cache: dict[Path, torch.Tensor] = {}

    def __call__(self, video: Path) -> torch.Tensor:
        if video in self._cache:
            self._cache[video] = self._cache.pop(video)  # most recent last
            return self._cache[video]
        frames = decode_frames(video, fps=self.options.fps, max_frames=self.options.max_frames)
        with torch.inference_mode():
            features = self.encoder(frames)  # (F, L, D)
        features = features.to("cpu").clone()  # leave inference mode (autograd uses it); RAM, not GPU memory
        if self.options.feature_cache > 0:
            self._cache[video] = features
            while len(self._cache) > self.options.feature_cache:
                self._cache.pop(next(iter(self._cache)))
        return features


# -- model parts ---------------------------------------------------------------------------------------------
def _inner(model: nn.Module) -> nn.Module:
    """LlavaOnevisionForConditionalGeneration keeps its parts in `.model` (transformers 5); older ones on itself."""
    return getattr(model, "model", model)


def projector_of(model: nn.Module) -> nn.Module:
    inner = _inner(model)
    projector = getattr(inner, "multi_modal_projector", None) or getattr(model, "multi_modal_projector", None)
    if projector is None:
        raise ModelNotFoundError("the model has no multi_modal_projector, so it is not a LLaVA-style VLM")
    return projector


def _language_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    inner = _inner(model)
    lm = getattr(inner, "language_model", None) or getattr(model, "language_model", None)
    head = getattr(model, "lm_head", None)
    if lm is None or head is None:
        raise ModelNotFoundError("the model has no language_model and lm_head, so it is not a LLaVA-style VLM")
    return lm, head


def caption_loss(
    vlm: Any, compressor: Compressor, projector: nn.Module, features: torch.Tensor, caption: str, *, options: TrainOptions
) -> tuple[torch.Tensor, int]:
    """Next-token loss of `caption` given [prompt, projected compressed tokens of every segment]; returns (loss, segments)."""
    model, tokenizer = vlm.model, vlm.tokenizer
    device = next(projector.parameters()).device
    segments = split_segments(features, options.segment_frames)
    tokens = torch.cat([compressor(segment).tokens for segment in segments])  # (N, D) vision space
    visual = projector(tokens[None].to(device, next(projector.parameters()).dtype))  # (1, N, H)
    embed = model.get_input_embeddings()
    encode = lambda text: tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)  # noqa: E731
    if hasattr(vlm, "chat_ids"):
        # the layout the answering VLM uses at question time: chat template, visual block opening the user turn
        before, after = (ids[None].to(device) for ids in vlm.chat_ids(SYSTEM_PROMPT, options.prompt))
    else:
        before, after = encode(options.prompt + "\n"), encode("\n")
    caption_ids = encode(caption.strip())
    if tokenizer.eos_token_id is not None:
        eos = torch.tensor([[tokenizer.eos_token_id]], device=device)
        caption_ids = torch.cat((caption_ids, eos), dim=1)
    prefix, suffix, target = embed(before), embed(after), embed(caption_ids)  # (1, P, H), (1, A, H), (1, C, H)
    inputs = torch.cat((prefix, visual.to(prefix.dtype), suffix, target), dim=1)  # (1, P + N + A + C, H)
    lm, head = _language_model(model)
    hidden = lm(inputs_embeds=inputs).last_hidden_state  # (1, P + N + A + C, H)
    start = prefix.shape[1] + visual.shape[1] + suffix.shape[1]
    # position i predicts token i + 1: the caption's tokens are predicted from the positions just before them
    logits = head(hidden[:, start - 1 : -1]).float()  # (1, C, V)
    loss = F.cross_entropy(logits.flatten(0, 1), caption_ids.flatten())
    return loss, len(segments)


# -- checkpoints ---------------------------------------------------------------------------------------------
def save_checkpoint(
    path: Path,
    compressor: Compressor,
    *,
    encoder_fingerprint: str,
    projector: nn.Module | None = None,
    info: dict | None = None,
) -> Path:
    """Write compressor (and projector) weights with their JSON config atomically to one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"compressor.{k}": v.detach().cpu().contiguous() for k, v in compressor.state_dict().items()}
    if projector is not None:
        tensors.update({f"projector.{k}": v.detach().cpu().contiguous() for k, v in projector.state_dict().items()})
    config = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "compressor": compressor.config(),
        "encoder_fingerprint": encoder_fingerprint,
        "has_projector": projector is not None,
        **(info or {}),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"vidmem": json.dumps(config)})
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def read_checkpoint_config(path: Path) -> dict:
    """The JSON config of a vidmem compressor checkpoint, without loading its weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"compressor checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        config = json.loads(metadata["vidmem"])
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ModelNotFoundError(f"{path} is not a vidmem compressor checkpoint ({exc})") from exc
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ModelNotFoundError(f"{path} is not a vidmem compressor checkpoint")
    return config


def load_compressor(path: Path, *, encoder_fingerprint: str, dim: int) -> tuple[Compressor, dict | None]:
    """Load a compressor checkpoint made for this vision encoder; returns (compressor, projector state or None).

    A checkpoint trained on another vision encoder is refused with `EncoderMismatchError`.
    """
    from safetensors.torch import load_file

    config = read_checkpoint_config(path)
    made_for = config.get("encoder_fingerprint")
    if made_for != encoder_fingerprint:
        raise EncoderMismatchError(
            f"compressor checkpoint {path} was trained on vision encoder {made_for}, but the loaded model's encoder "
            f"is {encoder_fingerprint}; train a compressor for this model or load the model it was trained with."
        )
    spec = dict(config["compressor"])
    if int(spec.get("dim", -1)) != dim:
        raise EncoderMismatchError(
            f"compressor checkpoint {path} expects vision features of width {spec.get('dim')}, but the encoder gives {dim}."
        )
    name = spec.pop("name")
    spec.pop("dim")
    tensors = load_file(str(path))
    state = {k[len("compressor.") :]: v for k, v in tensors.items() if k.startswith("compressor.")}
    try:
        compressor = build_compressor(name, dim=dim, **spec)
        compressor.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as exc:  # options or weights this version cannot rebuild
        raise ModelNotFoundError(f"{path} holds a '{name}' compressor this version of vidmem cannot rebuild ({exc})") from exc
    projector = {k[len("projector.") :]: v for k, v in tensors.items() if k.startswith("projector.")}
    return compressor.eval(), (projector or None)


# -- the loop ------------------------------------------------------------------------------------------------
def _device(options: TrainOptions) -> torch.device:
    if options.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA device is available")
    return torch.device(options.device)


def _schedule(step: int, options: TrainOptions) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10% of the peak."""
    if step < options.warmup:
        return (step + 1) / options.warmup
    progress = (step - options.warmup) / max(1, options.steps - options.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(options: TrainOptions, *, vlm: Any = None) -> TrainReport:
    """Train a compressor (and the projector) and write a checkpoint; `vlm` skips loading `options.model`."""
    options = options.validate()
    started = time.monotonic()
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    if vlm is None:
        from vidmem.agents.models import load_vlm  # lazily: agents depends on compressors, not the reverse

        vlm = load_vlm(options.model, device=str(_device(options)))
    device = next(vlm.model.parameters()).device
    encoder = vlm.encoder
    samples = read_jsonl(Path(options.data), need_captions=options.objective == "caption")

    if options.init is not None:
        compressor, projector_state = load_compressor(
            Path(options.init), encoder_fingerprint=encoder.fingerprint, dim=encoder.dim
        )
    else:
        compressor = build_compressor(
            options.compressor, dim=encoder.dim, num_patches=encoder.num_patches, **options.compressor_options
        )
        projector_state = None
    if options.objective == "reconstruction" and not hasattr(compressor, "reconstruction_loss"):
        raise ConfigError(f"compressor '{compressor.name}' has no decoder; the reconstruction objective needs 'svc'")
    compressor = compressor.to(device=device, dtype=torch.float32).train()

    trainable: list[nn.Parameter] = list(compressor.parameters())
    projector = None
    if options.objective == "caption":
        for param in vlm.model.parameters():
            param.requires_grad_(False)
        projector = projector_of(vlm.model)
        if projector_state is not None:
            projector.load_state_dict(projector_state)
        if options.train_projector:
            projector.float().requires_grad_(True)  # fp32 master weights; autocast runs it in bf16 on GPU
            trainable += list(projector.parameters())
        if options.train_llm:
            lm, head = _language_model(vlm.model)
            lm.float().requires_grad_(True)
            head.float().requires_grad_(True)
            trainable += [p for p in (*lm.parameters(), *head.parameters()) if p.requires_grad]
        trainable = list({id(p): p for p in trainable}.values())
    if not trainable:
        raise ConfigError(f"nothing to train: compressor '{compressor.name}' has no parameters and the projector is frozen")
    optimiser = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
    use_bf16 = options.precision == "bf16" or (options.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)
    features_of = FeatureStore(encoder, options)
    log.info(
        "training %s (%s) on %d videos, %d steps, %d trainable parameters, %s%s",
        compressor.name, options.objective, len(samples), options.steps,
        sum(p.numel() for p in trainable), device, " bf16" if use_bf16 else "",
    )

    order: list[int] = []
    segment_pool: list[torch.Tensor] = []

    def next_sample() -> Sample:
        if not order:
            order.extend(rng.sample(range(len(samples)), len(samples)))
        return samples[order.pop()]

    def next_segment() -> torch.Tensor:
        if not segment_pool:  # refill from the next video, segments shuffled
            segs = split_segments(features_of(next_sample().video), options.segment_frames)
            segment_pool.extend(rng.sample(segs, len(segs)))
        return segment_pool.pop()

    losses: list[float] = []
    segments_seen = 0
    bar = None
    if options.progress:
        from tqdm import tqdm

        bar = tqdm(total=options.steps, desc=f"train {compressor.name}", unit="step")
    for step in range(options.steps):
        for group in optimiser.param_groups:
            group["lr"] = options.lr * _schedule(step, options)
        total = 0.0
        for _ in range(options.grad_accum):
            with autocast:
                if options.objective == "caption":
                    parts = []
                    for _ in range(options.batch_size):
                        sample = next_sample()
                        loss, count = caption_loss(
                            vlm, compressor, projector, features_of(sample.video), sample.caption, options=options
                        )
                        parts.append(loss)
                        segments_seen += count
                else:
                    parts = [compressor.reconstruction_loss(next_segment().to(device)[None]) for _ in range(options.batch_size)]
                    segments_seen += len(parts)
                loss = torch.stack(parts).mean() / options.grad_accum
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(total)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
        if options.log_every and (step + 1) % options.log_every == 0:
            log.info("step %d/%d loss %.4f", step + 1, options.steps, total)

    if bar is not None:
        bar.close()
    compressor.eval()
    trained_projector = projector if (projector is not None and options.train_projector) else None
    info = {
        "objective": options.objective,
        "steps": options.steps,
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "model": str(getattr(vlm, "name", None) or options.model),
        "encoder_name": getattr(encoder, "name", ""),
    }
    path = save_checkpoint(
        Path(options.output), compressor, encoder_fingerprint=encoder.fingerprint, projector=trained_projector, info=info
    )
    return TrainReport(
        objective=options.objective,
        compressor=compressor.name,
        checkpoint=path,
        steps=options.steps,
        losses=losses,
        samples=len(samples),
        segments=segments_seen,
        trainable_parameters=sum(p.numel() for p in trainable),
        device=str(device),
        seconds=time.monotonic() - started,
    )
