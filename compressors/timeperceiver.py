"""Clapper's slow-fast segment representation with the TimePerceiver (clapper-timeperceiver.txt, section 3.1).

A segment of T <= 4 frames becomes
  slow: the keyframe (frame 0) pooled 2x2 on the patch grid, 27x27 -> 14x14 = 196 tokens;
  fast: 49 TimePerceiver tokens whose queries are the frames pooled 4x4 (27x27 -> 7x7) and then averaged over
        time, cross-attending (Flamingo-style) to concat(queries, all T*L frame features).
So a 4-frame segment costs 196 + 49 = 245 tokens, a 2- or 3-frame one 245, and a 1-frame one 196.

Departures from the paper: each layer's residual branches are tanh-gated with gates initialised at zero (as in
Flamingo's gated cross-attention), so the untrained module returns its pooled queries exactly and a stock VLM
works before any training; training opens the gates. Flamingo's learned time embeddings are added to the media
(zero-initialised): without them attention over the flattened frames could not tell frame order apart. Flamingo's
final LayerNorm is left out so the output stays in the vision space the VLM's projector expects.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vidmem.compressors.base import Compressor, TokenBlock, pool_grid, register, stride_side

KEYFRAME_STRIDE = 2  # slow path: 2x2 spatial pooling of the keyframe (196 tokens from 27x27)
FAST_STRIDE = 4  # fast path: 4x4 spatial pooling of every frame for the queries (49 tokens from 27x27)


class FeedForward(nn.Module):
    def __init__(self, dim: int, *, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * mult, dim, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media, latents), Flamingo's perceiver-resampler attention."""

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # media: (B, M, D) flattened frame features; latents: (B, Q, D) queries
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((media, latents), dim=1)).chunk(2, dim=-1)  # keys/values over M + Q
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))  # (B, heads, n, dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, Q, dh)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


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


@register("timeperceiver")
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

    def forward(self, features: torch.Tensor) -> TokenBlock:
        # features: (T, L, D) for one segment
        dtype = features.dtype
        features = self._input(features)
        keyframe = pool_grid(features[0], self.slow_side)  # (196, D)
        if features.shape[0] == 1:
            return TokenBlock(keyframe.to(dtype), slow=keyframe.shape[0])
        fast = self.perceiver(features[None], self.queries(features)[None])[0]  # (49, D)
        return TokenBlock(torch.cat((keyframe, fast), dim=0).to(dtype), slow=keyframe.shape[0])

    def config(self) -> dict:
        return {**super().config(), **self.options}
