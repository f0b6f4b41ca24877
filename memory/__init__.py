"""vidmem's durable temporal memory: segments and their tokens on disk, a FAISS index over their embeddings.

    from vidmem.memory import Memory, Manifest
    with Memory.open("~/vidmem-memory") as memory:
        memory.bind(manifest)
        row = memory.add_segment(stream="kitchen", start=..., end=..., frames=4, cut=False, tokens=tokens,
                                 slow=196, embedding=clip_embedding)
        hits = memory.search(query_embedding, k=16, streams=["kitchen"], since=t0)
"""
from __future__ import annotations

from vidmem.memory.index import IndexOptions
from vidmem.memory.store import Memory
from vidmem.memory.types import Manifest, Retention, SegmentRow, StreamInfo, check_stream_name

__all__ = ["IndexOptions", "Manifest", "Memory", "Retention", "SegmentRow", "StreamInfo", "check_stream_name"]
