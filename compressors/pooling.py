"""Clapper's training-free pooling baselines (clapper-timeperceiver.txt, section 4.3, Table 3).

- `baseline`: every frame pooled 2x2 on the patch grid (27x27 -> 14x14 = 196 tokens per frame, CR 4x in the paper).
- `spatial`: an extra 2x2 spatial pooling on top of the baseline, i.e. stride 4 (27x27 -> 7x7 = 49 tokens per frame).
- `temporal`: the baseline's 196 tokens per frame, then temporal pooling with stride 4 (4 frames -> 196 tokens).

Pooling follows the projector, as in LLaVA-OneVision's own video path: 14x14 grids are the stock bilinear pooling
of projected frames (so `baseline` is exactly the checkpoint's native video representation), 7x7 grids are area
averages of projected frames. Views: "key" is frame 0 (or the first temporal group), "low" is that pooled to 7x7
(`spatial`: frame 0's 49 tokens). Only `baseline` keeps the keyframe at full detail, so only it reports `slow`.
"""
from __future__ import annotations

import math

import torch

from vidmem.compressors.base import Compressor, Project, TokenBlock, View, Views, area_pool, identity, keyframe_tokens
from vidmem.compressors.base import stride_side

MODES = ("baseline", "spatial", "temporal")


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

    def forward(self, features: torch.Tensor, project: Project | None = None) -> TokenBlock:
        # features: (T, L, D) for one segment
        features = self._input(features)
        if self.mode == "spatial":
            pooled = area_pool((project or identity)(features), self.out_side)  # (T, 49, C)
        else:
            pooled = keyframe_tokens(features, project, self.out_side)  # (T, 196, C), the stock video form
        if self.mode == "temporal":
            # mean over consecutive groups of `temporal_stride` frames; a short last group is averaged as it is
            groups = pooled.split(self.temporal_stride, dim=0)
            pooled = torch.stack([g.float().mean(dim=0).to(pooled.dtype) for g in groups])  # (ceil(T/s), 196, C)
        per_frame = pooled.shape[1]
        tokens = pooled.reshape(-1, pooled.shape[-1])  # (N, C), frames in time order
        first = View(((0, per_frame),))
        low = first if self.mode == "spatial" else View(((0, per_frame),), pool=stride_side(self.side, 4))
        views = Views(count=tokens.shape[0], key=first, low=low)
        return TokenBlock(tokens, slow=per_frame if self.mode == "baseline" else 0, views=views)

    def config(self) -> dict:
        return {**super().config(), "mode": self.mode, "temporal_stride": self.temporal_stride}
