"""Tiny models trained from scratch on the synthetic world (vidmem.stream.world), saved as ordinary checkpoints.

    python bench/world_models.py --recipe quick --out DIR   # minutes on 2 CPU cores (the tests' recipe)
    python bench/world_models.py --recipe full --out DIR    # the bench's recipe

writes DIR/clip (a sentence-transformers CLIP, `--embedder DIR/clip`), DIR/vlm (a LLaVA-OneVision checkpoint,
`--model DIR/vlm`) and DIR/train (the generated training footage and its JSONL files). Every step is seeded: the
same recipe and seed give the same weights.

The models are built for this world, not for real video:
- the tokenizer is a byte-level BPE (digits split one by one, as Qwen2's) trained on the world's captions,
  questions, answers, timestamps and vidmem's system prompt, with Qwen2's special tokens and chat template;
- the LLaVA-OneVision is a one-layer SigLIP (384 px, patch 14: 27x27 features, as the real one) and a two-layer
  Qwen2 with a two-layer projector.

Steps (`train_all`):
1. footage: training clips (seeds far from the evaluation seeds) written as H.264 with `stream.world`;
2. the vision tower: trained alone (stage 0, `pretrain_vision`) on a frame every `vision_stride` seconds, to tell
   the colour of each of its 27x27 patches, the background, and the object's shape from the mean of the object's
   patches (how attention reads it); the bench prints fresh linear probes' accuracies before and after;
3. the CLIP: trained contrastively (InfoNCE) on keyframes and their captions and questions (`train_clip`), so a
   question's text retrieves its segment;
4. the VLM, through `vidmem train` (the projector and the language model; the vision tower frozen; the default
   compressor, TimePerceiver, left untrained so that `vidmem ingest` without --compressor-weights stores exactly
   the tokens the model learnt from):
   - stage 1, the "caption" objective: every shot's description over that shot's segment alone. This dense signal
     is what teaches a language model trained from scratch to read the evidence; whole-clip captions and questions
     alone taught it the answers' priors instead (one description for every shot);
   - question answering, the "qa" objective, with stage 1's descriptions mixed in as questions so that learning
     the priors of one-word answers does not unlearn reading.
   The projector's output layer starts `projector_scale` smaller, so visual tokens start at the text embeddings'
   scale (`build_vlm_skeleton`). Both objectives read JSONL in `vidmem train`'s format ({"video", "caption",
   "since", "until"} and {"video", "question", "answer", "since", "until"}); prompts are built by the VLM adapter
   exactly as answering builds them (system prompt, timestamped segments, image_newline, the chat template).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `bench` importable like `python -m bench.world_models`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vidmem.stream import world

log = logging.getLogger("vidmem.bench.world_models")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]  # Qwen2's, as LLaVA-OneVision adds
QWEN2_CHAT_TEMPLATE = (  # Qwen2-Instruct's string template, as the llava-hf checkpoints' tokenizer_config.json has it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PREPROCESSOR = {  # llava-onevision-qwen2's preprocessor_config.json, less the anyres pinpoints
    "crop_size": {"height": 384, "width": 384}, "do_convert_rgb": True, "do_normalize": True, "do_pad": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "LlavaOnevisionImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "processor_class": "LlavaOnevisionProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
QA_FOCUS = 0.5  # share of one-shot questions trained on that shot's segment alone (shorter, cheaper prompts)
TRAIN_SEED_BASE = 100_000  # training footage seeds start here; evaluation seeds stay below it
CAPTION_PROMPT = "Describe the video."


@dataclass(frozen=True)
class Recipe:
    """How much of everything to train: `tests` for the suite, `quick` for `bench/quality.py --quick`, `full` for the
    bench's figures."""

    name: str
    clips: int  # training clips (16 s each)
    vision_steps: int  # stage 0: vision tower steps (batches of 16 frames)
    vision_clips: int  # stage 0: clips whose frames the tower learns from
    clip_steps: int  # CLIP contrastive steps
    caption_steps: int  # VLM stage 1 steps: one shot's segment and its description per example
    qa_steps: int  # VLM question-answering steps (questions mixed with stage 1's descriptions)
    lr: float = 2e-3  # VLM stage 1 peak learning rate (AdamW, warm-up then cosine)
    qa_lr: float = 1e-3  # question answering's peak learning rate (higher drifts back to the answers' priors)
    clip_lr: float = 2e-3  # CLIP peak learning rate
    vision_hidden: int = 32  # SigLIP width D
    text_hidden: int = 128  # Qwen2 width H
    text_layers: int = 2
    vision_stride: int = 2  # stage 0: one frame every this many seconds of every shot
    projector_scale: float = 0.05  # the projector's output layer starts this much smaller (see build_vlm_skeleton)
    seed: int = 0


RECIPES = {
    # the suite's: the trained vision tower and CLIP for retrieval and rules, and stage 1 alone for the VLM (a few
    # question-answering steps would leave it describing nothing right; it takes hundreds to recover)
    "tests": Recipe("tests", clips=64, vision_steps=100, vision_clips=32, clip_steps=300, caption_steps=400,
                    qa_steps=0),
    "quick": Recipe("quick", clips=96, vision_steps=400, vision_clips=48, clip_steps=300, caption_steps=600,
                    qa_steps=600),
    "full": Recipe("full", clips=320, vision_steps=1200, vision_clips=160, clip_steps=1200, caption_steps=2000,
                   qa_steps=1500, vision_stride=1),
}


# ---- tokenizer and checkpoint skeletons --------------------------------------------------------------------------
def corpus(seeds: Iterable[int]) -> list[str]:
    """Every text the models will read or write in this world."""
    from vidmem.agents.answer import SYSTEM_PROMPT

    texts = [SYSTEM_PROMPT, CAPTION_PROMPT, "You are a helpful assistant.", "system user assistant"]
    for seed in seeds:
        footage = world.make_clip(seed)
        texts.append(world.caption(footage))
        texts += [f"{q.question} {q.answer}" for q in world.questions(footage, "x.mp4")]
    for second in range(0, 3600, 4):
        whole = f"{second // 3600:02d}:{second % 3600 // 60:02d}:{second % 60:02d}"
        texts.append(f"[{whole}-{whole}]")
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            texts.append(f"a {colour} {shape} is in view. Is there a {colour} {shape}? yes no")
    return texts


def build_tokenizer(texts: Sequence[str], *, vocab_size: int = 512):
    """A byte-level BPE with digits split (as Qwen2's), Qwen2's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:], model_max_length=32768, clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
    return tokenizer


def build_vlm_skeleton(directory: Path, tokenizer, recipe: Recipe) -> Path:
    """A LLaVA-OneVision checkpoint with seeded random weights, sized for the world."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIALS}
    vision = SiglipVisionConfig(hidden_size=recipe.vision_hidden, intermediate_size=2 * recipe.vision_hidden,
                                num_hidden_layers=1, num_attention_heads=2, image_size=384, patch_size=14,
                                vision_use_head=False)
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=recipe.text_hidden, intermediate_size=2 * recipe.text_hidden,
        num_hidden_layers=recipe.text_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                                  video_token_index=ids["<video>"], vision_feature_layer=-1,
                                  vision_feature_select_strategy="full")
    torch.manual_seed(recipe.seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    # The language model starts from scratch: its text embeddings have norms near 0.2, while a random projector's
    # visual tokens come out near 20. Started that far apart, the model learns the answers' priors from the text
    # and never reads the evidence (measured: one description for every shot). Visual tokens that start at the
    # text's scale are read within a few hundred steps.
    projector = model.model.multi_modal_projector.linear_2
    with torch.no_grad():
        projector.weight.mul_(recipe.projector_scale)
        projector.bias.mul_(recipe.projector_scale)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"  # as the real checkpoint names it
    tokenizer_config["chat_template"] = QWEN2_CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return directory


def build_clip_skeleton(directory: Path, texts: Sequence[str], *, seed: int = 0, width: int = 64) -> Path:
    """A sentence-transformers CLIP directory (the `clip-ViT-B-32` layout) with seeded random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, PreTrainedTokenizerFast

    directory = Path(directory)
    module = directory / "0_CLIPModel"
    module.mkdir(parents=True, exist_ok=True)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bos, eos = raw.token_to_id(specials[0]), raw.token_to_id(specials[1])
    raw.post_processor = processors.TemplateProcessing(
        single=f"{specials[0]} $A {specials[1]}", special_tokens=[(specials[0], bos), (specials[1], eos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=specials[0], eos_token=specials[1],
                                        pad_token=specials[1], unk_token=specials[1], model_max_length=77)
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                   bos_token_id=bos, eos_token_id=eos, pad_token_id=eos).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=224, patch_size=32).to_dict(),
        projection_dim=width,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(module)
    tokenizer.save_pretrained(module)
    (module / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224},
    }, indent=2))
    modules = [{"idx": 0, "name": "0", "path": "0_CLIPModel", "type": "sentence_transformers.models.CLIPModel"}]
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    return directory


# ---- footage as vidmem segments it ---------------------------------------------------------------------------------
@dataclass
class ClipSegments:
    """A video cut into segments exactly as `vidmem ingest` cuts it: (start, end, frames) per stored segment."""

    path: Path
    spans: list[tuple[float, float]]
    frames: list[list[np.ndarray]]  # per segment: (H, W, 3) uint8 RGB frames as decoded


class _CaptureSink:
    """A SegmentSink that keeps the decoded frames of every segment instead of encoding them."""

    def __init__(self) -> None:
        self.segments: list = []

    def encode(self, segments: list) -> list:
        return [None] * len(segments)

    def commit(self, segment, encoded) -> int:
        self.segments.append([segment.start, segment.end, [f.image for f in segment.frames]])
        return 0

    def extend(self, segment) -> None:
        self.segments[-1][1] = segment.end


def segment_video(path: Path) -> ClipSegments:
    """Runs vidmem's ingest loop (decoding, sampling, shot cuts, segmenting, static check) on `path`."""
    import asyncio

    from vidmem.stream import open_source
    from vidmem.stream.ingest import IngestOptions, ingest

    sink = _CaptureSink()
    asyncio.run(ingest(open_source(str(path)), sink, stream="train", options=IngestOptions()))
    return ClipSegments(Path(path), [(float(s), float(e)) for s, e, _ in sink.segments],
                        [frames for _, _, frames in sink.segments])


def write_training_set(folder: Path, recipe: Recipe) -> tuple[list[world.Footage], Path, Path]:
    """Training clips under `folder`, with `captions.jsonl` and `qa.jsonl` in `vidmem train`'s format; returns
    (footage, captions file, qa file).

    - captions: one row per shot, {"video", "caption", "since", "until"}: the shot's description over its own
      segment (stage 1, the dense signal that teaches the language model to read the evidence);
    - qa: {"video", "question", "answer", "kind"} for every question, a share of the one-shot ones over that shot's
      segment alone, plus every shot's description again as a question ("describe"), so that learning the answers'
      priors does not unlearn reading the evidence.
    """
    folder = Path(folder)
    seeds = [TRAIN_SEED_BASE + recipe.seed * 10_000 + i for i in range(recipe.clips)]
    made = world.build_set(folder, seeds)
    captions, qa = folder / "captions.jsonl", folder / "qa.jsonl"
    rng = random.Random(recipe.seed)
    rows = []
    with captions.open("w") as cap:
        for footage in made.footage:
            video = made.path(footage).name
            for shot in footage.shots:
                span = {"since": shot.start + 0.5, "until": shot.end - 0.5}  # that shot's segment only
                cap.write(json.dumps({"video": video, "caption": shot.describe(), **span}) + "\n")
                rows.append({"video": video, "question": CAPTION_PROMPT, "answer": shot.describe(), "kind": "describe",
                             **span})
    for q in made.questions:
        row = {"video": q.video, "question": q.question, "answer": answer_text(q), "kind": q.kind}
        if q.end - q.start < world.SEGMENT_SECONDS * 4 and rng.random() < QA_FOCUS:
            row.update(since=q.start + 0.5, until=q.end - 0.5)  # only that shot's segment as evidence
        rows.append(row)
    rng.shuffle(rows)
    qa.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return made.footage, captions, qa


def answer_text(q: world.Question) -> str:
    """The answer the model is taught to write: the word, the number, or for `when` the time as the evidence shows it."""
    if q.kind == "when":
        second = int(float(q.answer))
        return f"{second // 3600:02d}:{second % 3600 // 60:02d}:{second % 60:02d}"
    return q.answer


# ---- stage 0: the vision tower ----------------------------------------------------------------------------------------
def patch_labels(footage: world.Footage, second: int, side: int = 27) -> tuple[np.ndarray, np.ndarray, int]:
    """Per patch of the side x side grid: colour class (0 none, 1.. COLOURS) and shape class (0 none, 1.. SHAPES),
    and the background class of the frame."""
    shot = footage.shot_at(second)
    _, labels = world.render(shot, second - shot.start)
    centres = ((np.arange(side) + 0.5) * world.SIZE / side).astype(int)  # pixel under each patch centre
    covered = labels[np.ix_(centres, centres)] >= 0  # (side, side)
    colour = np.zeros((side, side), np.int64)
    shape = np.zeros((side, side), np.int64)
    if shot.thing is not None:
        colour[covered] = 1 + list(world.COLOURS).index(shot.thing.colour)
        shape[covered] = 1 + world.SHAPES.index(shot.thing.shape)
    return colour.reshape(-1), shape.reshape(-1), list(world.BACKGROUNDS).index(shot.background)


def vision_batches(footage: list[world.Footage], paths: list[Path], rng: random.Random, *, stride: int = 2) -> list:
    """(decoded frame, colour labels, shape labels, background) for a frame every `stride` seconds of every shot,
    starting at a random second, shuffled."""
    items = []
    for clip, path in zip(footage, paths):
        decoded = decode_all(path)
        for shot in clip.shots:
            end = min(shot.end, len(decoded))
            for second in range(shot.start + rng.randrange(stride), end, stride):
                colour, shape, background = patch_labels(clip, second)
                items.append((decoded[second], colour, shape, background))
    rng.shuffle(items)
    return items


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame of a world video, decoded with PyAV (RGB)."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


class Probe(torch.nn.Module):
    """Linear read-outs of patch features: colour per patch, the object's shape from the mean of its patches, the
    background from the mean of all patches.

    Shape is read from the object's patches together because that is how the language model reads it (attention
    averages the tokens of what the question names); a patch inside a large square looks like one inside a large
    circle, so per-patch shape labels ask the one-layer tower for what it cannot see."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.colour = torch.nn.Linear(dim, 1 + len(world.COLOURS))
        self.shape = torch.nn.Linear(dim, len(world.SHAPES))
        self.background = torch.nn.Linear(dim, len(world.BACKGROUNDS))

    def losses(self, features: torch.Tensor, colour, shape, background) -> tuple[torch.Tensor, dict]:
        # features: (B, L, D); colour, shape: (B, L) classes per patch (0: no object); background: (B,)
        c = self.colour(features)  # (B, L, 1 + colours)
        b = self.background(features.mean(dim=1))  # (B, backgrounds)
        on = colour > 0  # (B, L) object patches
        # object patches are few: their colour loss is averaged apart from the background patches'
        loss = F.cross_entropy(c[~on], colour[~on]) + F.cross_entropy(b, background)
        acc = {"background": float((b.argmax(-1) == background).float().mean())}
        seen = on.any(dim=1)  # (B,) frames with an object
        if seen.any():
            weights = on.float() / on.float().sum(dim=1, keepdim=True).clamp(min=1)  # (B, L) mean over the object
            pooled = torch.einsum("bl,bld->bd", weights, features)[seen]  # (B', D)
            target = shape.max(dim=1).values[seen] - 1  # (B',) the frame's object shape
            s = self.shape(pooled)
            loss = loss + F.cross_entropy(c[on], colour[on]) + F.cross_entropy(s, target)
            with torch.no_grad():
                acc["colour"] = float((c.argmax(-1)[on] == colour[on]).float().mean())
                acc["shape"] = float((s.argmax(-1) == target).float().mean())
        return loss, acc


def tower_features(encoder, pixels: torch.Tensor) -> torch.Tensor:
    """(B, L, D) patch features of preprocessed (B, 3, S, S) pixels, with grad when enabled, as `VisionEncoder`
    computes them."""
    return encoder.tower(pixel_values=pixels.to(encoder.dtype), output_hidden_states=True).hidden_states[encoder.feature_layer]


def pretrain_vision(encoder, items: list, *, steps: int, batch: int = 16, lr: float = 3e-3, seed: int = 0,
                    probe_steps: int = 100, held: int = 48) -> dict:
    """Stage 0: train the tower (with throw-away linear probes) to expose colour, shape and background per patch.

    Frames are preprocessed once (the checkpoint's own resize and normalisation). Returns the accuracies of fresh
    linear probes on held-back frames for the random tower and for the trained one."""
    torch.manual_seed(seed)
    with torch.no_grad():
        pixels = torch.cat([encoder.preprocess([i[0] for i in items[k:k + 16]], device=encoder.device, dtype=torch.float32)
                            for k in range(0, len(items), 16)]).to(torch.bfloat16)  # (N, 3, S, S), bf16 to halve RAM
    colour = torch.from_numpy(np.stack([i[1] for i in items]))  # (N, L)
    shape = torch.from_numpy(np.stack([i[2] for i in items]))
    background = torch.tensor([i[3] for i in items])
    train = list(range(held, len(items)))

    def probe_accuracy() -> dict:
        with torch.no_grad():
            feats = torch.cat([tower_features(encoder, pixels[k:k + 16].float()) for k in range(0, len(items), 16)])
        probe = Probe(encoder.dim)
        optim = torch.optim.AdamW(probe.parameters(), lr=1e-2)
        for _ in range(probe_steps):
            loss, _ = probe.losses(feats[held:], colour[held:], shape[held:], background[held:])
            optim.zero_grad()
            loss.backward()
            optim.step()
        with torch.no_grad():
            _, acc = probe.losses(feats[:held], colour[:held], shape[:held], background[:held])
        return {k: round(v, 3) for k, v in acc.items()}

    before = probe_accuracy()
    probe = Probe(encoder.dim)
    optim = torch.optim.AdamW(list(probe.parameters()) + list(encoder.tower.parameters()), lr=lr)
    rng = random.Random(seed)
    encoder.tower.train()
    for step in range(steps):
        chosen = rng.sample(train, min(batch, len(train)))
        loss, _ = probe.losses(tower_features(encoder, pixels[chosen].float()), colour[chosen], shape[chosen],
                               background[chosen])
        optim.zero_grad()
        loss.backward()
        optim.step()
        if (step + 1) % 20 == 0:
            log.info("vision step %d/%d loss %.3f", step + 1, steps, float(loss.detach()))
    encoder.tower.eval()
    return {"random_tower": before, "trained_tower": probe_accuracy()}


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10% of the peak (as `vidmem train`)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# ---- the CLIP ---------------------------------------------------------------------------------------------------------
def shot_texts(shot: world.Shot, footage: world.Footage) -> list[str]:
    """What a user may write about a shot: its caption, names of what is in it, and the questions about it."""
    if shot.thing is None:
        return [shot.describe(), f"an empty {shot.background} background", "nothing is in view"]
    thing = shot.thing
    texts = [shot.describe(), f"a {thing.colour} {thing.shape}", f"the {thing.colour} object", thing.describe(),
             f"a {thing.colour} {thing.shape} is in view"]
    texts += [q.question for q in world.questions(footage, "x.mp4") if q.start == shot.start and q.end == shot.end]
    return texts


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def train_clip(directory: Path, footage: list[world.Footage], paths: list[Path], *, steps: int, batch: int = 32,
               lr: float = 2e-3, seed: int = 0, log_every: int = 100) -> list[float]:
    """Contrastive training (InfoNCE, both directions) of the CLIP in `directory` on frames of shots and texts about
    them; at most one shot per colour and shape in a batch, so no pair in it is a false negative."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    module = Path(directory) / "0_CLIPModel"
    model = CLIPModel.from_pretrained(module)
    processor = CLIPImageProcessor.from_pretrained(module)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(module)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pool = []  # (key, frame, texts)
    for clip, path in zip(footage, paths):
        decoded = decode_all(path)
        for shot in clip.shots:
            key = shot.thing.name if shot.thing is not None else f"empty {shot.background}"
            shot_frames = [decoded[s] for s in range(shot.start, min(shot.end, len(decoded)))]
            pool.append((key, shot_frames, shot_texts(shot, clip)))
    pixels_cache: dict[int, torch.Tensor] = {}

    def pixels(index: int, frame_index: int) -> torch.Tensor:
        key = index * 16 + frame_index
        if key not in pixels_cache:
            image = Image.fromarray(pool[index][1][frame_index])
            pixels_cache[key] = processor(images=image, return_tensors="pt").pixel_values[0]
        return pixels_cache[key]

    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        for group in optim.param_groups:
            group["lr"] = lr * _schedule(step, steps, max(1, steps // 20))
        chosen, keys = [], set()
        while len(chosen) < batch:
            index = rng.randrange(len(pool))
            if pool[index][0] not in keys:
                keys.add(pool[index][0])
                chosen.append(index)
            if len(keys) >= 1 + len(world.COLOURS) * len(world.SHAPES) + len(world.BACKGROUNDS) - 1:
                break
        images = torch.stack([pixels(i, 0 if rng.random() < 0.5 else rng.randrange(len(pool[i][1]))) for i in chosen])
        texts = [rng.choice(pool[i][2]) for i in chosen]
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        image_vec = F.normalize(_features(model.get_image_features(pixel_values=images)), dim=-1)
        text_vec = F.normalize(_features(model.get_text_features(**tokens)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image_vec @ text_vec.T  # (B, B)
        target = torch.arange(len(chosen))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            log.info("clip step %d/%d loss %.3f (%.1f s)", step + 1, steps, sum(losses[-log_every:]) / log_every,
                     time.perf_counter() - started)
    model.eval()
    model.save_pretrained(module)
    return losses


# ---- everything ---------------------------------------------------------------------------------------------------
def vidmem_train(vlm, *, data: Path, output: Path, objective: str, steps: int, lr: float, seed: int,
                 model_dir: Path | None, compressor: str = "timeperceiver", options: dict | None = None,
                 cache_dir: Path, train_llm: bool = True, batch_size: int = 4) -> dict:
    """`vidmem train` (compressors.train.train, the code behind the CLI) with the world's settings."""
    from vidmem.compressors.train import TrainOptions, train

    report = train(TrainOptions(
        data=data, output=output, objective=objective, compressor=compressor, compressor_options=options or {},
        steps=steps, lr=lr, warmup=max(1, steps // 20), batch_size=batch_size, train_llm=train_llm,
        output_model=model_dir, cache_dir=cache_dir, seed=seed, log_every=50,
    ), vlm=vlm)
    out = report.to_json()
    return {"first_loss": round(out["first_loss"], 4), "last_loss": round(out["final_loss"], 4),
            "seconds": round(report.seconds, 1), "steps": steps, "checkpoint": str(report.checkpoint)}


def train_all(out: Path, recipe: Recipe) -> dict:
    """The whole recipe: footage, the CLIP, the vision tower, then the VLM's caption and QA stages through
    `vidmem train` (`python -m vidmem train DATA --objective caption|qa --train-llm ...` does the same)."""
    from vidmem.agents.models import load_vlm

    torch.manual_seed(recipe.seed)
    out = Path(out)
    report: dict = {"recipe": asdict(recipe)}
    started = time.perf_counter()
    train_dir = out / "train"
    footage, captions_file, qa_file = write_training_set(train_dir, recipe)
    paths = [train_dir / f"{f.name}.mp4" for f in footage]
    texts = corpus(TRAIN_SEED_BASE + recipe.seed * 10_000 + i for i in range(min(recipe.clips, 200)))
    report["footage_seconds"] = _since(started)

    mark = time.perf_counter()
    build_clip_skeleton(out / "clip", texts, seed=recipe.seed)
    clip_losses = train_clip(out / "clip", footage, paths, steps=recipe.clip_steps, lr=recipe.clip_lr, seed=recipe.seed)
    report["clip"] = {"first_loss": round(clip_losses[0], 4), "last_loss": _tail(clip_losses), "seconds": _since(mark)}

    mark = time.perf_counter()
    skeleton = out / "train" / "vlm-stage0"
    build_vlm_skeleton(skeleton, build_tokenizer(texts), recipe)
    vlm = load_vlm(str(skeleton), device="cpu")
    items = vision_batches(footage[: recipe.vision_clips], paths[: recipe.vision_clips], random.Random(recipe.seed),
                           stride=recipe.vision_stride)
    report["vision"] = pretrain_vision(vlm.encoder, items, steps=recipe.vision_steps, seed=recipe.seed)
    report["vision"]["seconds"] = _since(mark)
    vlm.save_pretrained(skeleton)
    del vlm, items

    # stage 1 (captions) and question answering; the default compressor untrained (depth 0 gives exactly the
    # untrained TimePerceiver's tokens, without computing its zero-gated layers)
    untrained = {"depth": 0}
    cache = out / "train" / "features"
    stage1 = out / "train" / "vlm-stage1"
    report["caption"] = vidmem_train(
        load_vlm(str(skeleton), device="cpu"), data=captions_file, output=out / "train" / "caption.safetensors",
        objective="caption", steps=recipe.caption_steps, lr=recipe.lr, seed=recipe.seed, model_dir=stage1,
        options=untrained, cache_dir=cache)
    if recipe.qa_steps:
        report["qa"] = vidmem_train(
            load_vlm(str(stage1), device="cpu"), data=qa_file, output=out / "train" / "qa.safetensors", objective="qa",
            steps=recipe.qa_steps, lr=recipe.qa_lr, seed=recipe.seed + 1, model_dir=out / "vlm", options=untrained,
            cache_dir=cache)
    else:  # stage 1's model is the recipe's
        shutil.copytree(stage1, out / "vlm", dirs_exist_ok=True)
    report["seconds"] = _since(started)
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    return report


def _tail(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 10):]
    return round(sum(tail) / len(tail), 4)


def _since(mark: float) -> float:
    return round(time.perf_counter() - mark, 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the synthetic world's tiny CLIP and LLaVA-OneVision on a CPU.")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="quick")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/clip, OUT/vlm and OUT/train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.add_argument("--threads", type=int, help="torch threads (1 on a CPU shared with other work: spinning "
                        "OpenMP threads slow small models down tenfold there)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "sentence_transformers", "vidmem.stream", "vidmem.agents.models", "vidmem.compressors.dataset"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    recipe = replace(RECIPES[args.recipe], seed=args.seed)
    for pair in args.set:
        key, _, value = pair.partition("=")
        recipe = replace(recipe, **{key: type(getattr(recipe, key))(value)})
    report = train_all(args.out, recipe)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
