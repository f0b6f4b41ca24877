"""Stream a video file to `vidmem serve` as if it were a camera, then ask a question about it.

    python client.py VIDEO [--url ws://127.0.0.1:8765] [--token T] [--stream NAME] [--fps 2] [--seconds 10]
                     [--question "What is happening?"] [--json]

Frames are decoded with PyAV, scaled to 320 px, encoded as JPEG with Pillow and sent one per binary websocket
message, each announced by {"type": "frame", "ts": <unix seconds>} and paced at --fps in real time. Then the
question is sent; the answer's tokens are printed as they arrive, followed by the cited times (or, with --json,
one JSON object: the answer message plus the last ack's frame counts).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from datetime import datetime

import av
from websockets.asyncio.client import connect


def frames(path: str, fps: float, seconds: float, side: int = 320):
    """(seconds into the video, JPEG bytes) at `fps`, for at most `seconds` of video."""
    next_at = 0.0
    with av.open(path) as container:
        for frame in container.decode(video=0):
            if frame.time is None or frame.time < next_at - 1e-6:
                continue
            if frame.time > seconds:
                return
            next_at += 1.0 / fps
            image = frame.to_image()
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
            yield frame.time, buffer.getvalue()


async def main(args: argparse.Namespace) -> int:
    url = f"{args.url.rstrip('/')}/ws/live?stream={args.stream}"
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    async with connect(url, additional_headers=headers) as ws:
        last_ack: dict = {}
        errors: list[dict] = []

        async def read_acks() -> None:
            async for text in ws:
                message = json.loads(text)
                if message["type"] == "ack":
                    last_ack.update(message)
                elif message["type"] == "error":
                    errors.append(message)
                    print(f"server: {message['code']}: {message['message']}", file=sys.stderr)

        reader = asyncio.create_task(read_acks())
        start, sent = time.monotonic(), 0
        for pts, data in frames(args.video, args.fps, args.seconds):
            await asyncio.sleep(max(0.0, start + pts - time.monotonic()))  # real time, like a camera
            await ws.send(json.dumps({"type": "frame", "ts": time.time()}))
            await ws.send(data)
            sent += 1
        await asyncio.sleep(1.0)  # let the last acks arrive
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)  # one reader at a time on a connection
        print(f"sent {sent} frames; the server has {last_ack.get('frames', '?')} "
              f"({last_ack.get('dropped', '?')} dropped)", file=sys.stderr)

        await ws.send(json.dumps({"type": "ask", "id": "q1", "question": args.question, "budget": args.budget}))
        async with asyncio.timeout(args.timeout):
            async for text in ws:
                message = json.loads(text)
                if message["type"] == "ack":
                    last_ack.update(message)
                elif message["type"] == "token" and not args.json:
                    print(message["text"], end="", flush=True)
                elif message["type"] == "answer":
                    if args.json:
                        print(json.dumps({**message, "sent": sent, "ack": last_ack}))
                    else:
                        print()
                        for s in message["segments"]:
                            print(f"  cited {datetime.fromtimestamp(s['start']):%H:%M:%S}-"
                                  f"{datetime.fromtimestamp(s['end']):%H:%M:%S} ({s['tokens']} tokens)")
                    return 0
                elif message["type"] == "error" and message.get("id") == "q1":
                    print(f"error: {message['code']}: {message['message']}", file=sys.stderr)
                    return 1
    return 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Stream a video file to vidmem serve and ask about it.")
    parser.add_argument("video")
    parser.add_argument("--url", default="ws://127.0.0.1:8765")
    parser.add_argument("--token", help="the server's --token, if it has one")
    parser.add_argument("--stream", default="camera")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=10.0, help="how much of the video to send")
    parser.add_argument("--question", default="What is happening?")
    parser.add_argument("--budget", type=int, default=6000)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer")
    parser.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    sys.exit(asyncio.run(main(parser.parse_args())))
