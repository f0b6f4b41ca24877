"""A soak: a `vidmem serve` process fed live camera frames over its websocket, asked a question every few seconds,
its resident memory sampled once a second. RAM must stay flat (DESIGN.md: nothing grows without bound).

The bounded run lasts SOAK_CI_S seconds; `--soak` (or VIDMEM_SOAK=1) runs VIDMEM_SOAK_S seconds (default 600).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

import pytest
from rel_support import WAIT, cli, cli_env, rss_bytes
from services import free_port, stop_server
from test_reliability_fuzz import jpegs
from websockets.sync.client import connect

SOAK_CI_S = 60.0  # the live KV window (32 s of footage) must fill before RAM can be flat
GROWTH_LIMIT = 64 * 2**20  # bytes the server may grow over the second half of the run
FPS = 3.0  # camera frames per second sent
ASK_EVERY_S = 5.0


@pytest.mark.slow
def test_live_ingest_with_periodic_questions_keeps_resident_memory_flat(tmp_path, tiny_models, videos, soak):
    seconds = float(os.environ.get("VIDMEM_SOAK_S", "600")) if soak else SOAK_CI_S
    frames = jpegs(videos["bikes.mp4"]["file"], count=16, side=320)
    port = free_port()
    server = subprocess.Popen(cli("serve", "--port", str(port), "--token", "soak", memory=tmp_path / "memory",
                                  tiny=tiny_models), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env())
    samples: list[tuple[float, int]] = []
    answers, errors, sent = 0, [], 0
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                ws = connect(f"ws://127.0.0.1:{port}/ws/live?stream=soak&token=soak", open_timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        with ws:
            started = time.monotonic()
            next_frame = next_ask = next_sample = started
            asking = False
            while time.monotonic() - started < seconds:
                now = time.monotonic()
                if now >= next_sample:
                    samples.append((now - started, rss_bytes(server.pid)))
                    next_sample += 1.0
                if now >= next_frame:
                    ws.send(json.dumps({"type": "frame", "ts": time.time()}))
                    ws.send(frames[sent % len(frames)])
                    sent += 1
                    next_frame += 1.0 / FPS
                if now >= next_ask and not asking and now - started > 3.0:
                    ws.send(json.dumps({"type": "ask", "id": f"q{answers}", "question": "What is happening now?",
                                        "budget": 3000}))
                    asking, next_ask = True, now + ASK_EVERY_S
                try:
                    reply = json.loads(ws.recv(timeout=0.05))
                except TimeoutError:
                    continue
                if reply["type"] == "answer":
                    answers, asking = answers + 1, False
                elif reply["type"] == "error":
                    asking = False
                    if reply["code"] not in ("no_segments", "busy", "rate_limited"):
                        errors.append(reply)
        assert server.poll() is None
    finally:
        stop_server(server, timeout=60)  # SIGTERM: it commits its segment in flight and stops
    assert errors == []
    assert answers >= seconds / ASK_EVERY_S / 3, answers
    # warm-up (models, allocator arenas, the live window filling) is over by half time; from then on RSS stays flat
    half = [rss for t, rss in samples if t >= seconds / 2]
    baseline = [rss for t, rss in samples if seconds / 2 <= t < seconds / 2 + 10]
    growth = max(half) - statistics.median(baseline)
    print(json.dumps({"soak_seconds": seconds, "frames_sent": sent, "answers": answers,
                      "rss_mb_start": round(samples[0][1] / 2**20, 1), "rss_mb_end": round(samples[-1][1] / 2**20, 1),
                      "rss_growth_second_half_mb": round(growth / 2**20, 1)}))
    assert growth < GROWTH_LIMIT, [(round(t), round(r / 2**20)) for t, r in samples]
