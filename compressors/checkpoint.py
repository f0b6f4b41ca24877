"""Checkpoint I/O for trained compressors, and the training state that lets a run resume.

A compressor checkpoint is one safetensors file: the compressor's weights under "compressor.", the projector's
under "projector." when it was trained, and a JSON config in the file's metadata (key "vidmem") naming the
compressor config, the fingerprint of the vision encoder it was trained on and, after `--train-llm`, the model
directory that holds the language model trained with it.

The training state sits beside it (`tp.safetensors` -> `tp.state.safetensors`): the optimiser's moments as
tensors, the step, the torch random state, the validation history, and what the run trained (compressor config,
encoder fingerprint, language-model fingerprint, objective), so that `--resume` continues the same run and
refuses another one. Nothing is pickled: tensors go to safetensors, everything else to JSON metadata.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vidmem.compressors import Compressor, build_compressor
from vidmem.errors import ConfigError, EncoderMismatchError, ModelNotFoundError
from vidmem.memory.atomic import atomic_write

CHECKPOINT_FORMAT = "vidmem-compressor"  # metadata "format" of a vidmem compressor checkpoint
CHECKPOINT_VERSION = 1
STATE_FORMAT = "vidmem-train-state"  # metadata "format" of the training state beside a checkpoint
STATE_VERSION = 1


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically: a temporary file in the same folder, fsync, rename, fsync the folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def _cpu(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().to("cpu").contiguous() for k, v in state.items()}


# -- compressor checkpoints ------------------------------------------------------------------------------------
def save_checkpoint(
    path: Path,
    compressor: Compressor,
    *,
    encoder_fingerprint: str,
    projector: nn.Module | None = None,
    info: dict | None = None,
) -> Path:
    """Write compressor (and projector) weights with their JSON config atomically to one safetensors file."""
    tensors = _cpu(compressor.state_dict(), "compressor.")
    if projector is not None:
        tensors.update(_cpu(projector.state_dict(), "projector."))
    config = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "compressor": compressor.config(),
        "encoder_fingerprint": encoder_fingerprint,
        "has_projector": projector is not None,
        **(info or {}),
    }
    return atomic_save(tensors, Path(path), {"vidmem": json.dumps(config)})


def _metadata(path: Path, what: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {})["vidmem"])
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ModelNotFoundError(f"{path} is not a {what} ({type(exc).__name__})") from exc


def read_checkpoint_config(path: Path) -> dict:
    """The JSON config of a vidmem compressor checkpoint, without loading its weights."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"compressor checkpoint not found: {path}")
    config = _metadata(path, "vidmem compressor checkpoint")
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ModelNotFoundError(f"{path} is not a vidmem compressor checkpoint")
    return config


def load_compressor(
    path: Path, *, encoder_fingerprint: str, dim: int, language_model: nn.Module | None = None
) -> tuple[Compressor, dict | None]:
    """Load a compressor checkpoint made for this vision encoder; returns (compressor, projector state or None).

    A checkpoint trained on another vision encoder is refused with `EncoderMismatchError`; one trained together
    with a language model (`--train-llm`) is refused with a `ConfigError` naming the model directory when
    `language_model` is not that model.
    """
    from safetensors.torch import load_file

    config = read_checkpoint_config(path)
    model_dir = config.get("model_dir")
    if model_dir and language_model is not None and module_fingerprint(language_model) != config.get("language_model"):
        raise ConfigError(
            f"compressor checkpoint {path} was trained together with the language model saved in {model_dir}; "
            f"load that model with --model {model_dir}"
        )
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


# -- what a run trained, for refusing a mismatched resume --------------------------------------------------------
def module_fingerprint(module: nn.Module, *, sample: int = 4096) -> str:
    """A short digest of a module's weights (names, shapes and the first `sample` values of each, as bf16 bytes).

    bf16 so that the same weights loaded in fp32 on a CPU or in bf16 on a GPU give the same digest.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        if tensor.is_floating_point():
            values = tensor.detach().flatten()[:sample].to("cpu", torch.bfloat16).view(torch.int16)
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class RunIdentity:
    """What a training run trains on: a resumed run must match the one that saved the state, field by field."""

    objective: str  # "caption", "qa" or "reconstruction"
    compressor: dict  # the compressor's config (name, width and options)
    encoder: str  # vision encoder fingerprint
    language_model: str  # fingerprint of the language model's weights when the state was saved
    train_llm: bool  # whether the language model is trained too

    def mismatch(self, saved: "RunIdentity", *, source: Path) -> str | None:
        """One sentence saying why `saved` (read from `source`) cannot be resumed by this run, or None."""
        where = f"cannot resume from {source}"
        if saved.objective != self.objective:
            return f"{where}: it trained the '{saved.objective}' objective, this run trains '{self.objective}'"
        if saved.compressor.get("name") != self.compressor.get("name"):
            return (f"{where}: it trained compressor '{saved.compressor.get('name')}', "
                    f"this run trains '{self.compressor.get('name')}'")
        if saved.encoder != self.encoder:
            return f"{where}: it was trained on vision encoder {saved.encoder}, this model's encoder is {self.encoder}"
        if saved.compressor != self.compressor:
            return f"{where}: its compressor options {_options(saved.compressor)} differ from {_options(self.compressor)}"
        if saved.train_llm != self.train_llm:
            return f"{where}: it was run {'with' if saved.train_llm else 'without'} --train-llm; resume it the same way"
        if saved.language_model != self.language_model:
            hint = " (pass --model with the model directory that run saved)" if saved.train_llm else ""
            return (f"{where}: it was trained with language model {saved.language_model}, "
                    f"this model's is {self.language_model}{hint}")
        return None


def _options(config: dict) -> str:
    return json.dumps({k: v for k, v in sorted(config.items()) if k != "name"}, separators=(",", ":"))


# -- training state -------------------------------------------------------------------------------------------
def state_path(checkpoint: Path) -> Path:
    """Where the training state of `checkpoint` lives: tp.safetensors -> tp.state.safetensors."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.state.safetensors")


@dataclass
class TrainState:
    """Everything beyond the weights that a run needs to continue where it stopped."""

    identity: RunIdentity
    step: int  # optimiser steps taken
    optimiser: dict  # torch.optim state_dict
    rng: torch.Tensor  # torch's CPU random state
    cuda_rng: torch.Tensor | None  # the current CUDA device's random state, when training ran there
    history: dict  # losses per step and validation per epoch so far (JSON)
    model_dir: str | None  # the model directory saved with a --train-llm run


def save_state(path: Path, state: TrainState) -> Path:
    """Write the training state atomically; optimiser tensors as safetensors, the rest as JSON metadata."""
    tensors: dict[str, torch.Tensor] = {"rng.torch": state.rng.contiguous()}
    if state.cuda_rng is not None:
        tensors["rng.cuda"] = state.cuda_rng.to("cpu").contiguous()
    moments: dict[str, dict[str, Any]] = {}  # parameter index -> scalars kept in JSON
    for index, entry in state.optimiser["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                moments.setdefault(str(index), {})[key] = value
    config = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "identity": state.identity.__dict__,
        "step": state.step,
        "param_groups": state.optimiser["param_groups"],
        "scalars": moments,
        "history": state.history,
        "model_dir": state.model_dir,
    }
    return atomic_save(tensors, Path(path), {"vidmem": json.dumps(config)})


def load_state(checkpoint: Path) -> TrainState:
    """The training state saved beside `checkpoint`; a missing or damaged one is a one-line ConfigError."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    path = state_path(checkpoint)
    if not checkpoint.is_file():
        raise ConfigError(f"cannot resume: checkpoint not found: {checkpoint}")
    if not path.is_file():
        raise ConfigError(f"cannot resume from {checkpoint}: its training state {path.name} is missing")
    try:
        config = _metadata(path, "vidmem training state")
    except ModelNotFoundError as exc:
        raise ConfigError(f"cannot resume from {checkpoint}: {exc}") from exc
    if config.get("format") != STATE_FORMAT or config.get("version") != STATE_VERSION:
        raise ConfigError(f"cannot resume from {checkpoint}: {path.name} is not a vidmem training state it can read")
    tensors = load_file(str(path))
    entries: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            entries.setdefault(int(index), {})[key] = value
    for index, scalars in config["scalars"].items():
        entries.setdefault(int(index), {}).update(scalars)
    groups = [dict(group, betas=tuple(group["betas"])) if "betas" in group else group for group in config["param_groups"]]
    return TrainState(
        identity=RunIdentity(**config["identity"]),
        step=int(config["step"]),
        optimiser={"state": entries, "param_groups": groups},
        rng=tensors["rng.torch"],
        cuda_rng=tensors.get("rng.cuda"),
        history=config["history"],
        model_dir=config.get("model_dir"),
    )
