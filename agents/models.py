"""Loading the answering VLM and the retrieval embedders from a hub id or a local directory.

One code path for both: a local directory is passed straight to `from_pretrained`; a hub id is served from the
Hugging Face cache when it is there, downloaded when the hub answers, and otherwise refused at once with one
sentence saying how to fetch it (no minutes of retries when the machine is offline).

- `load_vlm`: LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`) wrapped in the `VLM` adapter
  (agents/vlm.py), which owns its tower, projector, template and language model (DESIGN.md, "Answering").
- `load_embedder`: a sentence-transformers CLIP for keyframes and query text; `load_caption_embedder`: a
  sentence-transformers text model for captions and transcripts.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import numpy as np
import torch

from vidmem.agents.vlm import TEMPLATE_FILES, VLM
from vidmem.errors import ConfigError, ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL_CPU = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
DEFAULT_MODEL_GPU = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
DEFAULT_EMBEDDER = "clip-ViT-B-32"
DEFAULT_CAPTION_EMBEDDER = "all-MiniLM-L6-v2"

HUB_PROBE_TIMEOUT_S = 3.0  # seconds to wait for a TCP connection to the hub before calling it unreachable
ST_ORGANIZATION = "sentence-transformers"  # where sentence-transformers looks up bare names like "clip-ViT-B-32"


# ---------------------------------------------------------------------------------------------------- devices


def resolve_device(spec: str = "auto") -> torch.device:
    """"auto" -> cuda when a GPU is visible, else cpu; "cuda"/"cuda:N" without a GPU is a ConfigError."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"device {spec!r} is not valid; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} was asked for but no CUDA GPU is visible; use --device cpu or auto.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ConfigError(f"device {spec!r} does not exist: only {count} CUDA GPU(s) are visible.")
    elif device.type != "cpu":
        raise ConfigError(f"device {spec!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    return device


def default_model(device: torch.device) -> str:
    """The 7B LLaVA-OneVision on a GPU, the 0.5B one on a CPU."""
    return DEFAULT_MODEL_GPU if torch.device(device).type == "cuda" else DEFAULT_MODEL_CPU


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # a broken flash-attn build raises more than ImportError
        return False
    return True


ATTENTION = ("sdpa", "eager", "flash_attention_2")  # attention implementations load_vlm accepts


def _check_attention(attn: str | None, device: torch.device) -> str:
    """The attention implementation to load with: flash-attention 2 on a GPU when installed, else SDPA."""
    if attn is None:
        return "flash_attention_2" if device.type == "cuda" and _flash_attn_available() else "sdpa"
    if attn not in ATTENTION:
        raise ConfigError(f"attention {attn!r} is not supported; use one of {', '.join(ATTENTION)}.")
    if attn == "flash_attention_2" and (device.type != "cuda" or not _flash_attn_available()):
        raise ConfigError("attention 'flash_attention_2' needs a CUDA GPU and the flash-attn package; use sdpa.")
    return attn


# ---------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    """Where a model comes from, decided before any loading starts."""

    name: str  # what the user asked for, for messages
    path: str  # what from_pretrained / SentenceTransformer receives: a directory or a hub id
    local_dir: bool  # True: a directory on disk; False: a hub id
    local_files_only: bool  # hub ids already in the Hugging Face cache load without touching the network


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _offline_mode() -> bool:
    """HF_HUB_OFFLINE, read again because huggingface_hub reads it only once, at import."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or value in {"1", "true", "yes", "on"}


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens within `timeout` seconds (honours HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    if _offline_mode():
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    reached = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((url.hostname, port), timeout=timeout):
                reached.set()
        except OSError:
            pass

    # a thread, because a stalled DNS lookup ignores the socket timeout; it dies on its own afterwards
    thread = threading.Thread(target=probe, name="vidmem-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return reached.is_set()


def _in_cache(repo_ids: list[str], filename: str) -> str | None:
    """The first of `repo_ids` whose `filename` is in the Hugging Face cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    for repo_id in repo_ids:
        try:
            hit = try_to_load_from_cache(repo_id, filename)
        except Exception:  # an id the hub would reject (bad characters) is simply not cached
            continue
        if isinstance(hit, str):
            return repo_id
    return None


def _resolve(name: str, *, what: str, marker_file: str, st_bare_names: bool = False) -> _Source:
    """Decides how to load `name`; raises ModelNotFoundError at once when it cannot possibly load."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / marker_file).is_file():
            raise ModelNotFoundError(
                f"could not load {what} from directory '{name}': it has no {marker_file}, so it is not a saved "
                f"checkpoint; pass a directory written by save_pretrained or downloaded with `hf download`."
            )
        return _Source(name, str(path), local_dir=True, local_files_only=True)
    if path.exists():
        raise ModelNotFoundError(f"could not load {what} '{name}': it is a file, not a checkpoint directory or hub id.")
    if _looks_like_path(name):
        raise ModelNotFoundError(f"could not load {what} '{name}': no such directory, and it is not a hub id.")
    candidates = [name]
    if st_bare_names and "/" not in name:
        candidates.insert(0, f"{ST_ORGANIZATION}/{name}")  # what sentence-transformers itself tries first
    cached = _in_cache(candidates, marker_file)
    if cached is not None:
        return _Source(name, cached, local_dir=False, local_files_only=True)
    if not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if _offline_mode() else "the hub is unreachable"
        raise ModelNotFoundError(
            f"could not load {what} '{name}': it is not a local directory, not in the Hugging Face cache, and "
            f"{why}; download it on a machine with network (`hf download "
            f"{candidates[0]} --local-dir DIR`) and point vidmem at it ({_FLAGS.get(what, '--model')} DIR)."
        )
    return _Source(name, name, local_dir=False, local_files_only=False)


_FLAGS = {"model": "--model", "embedder": "--embedder", "caption embedder": "--caption-embedder"}  # CLI flag per role


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def _loading(source: _Source, what: str) -> Iterator[None]:
    """Turns whatever the libraries raise while loading into one ModelNotFoundError sentence."""
    try:
        yield
    except ModelNotFoundError:
        raise
    except Exception as exc:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        reason = _first_line(exc)
        if source.local_dir:
            message = (
                f"could not load {what} from directory '{source.name}': it is not a valid checkpoint ({reason}); "
                f"pass a complete directory written by save_pretrained or downloaded with `hf download`."
            )
        elif isinstance(exc, GatedRepoError):
            message = (
                f"could not load {what} '{source.name}': the hub repository is gated; accept its terms on the hub "
                f"and log in with `hf auth login`."
            )
        elif isinstance(exc, RepositoryNotFoundError):
            message = f"could not load {what} '{source.name}': the Hugging Face hub has no such repository."
        else:
            message = (
                f"could not load {what} '{source.name}' from the Hugging Face hub ({reason}); download it with "
                f"`hf download {source.path} --local-dir DIR` and pass DIR instead."
            )
        raise ModelNotFoundError(message) from exc


# ---------------------------------------------------------------------------------------------------- the VLM


def load_vlm(name_or_path: str | None = None, *, device: str = "auto", attn: str | None = None) -> VLM:
    """Loads LLaVA-OneVision from a hub id or a local directory: bf16 on a GPU (flash-attention 2 when installed,
    else SDPA), float32 + SDPA on a CPU. Anything that fails to load is a ModelNotFoundError."""
    dev = resolve_device(device)
    name = name_or_path or default_model(dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    attn = _check_attention(attn, dev)
    # resolved before importing transformers, so refusals come at once
    source = _resolve(name, what="model", marker_file="config.json")
    from transformers import AutoConfig, AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.utils import cached_file

    hub = {"local_files_only": source.local_files_only}
    with _loading(source, "model"):
        config = AutoConfig.from_pretrained(source.path, **hub)
        if not isinstance(config, LlavaOnevisionConfig):
            raise ModelNotFoundError(
                f"could not load model '{name}': it is a '{config.model_type}' checkpoint, not LLaVA-OneVision "
                f"(llava_onevision), which vidmem answers with."
            )
        # with accelerate, weights go straight to the GPU instead of through host memory first
        placement = {"device_map": dev} if dev.type == "cuda" and importlib.util.find_spec("accelerate") else {}
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            source.path, config=config, dtype=dtype, attn_implementation=attn, **placement, **hub
        )
        model = model.to(dev).eval()
        tokenizer = AutoTokenizer.from_pretrained(source.path, **hub)
        files = {
            file: cached_file(source.path, file, _raise_exceptions_for_missing_entries=False, **hub)
            for file in ("preprocessor_config.json", *TEMPLATE_FILES)
        }
    vlm = VLM.wrap(model, tokenizer, name=name, files=files)
    log.info("loaded %s on %s (%s, %s attention, template from %s)", name, dev, dtype, attn, vlm.layout.form)
    return vlm


# ---------------------------------------------------------------------------------------------------- embedders


class Embedder:
    """A sentence-transformers model giving L2-normalised float32 embeddings of images and/or texts."""

    def __init__(self, model: Any, *, name: str, images: bool, batch_size: int = 32) -> None:
        self.model = model
        self.name = name
        self.supports_images = images  # False for text-only caption embedders
        self.batch_size = batch_size
        self.dim = int(self.embed_texts(["a"]).shape[1])

    def embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        """list of (H, W, 3) uint8 RGB -> (N, E) float32, unit rows."""
        if not self.supports_images:
            raise ConfigError(f"the embedder '{self.name}' embeds text only, not images.")
        from PIL import Image

        if not images:
            return np.zeros((0, self.dim), np.float32)
        pictures = [Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)) for image in images]
        return self._encode(pictures)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """list of str -> (N, E) float32, unit rows."""
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        return self._encode(list(texts))

    def _encode(self, inputs: list) -> np.ndarray:
        with torch.inference_mode():
            out = self.model.encode(
                inputs,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(out, dtype=np.float32)


def _load_sentence_transformer(name: str, *, device: str, what: str, images: bool) -> Embedder:
    dev = resolve_device(device)
    source = _resolve(name, what=what, marker_file="modules.json", st_bare_names=True)
    from sentence_transformers import SentenceTransformer

    with _loading(source, what):
        model = SentenceTransformer(source.path, device=str(dev), local_files_only=source.local_files_only)
        model.eval()
        embedder = Embedder(model, name=name, images=images)
    log.info("loaded %s %s on %s (dim %d)", what, name, dev, embedder.dim)
    return embedder


def load_embedder(name_or_path: str | None = None, *, device: str = "auto") -> Embedder:
    """The retrieval embedder for keyframes and query text (a sentence-transformers CLIP)."""
    embedder = _load_sentence_transformer(name_or_path or DEFAULT_EMBEDDER, device=device, what="embedder", images=True)
    try:
        embedder.embed_images([np.zeros((32, 32, 3), np.uint8)])
    except Exception as exc:
        raise ModelNotFoundError(
            f"could not use embedder '{embedder.name}' for images ({_first_line(exc)}); pass a CLIP-style "
            f"sentence-transformers model such as {DEFAULT_EMBEDDER}."
        ) from exc
    return embedder


def load_caption_embedder(name_or_path: str | None = None, *, device: str = "auto") -> Embedder:
    """The text embedder for captions and transcripts (a sentence-transformers text model)."""
    return _load_sentence_transformer(
        name_or_path or DEFAULT_CAPTION_EMBEDDER, device=device, what="caption embedder", images=False
    )
