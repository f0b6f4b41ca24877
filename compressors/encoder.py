"""The answering VLM's own vision tower as vidmem's frame encoder, with preprocessing in plain torch.

LLaVA-OneVision resizes video frames to 384x384, rescales to [0, 1] and normalises with the checkpoint's
`preprocessor_config.json` mean and std; SigLIP at patch 14 then gives 27x27 = 729 features of width D.
No torchvision: resizing is `torch.nn.functional.interpolate`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocess:
    """How frames become pixel values for the vision tower."""

    size: int = 384  # square input side in pixels
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel mean after rescaling to [0, 1]
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel std after rescaling to [0, 1]

    @classmethod
    def from_config(cls, config: dict, *, default_size: int) -> "Preprocess":
        size = config.get("size") or {}
        if isinstance(size, dict):
            side = size.get("height") or size.get("shortest_edge") or default_size
        else:
            side = int(size)
        return cls(
            size=int(side),
            mean=tuple(config.get("image_mean", cls.mean)),
            std=tuple(config.get("image_std", cls.std)),
        )

    def __call__(self, images: list[np.ndarray], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """list of (H, W, 3) uint8 RGB -> (B, 3, size, size) normalised pixel values."""
        batch = []
        for image in images:
            x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
            batch.append(x)
        x = torch.cat(batch).clamp_(0, 255) / 255.0  # (B, 3, size, size) in [0, 1]
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(dtype)


class VisionEncoder:
    """Encodes frames with a VLM's vision tower into patch features (B, L, D)."""

    def __init__(
        self,
        tower: nn.Module,
        *,
        preprocess: Preprocess,
        feature_layer: int | Sequence[int] = -1,
        select_strategy: str = "full",
        name: str = "vision-encoder",
        batch_size: int = 8,
    ) -> None:
        self.tower = tower.eval()
        self.preprocess = preprocess
        # LLaVA's config: which hidden state(s) are the features (a list is concatenated along the width), and
        # whether the first token is dropped ("default", for towers with a CLS token) or kept ("full", SigLIP)
        self.feature_layer = feature_layer if isinstance(feature_layer, int) else tuple(int(i) for i in feature_layer)
        if select_strategy not in ("full", "default"):
            raise ValueError(f"unknown vision_feature_select_strategy {select_strategy!r}")
        self.select_strategy = select_strategy
        self.name = name
        self.batch_size = batch_size
        self.calls = 0  # images encoded so far; the static check and the cacher are measured by it
        param = next(tower.parameters())
        self.device, self.dtype = param.device, param.dtype
        config = tower.config
        layers = 1 if isinstance(self.feature_layer, int) else len(self.feature_layer)
        self.dim = int(config.hidden_size) * layers
        self.side = int(config.image_size) // int(config.patch_size)  # 27 for SigLIP at 384 px, patch 14
        self.num_patches = self.side**2
        self.fingerprint = _fingerprint(tower)

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = self.preprocess(chunk, device=self.device, dtype=self.dtype)
            hidden = self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
            outputs.append(self.select(hidden))  # (b, L, D)
            self.calls += len(chunk)
        return torch.cat(outputs)


    def select(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """The features LLaVA-OneVision uses from the tower's hidden states, as `get_video_features` selects them."""
        if isinstance(self.feature_layer, int):
            features = hidden_states[self.feature_layer]  # (b, L', D)
        else:
            features = torch.cat([hidden_states[i] for i in self.feature_layer], dim=-1)  # (b, L', D * layers)
        return features[:, 1:] if self.select_strategy == "default" else features


def _fingerprint(tower: nn.Module) -> str:
    """Identifies an encoder by its architecture and its patch-embedding weights (cheap, and unique in practice)."""
    config = tower.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset"):
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    # bf16 bytes, so the same checkpoint loaded in fp32 on a CPU or in bf16 on a GPU gives the same fingerprint
    first = next(tower.parameters()).detach().to("cpu", torch.bfloat16).contiguous()
    digest.update(first.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]
