"""vidmem: a streaming video assistant with memory.

The package root holds only the error hierarchy and the version; the work lives in the stages:
`vidmem.stream` (sources to segments), `vidmem.compressors` (features to tokens), `vidmem.memory`
(durable temporal memory) and `vidmem.agents` (selection, answering, the CLI and the services).
"""
from __future__ import annotations

from vidmem.errors import (
    BudgetError,
    ConfigError,
    EncoderMismatchError,
    MemoryStoreError,
    ModelNotFoundError,
    ProtocolError,
    SourceError,
    UnknownStreamError,
    VidmemError,
)

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "ConfigError",
    "EncoderMismatchError",
    "MemoryStoreError",
    "ModelNotFoundError",
    "ProtocolError",
    "SourceError",
    "UnknownStreamError",
    "VidmemError",
    "__version__",
]
