"""Training compressors: Clapper's stage 1, question answering, and SVC's reconstruction pretraining.

- objective "caption" (clapper-timeperceiver.txt, sections 3.2 and 4.1, stage 1): video-caption pairs; the vision
  encoder is frozen, the compressor and the VLM's projector are trained (the language model too with
  `train_llm`); the loss is the next-token loss of the caption after the answering prompt with `prompt` as the
  question. Departure: Clapper also trains the language model in stage 1 (section 4.1); here it stays frozen
  unless asked, which keeps a stock VLM's language ability and makes training affordable on one GPU or a CPU.
- objective "qa": question-answer pairs over a video (optionally a stretch of it); the loss is the next-token
  loss of the answer after the answering prompt with the question, the stage a small VLM needs to answer
  questions about footage.
- objective "reconstruction" (avs-svc-adaptive-sampler-and-compressor.txt, section 3.2.2, eq. 11): video only; the
  SVC compressor and its decoder minimise |f - D(C(f) + avgpool3d(f))| on frozen vision features.

The prompt is the one `vidmem ask` builds, through the VLM adapter: the same system prompt, every segment's
evidence after its timestamp text, the checkpoint's own chat template. Segments are the ones ingest makes
(`vidmem.compressors.dataset`), at most `max_frames` frames of them per example, evenly spaced, each with its time.

An epoch is one pass over the training examples (videos' segments for "reconstruction"); the validation loss
(held-out videos) is measured after every epoch and at the end. The run saves the checkpoint, its training state
and, with `train_llm`, a complete model directory (`output_model`) every `save_every` steps and at the end;
`resume` continues a saved run from its step with its optimiser and random state.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vidmem.compressors import Compressor, build_compressor
from vidmem.compressors.checkpoint import (
    RunIdentity,
    TrainState,
    load_compressor,
    load_state,
    module_fingerprint,
    read_checkpoint_config,
    save_checkpoint,
    save_state,
    state_path,
)
from vidmem.compressors.dataset import (
    CachedSegment,
    Example,
    FeatureCache,
    batches,
    default_cache_dir,
    in_window,
    read_examples,
    sampled_frames as decode_frames,
    split_validation,
    thin,
)
from vidmem.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [  # checkpoint I/O and clip reading live in checkpoint.py and dataset.py; older imports find them here
    "OBJECTIVES", "TrainOptions", "TrainReport", "answer_loss", "answer_losses", "decode_frames", "load_compressor",
    "load_examples", "read_checkpoint_config", "save_checkpoint", "train",
]
OBJECTIVES = ("caption", "qa", "reconstruction")
_ALIASES = {"reconstruct": "reconstruction", "svc": "reconstruction", "stage1": "caption"}


@dataclass(frozen=True)
class TrainOptions:
    """Everything `train` needs; checked once by `validate`."""

    data: Path  # JSONL of examples (see vidmem.compressors.dataset), relative paths against its folder
    output: Path  # checkpoint file to write (.safetensors); its training state goes beside it
    objective: str = "caption"  # "caption" (Clapper stage 1), "qa" (question answering) or "reconstruction" (SVC)
    compressor: str = "timeperceiver"  # registered compressor name
    compressor_options: dict = field(default_factory=dict)  # keyword options for build_compressor
    init: Path | None = None  # start from this checkpoint's weights (a new run: fresh optimiser, step 0)
    resume: Path | None = None  # continue the run that saved this checkpoint: weights, optimiser, step, random state
    steps: int = 100  # optimiser steps in all (a resumed run continues up to this)
    batch_size: int = 1  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4  # peak learning rate (AdamW), linear warm-up then cosine decay to 10%
    warmup: int = 0  # warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    fps: float = 1.0  # frames sampled per second of video, as `vidmem ingest --fps`
    max_frames: int = 96  # at most this many sampled frames of evidence per example (Clapper: 96)
    prompt: str = "Describe the video."  # the question the caption objective asks
    train_projector: bool = True  # train the VLM's projector with the compressor (caption, qa)
    train_llm: bool = False  # also train the language model (saved to `output_model`)
    output_model: Path | None = None  # model directory written with `train_llm` (default: OUTPUT's stem + "-model")
    val: Path | None = None  # a separate JSONL of validation examples
    val_split: float = 0.0  # else hold out this share of the training videos for validation
    cache_dir: Path | None = None  # where vision features are cached (default: default_cache_dir())
    save_every: int = 0  # also save the checkpoint and training state every this many steps (0: at the end only)
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16"
    seed: int = 0  # seeds data order, the validation split and initialisation
    log_every: int = 10  # log the loss every this many steps
    progress: bool = False  # show progress bars on stderr

    def validate(self) -> "TrainOptions":
        if self.objective in _ALIASES:
            return dataclasses.replace(self, objective=_ALIASES[self.objective]).validate()
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got '{self.objective}'")
        for key in ("steps", "batch_size", "grad_accum", "max_frames"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.save_every < 0 or self.warmup < 0:
            raise ConfigError("save_every and warmup must not be negative")
        if not (self.lr > 0 and self.fps > 0):
            raise ConfigError("lr and fps must be positive")
        if not 0.0 <= self.val_split < 1.0:
            raise ConfigError(f"val_split must be a share in [0, 1), got {self.val_split}")
        if self.val is not None and self.val_split > 0:
            raise ConfigError("give either a validation file or val_split, not both")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got '{self.precision}'")
        if self.init is not None and self.resume is not None:
            raise ConfigError("give either init (new run from weights) or resume (continue a run), not both")
        if self.train_llm and self.objective == "reconstruction":
            raise ConfigError("train_llm needs the caption or qa objective; reconstruction never runs the language model")
        if not Path(self.data).is_file():
            raise ConfigError(f"training data not found: {self.data}")
        if self.val is not None and not Path(self.val).is_file():
            raise ConfigError(f"validation data not found: {self.val}")
        return self

    @property
    def model_dir(self) -> Path:
        """Where `train_llm` writes the trained model directory."""
        output = Path(self.output)
        return Path(self.output_model) if self.output_model else output.with_name(f"{output.stem}-model")


@dataclass
class TrainReport:
    """What a training run did; `to_json` is `vidmem train --json`'s object."""

    objective: str  # "caption", "qa" or "reconstruction"
    compressor: str  # compressor name
    checkpoint: Path  # the file written
    steps: int  # optimiser steps taken in all (including those before a resume)
    start_step: int  # the step this run started from (0, or the resumed checkpoint's)
    losses: list[float]  # mean training loss of every optimiser step (of the whole run, across resumes)
    epochs: list[dict]  # {"epoch", "step", "train_loss", "val_loss"} after each epoch and at the end
    samples: int  # training examples
    val_samples: int  # validation examples
    segments: int  # segments seen in this run
    trainable_parameters: int  # parameters updated
    device: str  # where it ran
    seconds: float  # wall time
    model_dir: Path | None = None  # the trained model directory (train_llm)

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        """Mean of the last few steps, less noisy than the last one."""
        tail = self.losses[-max(1, min(5, len(self.losses) // 5)) :]
        return sum(tail) / len(tail)

    @property
    def val_loss(self) -> float | None:
        """The last validation loss measured (None without validation data)."""
        measured = [e["val_loss"] for e in self.epochs if e.get("val_loss") is not None]
        return measured[-1] if measured else None

    def to_json(self) -> dict:
        out = asdict(self)
        out["checkpoint"] = str(self.checkpoint)
        out["model_dir"] = None if self.model_dir is None else str(self.model_dir)
        out.update(first_loss=self.first_loss, final_loss=self.final_loss, last_loss=self.final_loss,
                   val_loss=self.val_loss)
        return out


# -- losses -----------------------------------------------------------------------------------------------------
def answer_loss(vlm: Any, compressor: Compressor, segments: list[CachedSegment], question: str, target: str,
                *, device: torch.device) -> torch.Tensor:
    """Next-token loss of `target` after the answering prompt: the question over the segments' timestamped evidence.

    Every segment is shown at full detail (the compressor's whole token block), in time order, as `vidmem ask`
    shows the segments it selects.
    """
    return answer_losses(vlm, compressor, [(segments, question, target)], device=device)[0]


def answer_losses(vlm: Any, compressor: Compressor, examples: list[tuple[list[CachedSegment], str, str]],
                  *, device: torch.device) -> torch.Tensor:
    """(B,) `answer_loss` of each (segments, question, target), the language model run once over the batch."""
    prompts = []
    for segments, question, _ in examples:
        items = []
        for segment in segments:
            block = vlm.compress(compressor, segment.features().to(device))  # tokens (N, H) in the LM's input space
            items.append((segment.start, segment.end, block.tokens))
        evidence = vlm.evidence_embeds(items)  # (S, H)
        prompts.append(vlm.prompt_embeds(question, evidence))  # (1, P, H), the system prompt answering uses
    return vlm.answer_losses(prompts, [target for *_, target in examples])


@dataclass(frozen=True)
class Item:
    """One unit of training: an example over its evidence segments (or, for reconstruction, one segment)."""

    segments: tuple[CachedSegment, ...]  # time order
    question: str | None  # None for reconstruction
    target: str | None


def items_of(examples: list[Example], cache: FeatureCache, options: TrainOptions) -> list[Item]:
    """Examples -> items, reading the segment index of every video (extracting features on first use)."""
    items = []
    for example in examples:
        segments = cache.segments(example.video)
        if options.objective == "reconstruction":
            items += [Item((s,), None, None) for s in segments]
            continue
        shown = thin(in_window(segments, example.since, example.until), options.max_frames)
        if not shown:
            raise ConfigError(f"{example.video}: no segment lies between {example.since} and {example.until} s")
        if options.objective == "caption":
            items.append(Item(tuple(shown), options.prompt, example.caption))
        else:
            items.append(Item(tuple(shown), example.question, example.answer))
    if options.objective == "reconstruction":  # one item per distinct segment: a video listed twice counts once
        items = list({item.segments[0].path: item for item in items}.values())
    return items


# -- the loop ---------------------------------------------------------------------------------------------------
def _schedule(step: int, options: TrainOptions) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10% of the peak."""
    if step < options.warmup:
        return (step + 1) / options.warmup
    progress = (step - options.warmup) / max(1, options.steps - options.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """The parts of one run: the modules trained, the optimiser, the data, and how a loss is computed."""

    def __init__(self, options: TrainOptions, vlm: Any) -> None:
        self.options = options
        self.vlm = vlm
        self.encoder = vlm.encoder
        self.device = torch.device(vlm.device)
        self.state = load_state(options.resume) if options.resume is not None else None
        self.compressor = self._compressor()
        if options.objective == "reconstruction" and not hasattr(self.compressor, "reconstruction_loss"):
            raise ConfigError(f"compressor '{self.compressor.name}' has no decoder; the reconstruction objective needs 'svc'")
        self.identity = RunIdentity(
            objective=options.objective, compressor=self.compressor.config(), encoder=self.encoder.fingerprint,
            language_model=module_fingerprint(vlm.language_model), train_llm=options.train_llm,
        )
        if self.state is not None:
            problem = self.identity.mismatch(self.state.identity, source=Path(options.resume))
            if problem:
                raise ConfigError(problem)
            self._load_weights(Path(options.resume))
        self.modules, self.trainable = self._unfreeze()
        self.optimiser = torch.optim.AdamW(self.trainable, lr=options.lr, weight_decay=options.weight_decay)
        if self.state is not None:
            try:
                self.optimiser.load_state_dict(self.state.optimiser)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise ConfigError(f"cannot resume from {options.resume}: its optimiser state does not fit ({exc})") from exc
        use_bf16 = options.precision == "bf16" or (options.precision == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if use_bf16
                         else nullcontext())
        self.bf16 = use_bf16

    def _compressor(self) -> Compressor:
        """A fresh compressor as the options ask, or (init) the one in a checkpoint with its projector."""
        options, encoder = self.options, self.encoder
        if options.init is not None:
            compressor = self._load_weights(Path(options.init))
        else:
            compressor = build_compressor(options.compressor, dim=encoder.dim, num_patches=encoder.num_patches,
                                          **options.compressor_options)
        return compressor.to(device=self.device, dtype=torch.float32).train()

    def _load_weights(self, path: Path) -> Compressor:
        """Load a checkpoint's compressor (into `self.compressor` when there is one) and its projector."""
        compressor, projector_state = load_compressor(path, encoder_fingerprint=self.encoder.fingerprint,
                                                      dim=self.encoder.dim)
        if projector_state is not None:
            self.vlm.projector.load_state_dict(projector_state)
        if getattr(self, "compressor", None) is not None:
            self.compressor.load_state_dict(compressor.state_dict())
            return self.compressor
        return compressor

    def _unfreeze(self) -> tuple[list[nn.Module], list[nn.Parameter]]:
        """The modules and parameters to train, in a fixed order (compressor, projector, language model)."""
        options, vlm = self.options, self.vlm
        modules: list[nn.Module] = [self.compressor]
        if options.objective != "reconstruction":
            for module in (vlm.projector, vlm.language_model, vlm.lm_head):
                module.requires_grad_(False)
            parts = ([vlm.projector] if options.train_projector else []) + (
                [vlm.language_model, vlm.lm_head] if options.train_llm else [])
            for module in parts:
                module.float().requires_grad_(True)  # fp32 master weights; autocast runs them in bf16 on a GPU
            modules += parts
        # lm_head may share the embedding's weight: each parameter once
        trainable = list({id(p): p for module in modules for p in module.parameters()}.values())
        if not trainable:
            raise ConfigError(
                f"nothing to train: compressor '{self.compressor.name}' has no parameters and the projector is frozen")
        return modules, trainable

    def loss(self, item: Item) -> torch.Tensor:
        return self.losses([item])[0]

    def losses(self, items: list[Item]) -> torch.Tensor:
        """(B,) the loss of each item; answering items share one pass of the language model."""
        answering = [item for item in items if item.question is not None]
        batched = iter(answer_losses(self.vlm, self.compressor,
                                     [(list(item.segments), item.question, item.target) for item in answering],
                                     device=self.device)) if answering else iter(())
        return torch.stack([
            next(batched) if item.question is not None
            else self.compressor.reconstruction_loss(item.segments[0].features().to(self.device)[None])
            for item in items])

    def step(self, micro_batches: list[list[Item]], lr: float) -> float:
        """One optimiser step over `grad_accum` micro-batches at learning rate `lr`; returns its mean loss."""
        for group in self.optimiser.param_groups:
            group["lr"] = lr
        total = 0.0
        for picked in micro_batches:
            with self.autocast:
                loss = self.losses(picked).mean() / len(micro_batches)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimiser.step()
        self.optimiser.zero_grad(set_to_none=True)
        return total

    def set_mode(self, training: bool) -> None:
        """Dropout on the trained modules only; frozen ones stay in eval mode."""
        for module in self.modules:
            module.train(training)

    @torch.no_grad()
    def evaluate(self, items: list[Item]) -> float:
        """Mean loss over `items`, without dropout."""
        self.set_mode(False)
        total = 0.0
        size = self.options.batch_size
        for first in range(0, len(items), size):
            with self.autocast:
                total += float(self.losses(items[first : first + size]).sum())
        self.set_mode(True)
        return total / len(items)

    def save(self, step: int, history: dict) -> Path:
        """Checkpoint, (with train_llm) the model directory, then the training state naming them: a crash mid-way
        leaves the previous state pointing at complete files, or the new one at new ones."""
        options = self.options
        model_dir = None
        if options.train_llm:
            model_dir = options.model_dir
            self.vlm.save_pretrained(model_dir)
        info = {
            "objective": options.objective,
            "steps": step,
            "final_loss": sum(history["losses"][-5:]) / max(1, len(history["losses"][-5:])),
            "model": str(self.vlm.name),
            "encoder_name": getattr(self.encoder, "name", ""),
            "language_model": module_fingerprint(self.vlm.language_model),
            "model_dir": None if model_dir is None else str(Path(model_dir).resolve()),
        }
        projector = self.vlm.projector if (options.train_projector and options.objective != "reconstruction") else None
        path = save_checkpoint(Path(options.output), self.compressor, encoder_fingerprint=self.encoder.fingerprint,
                               projector=projector, info=info)
        identity = dataclasses.replace(self.identity, language_model=info["language_model"])
        save_state(state_path(path), TrainState(
            identity=identity, step=step, optimiser=self.optimiser.state_dict(), rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state() if self.device.type == "cuda" else None, history=history,
            model_dir=info["model_dir"],
        ))
        return path


def load_examples(options: TrainOptions) -> tuple[list[Example], list[Example]]:
    """(training, validation) examples: the validation file's, or whole videos held out by `val_split`."""
    examples = read_examples(Path(options.data), options.objective)
    if options.val is not None:
        return examples, read_examples(Path(options.val), options.objective)
    return split_validation(examples, options.val_split, seed=options.seed)


def train(options: TrainOptions, *, vlm: Any) -> TrainReport:
    """Train a compressor (with the projector, and the language model if asked) and write its checkpoint.

    `vlm` is the loaded VLM adapter (`vidmem.agents.vlm.VLM`; the CLI loads it): training uses its vision
    encoder, `compress`, `evidence_embeds`, `prompt_embeds`, `answer_loss`, its trainable parts and
    `save_pretrained`, and never reaches inside the model.
    """
    options = options.validate()
    started = time.monotonic()
    torch.manual_seed(options.seed)
    train_examples, val_examples = load_examples(options)
    trainer = Trainer(options, vlm)

    state = trainer.state
    start = state.step if state is not None else 0
    if start >= options.steps:
        raise ConfigError(f"the run in {options.resume} already took {start} steps; ask for more than that with --steps")
    history: dict = state.history if state is not None else {"losses": [], "epochs": []}
    cache = FeatureCache(options.cache_dir or default_cache_dir(), vlm.encoder, fps=options.fps,
                         progress=options.progress)
    cache.prepare([e.video for e in train_examples + val_examples])
    train_items = items_of(train_examples, cache, options)
    val_items = items_of(val_examples, cache, options)
    per_step = options.batch_size * options.grad_accum
    log.info(
        "training %s (%s) on %d examples (%d items, %d for validation), steps %d..%d, %d trainable parameters, %s%s",
        trainer.compressor.name, options.objective, len(train_examples), len(train_items), len(val_items), start,
        options.steps, sum(p.numel() for p in trainer.trainable), trainer.device, " bf16" if trainer.bf16 else "",
    )

    def epoch_end(step: int) -> None:
        """Validation after an epoch (or at the end): appended to the history that the report and state carry."""
        epoch = step * per_step / len(train_items)
        val = trainer.evaluate(val_items) if val_items else None
        recent = history["losses"][-max(1, math.ceil(len(train_items) / per_step)) :]  # this epoch's steps
        entry = {"epoch": round(epoch, 3), "step": step, "train_loss": sum(recent) / len(recent), "val_loss": val}
        history["epochs"].append(entry)
        log.info("epoch %.2f (step %d): train loss %.4f%s", epoch, step, entry["train_loss"],
                 "" if val is None else f", validation loss {val:.4f}")

    if state is not None:  # the random state the interrupted run would have had at this step (dropout)
        torch.set_rng_state(state.rng)
        if state.cuda_rng is not None and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(state.cuda_rng)
    order = batches(len(train_items), options.batch_size, seed=options.seed, start=start * per_step)
    segments_seen = 0
    completed = start  # optimiser steps whose update is in the weights
    bar = _bar(options, trainer.compressor.name, start)
    try:
        for step in range(start, options.steps):
            micro_batches = [[train_items[i] for i in next(order)] for _ in range(options.grad_accum)]
            total = trainer.step(micro_batches, options.lr * _schedule(step, options))
            completed = step + 1
            history["losses"].append(total)
            segments_seen += sum(len(item.segments) for batch in micro_batches for item in batch)
            if completed * per_step // len(train_items) > step * per_step // len(train_items) or completed == options.steps:
                epoch_end(completed)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}")
            if options.log_every and completed % options.log_every == 0:
                log.info("step %d/%d loss %.4f", completed, options.steps, total)
            if options.save_every and completed % options.save_every == 0 and completed < options.steps:
                trainer.save(completed, history)
    except KeyboardInterrupt:
        if completed > start:  # keep the work done: the steps completed so far, resumable
            trainer.set_mode(False)
            path = trainer.save(completed, history)
            log.warning("interrupted after step %d of %d; saved %s, continue with --resume %s",
                        completed, options.steps, path, path)
        raise
    finally:
        if bar is not None:
            bar.close()
    trainer.set_mode(False)
    path = trainer.save(options.steps, history)
    return TrainReport(
        objective=options.objective,
        compressor=trainer.compressor.name,
        checkpoint=path,
        steps=options.steps,
        start_step=start,
        losses=history["losses"],
        epochs=history["epochs"],
        samples=len(train_examples),
        val_samples=len(val_examples),
        segments=segments_seen,
        trainable_parameters=sum(p.numel() for p in trainer.trainable),
        device=str(trainer.device),
        seconds=time.monotonic() - started,
        model_dir=options.model_dir if options.train_llm else None,
    )


def _bar(options: TrainOptions, name: str, start: int) -> Any:
    if not options.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=options.steps, initial=start, desc=f"train {name}", unit="step")
