"""Live server under load: N websocket clients streaming JPEG frames at a fixed rate, plus a question mid-run.

    python bench/live.py [--quick] [--clients 20] [--fps 2] [--seconds 30] [--streams N] --model DIR --embedder DIR

The server runs in-process in its own thread and event loop, on a free loopback port; the clients run in the
main loop with `websockets.asyncio.client`. Frames are real: a test video decoded with PyAV and encoded as
JPEG with Pillow (320 px), stamped with their send time. Halfway through, one more client asks a question on
the first stream. Prints one JSON line (progress on stderr):
- frames: sent by clients, received, stored (taken by the ingest loops), dropped (rate limit + full queues),
  in_segments (kept by sampling); `accounted` is true when received == stored + dropped on every stream and
  sent == received;
- ack latency p50/p99 (ms): from sending frame N to receiving the ack that counts N frames;
- answer under load: client-side time to first token and to the answer, and the server's ttft_seconds;
- server_up: /healthz still answers after the run; max RSS in MB.
`--quick` builds the tiny checkpoints (tests/checkpoints.py) into a temporary directory and runs 20 clients for
8 s. Absolute times only mean something on the hardware they were measured on (CPU here, tiny models).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import av
import numpy as np

from vidmem.agents.app import Settings, Vidmem
from vidmem.agents.protocol import Limits
from vidmem.agents.server import LiveServer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = REPO.parent / "shared" / "testdata" / "mmaction2" / "test.mp4"


def log(msg: str) -> None:
    print(f"[bench/live] {msg}", file=sys.stderr, flush=True)


def jpeg_frames(path: Path, *, count: int = 40, side: int = 320) -> list[bytes]:
    """JPEGs of evenly spread frames of a real video."""
    out: list[bytes] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            image = frame.to_image()
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
            out.append(buffer.getvalue())
    step = max(1, len(out) // count)
    return out[::step][:count]


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


class Camera:
    """One client: sends a frame every 1/fps seconds for `seconds`, timing each ack against its frame."""

    def __init__(self, url: str, frames: list[bytes], fps: float, seconds: float, offset: int) -> None:
        self.url, self.frames, self.fps, self.seconds, self.offset = url, frames, fps, seconds, offset
        self.sent_at: dict[int, float] = {}  # frame count after sending -> monotonic send time
        self.latencies: list[float] = []  # ms
        self.sent = 0
        self.last_ack: dict = {}
        self.errors: list[dict] = []

    async def run(self) -> None:
        from websockets.asyncio.client import connect

        async with connect(self.url, max_size=2**22) as ws:
            reader = asyncio.create_task(self._read(ws))
            start = time.monotonic()
            n = int(self.seconds * self.fps)
            for i in range(n):
                await asyncio.sleep(max(0.0, start + i / self.fps - time.monotonic()))  # a steady rate, no drift
                data = self.frames[(self.offset + i) % len(self.frames)]
                await ws.send(json.dumps({"type": "frame", "ts": time.time()}))
                await ws.send(data)
                self.sent += 1
                self.sent_at[self.sent] = time.monotonic()
            await asyncio.sleep(1.5)  # the last acks
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, ws) -> None:  # noqa: ANN001
        async for text in ws:
            message = json.loads(text)
            if message["type"] == "ack":
                self.last_ack = message
                sent = self.sent_at.pop(message["frames"], None)
                if sent is not None:
                    self.latencies.append((time.monotonic() - sent) * 1000)
            elif message["type"] == "error":
                self.errors.append(message)


async def ask(url: str, question: str) -> dict:
    from websockets.asyncio.client import connect

    async with connect(url) as ws:
        asked = time.monotonic()
        await ws.send(json.dumps({"type": "ask", "id": "bench", "question": question}))
        first = None
        async with asyncio.timeout(300):
            async for text in ws:
                message = json.loads(text)
                if message["type"] == "token" and first is None:
                    first = time.monotonic()
                elif message["type"] == "answer":
                    done = time.monotonic()
                    return {"ttft_s": round((first or done) - asked, 3), "answer_s": round(done - asked, 3),
                            "server_ttft_s": message["ttft_seconds"], "segments": len(message["segments"]),
                            "visual_tokens": message["visual_tokens"]}
                elif message["type"] == "error" and message.get("id") == "bench":
                    return {"error": message["code"], "message": message["message"]}
    return {"error": "closed"}


def run(args: argparse.Namespace, model: str, embedder: str) -> dict:
    frames = jpeg_frames(Path(args.video))
    log(f"{len(frames)} JPEG frames from {args.video}; loading models")
    with tempfile.TemporaryDirectory(prefix="vidmem-bench-live-") as tmp:
        app = Vidmem(Settings(memory=Path(tmp) / "memory", model=model, embedder=embedder, device=args.device,
                              max_new_tokens=32))
        app.load_models()
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="live-server", daemon=True)
        thread.start()
        on_server = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(600)  # noqa: E731
        limits = Limits(max_clients=max(32, args.clients + 2), max_streams=max(16, args.streams))
        server = LiveServer(app, port=0, limits=limits)
        on_server(server.start())
        base = f"ws://127.0.0.1:{server.port}/ws/live?stream="
        log(f"{args.clients} clients on {args.streams} streams at {args.fps} fps for {args.seconds} s")

        async def load() -> tuple[list[Camera], dict]:
            cameras = [Camera(f"{base}cam{i % args.streams}", frames, args.fps, args.seconds, offset=i * 3)
                       for i in range(args.clients)]
            tasks = [asyncio.create_task(c.run()) for c in cameras]
            await asyncio.sleep(args.seconds / 2)
            answer = await ask(f"{base}cam0", "What is happening right now?")
            await asyncio.gather(*tasks)
            return cameras, answer

        started = time.monotonic()
        cameras, answer = asyncio.run(load())
        wall = time.monotonic() - started
        log("clients done; waiting for the streams to flush")
        deadline = time.monotonic() + 300
        while len({f["name"] for f in list(server.finished)}) < args.streams and time.monotonic() < deadline:
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
            up = json.load(response).get("status") == "ok"
        streams = {f["name"]: f for f in server.finished}  # the last run of each stream
        on_server(server.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        app.close()

    total = {key: sum(f[key] for f in streams.values())
             for key in ("received", "stored", "dropped", "rate_dropped", "queue_dropped", "in_segments", "segments")}
    sent = sum(c.sent for c in cameras)
    latencies = [x for c in cameras for x in c.latencies]
    errors = [e["code"] for c in cameras for e in c.errors]
    return {
        "bench": "live", "clients": args.clients, "streams": args.streams, "fps": args.fps, "seconds": args.seconds,
        "wall_seconds": round(wall, 2), "device": args.device, "model": model,
        "frames": {"sent": sent, **total},
        "accounted": sent == total["received"] and all(f["received"] == f["stored"] + f["dropped"]
                                                       for f in streams.values()),
        "streams_finished": len(streams),
        "ack_latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "n": len(latencies)},
        "answer_under_load": answer,
        "client_errors": {code: errors.count(code) for code in sorted(set(errors))},
        "server_up": up,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--streams", type=int, help="streams the clients share (default: one per client)")
    parser.add_argument("--model", help="LLaVA-OneVision directory or hub id")
    parser.add_argument("--embedder", help="CLIP sentence-transformers directory or hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--video", default=str(DEFAULT_VIDEO))
    parser.add_argument("--quick", action="store_true", help="tiny checkpoints, 8 s")
    args = parser.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 8.0)
    args.streams = args.streams or args.clients
    if args.quick or not args.model:
        sys.path.insert(0, str(REPO / "tests"))
        from checkpoints import build_tiny_clip, build_tiny_llava

        with tempfile.TemporaryDirectory(prefix="vidmem-tiny-") as tiny:
            log("building the tiny checkpoints")
            model = str(build_tiny_llava(Path(tiny) / "llava"))
            embedder = str(build_tiny_clip(Path(tiny) / "clip"))
            result = run(args, model, embedder)
    else:
        result = run(args, args.model, args.embedder)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
