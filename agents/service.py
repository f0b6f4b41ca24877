"""What every long-running vidmem service does besides its own work: upkeep of the memory, and a clean stop.

`vidmem serve` and `vidmem monitor` both run `upkeep(app, stop)` beside their work: retention (per stream ages and
byte limits, the memory's disk budget) is enforced every `RETENTION_EVERY` seconds even on streams that receive
nothing (an idle camera's old footage still ages out), and the bookkeeping tables are pruned with it.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from vidmem.errors import VidmemError

log = logging.getLogger(__name__)

RETENTION_EVERY = 60.0  # seconds between two retention passes of a running service


async def upkeep(app: Any, stop: asyncio.Event, *, every: float = RETENTION_EVERY) -> None:
    """Enforce the memory's retention every `every` seconds until `stop` is set (the first pass right away)."""
    while not stop.is_set():
        try:
            deleted = await asyncio.to_thread(app.memory.apply_retention)
            if deleted:
                log.info("retention removed %d segments", deleted)
        except VidmemError as exc:  # a busy or full disk: try again next time, keep serving
            log.warning("enforcing retention failed: %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass
