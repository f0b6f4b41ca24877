"""AVS/SVC: the autoencoder-based Spatio-temporal Video Compressor (avs-svc-adaptive-sampler-and-compressor.txt,
section 3.2.2).

The compressor C maps a segment's features f (T x H x W x D, H = W = 27) to a latent of t x h x w tokens
(4x4x4 by default: a 4-frame segment on SigLIP's 27x27 grid -> 1 x 7 x 7 = 49 tokens). With the residual
latent-space constraint (eq. 10) the latent is

    h = C(f) + avgpool3d(f)

so C learns only what average pooling loses and h stays in the space of the pooled vision features, which is what
the VLM's projector expects. A decoder D reconstructs f from h; C and D are pre-trained on video alone with the
L1 loss |f - D(C(f) + avgpool3d(f))| (eq. 11; `reconstruction_loss`).

C is a "light-weight 3D convolution" factorised into a 2D spatial convolution that maps D channels to a smaller
bottleneck and a 1D temporal convolution that restores D (the channel-wise bottleneck); downsampling is by the
strides (s_h, s_w) and s_t, then cascaded residual blocks of the same factorised form.

Departures: the last convolution of every residual branch is zero-initialised, so an untrained SVC's latent is
exactly avgpool3d(f) (a safe training-free start, DESIGN.md) and its decoder starts as nearest upsampling. Segments
shorter than s_t frames and grids not divisible by the stride are padded by replication for the convolutions,
while the average-pool term uses adaptive pooling over the real frames and patches (27 -> 7, as `pool_grid`).
The latent lives in the vision space (eq. 10) and is projected into the language model's space after; with
`keyframe=True` the slow keyframe (LLaVA-OneVision's video form) is shown first, as in Clapper's slow-fast layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vidmem.compressors.base import Compressor, Project, TokenBlock, View, Views, identity, keyframe_tokens, stride_side
from vidmem.compressors.timeperceiver import KEYFRAME_STRIDE


class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, T, H, W) tensor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class FactorisedConv3d(nn.Module):
    """(2+1)D convolution: spatial Conv2d in -> bottleneck, GELU, temporal Conv1d bottleneck -> out."""

    def __init__(
        self, in_dim: int, out_dim: int, *, bottleneck: int, kernel: tuple[int, int], stride: tuple[int, int]
    ) -> None:
        super().__init__()
        (k_t, k_s), (s_t, s_s) = kernel, stride
        self.spatial = nn.Conv2d(in_dim, bottleneck, k_s, stride=s_s, padding=(k_s - s_s) // 2)
        self.temporal = nn.Conv1d(bottleneck, out_dim, k_t, stride=s_t, padding=(k_t - s_t) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W)
        batch = x.shape[0]
        y = rearrange(x, "b c t h w -> (b t) c h w")  # frames as images
        y = F.gelu(self.spatial(y))  # ((B T), c, H', W')
        height, width = y.shape[-2:]
        y = rearrange(y, "(b t) c h w -> (b h w) c t", b=batch)  # every position as a time series
        y = self.temporal(y)  # ((B H' W'), out, T')
        return rearrange(y, "(b h w) c t -> b c t h w", b=batch, h=height, w=width)


class ResidualBlock(nn.Module):
    """x + FactorisedConv3d(norm(x)) at constant shape; the branch starts at zero."""

    def __init__(self, dim: int, *, bottleneck: int) -> None:
        super().__init__()
        self.norm = ChannelNorm(dim)
        self.conv = FactorisedConv3d(dim, dim, bottleneck=bottleneck, kernel=(3, 3), stride=(1, 1))
        nn.init.zeros_(self.conv.temporal.weight)
        nn.init.zeros_(self.conv.temporal.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.norm(x))


class SVCCompressor(Compressor):
    """SVC latent tokens (49 for a segment of up to 4 frames at 4x4x4); `decode` and `reconstruction_loss` train it."""

    name = "svc"

    def __init__(
        self,
        *,
        dim: int,
        num_patches: int = 729,
        ratio: tuple[int, int, int] | list[int] = (4, 4, 4),
        bottleneck: int = 256,
        depth: int = 2,
        keyframe: bool = False,
    ) -> None:
        super().__init__(dim=dim, num_patches=num_patches)
        s_t, s_h, s_w = (int(r) for r in ratio)
        if s_h != s_w or min(s_t, s_h) < 1:
            raise ValueError(f"svc ratio must be (t, s, s) with positive strides, got {tuple(ratio)}")
        self.options = {"ratio": [s_t, s_h, s_w], "bottleneck": bottleneck, "depth": depth, "keyframe": keyframe}
        self.s_t, self.s = s_t, s_h
        self.latent_side = stride_side(self.side, self.s)  # 7 at stride 4
        self.keyframe = keyframe
        self.slow_side = stride_side(self.side, KEYFRAME_STRIDE)
        # compressor C: strided (2+1)D conv (kernel = stride), then cascaded residual blocks
        self.norm_in = ChannelNorm(dim)
        self.down = FactorisedConv3d(dim, dim, bottleneck=bottleneck, kernel=(s_t, self.s), stride=(s_t, self.s))
        nn.init.zeros_(self.down.temporal.weight)
        nn.init.zeros_(self.down.temporal.bias)
        self.encoder_blocks = nn.Sequential(*(ResidualBlock(dim, bottleneck=bottleneck) for _ in range(depth)))
        # decoder D: nearest upsampling plus a learned per-token expansion (pixel-shuffle style), then refinement
        expand = max(8, bottleneck // 4)
        self.dec_norm = ChannelNorm(dim)
        self.dec_expand = nn.Linear(dim, expand * s_t * self.s * self.s)
        self.dec_out = nn.Linear(expand, dim)
        nn.init.zeros_(self.dec_out.weight)
        nn.init.zeros_(self.dec_out.bias)
        self.decoder_blocks = nn.Sequential(*(ResidualBlock(dim, bottleneck=bottleneck) for _ in range(depth)))
        # ViT features carry absolute position embeddings that pooling averages away; the decoder learns them back
        self.dec_pos = nn.Parameter(torch.zeros(num_patches, dim))

    def token_count(self, num_frames: int) -> int:
        fast = math.ceil(num_frames / self.s_t) * self.latent_side**2
        return fast + (self.slow_side**2 if self.keyframe else 0)

    # -- the latent ---------------------------------------------------------------------------------------
    def _video(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, L, D) -> (B, D, T, side, side)."""
        return rearrange(features, "b t (h w) d -> b d t h w", h=self.side)

    def avgpool3d(self, features: torch.Tensor) -> torch.Tensor:
        """avgpool_3D(f) of eq. 10: (B, T, L, D) -> (B, D, t, h, w), adaptive over the real frames and patches."""
        num_frames = features.shape[1]
        out = (math.ceil(num_frames / self.s_t), self.latent_side, self.latent_side)
        video = self._video(features.float())
        return F.adaptive_avg_pool3d(video, out).to(features.dtype)

    def residual(self, features: torch.Tensor) -> torch.Tensor:
        """C(f) of eq. 10: (B, T, L, D) -> (B, D, t, h, w)."""
        video = self._video(features)
        num_frames = video.shape[2]
        pad_t = -num_frames % self.s_t
        pad_s = self.latent_side * self.s - self.side
        # replicate-pad time and space so the strided convolution sees whole windows
        video = F.pad(video, (0, pad_s, 0, pad_s, 0, pad_t), mode="replicate")  # (B, D, T', H', W')
        return self.encoder_blocks(self.down(self.norm_in(video)))

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """h = C(f) + avgpool3d(f): (B, T, L, D) -> (B, D, t, h, w)."""
        return self.residual(features) + self.avgpool3d(features)

    def decode(self, latent: torch.Tensor, num_frames: int) -> torch.Tensor:
        """D(h): (B, D, t, h, w) -> reconstructed features (B, T, L, D)."""
        batch, _, t, h, w = latent.shape
        up = latent.repeat_interleave(self.s_t, 2).repeat_interleave(self.s, 3).repeat_interleave(self.s, 4)
        x = rearrange(self.dec_norm(latent), "b d t h w -> b t h w d")
        x = self.dec_expand(x)  # (B, t, h, w, e * s_t * s * s)
        x = rearrange(x, "b t h w (e i j k) -> b (t i) (h j) (w k) e", i=self.s_t, j=self.s, k=self.s)
        x = self.dec_out(F.gelu(x)).movedim(-1, 1)  # (B, D, t*s_t, h*s, w*s)
        x = self.decoder_blocks(up + x)
        x = x[:, :, :num_frames, : self.side, : self.side]  # crop the padding, (B, D, T, side, side)
        return rearrange(x, "b d t h w -> b t (h w) d") + self.dec_pos

    def reconstruction_loss(self, features: torch.Tensor) -> torch.Tensor:
        """Eq. 11: mean |f - D(C(f) + avgpool3d(f))| over a batch of segments (B, T, L, D)."""
        target = features.to(next(self.parameters()).dtype)
        return (self.decode(self.encode(target), target.shape[1]) - target).abs().mean()

    def forward(self, features: torch.Tensor, project: Project | None = None) -> TokenBlock:
        # features: (T, L, D) for one segment
        dtype = features.dtype
        features = self._input(features)
        latent = self.encode(features[None])[0]  # (D, t, h, w)
        tokens = (project or identity)(rearrange(latent, "d t h w -> (t h w) d"))  # time-major latent tokens (N, C)
        group = self.latent_side**2  # latent tokens of one temporal group (49)
        slow = 0
        if self.keyframe:
            keyframe = keyframe_tokens(features[0], project, self.slow_side)  # (196, C)
            tokens, slow = torch.cat((keyframe, tokens.to(keyframe.dtype)), dim=0), keyframe.shape[0]
        # key: the keyframe, or the first temporal group's latent; low: the first latent group
        views = Views(count=tokens.shape[0], key=View(((0, slow or group),)), low=View(((slow, slow + group),)))
        return TokenBlock(tokens.to(dtype), slow=slow, views=views)

    def config(self) -> dict:
        return {**super().config(), **self.options}
