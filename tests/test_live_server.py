"""`vidmem serve` over a real socket: a real websockets client, real video frames, the tiny checkpoints.

The server runs in a thread with its own event loop (as it would in its own process); each test drives it with
`websockets.asyncio.client.connect` from `asyncio.run`. Frames are decoded from a real test video with PyAV and
encoded as JPEG with Pillow, stamped with unix seconds so the memory's times are the camera's.
"""
from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import av
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from vidmem.agents.app import Settings, Vidmem
from vidmem.agents.protocol import Limits
from vidmem.agents.server import LiveServer
from vidmem.errors import ConfigError

TOKEN = "test-token-4f1c"
SAMPLE_FPS = 2.0  # frames per second taken from the test video, as a camera page would send them
WAIT = 120.0  # seconds: an upper bound on any one wait, so a broken server fails the test instead of hanging it


class ServerThread:
    """An event loop in a thread that hosts LiveServers for the tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-server-loop", daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = WAIT):  # noqa: ANN001, ANN201
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn, *args):  # noqa: ANN001, ANN201
        async def on_loop():
            return fn(*args)

        return self.call(on_loop())

    def start(self, server: LiveServer) -> LiveServer:
        self.call(server.start())
        return server

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def video_frames(path, fps: float = SAMPLE_FPS, limit: int = 20, side: int = 320) -> list[tuple[float, bytes]]:
    """(seconds, JPEG bytes) of frames sampled at `fps` from a real video, decoded with PyAV."""
    out, next_at = [], 0.0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if frame.time is None or frame.time < next_at - 1e-6:
                continue
            next_at += 1.0 / fps
            image = frame.to_image()
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
            out.append((round(frame.time, 6), buffer.getvalue()))
            if len(out) >= limit:
                break
    return out


def ws_url(server: LiveServer, stream: str, token: str | None = TOKEN) -> str:
    url = f"ws://127.0.0.1:{server.port}/ws/live?stream={stream}"
    return url + (f"&token={token}" if token else "")


async def next_of(ws, kind: str, timeout: float = WAIT, into: list | None = None) -> dict:
    """The next message of `kind` (others are kept in `into`)."""
    async with asyncio.timeout(timeout):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == kind:
                return message
            if into is not None:
                into.append(message)


async def send_frames(ws, frames, base: float, gap: float = 0.12) -> None:
    for pts, data in frames:
        await ws.send(json.dumps({"type": "frame", "ts": base + pts}))
        await ws.send(data)
        await asyncio.sleep(gap)


async def ack_with(ws, frames: int) -> dict:
    while True:
        ack = await next_of(ws, "ack")
        if ack["frames"] >= frames:
            return ack


def finished(live, stream: str) -> dict:
    """The server's final figures for a stream whose clients have all left (its ingest flushed and ended)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        done = live.thread.run(lambda: [f for f in live.server.finished if f["name"] == stream])
        if done:
            return done[-1]
        time.sleep(0.1)
    raise AssertionError(f"the ingest of stream {stream} did not end")


@pytest.fixture(scope="module")
def live(tiny_models, talking_llava, tmp_path_factory):
    # a model taught to describe footage, so a question streams tokens (random weights stop at once)
    settings = Settings(memory=tmp_path_factory.mktemp("live") / "memory", model=str(talking_llava),
                        embedder=str(tiny_models.clip), device="cpu", max_new_tokens=12)
    app = Vidmem(settings)
    app.load_models()
    thread = ServerThread()
    limits = Limits(max_fps=10, fps_burst=10, ack_every_frames=1)
    server = thread.start(LiveServer(app, port=0, token=TOKEN, limits=limits))
    yield SimpleNamespace(app=app, server=server, thread=thread, limits=limits)
    thread.call(server.stop())
    thread.close()
    app.close()


@pytest.fixture(scope="module")
def frames(videos):
    return video_frames(videos["test.mp4"]["file"])


def test_frames_in_then_a_question_streams_tokens_and_an_answer_citing_the_time_covered(live, frames):
    base = time.time() - 60  # the camera's clock: unix seconds, a minute ago

    async def scenario():
        async with connect(ws_url(live.server, "pool", token=None),
                           additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            await send_frames(ws, frames, base)
            ack = await ack_with(ws, len(frames))
            await ws.send(json.dumps({"type": "ask", "id": "q-1", "question": "What is the person doing?",
                                      "budget": 2000}))
            before: list[dict] = []
            answer = await next_of(ws, "answer", into=before)
            return ack, before, answer

    ack, before, answer = asyncio.run(scenario())
    assert ack["frames"] == len(frames) and ack["dropped"] == 0
    assert not [m for m in before if m["type"] == "error"], before
    tokens = [m for m in before if m["type"] == "token"]
    assert tokens and all(m["id"] == "q-1" for m in tokens)
    # the stream adds up to the final answer (which is trimmed of the whitespace a model may start with)
    assert "".join(m["text"] for m in tokens).strip() == answer["text"].strip()
    assert answer["id"] == "q-1" and answer["visual_tokens"] <= 2000 and answer["ttft_seconds"] >= 0
    first, last = base + frames[0][0], base + frames[-1][0]
    assert answer["segments"], "the answer cites no segment"
    for segment in answer["segments"]:
        assert segment["stream"] == "pool"
        assert first - 1e-3 <= segment["start"] <= segment["end"] <= last + 1 / SAMPLE_FPS + 1e-3, segment

    figures = finished(live, "pool")  # every frame is accounted for once the stream ends
    assert figures["received"] == len(frames) == figures["stored"] + figures["dropped"]
    rows = live.app.memory.segments(stream="pool")
    assert rows and rows[0].start >= first - 1e-3 and rows[-1].end <= last + 1 / SAMPLE_FPS + 1e-3


def test_a_follow_up_in_a_conversation_reuses_the_kept_cache(live, frames):
    base = time.time() - 30

    async def scenario():
        async with connect(ws_url(live.server, "talk")) as ws:
            await send_frames(ws, frames[:8], base)
            await ack_with(ws, 8)
            answers = []
            for qid, question in (("c1", "What is happening?"), ("c2", "And what colour is it?")):
                await ws.send(json.dumps({"type": "ask", "id": qid, "question": question, "budget": 2000,
                                          "conversation": "kitchen-chat"}))
                answers.append(await next_of(ws, "answer"))
            await ws.send(json.dumps({"type": "ask", "id": "solo", "question": "Anything new?", "budget": 2000}))
            answers.append(await next_of(ws, "answer"))
            await ws.send(json.dumps({"type": "ask", "id": "bad", "question": "x", "conversation": ["no"]}))
            error = await next_of(ws, "error")
            return answers, error

    (first, follow_up, solo), error = asyncio.run(scenario())
    assert first["cached_tokens"] == 0 and first["prefill_tokens"] > 0  # the first question builds the cache
    assert follow_up["cached_tokens"] > 0  # the follow-up reuses it ...
    assert follow_up["cached_tokens"] < first["prefill_tokens"]  # head + evidence, without the first question
    assert follow_up["prefill_tokens"] < first["prefill_tokens"]  # ... and prefills only itself
    assert follow_up["segments"] == first["segments"]  # on the same evidence
    assert {"prefill_tokens", "cached_tokens"} <= set(solo)  # the contract's fields on every answer
    assert error["code"] == "bad_message" and "conversation" in error["message"]
    health = live.thread.run(live.server.health)  # /healthz reports each source's state, as recorded
    assert health["sources"]["talk"]["state"] in ("live", "ended")
    assert health["encoding"]["frames"] > 0 and health["encoding"]["calls"] > 0  # the shared encoder's figures


def test_bad_messages_each_get_an_error_and_the_connection_keeps_serving(live, frames):
    limits = live.limits

    async def scenario():
        replies = {}
        async with connect(ws_url(live.server, "errors")) as ws:
            await next_of(ws, "ack")  # the greeting
            await ws.send(b"this is not an image")
            replies["not_image"] = await next_of(ws, "error")
            await ws.send(b"\xff\xd8\xff" + b"\0" * limits.max_frame_bytes)  # a "JPEG" just over the limit
            replies["too_large"] = await next_of(ws, "error")
            await ws.send(b"\xff\xd8\xff\xe0 truncated jpeg")
            replies["bad_image"] = await next_of(ws, "error")
            await ws.send("{not json")
            replies["bad_json"] = await next_of(ws, "error")
            await ws.send(json.dumps({"type": "subscribe", "topic": "everything"}))
            replies["unknown_type"] = await next_of(ws, "error")
            await ws.send(json.dumps({"type": "ask", "id": "long", "question": "why? " * 400}))
            replies["question_too_long"] = await next_of(ws, "error")
            await ws.send(json.dumps({"type": "ask", "id": "early", "question": "what is on the table?"}))
            replies["no_frames"] = await next_of(ws, "error")
            await ws.send(frames[0][1])  # and a good frame is still taken
            ack = await ack_with(ws, 1)
            return replies, ack

    replies, ack = asyncio.run(scenario())
    for code, reply in replies.items():
        assert reply["code"] == code, reply
        assert reply["message"] and "\n" not in reply["message"]
    assert replies["no_frames"]["id"] == "early"
    assert ack["frames"] == 1 and ack["dropped"] == 0
    figures = finished(live, "errors")
    assert figures["rejected"] == 3 and figures["received"] == 1 == figures["stored"] + figures["dropped"]


def test_a_message_over_the_hard_limit_closes_only_that_connection(live, frames):
    async def scenario():
        async with connect(ws_url(live.server, "bystander")) as bystander:
            await next_of(bystander, "ack")
            async with connect(ws_url(live.server, "huge"), max_size=None) as ws:
                await next_of(ws, "ack")
                await ws.send(b"\xff\xd8\xff" + b"\0" * live.limits.hard_max_bytes)
                with pytest.raises(ConnectionClosed) as closed:
                    await next_of(ws, "ack")
            await bystander.send(frames[0][1])  # the server still serves the others
            return closed.value.rcvd.code, await ack_with(bystander, 1)

    code, ack = asyncio.run(scenario())
    assert code == 1009  # "message too big"
    assert ack["frames"] == 1


def test_frames_over_the_rate_limit_are_dropped_counted_and_reported_once(live, frames):
    async def scenario():
        async with connect(ws_url(live.server, "burst")) as ws:
            await next_of(ws, "ack")
            burst = [data for _, data in frames] * 2  # 40 frames as fast as the socket takes them
            for data in burst:
                await ws.send(data)
            messages: list[dict] = []
            ack = None
            while ack is None or ack["frames"] < len(burst):
                ack = await next_of(ws, "ack", into=messages)
            return len(burst), ack, [m for m in messages if m["type"] == "error"]

    sent, ack, errors = asyncio.run(scenario())
    assert ack["frames"] == sent
    assert ack["dropped"] >= sent - live.limits.fps_burst - live.limits.max_fps * 5  # 10 fps allowed, 40 sent at once
    assert [e["code"] for e in errors] == ["rate_limited"]  # once, not once per frame
    figures = finished(live, "burst")
    assert figures["received"] == sent == figures["stored"] + figures["dropped"]
    assert figures["rate_dropped"] == ack["dropped"] - figures["queue_dropped"]


def test_a_missing_or_wrong_token_is_refused_at_the_handshake(live):
    async def status(url: str, headers: dict | None = None) -> int:
        try:
            async with connect(url, additional_headers=headers or {}) as ws:
                await next_of(ws, "ack")
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    async def scenario():
        return [
            await status(ws_url(live.server, "auth", token=None)),
            await status(ws_url(live.server, "auth", token="guess")),
            await status(ws_url(live.server, "auth", token=None), {"Authorization": "Bearer guess"}),
            await status(ws_url(live.server, "auth", token=TOKEN)),
            await status(ws_url(live.server, "auth", token=None), {"Authorization": f"Bearer {TOKEN}"}),
        ]

    assert asyncio.run(scenario()) == [401, 401, 401, 101, 101]


def test_the_handshake_applies_the_memorys_stream_name_rule(live):
    async def status(name: str) -> int:
        try:
            async with connect(ws_url(live.server, name)) as ws:
                await next_of(ws, "ack")
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    async def scenario():
        return [await status(name) for name in ("a..b", ".hidden", "cam.1", "x" * 65)]

    # 'a..b' once passed the handshake and then failed at its first commit; now one rule decides everywhere
    assert asyncio.run(scenario()) == [400, 400, 101, 400]


def test_the_page_and_the_health_check_are_served_over_http(live):
    base = f"http://127.0.0.1:{live.server.port}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(base + "/", timeout=10)
    assert refused.value.code == 401, "with a token configured, the page is only served to whoever has it"
    with urllib.request.urlopen(base + f"/?token={TOKEN}", timeout=10) as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
    assert "app.js" in page and "question" in page
    with urllib.request.urlopen(base + "/app.js", timeout=10) as response:
        assert "getUserMedia" in response.read().decode()
    with urllib.request.urlopen(base + "/healthz", timeout=10) as response:
        assert json.load(response) == {"status": "ok"}, "without the token, liveness only: no stream names"
    with urllib.request.urlopen(base + f"/healthz?token={TOKEN}", timeout=10) as response:
        health = json.load(response)
    assert health["status"] == "ok" and isinstance(health["streams"], list) and health["clients"] >= 0
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(base + "/nothing-here", timeout=10)
    assert missing.value.code == 404


def test_clients_beyond_the_limit_are_refused_with_503_and_the_others_keep_working(live):
    small = live.thread.start(LiveServer(live.app, port=0, limits=Limits(max_clients=2, ack_every_frames=1)))

    async def scenario():
        async with connect(ws_url(small, "a", token=None)) as a, connect(ws_url(small, "b", token=None)) as b:
            await next_of(a, "ack")
            await next_of(b, "ack")
            with pytest.raises(InvalidStatus) as refused:
                async with connect(ws_url(small, "c", token=None)):
                    pass
            await a.send(json.dumps({"type": "ping"}))
            still = await next_of(a, "error")  # an unknown type, answered: the connection lives on
        async with connect(ws_url(small, "c", token=None)) as c:  # room again once they left
            return refused.value.response.status_code, still, await next_of(c, "ack")

    try:
        code, still, ack = asyncio.run(scenario())
    finally:
        live.thread.call(small.stop())
    assert code == 503
    assert still["code"] == "unknown_type" and ack["frames"] == 0


def test_events_and_segment_hooks_reach_the_streams_clients(live, frames):
    seen: list[tuple[str, float, float]] = []
    live.thread.run(live.server.on_segment.append, lambda stream, row, segment: seen.append((stream, row.start, row.end)))
    base = time.time() - 30

    async def scenario():
        async with connect(ws_url(live.server, "door")) as one, connect(ws_url(live.server, "door")) as two, \
                connect(ws_url(live.server, "yard")) as other:
            for ws in (one, two, other):
                await next_of(ws, "ack")
            await send_frames(one, frames[:8], base, gap=0.15)
            await ack_with(one, 8)
            # from another thread and loop, as an MQTT monitor might: handed over to the server's loop
            sent_to = live.server.publish_event("door", {
                "type": "new", "event": {"id": "e1", "stream": "door", "rule": "person at the door", "score": 0.9}})
            got = [await next_of(ws, "event") for ws in (one, two)]
            await other.send(frames[0][1])
            other_next = json.loads(await other.recv())  # its ack, not the door's event
            return sent_to, got, other_next

    sent_to, got, other_next = asyncio.run(scenario())
    assert sent_to == 2
    for event in got:
        assert event["kind"] == "new" and event["stream"] == "door" and event["event"]["rule"] == "person at the door"
    assert other_next["type"] == "ack"
    finished(live, "door")
    door = [s for s in seen if s[0] == "door"]
    assert door and all(base - 1e-3 <= start <= end for _, start, end in door)


def test_stopping_the_server_closes_clients_and_keeps_what_they_sent(live, frames):
    own = live.thread.start(LiveServer(live.app, port=0, limits=Limits(max_fps=10, fps_burst=10)))
    base = time.time() - 20

    async def scenario():
        async with connect(ws_url(own, "porch", token=None)) as ws:
            await send_frames(ws, frames[:8], base)
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(own.stop(), live.thread.loop))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.recv()
            return closed.value.rcvd.code

    assert asyncio.run(scenario()) == 1001  # going away
    figures = [f for f in own.finished if f["name"] == "porch"][-1]
    assert figures["received"] == 8 == figures["stored"] + figures["dropped"]
    rows = live.app.memory.segments(stream="porch")
    assert sum(r.frames for r in rows) == figures["in_segments"] > 0


def test_a_client_that_stops_reading_is_disconnected_without_holding_up_the_others(live, frames):
    own = live.thread.start(LiveServer(live.app, port=0, limits=Limits(send_queue=16, ack_every_frames=1)))

    async def scenario():
        # A reader that never reads: a tiny receive buffer, and websockets stops reading after one message.
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        raw.connect(("127.0.0.1", own.port))
        raw.setblocking(False)
        async with connect(ws_url(own, "busy", token=None)) as good:
            await next_of(good, "ack")
            slow = await connect(ws_url(own, "slow", token=None), sock=raw, max_queue=1)
            sent, closed = 0, False
            async with asyncio.timeout(WAIT):
                while not closed:
                    try:  # every one of these earns an error reply that the slow client never reads
                        for _ in range(500):
                            await slow.send("{not json")
                            sent += 1
                    except ConnectionClosed:
                        closed = True
                    # Meanwhile the good client is served as usual, sending within its frame rate so that none of
                    # its frames is dropped by the rate limit, however many rounds the slow client lasts.
                    await asyncio.sleep(1.5 / own.limits.max_fps)
                    await good.send(frames[0][1])
                    await next_of(good, "ack")
                    closed = closed or live.thread.run(lambda: not [c for c in own.clients if c.stream.name == "slow"])
            await good.send(frames[1][1])
            return sent, await next_of(good, "ack")

    try:
        sent, ack = asyncio.run(scenario())
    finally:
        live.thread.call(own.stop())
    assert ack["dropped"] == 0 and ack["frames"] >= 2
    assert sent > 16  # it was closed for its backlog, which the server never let grow past its queue


def test_listening_beyond_loopback_requires_a_token(live):
    with pytest.raises(ConfigError) as err:
        LiveServer(live.app, host="0.0.0.0", port=0)
    assert "--token" in str(err.value)
    LiveServer(live.app, host="0.0.0.0", port=0, token="t")  # constructing is fine with one
