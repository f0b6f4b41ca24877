"""The live page in a real headless Chromium whose fake camera plays a real test video.

`vidmem serve` runs as the user would start it (the CLI, tiny checkpoints); the page opens the camera, streams
JPEG frames over the websocket, and a typed question gets an answer on the page with its cited times. A
screenshot is kept in tests/artifacts/ for a person to look at.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest

from services import ensure_debian_package, free_port

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TOKEN = "browser-token-9d2e"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]


def write_y4m(video: Path, out: Path, *, seconds: float = 4.0, fps: int = 10, width: int = 320, height: int = 240) -> Path:
    """A few seconds of `video` as raw YUV 4:2:0 in a y4m container (what Chromium's fake camera plays)."""
    with av.open(str(video)) as container, out.open("wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        next_at, written = 0.0, 0
        for frame in container.decode(video=0):
            if frame.time is None or frame.time < next_at - 1e-6:
                continue
            next_at += 1.0 / fps
            planes = frame.reformat(width=width, height=height, format="yuv420p").to_ndarray()  # (H * 3/2, W)
            f.write(b"FRAME\n" + np.ascontiguousarray(planes, dtype=np.uint8).tobytes())
            written += 1
            if written >= seconds * fps:
                break
    return out


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz?token={TOKEN}", timeout=10) as response:
        return json.load(response)


@pytest.fixture
def served(tiny_models, talking_llava, tmp_path):
    """`vidmem serve` with a tiny checkpoint taught to describe footage, on a free loopback port, stopped with SIGTERM
    afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "vidmem", "serve", "--port", str(port), "--token", TOKEN,
               "--memory", str(tmp_path / "memory"), "--model", str(talking_llava),
               "--embedder", str(tiny_models.clip), "--device", "cpu", "--encode-batch", "8"]
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            pytest.fail(f"vidmem serve exited with {process.returncode}: {(tmp_path / 'serve.log').read_text()[-2000:]}")
        try:
            health(port)
            break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail("vidmem serve did not start listening within 120 s")
            time.sleep(0.3)
    yield port, process
    process.terminate()
    try:
        assert process.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert f"http://127.0.0.1:{port}/" in (tmp_path / "serve.log").read_text()  # the URL was printed


@pytest.mark.browser
def test_the_page_streams_the_camera_and_shows_the_answer_to_a_typed_question(served, videos, tmp_path):
    from playwright.async_api import async_playwright

    port, _ = served
    chromium = ensure_debian_package("chromium", "chromium")
    camera = write_y4m(videos["bikes.mp4"]["file"], tmp_path / "camera.y4m")
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "live_page.png"

    async def scenario():
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium,
                                              args=[*CHROMIUM_ARGS, f"--use-file-for-fake-video-capture={camera}"])
            try:
                page = await browser.new_page(viewport={"width": 1200, "height": 820})
                problems: list[str] = []
                page.on("pageerror", lambda exc: problems.append(str(exc)))
                await page.goto(f"http://127.0.0.1:{port}/?token={TOKEN}&stream=browser&fps=2")
                await page.click("#start")
                await page.wait_for_selector("body[data-state=connected]", timeout=30_000)
                # frames reach the memory: the server reports them and a segment is committed
                deadline = time.monotonic() + 60
                while True:
                    streams = {s["name"]: s for s in health(port)["streams"]}
                    if streams.get("browser", {}).get("segments", 0) >= 1:
                        encoding = health(port)["encoding"]
                        break
                    assert time.monotonic() < deadline, f"no segment from the page's frames: {streams}"
                    await asyncio.sleep(0.5)
                await page.fill("#question", "What do you see right now?")
                await page.click("#ask")
                await page.wait_for_selector("body[data-answered]", timeout=120_000)
                answer = await page.inner_text("#answer")
                classes = await page.get_attribute("#answer", "class")
                cited = await page.locator("#cited li").all_inner_texts()
                counters = await page.inner_text("#counters")
                await page.screenshot(path=str(screenshot), full_page=True)
                return streams["browser"], answer, classes, cited, counters, problems, encoding
            finally:
                await browser.close()

    stream, answer, classes, cited, counters, problems, encoding = asyncio.run(scenario())
    assert not problems, problems
    # the page's frames went through the shared encoder, at the batch size given on the command line
    assert encoding["max_frames"] == 8 and encoding["frames"] >= 2, encoding
    assert stream["received"] >= 2 and stream["clients"] == 1
    assert "error" not in classes and answer.strip() and answer != "thinking…", answer
    assert cited, "the page shows no cited times"
    assert all("–" in line for line in cited)  # "12:01:02 – 12:01:04 (245 tokens, full)"
    assert "frames sent" in counters
    assert screenshot.stat().st_size > 10_000
