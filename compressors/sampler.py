"""FTFV's weighted token sampler (ftfv-weighted-token-sampler.txt, section 3.2.1).

N learnable queries cross-attend to each frame's M patch features (eq. 1), giving per query an attention row
a_i (1 x M) and an attentive feature x_i. A query whose strongest attention max(a_i) is low found nothing in the
frame, so only the K queries with the highest max(a_i) are kept, in decreasing order of that score (eq. 2):
a frame's N tokens become K (16 by default, FTFV's S4-V16), and a segment of T frames gives T * K tokens.

Departures: FTFV's adapter maps features into the LLM's space; vidmem stores tokens in the vision space and lets
the VLM's own projector map them at question time, so the values are the frame's own patch features (no value or
output projection): every kept token is an attention-weighted average of real vision features, meaningful even
untrained; the kept tokens are then projected. Fixed 2D sine-cosine positions are added to the keys, as FTFV's
adapter adds 2D positional encodings. Views: "key" and "low" are the first frame's K tokens.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from vidmem.compressors.base import Compressor, Project, TokenBlock, View, Views, identity


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embeddings, (side*side, dim)."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * omega[None]  # (L, quarter)
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)  # (L, 4 * quarter)
    return nn.functional.pad(emb, (0, dim - emb.shape[1]))  # (L, dim)


class WeightedTokenSampler(Compressor):
    """Per frame: N query tokens by cross-attention, keep the K whose maximum attention weight is highest."""

    name = "weighted-sampler"

    def __init__(
        self, *, dim: int, num_patches: int = 729, num_queries: int = 64, keep: int = 16, dim_head: int = 128
    ) -> None:
        super().__init__(dim=dim, num_patches=num_patches)
        if not 0 < keep <= num_queries:
            raise ValueError(f"keep must be between 1 and num_queries ({num_queries}), got {keep}")
        self.options = {"num_queries": num_queries, "keep": keep, "dim_head": dim_head}
        self.keep = keep
        self.queries = nn.Parameter(torch.randn(num_queries, dim_head))
        self.norm = nn.LayerNorm(dim)
        self.to_k = nn.Linear(dim, dim_head, bias=False)
        self.register_buffer("pos", sincos_2d(self.side, dim), persistent=False)

    def token_count(self, num_frames: int) -> int:
        return num_frames * self.keep

    def attend(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1 for every frame: (T, L, D) -> attention weights (T, N, L) and attentive features (T, N, D)."""
        keys = self.to_k(self.norm(features) + self.pos.to(features.dtype))  # (T, L, dh)
        logits = torch.einsum("nc,tlc->tnl", self.queries.to(features.dtype), keys) / math.sqrt(keys.shape[-1])
        weights = logits.float().softmax(dim=-1).to(features.dtype)  # (T, N, L), rows sum to 1
        return weights, torch.einsum("tnl,tld->tnd", weights, features)

    def forward(self, features: torch.Tensor, project: Project | None = None) -> TokenBlock:
        # features: (T, L, D) for one segment
        dtype = features.dtype
        features = self._input(features)
        weights, outputs = self.attend(features)
        scores = weights.amax(dim=-1)  # r^t of eq. 2: (T, N)
        idx = scores.float().topk(self.keep, dim=-1).indices  # (T, K), highest score first
        kept = outputs.gather(1, idx[..., None].expand(-1, -1, self.dim))  # (T, K, D)
        tokens = (project or identity)(kept.reshape(-1, self.dim))  # (T*K, C), frames in time order
        first = View(((0, self.keep),))  # the first frame's K tokens stand for the segment at lower detail
        return TokenBlock(tokens.to(dtype), slow=0, views=Views(count=tokens.shape[0], key=first, low=first))

    def config(self) -> dict:
        return {**super().config(), **self.options}
