"""The compressor interface and its registry.

A compressor turns one segment's vision features, shape (T, L, D) with L = side * side patches, into a
`TokenBlock` of N tokens of width D, still in the vision space: the answering VLM projects them with its own
`multi_modal_projector` at question time (Clapper: vision encoder -> TimePerceiver -> MLP -> LLM).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vidmem.errors import ConfigError


@dataclass
class TokenBlock:
    """A segment's compressed tokens: the slow (keyframe) part first, then the fast part."""

    tokens: torch.Tensor  # (N, D) in the vision space
    slow: int  # the first `slow` tokens are the keyframe at full detail (196 at default); the rest are fast tokens

    @property
    def count(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def fast(self) -> int:
        return self.count - self.slow


def grid_side(num_patches: int) -> int:
    """Side of the square patch grid: 729 patches -> 27."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"expected a square patch grid, got {num_patches} patches")
    return side


def pool_grid(features: torch.Tensor, out_side: int) -> torch.Tensor:
    """Average-pool (..., L, D) patch features on their square grid to (..., out_side**2, D).

    Adaptive pooling keeps the token math exact on SigLIP's odd 27x27 grid: 27 -> 14 (2x2) and 27 -> 7 (4x4).
    """
    *lead, length, dim = features.shape
    side = grid_side(length)
    x = features.reshape(-1, side, side, dim).permute(0, 3, 1, 2)  # (B, D, side, side)
    x = nn.functional.adaptive_avg_pool2d(x.float(), out_side).to(features.dtype)  # (B, D, out, out)
    x = x.flatten(2).transpose(1, 2)  # (B, out*out, D)
    return x.reshape(*lead, out_side * out_side, dim)


def stride_side(side: int, stride: int) -> int:
    """Grid side after pooling with `stride`, rounding up as LLaVA-OneVision does (27 / 2 -> 14, 27 / 4 -> 7)."""
    return math.ceil(side / stride)


class Compressor(nn.Module):
    """Base class: `forward(features (T, L, D)) -> TokenBlock`; `token_count(T)` gives N without running it."""

    name: str = "base"

    def __init__(self, *, dim: int, num_patches: int = 729) -> None:
        super().__init__()
        self.dim = dim
        self.num_patches = num_patches
        self.side = grid_side(num_patches)

    def token_count(self, num_frames: int) -> int:
        raise NotImplementedError

    def config(self) -> dict:
        """What `build_compressor` needs to rebuild this module; saved beside the weights."""
        return {"name": self.name, "dim": self.dim, "num_patches": self.num_patches}

    def tokens_per_frame(self, num_frames: int = 4) -> float:
        """Average tokens per frame for a segment of `num_frames` frames (61.25 for Clapper's 4-frame segment)."""
        return self.token_count(num_frames) / num_frames

    def compression_ratio(self, num_frames: int = 4) -> float:
        """Clapper's CR (eq. 1): vision-encoder tokens over compressed tokens for one segment."""
        return num_frames * self.num_patches / self.token_count(num_frames)

    def _input(self, features: torch.Tensor) -> torch.Tensor:
        """Checks a segment's (T, L, D) features and moves them to this module's device and dtype."""
        if features.ndim != 3 or features.shape[1] != self.num_patches or features.shape[2] != self.dim:
            raise ValueError(
                f"{self.name} expects features of shape (T, {self.num_patches}, {self.dim}), got {tuple(features.shape)}"
            )
        if features.shape[0] < 1:
            raise ValueError(f"{self.name} needs at least one frame")
        param = next(self.parameters(), None)
        if param is None:
            return features
        return features.to(device=param.device, dtype=param.dtype)


_REGISTRY: dict[str, Callable[..., Compressor]] = {}


def register(name: str) -> Callable[[Callable[..., Compressor]], Callable[..., Compressor]]:
    def wrap(factory: Callable[..., Compressor]) -> Callable[..., Compressor]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def build_compressor(name: str, *, dim: int, num_patches: int = 729, **options) -> Compressor:
    """Build a registered compressor by name; an unknown name is a `ConfigError` listing the known ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown compressor '{name}'; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](dim=dim, num_patches=num_patches, **options)


def _load_builtin() -> None:
    # Importing the modules registers them; done lazily so `base` stays import-light.
    from vidmem.compressors import dynfocus, perceiver, pooling, sampler, svc, timeperceiver  # noqa: F401
