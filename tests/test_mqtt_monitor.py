"""The MQTT monitor against a real Mosquitto broker, with the tiny checkpoints and a real test video.

What a Home Assistant (or Node-RED) user sees: availability with a last will, questions answered over MQTT,
triggers and watch rules producing Frigate-style events, rules republished retained with discovery configs,
clear errors for bad input, and no event lost across a broker outage.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest
from services import ensure_debian_package, free_port

from vidmem.agents.app import Settings, Vidmem
from vidmem.agents.monitor import Monitor, MonitorOptions
from vidmem.agents.rules import Rule

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[1]
VIDEO = "test.mp4"  # mmaction2's 10 s clip: 3 segments at 1 fps
OUTAGE_SECONDS = float(os.environ.get("VIDMEM_MQTT_OUTAGE_S", "6"))  # how long the outage test keeps the broker down


class Broker:
    """A Mosquitto on a free loopback port with persistence in a temporary directory; stop() and start() again."""

    def __init__(self, folder: Path, *, users: dict[str, str] | None = None) -> None:
        self.binary = ensure_debian_package("mosquitto", "mosquitto")
        self.folder = folder
        self.port = free_port()
        self.users = users
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "mosquitto.conf"
        import getpass

        # `user`: mosquitto started as root drops to user "mosquitto", which could not use this folder
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", "persistence true", f"persistence_location {folder}/",
                 "autosave_interval 1", f"log_dest file {folder}/mosquitto.log", "log_type all"]
        if users is None:
            lines.append("allow_anonymous true")
        else:
            self.set_users(users)
            lines += ["allow_anonymous false", f"password_file {folder}/passwd"]
        self.config.write_text("\n".join(lines) + "\n")

    def set_users(self, users: dict[str, str]) -> None:
        passwd = self.folder / "passwd"
        passwd.unlink(missing_ok=True)
        tool = Path(self.binary).with_name("mosquitto_passwd")
        tool = tool if tool.exists() else Path(ensure_debian_package("mosquitto_passwd", "mosquitto"))
        for user, password in users.items():
            subprocess.run([str(tool), "-b", *([] if passwd.exists() else ["-c"]), str(passwd), user, password],
                           check=True, capture_output=True)
        passwd.chmod(0o600)

    def url(self, credentials: str = "") -> str:
        return f"mqtt://{credentials + '@' if credentials else ''}127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {(self.folder / 'mosquitto.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: mosquitto saves its persistence database on the way out
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


class Watcher:
    """An MQTT client collecting everything under the given filters (a persistent session: it misses nothing)."""

    def __init__(self, port: int, filters=("vidmem/#", "homeassistant/#"), *, client_id: str | None = None,
                 username: str | None = None, password: str | None = None) -> None:
        self.port, self.filters, self.client_id = port, filters, client_id
        self.username, self.password = username, password
        self.messages: list[tuple[str, bytes, bool]] = []
        self.connected = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Watcher:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), 10)
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:  # reconnects across broker restarts, like any real subscriber
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=self.client_id,
                                          clean_session=False if self.client_id else None,
                                          username=self.username, password=self.password) as client:
                    for f in self.filters:
                        await client.subscribe(f, qos=1)
                    self.client = client
                    self.connected.set()
                    async for m in client.messages:
                        self.messages.append((str(m.topic), bytes(m.payload), bool(m.retain)))
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.2)

    async def publish(self, topic: str, payload: str | bytes) -> None:
        await self.client.publish(topic, payload, qos=1)

    def on(self, topic: str) -> list:
        return [json.loads(p) if p[:1] in (b"{", b"[") else p.decode() for t, p, _ in self.messages if t == topic]

    def events(self, **match) -> list[dict]:
        return [m for m in self.on("vidmem/events") if all(m["event"].get(k) == v for k, v in match.items())]

    async def wait(self, predicate, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; got {[(t, p[:200]) for t, p, _ in self.messages[-20:]]}")


async def retained(port: int, topic: str, **auth) -> str | None:
    """What a newly connecting client receives retained on `topic` (None when nothing is retained)."""
    async with aiomqtt.Client("127.0.0.1", port, **auth) as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(1.5):
                async for m in client.messages:
                    return bytes(m.payload).decode()
        except TimeoutError:
            return None


def settings(tmp_path: Path, tiny) -> Settings:
    return Settings(memory=tmp_path / "memory", model=str(tiny.llava), embedder=str(tiny.clip), device="cpu")


# ---- the `vidmem monitor` process ------------------------------------------------------------------------------
@pytest.mark.slow
def test_monitor_process_serves_questions_triggers_rules_and_leaves_a_last_will(tmp_path, broker, tiny_models, videos):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - stream: cam\n    id: anything\n    condition: a person walking\n"
                     "    threshold: -1\n    cooldown: 0\n")
    command = [sys.executable, "-m", "vidmem", "monitor", "--mqtt", broker.url(), "--rules", str(rules),
               "--source", f"cam={videos[VIDEO]['file']}", "--memory", str(tmp_path / "memory"),
               "--model", str(tiny_models.llava), "--embedder", str(tiny_models.clip), "--device", "cpu"]

    async def scenario() -> None:
        async with Watcher(broker.port) as w:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
            try:
                await w.wait(lambda: "online" in w.on("vidmem/available"), "availability online", 120)
                # the rule watches the file: an event opens on the first segment, grows, and ends with the file
                await w.wait(lambda: w.events(rule="anything", **{}) and w.events(rule="anything")[-1]["type"] == "end",
                             "the rule's event to end", 60)
                kinds = [m["type"] for m in w.events(rule="anything")]
                assert kinds[0] == "new" and kinds[-1] == "end" and set(kinds[1:-1]) <= {"update"}
                first = w.events(rule="anything")[0]["event"]
                assert first["stream"] == "cam" and first["start_time"] == 0.0
                assert base64.b64decode(first["snapshot"])[:2] == b"\xff\xd8"  # a JPEG keyframe
                assert w.events(rule="anything")[-1]["event"]["end_time"] == pytest.approx(10.0, abs=0.5)
                # the sensor turns OFF (published just after the end event) ...
                await w.wait(lambda: w.on("vidmem/cam/rule/anything/state")[-1:] == ["OFF"], "the rule's state OFF", 10)
                # the source's state, retained: read while the file played, ended after its last frame
                await w.wait(lambda: [m["state"] for m in w.on("vidmem/cam/state")][-1:] == ["ended"], "ended", 30)
                states = [m["state"] for m in w.on("vidmem/cam/state")]
                assert "live" in states and states[-1] == "ended", states
                assert json.loads(await retained(broker.port, "vidmem/cam/state"))["state"] == "ended"
                config = w.on("homeassistant/binary_sensor/vidmem_cam_anything/config")[-1]
                assert config["state_topic"] == "vidmem/cam/rule/anything/state"
                assert config["availability_topic"] == "vidmem/available"

                # a question, as JSON and as plain text
                await w.publish("vidmem/cam/ask", json.dumps({"id": "q1", "question": "What happens?", "budget": 2000}))
                await w.publish("vidmem/cam/ask", "Is anyone there?")
                answers = await w.wait(lambda: len(w.on("vidmem/cam/answer")) >= 2 and w.on("vidmem/cam/answer"),
                                       "two answers")
                assert answers[0]["id"] == "q1" and answers[0]["question"] == "What happens?"
                assert answers[1]["id"] is None and answers[1]["question"] == "Is anyone there?"
                for answer in answers:
                    assert isinstance(answer["answer"], str) and answer["ts"] > 0
                    assert answer["segments"] and all(0 <= s["start"] <= s["end"] <= 10.5 for s in answer["segments"])

                # a trigger: look at the last 4 seconds and describe them in an event
                await w.publish("vidmem/cam/trigger", json.dumps({"id": "motion-1", "window_seconds": 4,
                                                                  "prompt": "Who is at the door?"}))
                trig = await w.wait(lambda: w.events(rule="trigger"), "the trigger's event")
                event = trig[0]["event"]
                assert event["trigger_id"] == "motion-1" and event["stream"] == "cam"
                assert 6.0 - 0.5 <= event["start_time"] <= event["end_time"] <= 10.5
                assert isinstance(event["description"], str) and event["snapshot"]

                # rules over MQTT: added, republished retained (with discovery), then deleted
                await w.publish("vidmem/cam/rules/set", json.dumps({"id": "dog", "condition": "a dog on the lawn",
                                                                    "threshold": 0.3, "min_duration": 2,
                                                                    "cooldown": 60, "verify": True}))
                await w.wait(lambda: any(len(r) == 2 for r in w.on("vidmem/cam/rules")), "rules with the new one")
                stored = json.loads(await retained(broker.port, "vidmem/cam/rules"))
                assert {r["id"] for r in stored} == {"anything", "dog"}
                assert next(r for r in stored if r["id"] == "dog")["min_duration"] == 2
                assert await retained(broker.port, "homeassistant/binary_sensor/vidmem_cam_dog/config")
                await w.publish("vidmem/cam/rules/set", json.dumps({"id": "dog", "delete": True}))
                await w.wait(lambda: [r["id"] for r in w.on("vidmem/cam/rules")[-1]] == ["anything"], "the deletion")
                assert await retained(broker.port, "homeassistant/binary_sensor/vidmem_cam_dog/config") is None

                # bad input on every input topic: an error each, and the monitor keeps serving
                bad = [
                    ("vidmem/cam/ask", "{not json", "bad_message"),
                    ("vidmem/cam/ask", json.dumps({"id": "q2", "question": ""}), "bad_message"),
                    ("vidmem/cam/ask", b"\xff\xfe\x00", "bad_message"),
                    ("vidmem/cam/ask", "x" * 70_000, "too_large"),
                    ("vidmem/nowhere/ask", "Is anyone there?", "unknown_stream"),
                    ("vidmem/cam/trigger", json.dumps({"window_seconds": "ten"}), "bad_message"),
                    ("vidmem/nowhere/trigger", "{}", "unknown_stream"),
                    ("vidmem/cam/rules/set", json.dumps({"id": "x", "condition": "a cat", "treshold": 0.2}), "bad_message"),
                    ("vidmem/cam/rules/set", json.dumps({"id": "x", "condition": "a cat", "threshold": 7}), "bad_message"),
                    ("vidmem/cam/rules/set", "[1, 2]", "bad_message"),
                    ("vidmem/nowhere/rules/set", json.dumps({"id": "x", "condition": "a cat"}), "unknown_stream"),
                ]
                for topic, payload, _ in bad:
                    await w.publish(topic, payload)
                errors = await w.wait(lambda: len(w.on("vidmem/errors")) >= len(bad) and w.on("vidmem/errors"),
                                      "one error per bad message")
                # (parse errors are immediate; unknown streams are found by the worker, so the order may differ)
                assert sorted((e["topic"], e["code"]) for e in errors) == sorted((t, c) for t, _, c in bad)
                rule_errors = [e["message"] for e in errors if e["topic"] == "vidmem/cam/rules/set"]
                assert any("'treshold'" in m for m in rule_errors) and any("'threshold'" in m for m in rule_errors)
                assert all(e["message"].endswith(".") for e in errors)
                await w.publish("vidmem/cam/ask", json.dumps({"id": "after", "question": "Still there?"}))
                await w.wait(lambda: any(a["id"] == "after" for a in w.on("vidmem/cam/answer")), "an answer after errors")
                assert process.poll() is None

                # SIGKILL: the broker publishes the last will, retained
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)
                await w.wait(lambda: w.on("vidmem/available")[-1] == "offline", "the last will")
                assert await retained(broker.port, "vidmem/available") == "offline"
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()

    asyncio.run(scenario())


def test_home_assistant_example_plays_the_automation(tmp_path, broker, tiny_models, videos):
    """examples/home_assistant/automation.py asks a question and sends a trigger against a running monitor."""
    app = Vidmem(settings(tmp_path, tiny_models))
    example = REPO / "examples" / "home_assistant"

    async def scenario() -> subprocess.CompletedProcess:
        stop = asyncio.Event()
        monitor = Monitor(app, broker.url(), rules_file=example / "rules.yaml",
                          sources={"front_door": str(videos[VIDEO]["file"])})
        task = asyncio.create_task(monitor.run(stop))
        try:
            await asyncio.wait_for(_ready(monitor), 60)
            await _until(lambda: app.memory.has_stream("front_door") and len(app.memory.segments(stream="front_door")) >= 3)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(example / "automation.py"), "--mqtt", broker.url(), "--stream", "front_door",
                "--timeout", "60", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())
        finally:
            stop.set()
            await task

    try:
        result = asyncio.run(scenario())
    finally:
        app.close()
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["answer"]["id"] and lines[0]["answer"]["segments"]
    assert lines[1]["event"]["rule"] == "trigger" and lines[1]["event"]["stream"] == "front_door"


async def _ready(monitor: Monitor) -> None:
    while monitor.ready is None or not monitor.ready.is_set():
        await asyncio.sleep(0.05)


async def _until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.1)


# ---- outages -------------------------------------------------------------------------------------------------------
def decoded_frames(path: Path, count: int) -> list:
    import av

    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % 25 == 0:
                frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == count:
                break
    return frames


def test_events_during_a_broker_outage_are_delivered_after_reconnect(tmp_path, broker, tiny_models, videos):
    """The broker goes away for several seconds while a live camera keeps producing rule hits; none is lost."""
    from vidmem.stream import PushSource

    app = Vidmem(settings(tmp_path, tiny_models))
    camera = PushSource("porch")
    frames = decoded_frames(videos["testvideo.mp4"]["file"], 16)
    options = MonitorOptions(reconnect_min=0.2, reconnect_max=float(os.environ.get("VIDMEM_MQTT_BACKOFF_S", "1")),
                             keepalive=5)
    monitor = Monitor(app, broker.url(), rules=[("porch", Rule("any", "anything at all", threshold=-1, cooldown=0))],
                      sources={"porch": camera}, options=options)

    async def scenario() -> list[dict]:
        stop = asyncio.Event()
        async with Watcher(broker.port, ("vidmem/events",), client_id="outage-watcher") as w:
            task = asyncio.create_task(monitor.run(stop))
            try:
                await asyncio.wait_for(_ready(monitor), 60)
                await asyncio.to_thread(broker.stop)
                outage = time.monotonic()
                for i, image in enumerate(frames):  # 16 s of camera time, pushed while the broker is down
                    while not camera.push(image, ts=1_000_000.0 + i):
                        await asyncio.sleep(0.05)
                camera.close()  # the camera goes away: its open event ends
                await _until(lambda: any(e["status"] == "end" for e in app.memory.events(stream="porch")))
                assert len(monitor.outbox) > 0  # the events are waiting, not lost
                # at least 6 s of outage (VIDMEM_MQTT_OUTAGE_S=30 for the 30 s run)
                await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - outage)))
                await asyncio.to_thread(broker.start)
                return await w.wait(lambda: [m for m in w.events() if m["type"] == "end"] and w.events(),
                                    "the events after the outage", 60)
            finally:
                stop.set()
                await task

    try:
        received = asyncio.run(scenario())
        segments = app.memory.segments(stream="porch")
    finally:
        app.close()
    assert monitor.stats["connects"] >= 2
    kinds = [m["type"] for m in received]
    # one event over every segment: new on the first, an update for each later one, the end when the camera left
    assert kinds == ["new"] + ["update"] * (len(segments) - 1) + ["end"]
    ends = [m["event"]["end_time"] for m in received]
    assert ends == sorted(ends) and ends[-1] == pytest.approx(segments[-1].end)
    assert len({m["event"]["id"] for m in received}) == 1


def test_a_camera_down_at_start_is_waited_for_and_its_state_published_retained(tmp_path, broker, tiny_models):
    """`vidmem monitor --source door=URL` with the camera off: the monitor keeps knocking (never giving up) and
    says so on `vidmem/door/state`, retained, so a dashboard that connects later sees it too."""
    port = free_port()
    app = Vidmem(settings(tmp_path, tiny_models))
    options = MonitorOptions(source_backoff_min=0.05, source_backoff_max=0.2)
    monitor = Monitor(app, broker.url(), sources={"door": f"http://127.0.0.1:{port}/cam.ts"}, options=options)

    async def scenario() -> dict:
        stop = asyncio.Event()
        task = asyncio.create_task(monitor.run(stop))
        try:
            await asyncio.wait_for(_ready(monitor), 60)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                body = await retained(broker.port, "vidmem/door/state")
                if body and json.loads(body)["attempts"] > 5:
                    return json.loads(body)
                await asyncio.sleep(0.2)
            raise AssertionError(f"no retained reconnecting state with more than 5 attempts: {body}")
        finally:
            stop.set()
            await task

    try:
        state = asyncio.run(scenario())
        recorded = app.memory.sources()["door"]
    finally:
        app.close()
    assert state["state"] == "reconnecting" and "refused" in state["error"].lower(), state
    assert recorded["state"] == "ended"  # stopped by us, recorded in the memory for `vidmem stats`


# ---- credentials ---------------------------------------------------------------------------------------------------
def test_bad_credentials_give_a_clear_error_and_a_running_monitor_rides_them_out(tmp_path, tiny_models, caplog):
    broker = Broker(tmp_path / "broker", users={"hass": "s3cret"})
    broker.start()
    try:
        # at start: one clear line and a non-zero exit, before any model loads or the memory is created
        result = subprocess.run(
            [sys.executable, "-m", "vidmem", "monitor", "--mqtt", broker.url("hass:wrong"),
             "--memory", str(tmp_path / "m1"), "--model", str(tiny_models.llava), "--embedder", str(tiny_models.clip)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "VIDMEM_DEBUG": ""})
        assert result.returncode == 2
        assert result.stderr.strip().count("\n") == 0 and "refused the credentials of user 'hass'" in result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "m1").exists()

        # while running: the broker starts refusing us; the monitor logs it, keeps retrying, and comes back
        app = Vidmem(settings(tmp_path, tiny_models))
        options = MonitorOptions(reconnect_min=0.2, reconnect_max=0.5)
        monitor = Monitor(app, broker.url("hass:s3cret"), options=options)

        async def scenario() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(monitor.run(stop))
            try:
                await asyncio.wait_for(_ready(monitor), 30)
                await asyncio.to_thread(broker.stop)
                broker.set_users({"hass": "changed"})
                await asyncio.to_thread(broker.start)
                await _until(lambda: "refused the credentials of user 'hass'" in caplog.text, 30)
                assert not task.done()
                await asyncio.to_thread(broker.stop)
                broker.set_users({"hass": "s3cret"})
                await asyncio.to_thread(broker.start)
                await _until(lambda: monitor.stats["connects"] >= 2, 30)
                assert await retained(broker.port, "vidmem/available", username="hass", password="s3cret") == "online"
            finally:
                stop.set()
                await task

        with caplog.at_level(logging.WARNING, logger="vidmem.agents.monitor"):
            try:
                asyncio.run(scenario())
            finally:
                app.close()
        assert asyncio.run(retained(broker.port, "vidmem/available", username="hass", password="s3cret")) == "offline"
    finally:
        broker.stop()


# ---- the live server's streams ---------------------------------------------------------------------------------------
def test_serve_with_mqtt_watches_websocket_cameras(tmp_path, broker, tiny_models, videos):
    """`vidmem serve --mqtt`: a rule set before the camera connects fires on its frames, on MQTT and on the websocket."""
    import argparse
    import io

    import websockets
    from PIL import Image

    from vidmem.agents.monitor import attach_live
    from vidmem.agents.server import LiveServer

    app = Vidmem(settings(tmp_path, tiny_models))
    jpegs = []
    for image in decoded_frames(videos["testvideo.mp4"]["file"], 10):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG")
        jpegs.append(buffer.getvalue())

    async def scenario() -> tuple[list, list]:
        async with LiveServer(app, host="127.0.0.1", port=0) as server, Watcher(broker.port) as w:
            args = argparse.Namespace(mqtt=broker.url(), rules=None)
            async with attach_live(server, args):
                await w.wait(lambda: "online" in w.on("vidmem/available"), "availability online")
                await w.publish("vidmem/kitchen/rules/set", json.dumps({"id": "any", "condition": "a kitchen",
                                                                        "threshold": -1, "cooldown": 0}))
                await w.wait(lambda: w.on("vidmem/kitchen/rules"), "the rule to be accepted")
                ws_events = []
                async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws/live?stream=kitchen") as ws:
                    for i, data in enumerate(jpegs):
                        await ws.send(json.dumps({"type": "frame", "ts": 1_700_000_000.0 + i}))
                        await ws.send(data)
                        await asyncio.sleep(0.1)
                    deadline = time.monotonic() + 60
                    while not ws_events and time.monotonic() < deadline:
                        try:
                            message = json.loads(await asyncio.wait_for(ws.recv(), 1))
                        except TimeoutError:
                            continue
                        if message.get("type") == "event":
                            ws_events.append(message)
                mqtt_events = await w.wait(lambda: w.events(stream="kitchen"), "an event for the camera")
                return ws_events, mqtt_events

    try:
        ws_events, mqtt_events = asyncio.run(scenario())
    finally:
        app.close()
    assert mqtt_events[0]["type"] == "new" and mqtt_events[0]["event"]["rule"] == "any"
    assert mqtt_events[0]["event"]["start_time"] >= 1_700_000_000.0
    assert ws_events and ws_events[0]["kind"] == "new" and ws_events[0]["event"]["id"] == mqtt_events[0]["event"]["id"]
