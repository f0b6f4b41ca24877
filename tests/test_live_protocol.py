"""The live websocket protocol's core (no sockets): what a client may send and what it is told when it is wrong."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from vidmem.agents import protocol
from vidmem.agents.protocol import Ask, FrameStamp, LiveError, Limits, RateLimiter, Throttle
from vidmem.errors import ProtocolError

LIMITS = Limits()


def encoded(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buffer, format=kind)
    return buffer.getvalue()


@pytest.mark.parametrize("kind,name", [("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp")])
def test_jpeg_png_and_webp_frames_are_accepted(kind, name):
    assert protocol.check_frame(encoded(kind), LIMITS) == name


@pytest.mark.parametrize("data", [b"", b"hello", b"GIF89a" + b"\0" * 20, b"RIFF\0\0\0\0WAVEfmt "])
def test_anything_else_is_not_an_image(data):
    with pytest.raises(LiveError) as err:
        protocol.check_frame(data, LIMITS)
    assert err.value.code == "not_image" and "JPEG, PNG or WebP" in str(err.value)
    assert isinstance(err.value, ProtocolError)  # one hierarchy: the CLI and services treat it like any other


def test_a_frame_over_the_size_limit_names_the_limit():
    small = Limits(max_frame_bytes=100)
    with pytest.raises(LiveError) as err:
        protocol.check_frame(b"\xff\xd8\xff" + b"\0" * 200, small)
    assert err.value.code == "too_large" and "100" in str(err.value)


def test_ask_and_frame_messages_parse():
    ask = protocol.parse_text(json.dumps({"type": "ask", "id": "a1", "question": " is the stove on? ", "budget": 900}),
                              LIMITS)
    assert ask == Ask("a1", "is the stove on?", 900)
    default = protocol.parse_text('{"type": "ask", "question": "what now?"}', LIMITS, counter=3)
    assert default == Ask("q3", "what now?", LIMITS.default_budget)
    assert protocol.parse_text('{"type": "frame", "ts": 1700000000.25}', LIMITS) == FrameStamp(1700000000.25)


@pytest.mark.parametrize("text,code", [
    ("not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ('{"question": "no type"}', "bad_message"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"type": "ask"}', "bad_message"),
    ('{"type": "ask", "question": "   "}', "bad_message"),
    ('{"type": "ask", "question": "q", "budget": 0}', "bad_message"),
    ('{"type": "ask", "question": "q", "budget": "lots"}', "bad_message"),
    ('{"type": "ask", "question": "q", "budget": true}', "bad_message"),
    ('{"type": "frame"}', "bad_message"),
    ('{"type": "frame", "ts": "yesterday"}', "bad_message"),
    ('{"type": "frame", "ts": -5}', "bad_message"),
])
def test_malformed_text_messages_get_a_precise_code(text, code):
    with pytest.raises(LiveError) as err:
        protocol.parse_text(text, LIMITS)
    assert err.value.code == code
    assert str(err.value) and "\n" not in str(err.value)  # one clear sentence


def test_a_long_question_is_refused_with_the_limit():
    with pytest.raises(LiveError) as err:
        protocol.parse_text(json.dumps({"type": "ask", "question": "why " * 300}), LIMITS)
    assert err.value.code == "question_too_long" and str(LIMITS.max_question_chars) in str(err.value)


def test_the_token_is_accepted_as_a_bearer_header_or_a_query_parameter():
    assert protocol.token_ok(None, None, {})  # no token configured: open
    assert protocol.token_ok("s3cret", "Bearer s3cret", {})
    assert protocol.token_ok("s3cret", None, {"token": ["s3cret"]})
    assert not protocol.token_ok("s3cret", None, {})
    assert not protocol.token_ok("s3cret", "Bearer wrong", {"token": ["s3cre"]})
    assert not protocol.token_ok("s3cret", "Basic s3cret", {})
    assert not protocol.token_ok("s3cret", None, {"token": ["ünïcode"]})


def test_only_loopback_addresses_count_as_private():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
        assert protocol.is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.org", ""):
        assert not protocol.is_loopback(host), host


def test_stream_names_are_checked():
    assert protocol.stream_name({}) == protocol.DEFAULT_STREAM
    assert protocol.stream_name({"stream": ["kitchen-cam.2"]}) == "kitchen-cam.2"
    for bad in ("", "../etc", "a b", "x" * 65, "-dash"):
        with pytest.raises(LiveError):
            protocol.stream_name({"stream": [bad]})


def test_the_rate_limiter_allows_the_rate_and_drops_the_excess():
    limiter = RateLimiter(rate=2.0, burst=2.0)
    # 10 frames in one second at t = 0.0, 0.1, ... 0.9: the burst of 2 plus about 2 refilled
    allowed = sum(limiter.allow(t / 10) for t in range(10))
    assert 2 <= allowed <= 4
    # then a steady 2 fps is allowed in full
    assert all(limiter.allow(1.0 + i * 0.5) for i in range(1, 20))


def test_the_throttle_fires_at_most_once_per_interval():
    throttle = Throttle(5.0)
    fired = [t for t in range(0, 20) if throttle.ready(float(t))]
    assert fired == [0, 5, 10, 15]


def test_server_messages_are_compact_json():
    text = protocol.dumps(protocol.error("bad_json", "nope", id="q1"))
    assert json.loads(text) == {"type": "error", "code": "bad_json", "message": "nope", "id": "q1"}
    event = protocol.event("door", {"type": "new", "event": {"id": "e1", "rule": "person"}})
    assert event["type"] == "event" and event["kind"] == "new" and event["stream"] == "door"
    assert event["event"]["rule"] == "person"
