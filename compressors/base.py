"""The compressor interface and its registry.

A compressor turns one segment's vision features, shape (T, L, D) with L = side * side patches, into a
`TokenBlock` of N tokens of width D, still in the vision space: the answering VLM projects them with its own
`multi_modal_projector` at question time (Clapper: vision encoder -> TimePerceiver -> MLP -> LLM).
"""
from __future__ import annotations

import math
import json
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn



Project = Callable[[torch.Tensor], torch.Tensor]  # (..., D) vision features -> (..., H) language-model embeddings
LEVELS = ("full", "key", "low")  # detail levels a stored segment can be shown at, most detail first


@dataclass(frozen=True)
class View:
    """Which stored tokens a detail level shows: index ranges into the block, optionally pooled on their grid.

    `pool` is set when the ranges hold one square grid of tokens (a keyframe, 14x14) to be shown smaller
    (`pool` x `pool`, area-averaged): that is how a 1-frame segment still has a 49-token low view.
    """

    ranges: tuple[tuple[int, int], ...]  # half-open [start, stop) ranges into the segment's tokens, in order
    pool: int | None = None  # side of the pooled grid, or None to show the ranges as they are

    @property
    def cost(self) -> int:
        """Tokens this view shows."""
        if self.pool is not None:
            return self.pool * self.pool
        return sum(stop - start for start, stop in self.ranges)

    def apply(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, C) stored tokens -> (cost, C) tokens shown."""
        shown = torch.cat([tokens[start:stop] for start, stop in self.ranges])
        return shown if self.pool is None else area_pool(shown, self.pool)

    def to_json(self) -> list | dict:
        ranges = [list(r) for r in self.ranges]
        return ranges if self.pool is None else {"ranges": ranges, "pool": self.pool}

    @classmethod
    def from_json(cls, data: list | dict) -> "View":
        if isinstance(data, dict):
            return cls(tuple((int(a), int(b)) for a, b in data["ranges"]), int(data["pool"]))
        return cls(tuple((int(a), int(b)) for a, b in data))


@dataclass(frozen=True)
class Views:
    """How one segment is shown at each detail level: "full" is every stored token, "key" and "low" are views."""

    count: int  # stored tokens N
    key: View  # the keyframe (or what stands for it): a question's second-best detail
    low: View  # the cheapest view that still shows the segment (49 tokens at default)

    def __post_init__(self) -> None:
        for name in ("key", "low"):
            view = getattr(self, name)
            if not view.ranges or any(not 0 <= a < b <= self.count for a, b in view.ranges):
                raise ValueError(f"the {name} view {view.ranges} does not index into {self.count} tokens")

    def view(self, level: str) -> View:
        if level == "full":
            return View(((0, self.count),))
        if level not in LEVELS:
            raise ValueError(f"unknown detail level {level!r}; use one of {', '.join(LEVELS)}")
        return getattr(self, level)

    def cost(self, level: str) -> int:
        return self.count if level == "full" else self.view(level).cost

    def to_json(self) -> str:
        return json.dumps({"key": self.key.to_json(), "low": self.low.to_json()}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, count: int) -> "Views":
        data = json.loads(text)
        return cls(count=count, key=View.from_json(data["key"]), low=View.from_json(data["low"]))

    @classmethod
    def legacy(cls, count: int, slow: int, low_tokens: int = 49) -> "Views":
        """Views of a segment stored before compressors declared them: keyframe first (`slow` tokens), then fast."""
        key = View(((0, slow or count),))
        if count > slow > 0:
            low = View(((slow, min(count, slow + low_tokens)),))
        elif slow and math.isqrt(slow) ** 2 == slow and slow > low_tokens:
            low = View(((0, slow),), pool=math.isqrt(low_tokens))
        else:
            low = View(((0, min(count, low_tokens)),))
        return cls(count=count, key=key, low=low)


@dataclass
class TokenBlock:
    """A segment's compressed tokens: the slow (keyframe) part first when there is one, then the fast part."""

    tokens: torch.Tensor  # (N, C): language-model embeddings (C = H) when made with a projector, else vision (C = D)
    slow: int  # the first `slow` tokens are the keyframe at full detail (196 at default); 0 when there is none
    views: Views | None = None  # how the block is shown at each detail level; None: derived from `slow`

    def __post_init__(self) -> None:
        if self.views is None:
            self.views = Views.legacy(self.count, self.slow)

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


def _grid(features: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(..., L, C) on a square grid -> ((B, C, side, side), lead dims)."""
    *lead, length, dim = features.shape
    side = grid_side(length)
    return features.reshape(-1, side, side, dim).permute(0, 3, 1, 2), lead  # (B, C, side, side)


def _tokens(grid: torch.Tensor, lead: list[int]) -> torch.Tensor:
    """(B, C, s, s) -> (..., s*s, C)."""
    batch, dim, side, _ = grid.shape
    return grid.flatten(2).transpose(1, 2).reshape(*lead, side * side, dim)


def area_pool(features: torch.Tensor, out_side: int) -> torch.Tensor:
    """Average-pool (..., L, C) tokens on their square grid to (..., out_side**2, C).

    Adaptive pooling keeps the token math exact on SigLIP's odd 27x27 grid: 27 -> 14 (2x2) and 27 -> 7 (4x4).
    """
    grid, lead = _grid(features)
    pooled = nn.functional.adaptive_avg_pool2d(grid.float(), out_side).to(features.dtype)  # (B, C, out, out)
    return _tokens(pooled, lead)


pool_grid = area_pool  # the name the compressors' vision-space pooling has always had


def bilinear_pool(features: torch.Tensor, out_side: int) -> torch.Tensor:
    """LLaVA-OneVision's own frame pooling (`apply_pooling`): bilinear interpolation of (..., L, C) to out_side**2.

    The stock checkpoints were trained on video frames pooled this way after the projector (27x27 -> 14x14), so
    the keyframe goes through exactly this call to look to the language model as its video frames did.
    """
    grid, lead = _grid(features)
    pooled = nn.functional.interpolate(grid, size=[out_side, out_side], mode="bilinear")  # (B, C, out, out)
    return _tokens(pooled, lead)


def stride_side(side: int, stride: int) -> int:
    """Grid side after pooling with `stride`, rounding up as LLaVA-OneVision does (27 / 2 -> 14, 27 / 4 -> 7)."""
    return math.ceil(side / stride)


def keyframe_tokens(frame: torch.Tensor, project: Project | None, side: int) -> torch.Tensor:
    """The slow path: one frame's (L, D) features -> (side**2, C) keyframe tokens in LLaVA-OneVision's video form.

    With a projector: projector, then bilinear pooling (`bilinear_pool`), as transformers' `get_video_features`.
    Without one (vision-space use, e.g. reconstruction training): area pooling of the features.
    """
    if project is None:
        return area_pool(frame, side)
    return bilinear_pool(project(frame), side)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Compressor(nn.Module):
    """Base class: `forward(features (T, L, D), project=None) -> TokenBlock`; `token_count(T)` gives N without running.

    `project` is the answering VLM's projector (vision width D -> language-model width H). Each compressor decides
    where it applies: the keyframe is projected before it is pooled (LLaVA-OneVision's video form), learned
    resamplers run in the vision space and are projected after (Clapper: encoder -> TimePerceiver -> MLP -> LLM).
    Without `project` the block stays in the vision space.
    """

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
