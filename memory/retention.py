"""Retention rules both memories follow, the embedded one (memory/store.py) and the shared one (memory/shared.py).

A memory has a retention of its own besides each stream's: a default age for the streams without one, and a disk
budget for the whole memory. It is stored as JSON under the meta key RETENTION_KEY, in SQLite or PostgreSQL alike.
The budget is kept oldest footage first: the chunk (of any stream) whose first segment was stored earliest goes
first, until the memory's `disk_usage()` plus what is about to be written fits. What `disk_usage()` counts is
each memory's to say (its docstring).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Protocol

from vidmem.memory.tokens import TokenFiles
from vidmem.memory.types import Retention

log = logging.getLogger(__name__)

RETENTION_KEY = "retention"  # meta key of the memory-wide retention (default age, disk budget)
BUDGET_HEADROOM = 0.03  # share of a disk budget kept free for the bookkeeping that grows between writes
MIN_CHUNK_BYTES = 256 << 10  # smallest chunk a byte limit may ask for
CHUNKS_PER_LIMIT = 8  # a byte limit is split in this many chunks: the stream stays within 1/8 of its limit
UNIX_EPOCH_2001 = 1e9  # seconds; end times past this are unix times, so ages count from the wall clock


def retention_json(retention: Retention) -> dict:
    return {"max_age_seconds": retention.max_age_seconds, "max_bytes": retention.max_bytes}


def memory_retention(stored: str | None) -> Retention:
    """The memory-wide retention from its stored meta value (None: no row, no limits)."""
    if stored is None:
        return Retention()
    body = json.loads(stored)
    return Retention(max_age_seconds=body.get("max_age_seconds"), max_bytes=body.get("max_bytes"))


def chunk_limit(max_bytes: int | None, chunk_bytes: int) -> int:
    """How large a stream's token chunk may grow under a byte limit (None: the memory's chunk size)."""
    if max_bytes is None:
        return chunk_bytes
    return int(min(chunk_bytes, max(MIN_CHUNK_BYTES, max_bytes // CHUNKS_PER_LIMIT)))


def stream_chunk_limit(own: int | None, budget: int | None, streams: int, chunk_bytes: int) -> int:
    """Chunk size for a stream with its own byte limit `own` in a memory with disk budget `budget` shared by
    `streams` streams: chunks small enough that dropping the oldest frees a fair share of either."""
    limit = own
    if budget is not None:
        share = budget // max(1, streams)
        limit = share if limit is None else min(limit, share)
    return chunk_limit(limit, chunk_bytes)


def chunks_to_drop(name: str, sizes: dict[int, int], incoming: int, max_bytes: int) -> list[int]:
    """The oldest chunks of stream `name` ({chunk: bytes}) to delete so that it fits `max_bytes` with `incoming`
    bytes more; none when it already fits."""
    total = sum(sizes.values())
    if total + incoming <= max_bytes:
        return []
    if incoming > max_bytes:
        log.warning("a segment of %d bytes exceeds stream %s's limit of %d bytes", incoming, name, max_bytes)
    victims = []
    for c in sorted(sizes):
        if total + incoming <= max_bytes:
            break
        victims.append(c)
        total -= sizes[c]
    return victims


def age_cutoff(newest: float, max_age: float) -> float:
    """Segments ending before this are older than `max_age`. Live streams carry unix times: age counts from now.
    Recordings carry seconds from the file start: age counts from the newest segment (keep the last max_age s)."""
    now = max(newest, time.time()) if newest > UNIX_EPOCH_2001 else newest
    return now - max_age


class Budgeted(Protocol):
    """What `enforce_budget` needs of a memory."""

    path: object
    _files: TokenFiles

    def disk_usage(self) -> int: ...
    def _stream_names(self) -> list[str]: ...
    def _first_stored(self, stream: str, chunk: int) -> float | None: ...
    def _drop_chunks(self, stream: str, victims: list[int]) -> int: ...
    def _compact(self) -> None: ...


def enforce_budget(memory: Budgeted, budget: int | None, incoming: int) -> int:
    """Delete the memory's oldest chunks (any stream) until it fits `budget` with `incoming` bytes more; returns the
    segments deleted. The caller keeps other writers of the memory out meanwhile."""
    if budget is None:
        return 0
    deleted = 0
    # Footage makes room down to a little under the budget: the database and the index grow a little between two
    # writes, and the budget holds for them too.
    target = int(budget * (1.0 - BUDGET_HEADROOM))
    if memory.disk_usage() + incoming > target:
        memory._compact()  # give the database's free space back first: footage goes only for what is left
    while memory.disk_usage() + incoming > target:
        oldest: tuple[float, str, int] | None = None
        for name in memory._stream_names():  # committed streams: a new one's first write may be in flight
            chunks = memory._files.chunks_on_disk(name)
            if not chunks:
                continue
            first = min(chunks)
            # Stored first goes first: live streams are stored in time order, and recordings have no common clock
            # to compare their starts on.
            created = memory._first_stored(name, first)
            key = (float("-inf") if created is None else created, name, first)  # orphan files go first
            if oldest is None or key < oldest:
                oldest = key
        if oldest is None:
            log.warning("the memory at %s takes %d bytes without any footage, over its budget of %d bytes",
                        memory.path, memory.disk_usage(), budget)
            break
        _, name, chunk = oldest
        deleted += memory._drop_chunks(name, [chunk])
        memory._compact()
    if deleted:
        log.info("retention removed %d segments to keep the memory under %d bytes", deleted, budget)
    return deleted
