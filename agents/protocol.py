"""The live websocket protocol without I/O: limits, message parsing and building, auth, rate limiting.

`vidmem.agents.server` wraps this core with the asyncio websockets server (the split the websockets library
itself uses: a sans-I/O protocol object driven by a thin asyncio layer). Everything here is plain, synchronous
and clock-injected (`now` arguments), so it is tested without sockets.

Messages (DESIGN.md, "Websocket /ws/live"):
- client -> server, binary: one encoded image (JPEG, PNG or WebP); timestamped on receipt unless the text
  message just before it was {"type": "frame", "ts": <unix seconds>}.
- client -> server, text: {"type": "ask", "id": "...", "question": "...", "budget": 6000}.
- server -> client: ack, token, answer, event, error (built by the functions below).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from vidmem.errors import ProtocolError

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one live server accepts; every excess is refused with an error message, never by falling over."""

    max_frame_bytes: int = 2 * MiB  # largest encoded image accepted; bigger ones get a "too_large" error
    hard_max_bytes: int = 4 * MiB  # websockets' max_size: beyond this the connection is closed (code 1009)
    max_text_bytes: int = 16 * 1024  # largest text (JSON) message
    max_fps: float = 5.0  # frames per second per client; excess frames are dropped and counted
    fps_burst: float = 5.0  # frames a client may send back to back before the rate applies
    max_clients: int = 32  # websocket clients per server; more are refused with HTTP 503
    max_streams: int = 16  # live streams per server; a client for one more is refused with HTTP 503
    max_question_chars: int = 1000  # longest question accepted
    max_budget: int = 32000  # largest visual-token budget a question may ask for
    default_budget: int = 6000  # budget when the question gives none (Clapper's evaluation bound)
    send_queue: int = 64  # messages queued per client; acks/tokens are dropped above 3/4, the client closed when full
    ack_every_frames: int = 5  # send an ack after this many frames ...
    ack_interval_s: float = 1.0  # ... or when this long has passed since the last one, whichever comes first
    error_interval_s: float = 5.0  # at most one "rate_limited" error per client in this many seconds
    max_pending_questions: int = 8  # questions queued or running server-wide; more get a "busy" error
    answer_workers: int = 1  # threads answering questions (model work is serialised by the answerer anyway)
    first_segment_wait_s: float = 20.0  # a question right after the first frames waits this long for a segment
    source_queue: int = 8  # frames pending per stream between the websocket and the ingest loop
    ingest_fps: float = 2.0  # frames per second the ingest loop samples from a live stream
    prefill_live: bool = True  # extend each live stream's kept KV cache as its segments arrive (DESIGN: answering)
    ws_read_queue: int = 4  # websockets max_queue: incoming messages buffered per client before reading pauses


class LiveError(ProtocolError):
    """A refused message; `code` says which rule it broke (sent back as {"type": "error", "code", "message"})."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# ---- client -> server ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameStamp:
    """{"type": "frame", "ts": ...}: the time of the binary frame that follows."""

    ts: float  # unix seconds


@dataclass(frozen=True)
class Ask:
    """{"type": "ask", ...}: a question about this stream."""

    id: str  # echoed in the token/answer/error replies
    question: str
    budget: int  # visual-token budget
    conversation: str | None = None  # asks in one conversation reuse the first one's evidence and kept cache


def image_kind(data: bytes) -> str | None:
    """'jpeg', 'png' or 'webp' from the magic bytes, or None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def check_frame(data: bytes, limits: Limits) -> str:
    """The image kind of a binary message, or a LiveError saying why it is refused."""
    if len(data) > limits.max_frame_bytes:
        raise LiveError(
            "too_large", f"the frame is {len(data)} bytes, more than the {limits.max_frame_bytes} allowed; "
            "send smaller JPEGs (lower resolution or quality)"
        )
    kind = image_kind(data)
    if kind is None:
        raise LiveError("not_image", "a binary message must be one encoded JPEG, PNG or WebP image")
    return kind


def parse_text(text: str, limits: Limits, *, counter: int = 0) -> FrameStamp | Ask:
    """A client's text message as a FrameStamp or an Ask; a LiveError for anything malformed or unknown."""
    if len(text.encode("utf-8", "surrogatepass")) > limits.max_text_bytes:
        raise LiveError("too_large", f"a text message may be at most {limits.max_text_bytes} bytes")
    try:
        message = json.loads(text)
    except ValueError:
        raise LiveError("bad_json", "a text message must be a JSON object such as {\"type\": \"ask\", ...}") from None
    if not isinstance(message, dict):
        raise LiveError("bad_json", "a text message must be a JSON object, not a JSON " + type(message).__name__)
    kind = message.get("type")
    if kind == "frame":
        ts = message.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
            raise LiveError("bad_message", "a frame message needs \"ts\": the frame's time in unix seconds")
        return FrameStamp(float(ts))
    if kind == "ask":
        question = message.get("question")
        if not isinstance(question, str) or not question.strip():
            raise LiveError("bad_message", "an ask message needs a non-empty \"question\" string")
        if len(question) > limits.max_question_chars:
            raise LiveError(
                "question_too_long",
                f"the question has {len(question)} characters, more than the {limits.max_question_chars} allowed",
            )
        budget = message.get("budget", limits.default_budget)
        if budget is None:
            budget = limits.default_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= limits.max_budget:
            raise LiveError("bad_message", f"\"budget\" must be a whole number of visual tokens from 1 to {limits.max_budget}")
        qid = message.get("id")
        if qid is None:
            qid = f"q{counter}"
        elif isinstance(qid, (int, float)) and not isinstance(qid, bool):
            qid = str(qid)
        if not isinstance(qid, str) or len(qid) > 128:
            raise LiveError("bad_message", "\"id\" must be a string of at most 128 characters")
        conversation = message.get("conversation")
        if isinstance(conversation, (int, float)) and not isinstance(conversation, bool):
            conversation = str(conversation)
        if conversation is not None and (not isinstance(conversation, str) or not 1 <= len(conversation) <= 128):
            raise LiveError("bad_message", "\"conversation\" must be a string of 1 to 128 characters")
        return Ask(qid, question.strip(), budget, conversation)
    if kind is None:
        raise LiveError("bad_message", "a text message needs a \"type\": \"ask\" or \"frame\"")
    raise LiveError("unknown_type", f"unknown message type {str(kind)[:40]!r}; expected \"ask\" or \"frame\"")


# ---- server -> client ---------------------------------------------------------------------------------
def dumps(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


def ack(frames: int, dropped: int, **extra: Any) -> dict:
    return {"type": "ack", "frames": frames, "dropped": dropped, **extra}


def token(qid: str, text: str) -> dict:
    return {"type": "token", "id": qid, "text": text}


def answer(qid: str, result: Mapping[str, Any]) -> dict:
    """The final answer from `Answer.to_json()`."""
    return {
        "type": "answer", "id": qid, "text": result["answer"], "segments": result["segments"],
        "visual_tokens": result["visual_tokens"], "ttft_seconds": result["ttft_seconds"],
        "seconds": result.get("seconds"), "prefill_tokens": result.get("prefill_tokens"),
        "cached_tokens": result.get("cached_tokens"),
    }


def error(code: str, message: str, **extra: Any) -> dict:
    return {"type": "error", "code": code, "message": message, **extra}


def event(stream: str, payload: Mapping[str, Any]) -> dict:
    """{"type": "event", "kind", "stream", ...} for a watch-rule hit.

    `payload` is the MQTT `vidmem/events` envelope ({"type": "new"|"update"|"end", "event": {...}}) or a bare
    event; the envelope's "type" moves to "kind" since "type" names the websocket message.
    """
    body = dict(payload)
    kind = body.pop("type", None)
    return {"type": "event", "kind": kind, "stream": stream, **body}


# ---- handshake ----------------------------------------------------------------------------------------
DEFAULT_STREAM = "live"


def stream_name(query: Mapping[str, list[str]]) -> str:
    """The stream a websocket asks for (?stream=NAME), checked by the memory's one stream-name rule
    (`vidmem.memory.check_stream_name`), so a name accepted here is one the memory stores; 'live' when none."""
    from vidmem.errors import ConfigError
    from vidmem.memory.types import check_stream_name

    names = query.get("stream") or [DEFAULT_STREAM]
    try:
        return check_stream_name(names[0])
    except ConfigError:
        raise LiveError(
            "bad_stream", "the stream name must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or "
                          "digit, without '..'"
        ) from None


def token_ok(expected: str | None, authorization: str | None, query: Mapping[str, list[str]]) -> bool:
    """True when no token is configured, or the request carries it as a Bearer header or ?token=."""
    if not expected:
        return True
    offered: list[str] = list(query.get("token", []))
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            offered.append(value.strip())
    want = expected.encode("utf-8")
    # compare_digest for every candidate: the time taken does not reveal how much of the token matched
    return any(hmac.compare_digest(want, candidate.encode("utf-8")) for candidate in offered)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, 'localhost')."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---- rates --------------------------------------------------------------------------------------------
class RateLimiter:
    """A token bucket: `rate` events per second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.tokens = self.burst
        self.last: float | None = None

    def allow(self, now: float) -> bool:
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Throttle:
    """True at most once per `interval` seconds (for error messages that would otherwise flood a client)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = -math.inf

    def ready(self, now: float) -> bool:
        if now - self.last >= self.interval:
            self.last = now
            return True
        return False


@dataclass
class FrameCounts:
    """One client's (or one stream's) frame accounting: received = handed to ingest + dropped."""

    received: int = 0  # valid image frames that arrived
    dropped: int = 0  # of those, dropped (over the rate limit, or the ingest queue was full)
    rate_dropped: int = 0  # of the dropped, over the per-client rate limit
    rejected: int = 0  # binary messages refused outright (not an image, too large); not counted as received

    @property
    def queued(self) -> int:
        """Frames handed to the stream's ingest loop."""
        return self.received - self.dropped
