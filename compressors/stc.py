"""STC's two accelerators for streaming VideoLLMs (related-work-abstracts.txt, "Accelerating Streaming Video Large
Language Models via Hierarchical Token Compression").

- STC-Cacher (`CachedEncoder`): the vision tower is the bottleneck of a stream, and consecutive frames are often
  near-identical, so features of a recently encoded frame are reused for a frame whose downscaled pixels match it
  within a tolerance (on average, and at every thumbnail pixel, so a small local change such as a clock digit
  still counts as a change); only changed frames reach the tower. Hits and misses are counted.
- STC-Pruner (`Pruner`, `prune`): before the LLM prefill, keep only the most salient tokens of a token block,
  salience mixing spatial relevance (how much a token differs from its block's mean) and temporal relevance (how
  much it differs from every token of the previous block).

Departure: STC caches and reuses features inside the ViT at token level; vidmem reuses whole frames' features,
which needs no change to the VLM's tower and keeps the cache a wrapper around `VisionEncoder`.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from vidmem.compressors.base import TokenBlock
from vidmem.compressors.encoder import VisionEncoder

log = logging.getLogger(__name__)


# -- STC-Cacher ----------------------------------------------------------------------------------------------
class CachedEncoder:
    """A `VisionEncoder` that skips the tower for frames matching a recently encoded one.

    Behaves like the wrapped encoder (same call, same attributes: dim, num_patches, fingerprint, calls, ...).
    Not thread-safe: use it from the one worker that runs the vision encoder.
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        *,
        tolerance: float = 2.0,  # mean absolute difference in 0..255 pixel units on the thumbnail
        max_tolerance: float = 12.0,  # largest difference of any thumbnail pixel: a small local change is a change
        thumb_size: int = 32,  # frames are compared as thumb_size x thumb_size RGB thumbnails
        capacity: int = 8,  # most recent distinct frames kept, least recently used dropped first
    ) -> None:
        if tolerance < 0 or max_tolerance < 0 or thumb_size < 1 or capacity < 1:
            raise ValueError("CachedEncoder needs tolerances >= 0, thumb_size >= 1 and capacity >= 1")
        self.encoder = encoder
        self.tolerance = tolerance
        self.max_tolerance = max_tolerance
        self.thumb_size = thumb_size
        self.capacity = capacity
        self.hits = 0  # frames answered from the cache
        self.misses = 0  # frames sent to the vision tower
        self._cache: OrderedDict[int, tuple[np.ndarray, torch.Tensor]] = OrderedDict()
        self._next_key = 0

    def __getattr__(self, name: str):
        # only called for attributes not found on the wrapper: delegate to the wrapped encoder
        if name == "encoder":
            raise AttributeError(name)
        return getattr(self.encoder, name)

    def thumbnail(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (s, s, 3) float32, area-averaged so sensor noise mostly cancels."""
        small = cv2.resize(np.ascontiguousarray(image), (self.thumb_size, self.thumb_size), interpolation=cv2.INTER_AREA)
        return small.astype(np.float32)

    def same(self, a: np.ndarray, b: np.ndarray) -> bool:
        """Whether two thumbnails show the same picture within the tolerances."""
        if a.shape != b.shape:
            return False
        diff = np.abs(a - b)
        return float(diff.mean()) <= self.tolerance and float(diff.max()) <= self.max_tolerance

    def _lookup(self, thumb: np.ndarray) -> int | None:
        for key in reversed(self._cache):  # most recent first
            cached, _ = self._cache[key]
            if self.same(cached, thumb):
                self._cache.move_to_end(key)
                return key
        return None

    def _store(self, thumb: np.ndarray, features: torch.Tensor) -> int:
        key = self._next_key
        self._next_key += 1
        self._cache[key] = (thumb, features)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return key

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        """list of (H, W, 3) uint8 RGB -> (B, L, D) features, encoding only the frames not found in the cache."""
        thumbs = [self.thumbnail(image) for image in images]
        sources: list[tuple[str, int]] = []  # per image: ("cache", key) or ("new", index into `fresh`)
        fresh: list[int] = []  # indices of images to encode
        for i, thumb in enumerate(thumbs):
            key = self._lookup(thumb)
            if key is not None:
                sources.append(("cache", key))
                continue
            # a repeat of a frame earlier in this same batch is a hit too
            match = next((j for j, f in enumerate(fresh) if self.same(thumbs[f], thumb)), None)
            if match is not None:
                sources.append(("new", match))
                self.hits += 1
                continue
            sources.append(("new", len(fresh)))
            fresh.append(i)
        hits_from_cache = sum(kind == "cache" for kind, _ in sources)
        self.hits += hits_from_cache
        self.misses += len(fresh)
        # features of cache hits are read now, before storing new frames can evict them
        cached = {key: self._cache[key][1] for kind, key in sources if kind == "cache"}
        encoded = self.encoder([images[i] for i in fresh]) if fresh else None
        for n, i in enumerate(fresh):
            self._store(thumbs[i], encoded[n].clone())  # its own storage: the batch tensor can be freed
        rows = [cached[key] if kind == "cache" else encoded[key] for kind, key in sources]
        log.debug("cacher: %d images, %d encoded, %d reused", len(images), len(fresh), len(images) - len(fresh))
        return torch.stack(rows)

    def clear(self) -> None:
        """Forget every cached frame (after a cut, say); the counters are kept."""
        self._cache.clear()


# -- STC-Pruner ----------------------------------------------------------------------------------------------
def salience(
    tokens: torch.Tensor, previous: torch.Tensor | None = None, *, temporal_weight: float = 0.5
) -> torch.Tensor:
    """Per-token salience of (N, D) tokens in [0, 2]: spatial (1 - cos to the block mean) mixed with temporal
    (1 - the best cos to any token of the previous block, (M, D)); spatial only without a previous block."""
    x = F.normalize(tokens.float(), dim=-1)  # (N, D)
    spatial = 1 - x @ F.normalize(tokens.float().mean(dim=0), dim=0)  # (N,)
    if previous is None or previous.shape[0] == 0:
        return spatial
    prev = F.normalize(previous.float(), dim=-1)  # (M, D)
    temporal = 1 - (x @ prev.T).amax(dim=-1)  # (N,)
    return (1 - temporal_weight) * spatial + temporal_weight * temporal


def keep_count(total: int, keep: int | float) -> int:
    """How many of `total` tokens to keep: an int is a count, a float in (0, 1] a fraction (rounded up)."""
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ValueError(f"a fraction of tokens to keep must be in (0, 1], got {keep}")
        return max(1, math.ceil(total * keep))
    if keep < 1:
        raise ValueError(f"the number of tokens to keep must be at least 1, got {keep}")
    return min(total, keep)


def prune(
    block: TokenBlock,
    *,
    keep: int | float,
    previous: TokenBlock | torch.Tensor | None = None,
    temporal_weight: float = 0.5,
) -> TokenBlock:
    """Keep the `keep` most salient tokens of `block`, in their original order; `slow` counts the keyframe's kept ones."""
    indices = prune_indices(block, keep=keep, previous=previous, temporal_weight=temporal_weight)
    slow = int((indices < block.slow).sum())
    return TokenBlock(block.tokens[indices], slow=slow)


def prune_indices(
    block: TokenBlock,
    *,
    keep: int | float,
    previous: TokenBlock | torch.Tensor | None = None,
    temporal_weight: float = 0.5,
) -> torch.Tensor:
    """Sorted indices (K,) of the tokens `prune` keeps."""
    prev = previous.tokens if isinstance(previous, TokenBlock) else previous
    scores = salience(block.tokens, prev, temporal_weight=temporal_weight)
    count = keep_count(block.count, keep)
    return scores.topk(count).indices.sort().values


@dataclass(frozen=True)
class Pruner:
    """STC-Pruner as a reusable callable: `Pruner(keep=0.5)(block, previous)`."""

    keep: int | float = 0.5  # tokens kept per block: an int count or a float fraction in (0, 1]
    temporal_weight: float = 0.5  # weight of novelty against the previous block versus spatial distinctiveness

    def __call__(self, block: TokenBlock, previous: TokenBlock | torch.Tensor | None = None) -> TokenBlock:
        return prune(block, keep=self.keep, previous=previous, temporal_weight=self.temporal_weight)
