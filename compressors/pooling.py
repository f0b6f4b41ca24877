"""Clapper's training-free pooling baselines (clapper-timeperceiver.txt, section 4.3, Table 3).

- `baseline`: every frame pooled 2x2 on the patch grid (27x27 -> 14x14 = 196 tokens per frame, CR 4x in the paper).
- `spatial`: an extra 2x2 spatial pooling on top of the baseline, i.e. stride 4 (27x27 -> 7x7 = 49 tokens per frame).
- `temporal`: the baseline's 196 tokens per frame, then temporal pooling with stride 4 (4 frames -> 196 tokens).

Only `baseline` keeps the keyframe at full detail (its first 196 tokens are frame 0), so only it reports `slow`.
"""
from __future__ import annotations

import math

import torch

from vidmem.compressors.base import Compressor, TokenBlock, pool_grid, register, stride_side

MODES = ("baseline", "spatial", "temporal")


@register("pool")
class PoolCompressor(Compressor):
    """Average pooling in space (and optionally time); no parameters, so it is the same trained or not."""

    name = "pool"

    def __init__(self, *, dim: int, num_patches: int = 729, mode: str = "spatial", temporal_stride: int = 4) -> None:
        super().__init__(dim=dim, num_patches=num_patches)
        if mode not in MODES:
            raise ValueError(f"pool mode must be one of {', '.join(MODES)}, got '{mode}'")
        if temporal_stride < 1:
            raise ValueError(f"temporal_stride must be at least 1, got {temporal_stride}")
        self.mode = mode
        self.temporal_stride = temporal_stride
        self.out_side = stride_side(self.side, 4 if mode == "spatial" else 2)  # 7 or 14

    def token_count(self, num_frames: int) -> int:
        per_frame = self.out_side**2
        if self.mode == "temporal":
            return math.ceil(num_frames / self.temporal_stride) * per_frame
        return num_frames * per_frame

    def forward(self, features: torch.Tensor) -> TokenBlock:
        # features: (T, L, D) for one segment
        features = self._input(features)
        pooled = pool_grid(features, self.out_side)  # (T, out*out, D)
        if self.mode == "temporal":
            # mean over consecutive groups of `temporal_stride` frames; a short last group is averaged as it is
            groups = pooled.split(self.temporal_stride, dim=0)
            pooled = torch.stack([g.float().mean(dim=0).to(pooled.dtype) for g in groups])  # (ceil(T/s), out*out, D)
        tokens = pooled.reshape(-1, self.dim)  # (N, D), frames in time order
        slow = self.out_side**2 if self.mode == "baseline" else 0
        return TokenBlock(tokens, slow=slow)

    def config(self) -> dict:
        return {**super().config(), "mode": self.mode, "temporal_stride": self.temporal_stride}
