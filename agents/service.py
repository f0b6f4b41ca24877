"""What every long-running vidmem service does besides its own work: start, upkeep of the memory, a clean stop.

`vidmem serve` and `vidmem monitor` both start through `run_service(app, main)`: the models load first (a missing
model fails before a port opens or the memory is touched), SIGINT and SIGTERM set the `stop` event their main
coroutine waits on, `upkeep(app, stop)` runs beside it, and the app is closed on the way out whatever happened.
Retention (per stream ages and byte limits, the memory's disk budget) is enforced every `RETENTION_EVERY` seconds
even on streams that receive nothing (an idle camera's old footage still ages out), and the bookkeeping tables are
pruned with it. The CLI wires the services together; they do not import each other.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any, Awaitable, Callable

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


def run_service(app: Any, main: Callable[[asyncio.Event], Awaitable[int]], *, exit_process: bool = False) -> int:
    """Load the models, open the memory, then run `main(stop)` with upkeep beside it until it returns;
    SIGINT/SIGTERM set `stop`.

    Returns main's exit code; the app (and so the memory) is closed in every case. With `exit_process` (the CLI),
    a clean stop ends the process right there: everything is committed and closed, and the interpreter's own
    teardown of the model libraries would otherwise add seconds to SIGTERM (measured 2-7 s on 2 busy cores).
    """
    code = _run(app, main)
    if exit_process:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    return code


def _run(app: Any, main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    try:
        app.load_models()
        app.memory  # noqa: B018 - opened now: a bad or unreachable memory fails at start, not at the first client

        async def run() -> int:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            keeper = asyncio.create_task(upkeep(app, stop), name="vidmem-upkeep")
            try:
                return await main(stop)
            finally:
                stop.set()
                await keeper

        return asyncio.run(run())
    finally:
        app.close()
