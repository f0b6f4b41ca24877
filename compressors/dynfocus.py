"""DynFocus: Dynamic Event Prototype Estimation (DPE) and Compact Cooperative Encoding (CCE)
(dynfocus-dpe-cce.txt, sections 3.2 and 3.3), applied to one segment at a time.

DPE: every frame is locally average-pooled (27x27 -> 7x7); DPC-KNN (eq. 1 and 4) scores each frame by
local density times distance to any denser frame; the top `candidates` frames are event prototypes (eq. 5,
importance-weighted cluster means); a score network on [max-norm row, mean row] (eq. 6) then keeps the top
`events` of them, min-max normalised. Top-K is made trainable with perturbed maximisation (eq. 7-9).

CCE: an important frame is encoded by the Cones: its event prototype plus multi-grained spatial prototypes,
DPC-KNN run repeatedly on its patches (729 -> 64 -> 32 -> 16 by default), each layer clustering the previous one's
prototypes (eq. 10). Every other frame is encoded by the Rods: two tokens, a global content token (the frame's
mean) and a context token condensed by attention over its spatial prototypes (eq. 11-12).

Departures: vidmem compresses at ingest time, before any question exists, so the Rods' text-grounded query is a
learned query, and the score network is question-agnostic; both are zero-initialised, as are the residual MLPs
that keep the tokens in the vision space, so an untrained DynFocus picks frames by DPC-KNN alone and emits plain
(cluster-mean) prototypes. Tokens are built in the vision space and projected after. Views: "key" is the first
important frame's cone (1 + 64 + 32 + 16 = 113 tokens), "low" its event prototype and coarsest prototypes (17).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vidmem.compressors.base import Compressor, Project, TokenBlock, View, Views, identity, pool_grid, stride_side


@dataclass
class DensityPeaks:
    """The result of DPC-KNN on N points."""

    centers: torch.Tensor  # (K,) indices of the cluster centres, highest score first
    assign: torch.Tensor  # (N,) index into `centers` of each point's cluster
    score: torch.Tensor  # (N,) density * distance indicator (importance)
    density: torch.Tensor  # (N,) rho of eq. 1


def dpc_knn(points: torch.Tensor, num_centers: int, *, k: int = 5) -> DensityPeaks:
    """Density-peak clustering with k nearest neighbours (DPC-KNN, Du et al. 2016) on (N, C) points.

    rho_i = exp(-mean of squared distances to the k nearest neighbours); delta_i = distance to the nearest point
    of higher density (the largest distance for the densest point); centres are the top rho * delta.
    """
    x = points.float().flatten(1)  # (N, C')
    num = x.shape[0]
    num_centers = min(num_centers, num)
    dist = torch.cdist(x[None], x[None])[0] / math.sqrt(x.shape[1])  # (N, N), scaled Frobenius distances
    neighbours = min(k, num - 1)
    if neighbours > 0:
        knn = dist.topk(neighbours + 1, dim=-1, largest=False).values[:, 1:]  # (N, k) without the point itself
        density = torch.exp(-(knn**2).mean(dim=-1))
    else:
        density = torch.ones(num, device=x.device)
    # break ties deterministically so "higher density" is a strict order
    density = density + torch.arange(num, 0, -1, dtype=density.dtype, device=density.device) * 1e-9
    higher = density[None, :] > density[:, None]  # (N, N): j denser than i
    far = dist.max()
    delta = torch.where(higher, dist, far.expand_as(dist)).amin(dim=-1)  # (N,)
    delta = torch.where(higher.any(dim=-1), delta, dist.amax(dim=-1))  # the densest point: its largest distance
    score = density * delta
    centers = score.topk(num_centers).indices  # (K,)
    assign = dist[:, centers].argmin(dim=-1)  # (N,)
    assign[centers] = torch.arange(num_centers, device=assign.device)
    return DensityPeaks(centers=centers, assign=assign, score=score, density=density)


def merge_clusters(points: torch.Tensor, peaks: DensityPeaks) -> torch.Tensor:
    """Eq. 5: importance-weighted mean of every cluster's members, (N, ...) -> (K, ...)."""
    num_centers = peaks.centers.shape[0]
    weight = peaks.score.to(points.dtype) + 1e-6  # (N,)
    onehot = F.one_hot(peaks.assign, num_centers).to(points.dtype) * weight[:, None]  # (N, K)
    onehot = onehot / onehot.sum(dim=0, keepdim=True)
    return torch.einsum("nk,n...->k...", onehot, points)


class PerturbedTopK(torch.autograd.Function):
    """Differentiable top-k indicators by perturbed maximisation (Berthet et al. 2020; DynFocus eq. 7-9)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, samples: int, sigma: float) -> torch.Tensor:  # type: ignore[override]
        noise = torch.randn(samples, *scores.shape, device=scores.device, dtype=scores.dtype)
        top = (scores[None] + sigma * noise).topk(k, dim=-1).indices  # (S, k)
        hits = torch.zeros(samples, scores.shape[-1], device=scores.device, dtype=scores.dtype).scatter_(-1, top, 1.0)
        ctx.save_for_backward(hits, noise)
        ctx.sigma = sigma
        return hits.mean(dim=0)  # (N,) expected indicator

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        hits, noise = ctx.saved_tensors
        # eq. 9: J = E[y(s + sigma Z) Z^T] / sigma
        jacobian = torch.einsum("sn,sm->nm", hits, noise) / (hits.shape[0] * ctx.sigma)
        return grad @ jacobian, None, None, None


class ResidualMLP(nn.Module):
    """x + MLP(norm(x)), the output layer zero-initialised so tokens start as their prototypes."""

    def __init__(self, dim: int, *, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class DynFocusCompressor(Compressor):
    """Cones for the segment's event frames (1 + sum(spatial) tokens each), Rods (2 tokens) for the others."""

    name = "dynfocus"

    def __init__(
        self,
        *,
        dim: int,
        num_patches: int = 729,
        events: int = 1,
        candidates: int = 2,
        spatial: tuple[int, ...] | list[int] = (64, 32, 16),
        k: int = 5,
        hidden: int = 256,
        sigma: float = 0.05,
    ) -> None:
        super().__init__(dim=dim, num_patches=num_patches)
        spatial = [int(s) for s in spatial]
        if events < 1 or candidates < events or not spatial or any(b >= a for a, b in zip(spatial, spatial[1:])):
            raise ValueError("dynfocus needs 1 <= events <= candidates and strictly decreasing spatial prototype counts")
        if spatial[0] > num_patches:
            raise ValueError(f"dynfocus cannot make {spatial[0]} spatial prototypes from {num_patches} patches")
        self.options = {"events": events, "candidates": candidates, "spatial": spatial, "k": k, "hidden": hidden, "sigma": sigma}
        self.events, self.candidates, self.spatial, self.k, self.sigma = events, candidates, spatial, k, sigma
        self.pool_side = stride_side(self.side, 4)  # DPE's local average pooling, 27 -> 7
        self.score_net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.score_net[-1].weight)
        nn.init.zeros_(self.score_net[-1].bias)
        self.cones = ResidualMLP(dim, hidden=hidden)
        self.rods = ResidualMLP(dim, hidden=hidden)
        self.rod_query = nn.Parameter(torch.zeros(dim))
        self.rod_key = nn.Linear(dim, dim, bias=False)

    @property
    def cone_tokens(self) -> int:
        return 1 + sum(self.spatial)

    def token_count(self, num_frames: int) -> int:
        important = min(self.events, num_frames)
        return important * self.cone_tokens + (num_frames - important) * 2

    # -- DPE -----------------------------------------------------------------------------------------------
    def select_events(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T, L, D) -> (important frame indices (E,) in time order, event prototypes (E, L', D), gates (E,))."""
        num_frames = features.shape[0]
        pooled = pool_grid(features, self.pool_side)  # (T, 49, D)
        peaks = dpc_knn(pooled, min(self.candidates, num_frames), k=self.k)
        prototypes = merge_clusters(pooled, peaks)  # (C, 49, D), one per candidate
        # eq. 6: score from the max-norm row and the mean row of each candidate prototype
        rows = prototypes.norm(dim=-1).argmax(dim=-1)  # (C,)
        max_row = prototypes[torch.arange(prototypes.shape[0], device=rows.device), rows]  # (C, D)
        learned = self.score_net(torch.cat((max_row, prototypes.mean(dim=1)), dim=-1)).squeeze(-1).float()  # (C,)
        spread = learned.max() - learned.min()
        # min-max normalised; while all scores tie (untrained) the value is 0 but the gradient still flows
        learned = (learned - learned.min()) / spread if spread > 1e-6 else learned - learned.detach()
        # DPC order breaks ties (an untrained score network scores every candidate alike)
        rank = torch.linspace(1e-3, 0, prototypes.shape[0], device=learned.device)
        scores = learned + rank
        important = min(self.events, num_frames)
        chosen = scores.topk(important).indices  # (E,)
        if self.training and prototypes.shape[0] > important:
            soft = PerturbedTopK.apply(scores, important, 32, self.sigma)[chosen]  # (E,)
            gates = soft / soft.detach().clamp_min(1e-6)  # value 1, gradient of the perturbed top-k
        else:
            gates = torch.ones(important, device=features.device)
        frames = peaks.centers[chosen]
        order = frames.argsort()  # time order
        return frames[order], prototypes[chosen][order], gates[order]

    # -- CCE -----------------------------------------------------------------------------------------------
    def spatial_prototypes(self, frame: torch.Tensor) -> list[torch.Tensor]:
        """Multi-grained spatial prototypes of one frame (L, D): one (n_l, D) tensor per clustering layer."""
        layers, points = [], frame
        for count in self.spatial:
            peaks = dpc_knn(points, count, k=self.k)
            points = merge_clusters(points, peaks)  # (count, D)
            layers.append(points)
        return layers

    def rod(self, frame: torch.Tensor) -> torch.Tensor:
        """Two tokens for a marginal frame (L, D): global content and an attention-condensed context token."""
        prototypes = self.spatial_prototypes(frame)[0]  # (n_1, D)
        weights = (self.rod_key(prototypes) @ self.rod_query).softmax(dim=0)  # (n_1,), uniform when untrained
        context = weights @ prototypes  # (D,)
        return self.rods(torch.stack((frame.mean(dim=0), context)))  # (2, D)

    def cone(self, frame: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        """1 + sum(spatial) tokens for an important frame: its event prototype and its spatial prototypes."""
        tokens = torch.cat([event.mean(dim=0, keepdim=True), *self.spatial_prototypes(frame)])  # (1 + sum, D)
        return self.cones(tokens)

    def forward(self, features: torch.Tensor, project: Project | None = None) -> TokenBlock:
        # features: (T, L, D) for one segment
        dtype = features.dtype
        features = self._input(features)
        frames, events, gates = self.select_events(features)
        cone_of = {int(f): i for i, f in enumerate(frames)}
        parts, first_cone = [], None
        for t in range(features.shape[0]):
            if t in cone_of:
                i = cone_of[t]
                if first_cone is None:
                    first_cone = sum(part.shape[0] for part in parts)
                parts.append(self.cone(features[t], events[i]) * gates[i].to(features.dtype))
            else:
                parts.append(self.rod(features[t]))
        tokens = (project or identity)(torch.cat(parts))  # (N, C), frames in time order
        # key: the first important frame's cone; low: its event prototype plus its coarsest spatial prototypes
        start = first_cone or 0
        coarse = start + 1 + sum(self.spatial[:-1])
        views = Views(
            count=tokens.shape[0],
            key=View(((start, start + self.cone_tokens),)),
            low=View(((start, start + 1), (coarse, start + self.cone_tokens))),
        )
        return TokenBlock(tokens.to(dtype), slow=0, views=views)

    def config(self) -> dict:
        return {**super().config(), **self.options}
