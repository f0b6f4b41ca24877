"""The compressors vidmem can build by name: an explicit table, so what exists is read here, not found by imports."""
from __future__ import annotations

from vidmem.compressors.base import Compressor
from vidmem.compressors.dynfocus import DynFocusCompressor
from vidmem.compressors.perceiver import SlowFastPerceiver
from vidmem.compressors.pooling import PoolCompressor
from vidmem.compressors.sampler import WeightedTokenSampler
from vidmem.compressors.svc import SVCCompressor
from vidmem.compressors.timeperceiver import SlowFastTimePerceiver
from vidmem.errors import ConfigError

REGISTRY: dict[str, type[Compressor]] = {
    "timeperceiver": SlowFastTimePerceiver,  # Clapper's default: 196 keyframe + 49 TimePerceiver tokens
    "perceiver": SlowFastPerceiver,  # Clapper's ablation: keyframe + 49 learned Perceiver queries
    "pool": PoolCompressor,  # Clapper's training-free pooling baselines
    "svc": SVCCompressor,  # AVS/SVC autoencoder latent
    "weighted-sampler": WeightedTokenSampler,  # FTFV top-K tokens by maximum attention
    "dynfocus": DynFocusCompressor,  # DynFocus event prototypes, cones and rods
}


def available() -> list[str]:
    return sorted(REGISTRY)


def build_compressor(name: str, *, dim: int, num_patches: int = 729, **options) -> Compressor:
    """Build a registered compressor by name; an unknown name is a `ConfigError` listing the known ones."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown compressor '{name}'; choose one of: {', '.join(available())}")
    return REGISTRY[name](dim=dim, num_patches=num_patches, **options)
