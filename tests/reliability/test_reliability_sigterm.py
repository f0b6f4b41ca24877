"""SIGTERM stops `vidmem serve` cleanly while a camera streams: exit 0 and the segment in flight committed."""
from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image
from rel_support import WAIT, check_consistent, cli, cli_env
from services import free_port
from websockets.asyncio.client import connect

FRAMES = 22  # 11 s of camera time at 2 frames per second


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)  # every frame a different picture: nothing is folded by the static check
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.slow
def test_sigterm_stops_serve_promptly_and_commits_the_segment_in_flight(tmp_path, tiny_models):
    port = free_port()
    memory = tmp_path / "memory"
    process = subprocess.Popen(cli("serve", "--port", str(port), memory=memory, tiny=tiny_models),
                               stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line or "serving" in line:
                break
        base = time.time() - 100

        async def camera() -> float:
            async with connect(f"ws://127.0.0.1:{port}/ws/live?stream=door") as ws:
                for i in range(FRAMES):
                    await ws.send(json.dumps({"type": "frame", "ts": base + 0.5 * i}))
                    await ws.send(_jpeg(i))
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)  # every frame has reached the server (acks come only now and then)
                sent = time.monotonic()
                process.send_signal(signal.SIGTERM)
                try:
                    while True:
                        await asyncio.wait_for(ws.recv(), WAIT)
                except Exception:  # the server closed the connection
                    pass
                return sent

        sent = asyncio.run(camera())
        code = process.wait(timeout=WAIT)
        stopped = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, process.stderr.read()[-2000:]
    assert stopped < 10.0  # a hang detector only; bench/shutdown.py measures the time (under 2 s)
    report = check_consistent(memory)
    from vidmem.memory import Memory

    with Memory.open(memory, readonly=True) as opened:
        rows = opened.segments(stream="door")
        source = opened.sources()["door"]
    assert report["segments"] == len(rows) > 0
    assert rows[-1].end >= base + 0.5 * (FRAMES - 1)  # the last frames, in flight at the signal, were kept
    assert source["state"] == "ended"
