"""Features to tokens: the vision encoder wrapper, the compressors behind one registry, and their training."""
from __future__ import annotations

from vidmem.compressors.base import Compressor, TokenBlock, View, Views
from vidmem.compressors.registry import available, build_compressor

__all__ = ["Compressor", "TokenBlock", "View", "Views", "available", "build_compressor"]
