"""SIGTERM to exit: `vidmem serve` with a camera streaming over its websocket, stopped with SIGTERM.

    python bench/shutdown.py --model DIR --embedder DIR [--runs 3]

Each run starts `vidmem serve` on a free loopback port, streams 22 distinct frames (11 s of camera time at 2 frames
per second), waits a second, sends SIGTERM and times until the process has exited; then reads the memory to check
that the last frames (the segment in flight) were committed. Prints one JSON line: seconds per run and their
median, the exit codes, and whether every run kept the last segment. CPU; the tiny or a real checkpoint.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FRAMES = 22


def _jpeg(i: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def one_run(model: str, embedder: str, memory: Path) -> dict:
    from websockets.asyncio.client import connect

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "vidmem", "serve", "--port", str(port), "--memory", str(memory),
                                "--model", model, "--embedder", embedder, "--device", "cpu"],
                               stderr=subprocess.PIPE, text=True, env=env)
    while True:
        line = process.stderr.readline()
        if not line or "serving" in line:
            break
    base = time.time() - 100

    async def camera() -> float:
        async with connect(f"ws://127.0.0.1:{port}/ws/live?stream=cam") as ws:
            for i in range(FRAMES):
                await ws.send(json.dumps({"type": "frame", "ts": base + 0.5 * i}))
                await ws.send(_jpeg(i))
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 60)
            except Exception:  # noqa: BLE001 - closed by the server
                pass
            return sent

    sent = asyncio.run(camera())
    code = process.wait(120)
    seconds = time.monotonic() - sent
    conn = sqlite3.connect(f"file:{memory / 'memory.sqlite'}?mode=ro", uri=True)
    last = conn.execute("SELECT MAX(end) FROM segments").fetchone()[0]
    conn.close()
    return {"seconds": round(seconds, 3), "code": code, "kept_last": last is not None and last >= base + 0.5 * (FRAMES - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--embedder", required=True)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="vidmem-shutdown-") as tmp:
        for i in range(args.runs):
            runs.append(one_run(args.model, args.embedder, Path(tmp) / f"m{i}"))
    print(json.dumps({"bench": "shutdown", "runtime": f"CPU, {args.model}", "runs": runs,
                      "median_seconds": statistics.median(r["seconds"] for r in runs),
                      "all_kept_last_segment": all(r["kept_last"] for r in runs)}))


if __name__ == "__main__":
    main()
