"""Clapper's slow-fast segment representation with the TimePerceiver (clapper-timeperceiver.txt, section 3.1).

A segment of T <= 4 frames becomes
  slow: the keyframe (frame 0) through the VLM's projector, then pooled bilinearly 27x27 -> 14x14 = 196 tokens:
        exactly the form LLaVA-OneVision's video frames take (`get_video_features`), so a stock checkpoint reads it
        as it was trained to;
  fast: 49 TimePerceiver tokens whose queries are the frames pooled 4x4 (27x27 -> 7x7) and then averaged over
        time, cross-attending (Flamingo-style) to concat(queries, all T*L frame features), then projected
        (Clapper: vision encoder -> TimePerceiver -> MLP -> LLM).
So a 4-frame segment costs 196 + 49 = 245 tokens, a 2- or 3-frame one 245, and a 1-frame one 196.

Departures from the paper: each layer's residual branches are tanh-gated with gates initialised at zero (as in
Flamingo's gated cross-attention), so the untrained module returns its pooled queries exactly and a stock VLM
works before any training; training opens the gates. Flamingo's learned time embeddings are added to the media
(zero-initialised): without them attention over the flattened frames could not tell frame order apart. Flamingo's
final LayerNorm is left out so the output stays in the vision space the VLM's projector expects. Views: "key" is
the keyframe, "low" the 49 fast tokens (a 1-frame segment: its keyframe pooled to 7x7).
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from vidmem.compressors.base import (
    Compressor, Project, TokenBlock, View, Views, identity, keyframe_tokens, pool_grid, stride_side,
)
from vidmem.compressors.layers import FeedForward, PerceiverAttention

KEYFRAME_STRIDE = 2  # slow path: 2x2 spatial pooling of the keyframe (196 tokens from 27x27)
FAST_STRIDE = 4  # fast path: 4x4 spatial pooling of every frame for the queries (49 tokens from 27x27)


class GatedPerceiverLayer(nn.Module):
    """One attention + feed-forward block; both residual branches scaled by tanh(gate), gates start at 0."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim, heads=heads, dim_head=dim_head)
        self.ff = FeedForward(dim, mult=ff_mult)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn_gate.tanh() * self.attn(media, latents)
        return latents + self.ff_gate.tanh() * self.ff(latents)


class TimePerceiver(nn.Module):
    """Temporal-spatial resampler: pooled queries cross-attend to the flattened features of T frames."""

    def __init__(
        self, dim: int, *, depth: int = 2, heads: int = 8, dim_head: int = 64, ff_mult: int = 4, max_frames: int = 4
    ) -> None:
        super().__init__()
        self.max_frames = max_frames
        self.time_embed = nn.Parameter(torch.zeros(max_frames, 1, dim))  # Flamingo's per-frame time embedding
        self.layers = nn.ModuleList(
            GatedPerceiverLayer(dim, heads=heads, dim_head=dim_head, ff_mult=ff_mult) for _ in range(depth)
        )

    def forward(self, frames: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        # frames: (B, T, L, D) vision features; queries: (B, Q, D)
        num_frames = frames.shape[1]
        if num_frames > self.max_frames:
            raise ValueError(f"TimePerceiver was built for at most {self.max_frames} frames, got {num_frames}")
        frames = frames + self.time_embed[:num_frames]  # (B, T, L, D), broadcast over patches
        media = rearrange(frames, "b t l d -> b (t l) d")  # flatten time and space, (B, T*L, D)
        latents = queries
        for layer in self.layers:
            latents = layer(media, latents)
        return latents  # (B, Q, D): as many tokens as queries


class SlowFastTimePerceiver(Compressor):
    """Clapper's default: 196 keyframe tokens (slow) plus 49 TimePerceiver tokens (fast) per segment."""

    name = "timeperceiver"

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
        self.perceiver = TimePerceiver(
            dim, depth=depth, heads=heads, dim_head=dim_head, ff_mult=ff_mult, max_frames=max_frames
        )

    def token_count(self, num_frames: int) -> int:
        slow = self.slow_side**2
        return slow if num_frames == 1 else slow + self.fast_side**2

    def queries(self, features: torch.Tensor) -> torch.Tensor:
        """(T, L, D) -> (Q, D): 4x4 spatial average pooling, then the mean over time."""
        return pool_grid(features, self.fast_side).mean(dim=0)

    def forward(self, features: torch.Tensor, project: Project | None = None) -> TokenBlock:
        # features: (T, L, D) for one segment
        dtype = features.dtype
        features = self._input(features)
        to_lm = project or identity
        keyframe = keyframe_tokens(features[0], project, self.slow_side)  # (196, C)
        slow = keyframe.shape[0]
        if features.shape[0] == 1:
            views = Views(count=slow, key=View(((0, slow),)), low=View(((0, slow),), pool=self.fast_side))
            return TokenBlock(keyframe.to(dtype), slow=slow, views=views)
        fast = to_lm(self.perceiver(features[None], self.queries(features)[None])[0])  # (49, C)
        tokens = torch.cat((keyframe, fast.to(keyframe.dtype)), dim=0)  # (245, C)
        views = Views(count=tokens.shape[0], key=View(((0, slow),)), low=View(((slow, tokens.shape[0]),)))
        return TokenBlock(tokens.to(dtype), slow=slow, views=views)

    def config(self) -> dict:
        return {**super().config(), **self.options}
