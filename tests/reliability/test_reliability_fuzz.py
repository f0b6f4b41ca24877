"""Hostile messages: fuzzed websocket frames and JSON against a real LiveServer, fuzzed MQTT payloads on every
input topic against a real Mosquitto and Monitor. Each bad message gets an error reply; the service keeps serving,
and a normal request still works afterwards.

Examples are bounded (derandomised hypothesis, FUZZ_CI per kind; `--soak` raises them to FUZZ_SOAK).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import socket
import threading
import time
import urllib.request

import av
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from rel_support import WAIT, Broker, LoopThread
from websockets.sync.client import connect

from vidmem.agents.app import Settings, Vidmem
from vidmem.agents.protocol import Limits
from vidmem.agents.server import LiveServer

FUZZ_CI = 60  # examples per kind in the bounded run
FUZZ_SOAK = 300
TOKEN = "fuzz-token-91"
REPLY_TYPES = {"ack", "error", "token", "answer", "event"}
COUNTS: dict[str, int] = {}  # inputs tried per kind, for the report


def fuzz_settings(soak: bool, n: int | None = None) -> settings:
    return settings(max_examples=n or (FUZZ_SOAK if soak else FUZZ_CI), deadline=None, derandomize=True,
                    database=None, suppress_health_check=list(HealthCheck))


def jpegs(video, count: int = 8, side: int = 256) -> list[bytes]:  # noqa: ANN001
    out = []
    with av.open(str(video)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % 15:
                continue
            image = frame.to_image()
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
            out.append(buffer.getvalue())
            if len(out) == count:
                break
    return out


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    vidmem = Vidmem(Settings(memory=tmp_path_factory.mktemp("fuzz") / "memory", model=str(tiny_models.llava),
                             embedder=str(tiny_models.clip), device="cpu", max_new_tokens=6))
    vidmem.load_models()
    yield vidmem
    vidmem.close()


# ---- websocket ------------------------------------------------------------------------------------------------------
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      st.text(max_size=40))
JSON = st.recursive(JSON_LEAF, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                          max_size=4), max_leaves=12)
MESSAGE = st.fixed_dictionaries(
    {"type": st.sampled_from(["ask", "frame", "Ask", "", "answer", "error", "token", "x" * 200]) | JSON_LEAF},
    optional={"question": JSON_LEAF | st.text(min_size=990, max_size=1100), "ts": JSON_LEAF,
              "budget": JSON_LEAF | st.integers(-5, 40_000), "id": JSON},
)
TEXT = st.one_of(st.text(max_size=300), JSON.map(json.dumps), MESSAGE.map(json.dumps),
                 st.integers(16_000, 17_000).map(lambda n: json.dumps({"type": "ask", "question": "x" * n})))
MAGIC = st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBP", b"GIF89a", b"BM", b""])


@st.composite
def images(draw) -> bytes:  # noqa: ANN001
    """A real small image, or one cut short."""
    w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    color = draw(st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)))
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buffer, format=draw(st.sampled_from(["JPEG", "PNG", "WEBP", "GIF", "BMP"])))
    data = buffer.getvalue()
    return data[: draw(st.integers(1, len(data)))] if draw(st.booleans()) else data


BINARY = st.one_of(st.binary(max_size=3000), st.tuples(MAGIC, st.binary(max_size=3000)).map(b"".join), images(),
                   st.integers(2 * 1024 * 1024 + 1, 3 * 1024 * 1024).map(lambda n: b"\xff\xd8\xff" + b"\0" * n))


def expects_error(message: str | bytes) -> bool | None:
    """True when the message must get an error, False when it must not, None when either is right."""
    if isinstance(message, bytes):
        try:
            with Image.open(io.BytesIO(message)) as img:
                img.load()
                good = img.format in ("JPEG", "PNG", "WEBP") and len(message) <= Limits().max_frame_bytes
        except Exception:  # noqa: BLE001 - anything Pillow cannot read must be refused
            good = False
        return None if good else True  # a good image may still be refused as too small to be useful: either
    try:
        data = json.loads(message)
    except ValueError:
        return True
    if not isinstance(data, dict) or len(message.encode("utf-8", "surrogatepass")) > Limits().max_text_bytes:
        return True
    if data.get("type") == "frame":
        ts = data.get("ts")
        ok = not isinstance(ts, bool) and isinstance(ts, (int, float)) and math.isfinite(ts) and ts >= 0
        return not ok
    if data.get("type") == "ask":
        return None  # a question gets an answer or an error (no frames yet, bad budget, bad id...)
    return True


@pytest.fixture(scope="module")
def live(app):
    thread = LoopThread()
    limits = Limits(max_fps=1000, fps_burst=1000, first_segment_wait_s=0.5, error_interval_s=0.0)
    server = LiveServer(app, port=0, token=TOKEN, limits=limits)
    thread.call(server.start())
    yield server
    thread.call(server.stop(timeout=30))
    thread.close()


def ws_url(server: LiveServer, stream: str) -> str:
    return f"ws://127.0.0.1:{server.port}/ws/live?stream={stream}&token={TOKEN}"


def exchange(ws, message: str | bytes, n: int) -> list[dict]:  # noqa: ANN001
    """Send one message, then a sentinel that must be refused; return every reply that came before its error."""
    ws.send(message)
    ws.send(json.dumps({"type": f"sentinel-{n}"}))
    replies = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        reply = json.loads(ws.recv(timeout=WAIT))
        assert isinstance(reply, dict) and reply.get("type") in REPLY_TYPES, reply
        if reply["type"] == "error" and f"sentinel-{n}" in reply["message"]:
            return replies
        replies.append(reply)
    raise AssertionError("no reply to the sentinel: the connection stopped serving")


@pytest.mark.slow
def test_fuzzed_websocket_messages_get_errors_and_the_server_keeps_serving(live, videos, soak):
    tried = {"text": 0, "binary": 0}
    with connect(ws_url(live, "fuzz"), max_size=2**22, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ack"

        @fuzz_settings(soak)
        @given(message=st.one_of(TEXT, BINARY))
        def one(message: str | bytes) -> None:
            tried["binary" if isinstance(message, bytes) else "text"] += 1
            replies = exchange(ws, message, sum(tried.values()))
            errors = [r for r in replies if r["type"] == "error"]
            want = expects_error(message)
            if want is True:
                assert errors, (message[:200], replies)
                assert all(isinstance(e["code"], str) and e["message"] for e in errors)
            elif want is False:
                assert not errors, (message[:200], replies)

        one()
    COUNTS["websocket"] = sum(tried.values())
    assert min(tried.values()) >= 10

    # still serving: a new client sends real frames and asks a question that is answered
    with connect(ws_url(live, "after"), max_size=2**22, open_timeout=30) as ws:
        for i, data in enumerate(jpegs(videos["test.mp4"]["file"])):
            ws.send(json.dumps({"type": "frame", "ts": 1_700_000_000.0 + i}))
            ws.send(data)
        deadline = time.monotonic() + WAIT
        answer = None
        while answer is None and time.monotonic() < deadline:
            ws.send(json.dumps({"type": "ask", "id": "real", "question": "What is happening?", "budget": 2000}))
            while True:
                reply = json.loads(ws.recv(timeout=WAIT))
                if reply.get("id") == "real" and reply["type"] in ("answer", "error"):
                    break
            if reply["type"] == "answer":
                answer = reply
            else:
                assert reply["code"] in ("no_segments", "no_frames"), reply
                time.sleep(0.5)
        assert answer is not None and answer["segments"]


@pytest.mark.slow
def test_malformed_websocket_frames_and_http_requests_close_only_their_connection(live, soak):
    tried = 0

    @fuzz_settings(soak, 30 if not soak else 150)
    @given(junk=st.binary(min_size=1, max_size=600), path=st.text(max_size=40))
    def one(junk: bytes, path: str) -> None:
        nonlocal tried
        tried += 1
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as raw:
            key = base64.b64encode(os.urandom(16)).decode()
            raw.sendall((f"GET /ws/live?stream=raw&token={TOKEN} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
            assert b" 101 " in raw.recv(4096).split(b"\r\n", 1)[0]
            raw.sendall(junk)  # not a valid (masked, well-formed) websocket frame, mostly
            raw.settimeout(0.3)
            try:
                raw.recv(4096)
            except (TimeoutError, ConnectionError):
                pass
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as raw:  # and HTTP garbage
            raw.sendall(b"GET /" + path.encode("utf-8", "replace").replace(b" ", b"%20")[:100] + b" HTTP/1.1\r\n"
                        + junk[:200].replace(b"\r\n", b"") + b"\r\n\r\n")
            raw.settimeout(2)
            try:
                raw.recv(4096)
            except (TimeoutError, ConnectionError):
                pass

    one()
    COUNTS["websocket_raw"] = tried
    with urllib.request.urlopen(f"http://127.0.0.1:{live.port}/healthz", timeout=30) as response:
        assert json.loads(response.read())["status"] == "ok"


# ---- MQTT -----------------------------------------------------------------------------------------------------------
class Collector:
    """A paho client collecting everything under vidmem/# (from its own network thread)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzzer")
        self.client.on_message = lambda c, u, m: self._add(m.topic, m.payload)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("vidmem/#", qos=1)
        self.client.loop_start()

    def _add(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.messages.append((topic, bytes(payload)))

    def on(self, topic: str) -> list:
        with self.lock:
            return [json.loads(p) for t, p in self.messages if t == topic and p[:1] in (b"{", b"[")]

    def publish(self, topic: str, payload: bytes | str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(30)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.slow
@pytest.mark.broker
def test_fuzzed_mqtt_payloads_on_every_input_topic_get_errors_and_the_monitor_keeps_serving(app, tmp_path, videos, soak):
    from vidmem.agents.monitor import Monitor, MonitorOptions
    from vidmem.stream import open_source

    asyncio.run(app.ingest(open_source(videos["test.mp4"]["file"]), stream="cam"))
    broker = Broker(tmp_path / "broker").start()
    thread = LoopThread()
    stop = asyncio.Event()
    monitor = Monitor(app, broker.url(), options=MonitorOptions(work_queue=1024, reconnect_min=0.2, reconnect_max=1))
    task = asyncio.run_coroutine_threadsafe(monitor.run(stop), thread.loop)
    collector = Collector(broker.port)
    try:
        deadline = time.monotonic() + WAIT
        while not (monitor.ready and monitor.ready.is_set()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert monitor.ready.is_set()
        time.sleep(0.5)
        with collector.lock:
            collector.messages.clear()
        sent = {"vidmem/cam/ask": 0, "vidmem/cam/trigger": 0, "vidmem/cam/rules/set": 0, "other": 0}
        payloads = st.one_of(st.binary(max_size=400), st.text(max_size=300).map(str.encode), JSON.map(json.dumps).map(str.encode),
                             MESSAGE.map(json.dumps).map(str.encode),
                             st.fixed_dictionaries({}, optional={
                                 "id": JSON_LEAF, "condition": JSON_LEAF, "threshold": JSON_LEAF, "min_duration": JSON_LEAF,
                                 "cooldown": JSON_LEAF, "verify": JSON_LEAF, "delete": JSON_LEAF, "window_seconds": JSON_LEAF,
                                 "prompt": JSON_LEAF, "question": JSON_LEAF}).map(json.dumps).map(str.encode),
                             st.just(b"x" * 70_000))

        @fuzz_settings(soak)
        @given(topic=st.sampled_from(["vidmem/cam/ask", "vidmem/cam/trigger", "vidmem/cam/rules/set"]), payload=payloads)
        def one(topic: str, payload: bytes) -> None:
            sent[topic] += 1
            collector.publish(topic, payload)

        one()

        # stream names that are not safe (or not there) in the topic itself
        names = st.text(st.characters(blacklist_characters="/+#", blacklist_categories=("Cc", "Cs", "Cn", "Co")), min_size=1, max_size=80)

        @fuzz_settings(soak, 30 if not soak else 150)
        @given(name=names | st.sampled_from(["..", ".", ".hidden", "a..b", "con", "x" * 65]),
               action=st.sampled_from(["ask", "trigger", "rules/set"]))
        def other(name: str, action: str) -> None:
            if name == "cam":
                return
            sent["other"] += 1
            collector.publish(f"vidmem/{name}/{action}", json.dumps({"id": "r", "condition": "a cat", "question": "hi?"}))

        other()
        total = sum(sent.values())

        def responses() -> int:
            errors = [e for e in collector.on("vidmem/errors") if e.get("topic", "").startswith("vidmem/")]
            answers = collector.on("vidmem/cam/answer")
            rules = collector.on("vidmem/cam/rules")
            triggers = [e for e in collector.on("vidmem/events") if e["type"] == "new" and e["event"]["rule"] == "trigger"]
            return len(errors) + len(answers) + len(rules) + len(triggers)

        deadline = time.monotonic() + WAIT * 2
        while responses() < total and time.monotonic() < deadline:
            time.sleep(0.2)
        assert responses() == total, (responses(), total, sent)
        errors = collector.on("vidmem/errors")
        assert all(e["code"] and e["message"] for e in errors)
        assert not [e for e in errors if e["code"] == "internal"], [e for e in errors if e["code"] == "internal"][:3]
        # nothing was created for an unsafe stream name
        from vidmem.memory import check_stream_name

        made = os.listdir(app.settings.memory / "tokens")
        assert "cam" in made and all(check_stream_name(name) for name in made)  # the websocket test's streams too
        assert not task.done()

        collector.publish("vidmem/cam/ask", json.dumps({"id": "after-fuzz", "question": "What happens?", "budget": 2000}))
        deadline = time.monotonic() + WAIT
        while not any(a.get("id") == "after-fuzz" for a in collector.on("vidmem/cam/answer")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(a.get("id") == "after-fuzz" and a["segments"] for a in collector.on("vidmem/cam/answer"))
        COUNTS["mqtt"] = total
    finally:
        collector.close()
        thread.loop.call_soon_threadsafe(stop.set)
        try:
            task.result(60)
        finally:
            thread.close()
            broker.stop()
