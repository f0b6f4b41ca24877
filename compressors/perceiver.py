"""Clapper's plain Perceiver baseline (clapper-timeperceiver.txt, section 4.3, Table 3): Flamingo's perceiver
resampler with 49 randomly initialised learned queries aggregating every segment's frames, beside the same
2x2-pooled keyframe as the TimePerceiver (196 + 49 tokens for 2..4 frames, 196 for one).

Departure from the paper, required by DESIGN.md ("untrained must be safe"): the resampler's output is added,
through a tanh gate initialised at zero, to the segment's spatio-temporally pooled tokens (the TimePerceiver's
queries). Untrained, the fast tokens are exactly those pooled tokens; training opens the gate. Inside, the learned
latents are a standard Flamingo resampler (ungated layers, time embeddings, final LayerNorm).
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from vidmem.compressors.base import Compressor, Project, TokenBlock, View, Views, identity, keyframe_tokens, pool_grid
from vidmem.compressors.base import stride_side
from vidmem.compressors.layers import FeedForward, PerceiverAttention
from vidmem.compressors.timeperceiver import FAST_STRIDE, KEYFRAME_STRIDE


class PerceiverResampler(nn.Module):
    """Flamingo: learned latents attend to concat(media, latents), depth times; output (B, Q, D)."""

    def __init__(
        self, dim: int, *, num_latents: int, depth: int, heads: int, dim_head: int, ff_mult: int, max_frames: int
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.time_embed = nn.Parameter(torch.zeros(max_frames, 1, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList((PerceiverAttention(dim, heads=heads, dim_head=dim_head), FeedForward(dim, mult=ff_mult)))
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        # frames: (B, T, L, D)
        batch, num_frames = frames.shape[:2]
        if num_frames > self.time_embed.shape[0]:
            raise ValueError(f"Perceiver was built for at most {self.time_embed.shape[0]} frames, got {num_frames}")
        media = rearrange(frames + self.time_embed[:num_frames], "b t l d -> b (t l) d")  # (B, T*L, D)
        latents = self.latents.expand(batch, -1, -1)  # (B, Q, D)
        for attn, ff in self.layers:
            latents = latents + attn(media, latents)
            latents = latents + ff(latents)
        return self.norm(latents)


class SlowFastPerceiver(Compressor):
    """Keyframe (196 tokens) plus 49 fast tokens from learned queries; the ablation baseline for TimePerceiver."""

    name = "perceiver"

    def __init__(
        self,
        *,
        dim: int,
        num_patches: int = 729,
        depth: int = 2,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        max_frames: int = 4,
    ) -> None:
        super().__init__(dim=dim, num_patches=num_patches)
        self.options = {"depth": depth, "heads": heads, "dim_head": dim_head, "ff_mult": ff_mult, "max_frames": max_frames}
        self.slow_side = stride_side(self.side, KEYFRAME_STRIDE)  # 14
        self.fast_side = stride_side(self.side, FAST_STRIDE)  # 7
        self.resampler = PerceiverResampler(
            dim,
            num_latents=self.fast_side**2,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            ff_mult=ff_mult,
            max_frames=max_frames,
        )
        self.out_gate = nn.Parameter(torch.zeros(1))

    def token_count(self, num_frames: int) -> int:
        slow = self.slow_side**2
        return slow if num_frames == 1 else slow + self.fast_side**2

    def forward(self, features: torch.Tensor, project: Project | None = None) -> TokenBlock:
        # features: (T, L, D) for one segment
        dtype = features.dtype
        features = self._input(features)
        keyframe = keyframe_tokens(features[0], project, self.slow_side)  # (196, C)
        slow = keyframe.shape[0]
        if features.shape[0] == 1:
            views = Views(count=slow, key=View(((0, slow),)), low=View(((0, slow),), pool=self.fast_side))
            return TokenBlock(keyframe.to(dtype), slow=slow, views=views)
        pooled = pool_grid(features, self.fast_side).mean(dim=0)  # (49, D): the safe starting point
        fast = (project or identity)(pooled + self.out_gate.tanh() * self.resampler(features[None])[0])  # (49, C)
        tokens = torch.cat((keyframe, fast.to(keyframe.dtype)), dim=0)  # (245, C)
        views = Views(count=tokens.shape[0], key=View(((0, slow),)), low=View(((slow, tokens.shape[0]),)))
        return TokenBlock(tokens.to(dtype), slow=slow, views=views)
