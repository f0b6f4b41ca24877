"""Video sources behind one interface: files, network URLs, cameras, and frames pushed in by the live server.

Every source is an async iterator of decoded frames (`Source.frames()`): RGB uint8, rotation applied, shrunk to
`MAX_SIDE` pixels on the longest side (the vision encoder sees 384), timestamps in seconds. Decoding is blocking
PyAV work with FFmpeg's frame threads, and never runs on the event loop:

- a file is pulled: worker threads (`asyncio.to_thread`) decode 8 frames at a time, one chunk ahead of the
  consumer, so a slow consumer simply slows decoding down (backpressure, nothing dropped);
- a live source (URL, camera) is pushed: a reader thread decodes continuously into a bounded queue and drops
  the newest frame (counted in `dropped`) when the queue is full, because a camera will not wait;
- `PushSource` is fed from the event loop by the websocket server, with the same drop rule.

Timestamps: seconds from the start for files and for recorded HTTP video (a URL whose container declares a
duration: it is read like a file, and a failure ends it); unix seconds for live sources, anchored on the wall
clock at the first frame of each connection. A live URL that fails to connect at first is an error (unless its
`Backoff` says `retry_first`, as a monitor's cameras do); one that fails mid-way is reconnected with capped,
jittered exponential backoff for as long as vidmem runs (a camera that reboots, or is gone for an hour, is
picked up again), and the lost stretch is recorded in `gaps` (never hidden). Only a `Backoff.max_attempts`
limit makes a live source give up, with `SourceError`.

Every source reports its state (`status`, a `SourceStatus`: "connecting", "live", "reconnecting" or "ended",
since when, failed attempts, gaps) and calls its `on_status` listeners on each change, so the memory, `/healthz`
and MQTT's retained `<prefix>/<stream>/state` can say what each camera is doing.
"""
from __future__ import annotations

import abc
import asyncio
import io
import logging
import os
import random
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import av
import numpy as np

from vidmem.errors import ProtocolError, SourceError
from vidmem.stream import decode
from vidmem.stream.types import Frame

logger = logging.getLogger(__name__)

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "hls")
FILE_CHUNK = 8  # frames decoded per worker-thread step for files
LIVE_QUEUE = 8  # decoded frames a live reader may hold before it drops
MAX_SIDE = 960  # pixels: decoded frames are shrunk to this longest side (the vision encoder sees 384; snapshots 960)
MAX_PUSHED_PIXELS = 50_000_000  # a pushed image larger than this is refused (decompression bombs)


@dataclass(frozen=True)
class Backoff:
    """How a live source waits between reconnection attempts: exponential, capped, jittered, and by default forever.

    The n-th wait in a row (from 0) is drawn uniformly from [(1 - jitter) * d, d] with d = min(cap, initial * 2^n),
    so cameras that fail together (a switch reboots) do not all knock again at the same instant.
    """

    initial: float = 0.5  # seconds before the first retry
    cap: float = 30.0  # the longest wait between two attempts
    jitter: float = 0.5  # share of each wait drawn at random (0: exact exponential waits)
    max_attempts: int | None = None  # failed attempts in a row before giving up; None: never (a 24/7 camera)
    retry_first: bool = False  # a first connection that fails is retried too (a monitor's camera may be down)

    def __post_init__(self) -> None:
        if not (self.initial > 0 and self.cap >= self.initial):
            raise ValueError(f"backoff needs 0 < initial <= cap, not {self.initial} and {self.cap}.")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"backoff jitter is a share in [0, 1], not {self.jitter}.")
        if self.max_attempts is not None and self.max_attempts < 0:
            raise ValueError(f"backoff max_attempts must be at least 0, not {self.max_attempts}.")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt number `attempt` (0 for the first retry)."""
        ceiling = min(self.cap, self.initial * 2.0 ** min(attempt, 62))
        return ceiling * (1.0 - self.jitter * (rng or random).random())


SOURCE_STATES = ("connecting", "live", "reconnecting", "ended")


@dataclass(frozen=True)
class SourceStatus:
    """What a source is doing: the `<prefix>/<stream>/state` MQTT payload, a `/healthz` and `vidmem stats` entry."""

    state: str = "connecting"  # one of SOURCE_STATES
    since: float = field(default_factory=time.time)  # unix seconds the state began
    attempts: int = 0  # failed reconnection attempts in the current outage
    gaps: int = 0  # outages so far
    gap_seconds: float = 0.0  # seconds lost to them
    reconnects: int = 0  # successful reconnections
    error: str | None = None  # why the connection was lost (or why the source ended)
    new_gap: tuple[float, float] | None = None  # set on the change that closes an outage: (start, end) seconds

    def to_json(self) -> dict:
        return {"state": self.state, "since": round(self.since, 3), "attempts": self.attempts, "gaps": self.gaps,
                "gap_seconds": round(self.gap_seconds, 3), "reconnects": self.reconnects, "error": self.error}


StatusListener = Callable[[SourceStatus], None]


class Source(abc.ABC):
    """A stream of decoded frames."""

    name: str  # human-readable: a path, or a URL without credentials
    live: bool  # True: drop frames under pressure; False: slow down instead
    duration: float | None = None  # seconds, when known (files)
    dropped: int = 0  # frames dropped because the consumer was behind
    gaps: list[tuple[float, float]]  # (start, end) seconds lost to a broken connection
    status: SourceStatus
    on_status: list[StatusListener]  # called on each state change, from the thread that made it: keep them quick

    def _init_status(self) -> None:
        self.status = SourceStatus()
        self.on_status = []
        self._status_lock = threading.Lock()

    def _set_status(self, state: str, *, error: str | None = None, attempts: int = 0,
                    new_gap: tuple[float, float] | None = None, reconnected: bool = False) -> None:
        """Record a state change and tell the listeners (a listener that fails is logged, never raised)."""
        with self._status_lock:
            old = self.status
            if old.state == "ended":
                return
            gaps, gap_seconds = old.gaps, old.gap_seconds
            if new_gap is not None:
                gaps, gap_seconds = gaps + 1, gap_seconds + max(0.0, new_gap[1] - new_gap[0])
            since = old.since if state == old.state else time.time()
            self.status = status = SourceStatus(state=state, since=since, attempts=attempts, gaps=gaps,
                                                gap_seconds=gap_seconds, reconnects=old.reconnects + int(reconnected),
                                                error=error, new_gap=new_gap)
        for listener in list(self.on_status):
            try:
                listener(status)
            except Exception:
                logger.exception("a status listener of %s failed", self.name)

    @abc.abstractmethod
    def frames(self) -> AsyncIterator[Frame]:
        """Every decoded frame (not sampled), in order."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop reading and release the decoder; safe to call twice."""

    async def __aenter__(self) -> Source:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class FileSource(Source):
    """A local video file (anything FFmpeg decodes). Opened, and so checked, on construction."""

    live = False

    def __init__(self, path: str | os.PathLike[str], *, max_side: int | None = MAX_SIDE) -> None:
        p = Path(path)
        self.max_side = max_side
        self.name = str(p)
        self.gaps = []
        self._init_status()
        if not p.exists():
            raise SourceError(f"Video file not found: {p}.")
        if not p.is_file():
            raise SourceError(f"Not a video file: {p} is a directory or device.")
        if not os.access(p, os.R_OK):
            raise SourceError(f"Video file is not readable: {p}.")
        if p.stat().st_size == 0:
            raise SourceError(f"Video file is empty: {p}.")
        self._container = decode.open_container(str(p), name=self.name)
        stream = self._container.streams.video[0]
        self._clock = decode.stream_clock(self._container, stream)
        self.duration = decode.stream_duration(self._container, stream, self._clock.origin)
        self._lock = threading.Lock()  # decoding and closing never overlap
        self._iter: Iterator[Frame] | None = None
        self._closed = False

    def _decode_chunk(self, n: int) -> list[Frame]:
        with self._lock:
            if self._closed:
                return []
            if self._iter is None:
                self._iter = decode.decode_frames(self._container, name=self.name, clock=self._clock,
                                                 max_side=self.max_side)
            out: list[Frame] = []
            for frame in self._iter:
                out.append(frame)
                if len(out) >= n:
                    break
            if not out and self._clock.last is None:
                raise SourceError(f"Video file {self.name} has no decodable video frames.")
            if not out and decode.is_truncated(self._clock.last, self._clock.frame_duration, self.duration):
                raise SourceError(f"Video file {self.name} is truncated: it ends at {self._clock.last or 0:.1f} s "
                                  f"of a declared {self.duration:.1f} s.")
            return out

    async def frames(self) -> AsyncIterator[Frame]:
        # One chunk is decoded ahead while the consumer works on the last: decoding and analysis overlap on two
        # cores, and a slow consumer still stops decoding after one chunk (backpressure, nothing dropped).
        ahead = asyncio.ensure_future(asyncio.to_thread(self._decode_chunk, FILE_CHUNK))
        self._set_status("live")
        try:
            while True:
                try:
                    chunk = await ahead
                except SourceError as exc:
                    self._set_status("ended", error=str(exc))
                    raise
                if not chunk:
                    self._set_status("ended")
                    return
                ahead = asyncio.ensure_future(asyncio.to_thread(self._decode_chunk, FILE_CHUNK))
                for frame in chunk:
                    yield frame
        finally:
            if not ahead.done():
                ahead.cancel()  # the worker thread finishes its chunk; aclose waits for it
            ahead.add_done_callback(_consume)

    def _close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._container.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close)
        self._set_status("ended", error=self.status.error)


def _consume(future: asyncio.Future) -> None:
    """Retrieve an abandoned read-ahead's outcome (an error after the consumer left is not news)."""
    if not future.cancelled():
        future.exception()


class _LiveSource(Source):
    """Shared machinery of URLs and cameras: a reader thread, a bounded queue, drops, reconnects, gaps."""

    live = True

    def __init__(self, *, max_pending: int = LIVE_QUEUE, backoff: Backoff | None = None,
                 max_side: int | None = MAX_SIDE) -> None:
        self.gaps = []
        self.max_side = max_side
        self.dropped = 0
        self.backoff = backoff or Backoff()
        self.attempts_total = 0  # failed reconnection attempts over the source's life
        self._init_status()
        self._rng = random.Random()
        self._max_pending = max_pending
        self._stop = threading.Event()
        self._slots = threading.Semaphore(max_pending)  # recorded URLs: frames in flight (backpressure, no drops)
        self._thread: threading.Thread | None = None
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @abc.abstractmethod
    def _open(self) -> av.container.InputContainer:
        """Open a connection (blocking); raises SourceError."""

    def _recorded(self, container: av.container.InputContainer) -> bool:
        """True when the source is a recording with a known end (timestamps from its start, errors are fatal)."""
        return False

    def _deliver(self, item: object) -> None:  # on the event loop
        assert self._queue is not None
        if isinstance(item, Frame) and self.live and self._queue.qsize() >= self._max_pending:
            self.dropped += 1  # the consumer is behind: a live source drops rather than waits
            return
        self._queue.put_nowait(item)

    def _send(self, item: object) -> None:  # from the reader thread
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stop.set()

    def _run(self) -> None:
        """Reader thread: connect, decode, deliver; reconnect with backoff; end with None or a SourceError."""
        try:
            self._read_all()
            self._set_status("ended")
            self._send(None)
        except SourceError as exc:
            self._set_status("ended", error=str(exc))
            self._send(exc)
        except Exception as exc:  # a bug or an unexpected library error must not hang the consumer
            logger.exception("reader thread for %s failed", self.name)
            self._set_status("ended", error=f"internal error: {exc}")
            self._send(SourceError(f"Video source {self.name} failed: {exc}."))

    @property
    def reconnects(self) -> int:
        """Successful reconnections so far."""
        return self.status.reconnects

    def _connect_first(self) -> av.container.InputContainer:
        """The first connection: an error unless the backoff retries it (then it waits like a reconnection)."""
        attempts = 0
        while True:
            try:
                return self._open()
            except SourceError as exc:
                limit = self.backoff.max_attempts
                if not self.backoff.retry_first or (limit is not None and attempts >= limit):
                    self._set_status("ended", error=str(exc))
                    raise
                self.attempts_total += 1
                self._set_status("reconnecting", error=str(exc), attempts=attempts + 1)
                logger.warning("%s: connection attempt %d failed: %s", self.name, attempts + 1, exc)
                if self._stop.wait(self.backoff.delay(attempts, self._rng)):
                    raise SourceError(f"Video source {self.name} was stopped before it connected.") from exc
                attempts += 1

    def _read_all(self) -> None:
        try:
            container = self._connect_first()  # without retry_first, failing here is an error: nothing to go back to
        except SourceError:
            if self._stop.is_set():
                return
            raise
        failures = 0
        last_ts: float | None = None
        gap_start: float | None = None  # set while a lost stretch awaits its first frame after reconnecting
        step = 0.04  # seconds between the last two frames: how long the last frame lasts
        error: SourceError | None = None
        try:
            while not self._stop.is_set():
                recorded = self._recorded(container)
                if recorded:
                    self.live = False
                    stream = container.streams.video[0]
                    self.duration = decode.stream_duration(container, stream,
                                                           decode.stream_clock(container, stream).origin)
                error = None
                try:
                    for frame in self._decode_connection(container, recorded, not_before=gap_start):
                        if self._stop.is_set():
                            return
                        if gap_start is not None:
                            gap = (gap_start, frame.ts)
                            self._send(gap)  # in order with the frames: the consumer records it
                            self._set_status("live", new_gap=gap, reconnected=True)
                            gap_start = None
                        else:
                            if self.status.state != "live":
                                self._set_status("live")
                            if last_ts is not None and frame.ts > last_ts:
                                step = frame.ts - last_ts
                        last_ts = frame.ts
                        if recorded:  # a recording waits for the consumer instead of dropping
                            while not self._slots.acquire(timeout=0.2):
                                if self._stop.is_set():
                                    return
                        self._send(frame)
                except SourceError as exc:
                    error = exc
                finally:
                    container.close()
                if recorded or self._stop.is_set():
                    if error is not None:
                        raise error
                    return
                # A live stream ended or failed: reconnect with capped, jittered backoff for as long as it takes;
                # the gap is recorded when frames flow again (or when stopped or giving up).
                if gap_start is None:  # the lost stretch begins where the last frame ends
                    gap_start = last_ts + step if last_ts is not None else time.time()
                reason = str(error) if error is not None else "the stream ended"
                logger.warning("%s: %s; reconnecting", self.name, reason)
                self._set_status("reconnecting", error=reason, attempts=failures)
                container = self._reconnect(reason)
                if container is None:
                    return
        finally:
            if gap_start is not None:  # stopped (or gave up) during an outage: it lasted until now
                gap = (gap_start, max(gap_start, time.time()))
                self._send(gap)
                self._set_status("ended", error=self.status.error, new_gap=gap)

    def _reconnect(self, reason: str) -> av.container.InputContainer | None:
        """Knock until the source answers (None when stopped); SourceError only past `Backoff.max_attempts`."""
        limit = self.backoff.max_attempts
        failures = 0
        while not self._stop.is_set():
            if limit is not None and failures >= limit:
                raise SourceError(f"Video source {self.name} was lost ({reason}) and {failures} reconnection "
                                  f"attempts failed.")
            if self._stop.wait(self.backoff.delay(failures, self._rng)):
                return None
            try:
                return self._open()
            except SourceError as exc:
                failures += 1
                self.attempts_total += 1
                self._set_status("reconnecting", error=str(exc), attempts=failures)
                logger.warning("%s: reconnection %d failed: %s", self.name, failures, exc)
        return None

    def _decode_connection(self, container: av.container.InputContainer, recorded: bool, *,
                           not_before: float | None = None) -> Iterator[Frame]:
        """One connection's frames; live timestamps are unix seconds anchored at its first frame.

        A feed may burst ahead of the wall clock (HLS delivers whole segments); a reconnection's first frame is
        then placed at `not_before` (where the last frame delivered ends), so time never runs backwards.
        """
        if recorded:
            yield from decode.decode_frames(container, name=self.name, max_side=self.max_side)
            return
        stream = container.streams.video[0]
        clock = decode.stream_clock(container, stream)
        anchor: float | None = None
        for frame in decode.decode_frames(container, name=self.name, clock=clock, max_side=self.max_side):
            if anchor is None:
                now = time.time() if not_before is None else max(time.time(), not_before)
                anchor = now - frame.ts
            yield Frame(ts=anchor + frame.ts, image=frame.image)

    async def frames(self) -> AsyncIterator[Frame]:
        if self._thread is not None:
            raise RuntimeError("frames() of a live source can be iterated once.")
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()  # bounded by _deliver's drop rule, not by maxsize (gaps must not be dropped)
        self._thread = threading.Thread(target=self._run, name=f"vidmem-read {self.name}", daemon=True)
        self._thread.start()
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, SourceError):
                raise item
            if isinstance(item, Frame):
                if not self.live:
                    self._slots.release()
                yield item
            elif isinstance(item, tuple):
                self.gaps.append(item)  # seen here, between the frames before and after it

    async def aclose(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            # The reader notices the stop flag after its current frame or read timeout.
            await asyncio.to_thread(thread.join, 30.0)
        self._set_status("ended", error=self.status.error)


def public_url(url: str) -> str:
    """The URL without user name and password, for names and messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class UrlSource(_LiveSource):
    """RTSP, HTTP(S), HLS and other network URLs FFmpeg reads, with connect and read timeouts."""

    def __init__(self, url: str, *, open_timeout: float = 10.0, read_timeout: float = 10.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.url = url
        self.name = public_url(url)
        self.open_timeout = open_timeout
        self.read_timeout = read_timeout
        scheme = urlsplit(url).scheme.lower()
        self._options: dict[str, str] = {}
        if scheme.startswith("rtsp"):
            self._options["rtsp_transport"] = "tcp"  # UDP loses packets behind NAT and firewalls
        # Socket-level timeout (microseconds) in addition to PyAV's interrupt deadline.
        self._options["rw_timeout"] = str(int(read_timeout * 1e6))

    def _open(self) -> av.container.InputContainer:
        return decode.open_container(self.url, name=self.name, options=self._options,
                                     open_timeout=self.open_timeout, read_timeout=self.read_timeout)

    def _recorded(self, container: av.container.InputContainer) -> bool:
        scheme = urlsplit(self.url).scheme.lower()
        # A declared duration means a recording (a file over HTTP, a finished HLS playlist); live feeds have none.
        return scheme in ("http", "https") and container.duration is not None


class CameraSource(_LiveSource):
    """A local camera: `/dev/videoN` (V4L2) or `camera:N` (V4L2, AVFoundation or DirectShow by platform)."""

    def __init__(self, spec: str, *, open_timeout: float = 10.0, read_timeout: float = 10.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.name = spec
        self.open_timeout = open_timeout
        self.read_timeout = read_timeout
        index = spec.split(":", 1)[1] if spec.startswith("camera:") else None
        if sys.platform == "darwin":
            self._device, self._format = (index or spec), "avfoundation"
        elif sys.platform == "win32":
            self._device, self._format = f"video={index or spec}", "dshow"
        else:
            self._device, self._format = (f"/dev/video{index}" if index is not None else spec), "v4l2"
        if self._format == "v4l2" and not Path(self._device).exists():
            raise SourceError(f"Camera not found: {self._device}.")

    def _open(self) -> av.container.InputContainer:
        return decode.open_container(self._device, name=self.name, format=self._format,
                                     open_timeout=self.open_timeout, read_timeout=self.read_timeout)


class PushSource(Source):
    """Frames pushed in by the live server (websocket); live: a full queue drops the new frame."""

    live = True

    def __init__(self, name: str, *, max_pending: int = 8) -> None:
        self.name = name
        self.gaps = []
        self._init_status()
        self._set_status("live")
        self.received = 0  # frames pushed, dropped or not
        self.dropped = 0
        self._max_pending = max_pending
        self._pending: deque[Frame] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._last_ts: float | None = None

    def push(self, image: np.ndarray, ts: float | None = None) -> bool:
        """Queue an (H, W, 3) uint8 RGB frame taken at `ts` unix seconds (now when None); False when dropped."""
        self.received += 1
        if self._closed or len(self._pending) >= self._max_pending:
            self.dropped += 1
            return False
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ProtocolError("A pushed frame must be an RGB image of 8-bit pixels.")
        ts = time.time() if ts is None else float(ts)
        if self._last_ts is not None and ts <= self._last_ts:
            ts = self._last_ts + 1e-3  # clients' clocks jitter; time must keep increasing
        self._last_ts = ts
        self._pending.append(Frame(ts=ts, image=image))
        self._wake.set()
        return True

    def push_encoded(self, data: bytes, ts: float | None = None) -> bool:
        """Decode a JPEG, PNG or WebP image (EXIF orientation applied) and push it; invalid data -> ProtocolError."""
        if self._closed or len(self._pending) >= self._max_pending:
            self.received += 1
            self.dropped += 1
            return False
        return self.push(decode_image(data), ts)

    def close(self) -> None:
        """End `frames()` once the pending frames are consumed."""
        self._closed = True
        self._wake.set()
        self._set_status("ended")

    async def frames(self) -> AsyncIterator[Frame]:
        while True:
            while self._pending:
                yield self._pending.popleft()
            if self._closed:
                return
            self._wake.clear()
            await self._wake.wait()

    async def aclose(self) -> None:
        self.close()
        self._pending.clear()


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> (H, W, 3) uint8 RGB with EXIF orientation applied; anything else -> ProtocolError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("JPEG", "PNG", "WEBP"):
                raise ProtocolError(f"A pushed frame must be JPEG, PNG or WebP, not {img.format or 'unknown'}.")
            if img.width * img.height > MAX_PUSHED_PIXELS:
                raise ProtocolError(f"A pushed frame of {img.width}x{img.height} pixels is too large.")
            img = ImageOps.exif_transpose(img)
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except ProtocolError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ProtocolError("A pushed frame is not a valid JPEG, PNG or WebP image.") from exc


def open_source(spec: str | os.PathLike[str], *, open_timeout: float = 10.0, read_timeout: float = 10.0,
                max_reconnects: int | None = None, backoff: Backoff | None = None,
                max_side: int | None = MAX_SIDE) -> Source:
    """A source for a file path, a network URL, or a camera (`/dev/video0`, `camera:0`).

    A file is opened (and so checked) right away: missing, empty or non-video files raise SourceError here.
    A URL or camera connects when `frames()` is first iterated, in a thread, within `open_timeout` seconds.
    `backoff`: how a live source waits between reconnections (default: from 0.5 s doubling to 30 s, jittered,
    forever); `max_reconnects` is a shorthand for `Backoff(max_attempts=...)` (failed attempts in a row before
    the source gives up with SourceError).
    `max_side`: frames are shrunk to this longest side while decoding (None keeps the full size).
    """
    policy = backoff or Backoff()
    if max_reconnects is not None:
        policy = replace(policy, max_attempts=max_reconnects)
    text = os.fspath(spec)
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme in NETWORK_SCHEMES:
        return UrlSource(text, open_timeout=open_timeout, read_timeout=read_timeout, backoff=policy,
                         max_side=max_side)
    if scheme == "file":
        return FileSource(urlsplit(text).path, max_side=max_side)
    if scheme:
        raise SourceError(f"Unsupported video source scheme {scheme}:// in {public_url(text)}.")
    if text.startswith("camera:") or text.startswith("/dev/video"):
        return CameraSource(text, open_timeout=open_timeout, read_timeout=read_timeout, backoff=policy,
                            max_side=max_side)
    return FileSource(text, max_side=max_side)
