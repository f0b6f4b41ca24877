"""`vidmem serve`: live camera Q&A over a websocket, plus the page that uses it.

One `LiveServer` holds one `Vidmem`. Each live stream (`/ws/live?stream=NAME`) has one `PushSource` and one
ingest task, shared by all the clients that send to it; each client has a bounded send queue drained by its
own sender task, so a slow reader is skipped (acks, tokens) or disconnected (when its queue overflows) and never
blocks the others. Frames are decoded off the event loop; questions run in a worker thread and their tokens come
back with `loop.call_soon_threadsafe`. The wire format and every limit live in `vidmem.agents.protocol`.

Start order: static files, thread pools, the listening socket. Stop order, reversed: stop accepting and close
the websockets, end each stream's source so its ingest flushes the last segment, then the thread pools.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from vidmem.agents import protocol
from vidmem.agents.protocol import Ask, FrameCounts, FrameStamp, LiveError, Limits, RateLimiter, Throttle
from vidmem.errors import ConfigError, ProtocolError, VidmemError

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PAGES = {  # URL path -> (file in static/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
WS_PATH = "/ws/live"
# The page needs the camera (blob:/mediastream: previews), its own scripts, and a websocket to this host.
CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; "
       "connect-src 'self' ws: wss:; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'")
SLOW_CLIENT = 1008  # close code for a client whose send queue overflowed (policy violation)
SEGMENT_CALLBACK = Callable[[str, Any, Any], None]  # (stream name, SegmentRow, Segment)


@dataclass(eq=False)
class Client:
    """One websocket connection to a stream."""

    connection: ServerConnection
    stream: "StreamState"
    queue: asyncio.Queue  # JSON texts waiting for the sender task; None ends it
    limiter: RateLimiter
    throttle: Throttle  # paces "rate_limited" errors
    counts: FrameCounts = field(default_factory=FrameCounts)
    pending_ts: float | None = None  # from a {"type": "frame", "ts"} message, for the next binary frame
    asking: bool = False  # one question at a time per connection
    asked: int = 0  # questions asked (to name those without an id)
    skipped: int = 0  # acks and tokens not sent because the client was reading too slowly
    closed: bool = False
    last_ack: float = 0.0  # monotonic time of the last ack
    since_ack: int = 0  # frames since the last ack
    sender: asyncio.Task | None = None


@dataclass(eq=False)
class StreamState:
    """One live stream: its push source, its ingest task and the clients sending to it."""

    name: str
    source: Any  # vidmem.stream.PushSource
    clients: set = field(default_factory=set)
    counts: FrameCounts = field(default_factory=FrameCounts)
    segments: int = 0  # segments committed by this server's ingest of the stream
    frames_stored: int = 0  # frames in those segments
    first_segment: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    report: Any = None  # the ingest loop's IngestReport once it ended
    failed: str | None = None  # why the ingest loop stopped, when it failed
    closing: bool = False

    def figures(self) -> dict:
        """Frame accounting: received = stored + dropped, where stored counts frames the ingest loop took.

        While the stream runs, `stored` includes the few frames still waiting in the source's queue; once its
        ingest has ended it is the loop's own count of frames read, and `in_segments` those kept by sampling.
        """
        report = self.report
        return {
            "name": self.name, "clients": len(self.clients), "received": self.counts.received,
            "stored": report.decoded_frames if report is not None else self.counts.queued,
            "dropped": self.counts.dropped, "rate_dropped": self.counts.rate_dropped,
            "queue_dropped": self.counts.dropped - self.counts.rate_dropped, "rejected": self.counts.rejected,
            "segments": report.segments if report is not None else self.segments,
            "in_segments": report.frames if report is not None else self.frames_stored,
            "finished": report is not None, "failed": self.failed,
            "source": self.source.status.to_json() if hasattr(self.source, "status") else None,
        }


class LiveServer:
    """The websocket server and page; usable in-process (`async with LiveServer(app, port=0) as server`)."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str | None = None,
        limits: Limits | None = None,
        ingest_options: Any = None,
    ) -> None:
        if not token and not protocol.is_loopback(host):
            raise ConfigError(
                f"--token is required to listen on {host}, which other machines can reach; "
                "set --token (or VIDMEM_TOKEN) or listen on 127.0.0.1"
            )
        self.app = app
        self.host = host
        self._port = port
        self.token = token or None
        self.limits = limits or Limits()
        self.ingest_options = ingest_options  # vidmem.stream.IngestOptions for live streams; None: live defaults
        self.on_segment: list[SEGMENT_CALLBACK] = []  # called on the event loop after each committed segment
        self.stopping = False  # set by stop(): answers in progress end at their next token
        self.on_status: list[Callable[[str, Any], None]] = []  # (stream, SourceStatus) on each change, any thread
        self.streams: dict[str, StreamState] = {}
        self.finished: deque[dict] = deque(maxlen=64)  # figures of the streams whose ingest ended, newest last
        self.clients: set[Client] = set()
        self.pending_questions = 0
        self._tasks: set[asyncio.Task] = set()  # questions being answered, connections being closed
        self._admitted: set[ServerConnection] = set()  # websocket handshakes let through, not yet finished
        self._server: Server | None = None
        self._pages: dict[str, tuple[bytes, str]] = {}
        self._decoder: ThreadPoolExecutor | None = None
        self._answerer: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started = 0.0

    # ---- lifecycle ----------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port listened on (the real one when constructed with port=0)."""
        if self._server is not None:
            return self._server.sockets[0].getsockname()[1]
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._pages = {path: ((STATIC / name).read_bytes(), kind) for path, (name, kind) in PAGES.items()}
        # Decoding JPEGs and reading the memory are blocking; each has its own small pool so neither starves the
        # other nor the ingest loop's worker thread. Model work (answers, live refreshes) goes through the app's
        # scheduler: questions first, refreshes coalesced per stream.
        self._decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vidmem-decode")
        self._answerer = ThreadPoolExecutor(max_workers=self.limits.answer_workers, thread_name_prefix="vidmem-answer")
        try:
            self._server = await serve(
                self._handle, self.host, self._port,
                process_request=self._process_request,
                max_size=self.limits.hard_max_bytes,  # beyond this websockets closes with 1009; below, we check
                max_queue=self.limits.ws_read_queue,  # reading pauses above this: TCP backpressure on the sender
                write_limit=64 * 1024,
                ping_interval=20, ping_timeout=20, close_timeout=5, open_timeout=10,
                server_header="vidmem",
            )
        except OSError as exc:
            await self._shutdown_pools()
            raise ConfigError(f"cannot listen on {self.host}:{self._port}: {exc.strerror or exc}") from exc
        self.started = time.time()
        log.info("live server listening on %s", self.url)

    async def stop(self, *, timeout: float = 30.0) -> None:
        """Stop accepting, close every websocket, let each stream's ingest flush, then free the pools."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for state in list(self.streams.values()):
            state.source.close()
        tasks = [s.task for s in self.streams.values() if s.task is not None]
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                log.warning("an ingest task did not finish within %.0f s; cancelling it", timeout)
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for task in list(self._tasks):  # answers for clients that are gone now
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await self._shutdown_pools()

    async def _shutdown_pools(self) -> None:
        """Drop queued work and wait for what is running (model work must end before the app closes its memory)."""
        for pool in (self._decoder, self._answerer):
            if pool is not None:
                await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    async def __aenter__(self) -> LiveServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- hooks for the MQTT monitor -----------------------------------------------------------------
    def publish_event(self, stream: str, event: dict) -> int:
        """Send {"type": "event", ...} to the clients of `stream`; returns how many it was queued for.

        Safe from any thread: called off the server's loop, it is handed over to it (and returns the count of
        clients at the time of the call).
        """
        if self._loop is not None and _running_loop() is not self._loop:
            self._loop.call_soon_threadsafe(self.publish_event, stream, event)
            state = self.streams.get(stream)
            return len(state.clients) if state is not None else 0
        state = self.streams.get(stream)
        if state is None:
            return 0
        message = protocol.event(stream, event)
        for client in list(state.clients):
            self._send(client, message)
        return len(state.clients)

    def health(self) -> dict:
        try:  # every source the memory knows of, this server's or another writer's (`vidmem monitor`)
            sources = self.app.memory.sources()
        except VidmemError:
            sources = {}
        return {
            "status": "ok", "streams": [s.figures() for s in self.streams.values()], "clients": len(self.clients),
            "pending_questions": self.pending_questions, "uptime_seconds": round(time.time() - self.started, 3),
            "sources": sources,
            "encoding": getattr(self.app, "encoding_stats", lambda: None)(),  # the shared encoder's batching
        }

    # ---- HTTP ---------------------------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Route plain HTTP (page, health) and check a websocket handshake before it is accepted."""
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        authorized = protocol.token_ok(self.token, request.headers.get("Authorization"), query)
        if url.path == "/" and not authorized:
            # The page is code anyone may read (app.js, style.css stay open), but with a token configured it is
            # only served to whoever has it: the page then passes the token on to the websocket.
            return _response(401, "a valid token is required: open this page as /?token=TOKEN\n")
        if url.path in self._pages:
            body, kind = self._pages[url.path]
            return _response(200, body, kind)
        if url.path == "/healthz":
            # Liveness for anyone; stream names and figures only with the token.
            health = self.health() if authorized else {"status": "ok"}
            return _response(200, json.dumps(health).encode(), "application/json")
        if url.path == "/favicon.ico":
            return _response(204, b"", "text/plain")
        if url.path != WS_PATH:
            return _response(404, f"not found: {url.path}; the page is at / and the websocket at {WS_PATH}\n")
        if not authorized:
            response = _response(401, "a valid token is required: send 'Authorization: Bearer TOKEN' or ?token=TOKEN\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="vidmem"'
            return response
        try:
            name = protocol.stream_name(query)
        except LiveError as exc:
            return _response(400, f"{exc}\n")
        self._admitted = {c for c in self._admitted if c.state.name in ("CONNECTING", "OPEN")}
        if len(self.clients) + len(self._admitted) >= self.limits.max_clients:
            return _response(503, f"the server already has {self.limits.max_clients} clients; try again later\n")
        if name not in self.streams and len(self.streams) >= self.limits.max_streams:
            return _response(503, f"the server already serves {self.limits.max_streams} streams; try again later\n")
        self._admitted.add(connection)
        return None  # let websockets perform the handshake (or answer 426 to a plain HTTP GET)

    # ---- websocket ----------------------------------------------------------------------------------
    async def _handle(self, connection: ServerConnection) -> None:
        self._admitted.discard(connection)
        name = protocol.stream_name(parse_qs(urlsplit(connection.request.path).query))
        try:
            state = await self._join(name)
        except LiveError as exc:
            await connection.close(1013, str(exc)[:120])  # 1013: try again later
            return
        limits = self.limits
        client = Client(
            connection, state, asyncio.Queue(), RateLimiter(limits.max_fps, limits.fps_burst),
            Throttle(limits.error_interval_s), last_ack=time.monotonic(),
        )
        state.clients.add(client)
        self.clients.add(client)
        client.sender = asyncio.create_task(self._sender(client), name=f"vidmem-send {name}")
        log.info("client %s joined stream %s", connection.remote_address, name)
        self._ack(client)
        try:
            async for message in connection:
                if isinstance(message, bytes):
                    await self._on_frame(client, message)
                else:
                    self._on_text(client, message)
        except ConnectionClosed:
            pass
        finally:
            client.closed = True
            client.queue.put_nowait(None)  # ends the sender (the queue has no maxsize: bounded by _send)
            state.clients.discard(client)
            self.clients.discard(client)
            log.info("client %s left stream %s (%s)", connection.remote_address, name, client.counts)
            if not state.clients:
                self._retire(state)

    async def _sender(self, client: Client) -> None:
        """Drain one client's queue; `send` waits while the socket's write buffer is full (a slow reader)."""
        try:
            while True:
                text = await client.queue.get()
                if text is None:
                    return
                await client.connection.send(text)
        except ConnectionClosed:
            client.closed = True

    def _send(self, client: Client, message: dict, *, droppable: bool = False) -> None:
        """Queue a message; acks and tokens are skipped for a backed-up client, which is closed when full."""
        if client.closed:
            return
        size = client.queue.qsize()
        if droppable and size >= self.limits.send_queue * 3 // 4:
            client.skipped += 1
            return
        if size >= self.limits.send_queue:
            client.closed = True
            log.warning("closing client %s of stream %s: it reads too slowly (%d messages queued)",
                        client.connection.remote_address, client.stream.name, size)
            self._spawn(client.connection.close(SLOW_CLIENT, "reading too slowly: messages backed up"), "vidmem-close")
            return
        client.queue.put_nowait(protocol.dumps(message))

    def _spawn(self, coro: Any, name: str) -> None:
        """A background task, referenced until done (the loop itself only keeps weak references)."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _error(self, client: Client, exc: VidmemError, **extra: Any) -> None:
        self._send(client, protocol.error(getattr(exc, "code", "error"), str(exc), **extra))

    def _ack(self, client: Client) -> None:
        state = client.stream
        client.last_ack, client.since_ack = time.monotonic(), 0
        self._send(client, protocol.ack(
            client.counts.received, client.counts.dropped, stream=state.name, stream_frames=state.counts.received,
            stream_dropped=state.counts.dropped, segments=state.segments,
        ), droppable=True)

    def _maybe_ack(self, client: Client) -> None:
        client.since_ack += 1
        if (client.since_ack >= self.limits.ack_every_frames
                or time.monotonic() - client.last_ack >= self.limits.ack_interval_s):
            self._ack(client)

    async def _on_frame(self, client: Client, data: bytes) -> None:
        ts, client.pending_ts = client.pending_ts, None
        try:
            protocol.check_frame(data, self.limits)
        except LiveError as exc:
            client.counts.rejected += 1
            client.stream.counts.rejected += 1
            self._error(client, exc)
            return
        state = client.stream
        if not client.limiter.allow(time.monotonic()):
            for counts in (client.counts, state.counts):
                counts.received += 1
                counts.dropped += 1
                counts.rate_dropped += 1
            if client.throttle.ready(time.monotonic()):
                self._send(client, protocol.error(
                    "rate_limited", f"more than {self.limits.max_fps:g} frames per second: extra frames are dropped "
                    f"({client.counts.rate_dropped} so far)"))
            self._maybe_ack(client)
            return
        from vidmem.stream.sources import decode_image

        try:
            # Decoding takes milliseconds per frame: off the event loop. Awaiting it keeps this client's order.
            image = await asyncio.get_running_loop().run_in_executor(self._decoder, decode_image, data)
        except ProtocolError as exc:
            client.counts.rejected += 1
            state.counts.rejected += 1
            self._send(client, protocol.error("bad_image", str(exc)))
            return
        for counts in (client.counts, state.counts):
            counts.received += 1
        if not state.source.push(image, ts):  # a closed source counts the frame as dropped too
            for counts in (client.counts, state.counts):
                counts.dropped += 1  # the ingest loop is behind: a live stream drops rather than waits
        self._maybe_ack(client)

    def _on_text(self, client: Client, text: str) -> None:
        client.pending_ts = None  # a stamp applies only to the binary message right after it
        try:
            message = protocol.parse_text(text, self.limits, counter=client.asked + 1)
        except LiveError as exc:
            self._error(client, exc)
            return
        if isinstance(message, FrameStamp):
            client.pending_ts = message.ts
            return
        assert isinstance(message, Ask)
        client.asked += 1
        if client.asking:
            self._send(client, protocol.error("busy", "a question is already being answered on this connection; "
                                                      "wait for its answer", id=message.id))
            return
        if self.pending_questions >= self.limits.max_pending_questions:
            self._send(client, protocol.error("busy", f"the server is answering {self.pending_questions} questions; "
                                                      "ask again in a moment", id=message.id))
            return
        client.asking = True
        self.pending_questions += 1
        self._ack(client)  # the exact frame count the answer can draw on
        self._spawn(self._answer(client, message), f"vidmem-ask {client.stream.name}")

    async def _answer(self, client: Client, ask: Ask) -> None:
        state = client.stream
        loop = asyncio.get_running_loop()
        try:
            if state.segments == 0:
                stored = await loop.run_in_executor(self._answerer, self.app.memory.has_stream, state.name)
                if not stored:
                    if state.counts.queued == 0:
                        raise LiveError("no_frames", f"stream '{state.name}' has no frames yet; send camera frames "
                                                     "before asking about them")
                    try:  # frames are in flight: give the first segment a moment to be committed
                        await asyncio.wait_for(state.first_segment.wait(), self.limits.first_segment_wait_s)
                    except asyncio.TimeoutError:
                        raise LiveError("no_segments", f"no segment of stream '{state.name}' is in the memory yet; "
                                                       "send frames for a few more seconds and ask again") from None

            def on_token(text: str) -> None:  # in the answering thread
                if self.stopping:  # SIGTERM: end the answer at its next token rather than hold the stop up
                    raise VidmemError("the server is stopping; the answer was cut short")
                loop.call_soon_threadsafe(functools.partial(self._send, client, protocol.token(ask.id, text),
                                                            droppable=True))

            if ask.conversation is not None:
                call = functools.partial(self.app.ask_conversation, ask.conversation, ask.question,
                                         streams=[state.name], budget=ask.budget, on_token=on_token, live=True)
            else:
                call = functools.partial(self.app.ask, ask.question, streams=[state.name], budget=ask.budget,
                                         on_token=on_token, live=True)
            from vidmem.agents.scheduler import Priority

            # Questions go first in the model's queue; a full queue is refused at once with a "busy" error.
            result = await asyncio.wrap_future(self.app.scheduler.submit(Priority.INTERACTIVE, call))
            self._send(client, protocol.answer(ask.id, result.to_json()))
        except VidmemError as exc:
            self._error(client, exc, id=ask.id)
        except Exception:
            log.exception("answering %r on stream %s failed", ask.question, state.name)
            self._send(client, protocol.error("internal", "the question could not be answered because of an "
                                                          "internal error; see the server log", id=ask.id))
        finally:
            client.asking = False
            self.pending_questions -= 1

    # ---- streams ------------------------------------------------------------------------------------
    async def _join(self, name: str) -> StreamState:
        """The stream's state, starting its source and ingest task for the first client."""
        state = self.streams.get(name)
        if state is not None and state.closing and state.task is not None:
            # The last client just left and its ingest is flushing; one writer per stream, so wait for it.
            await asyncio.wait([state.task], timeout=60)
            state = self.streams.get(name)
        if state is not None and not state.closing:
            return state
        if state is not None:
            raise LiveError("busy", f"stream '{name}' is still saving its last frames; connect again in a moment")
        from vidmem.stream.sources import PushSource

        state = StreamState(name, PushSource(name, max_pending=self.limits.source_queue))
        self.streams[name] = state
        state.task = asyncio.create_task(self._ingest(state), name=f"vidmem-ingest {name}")
        return state

    def _retire(self, state: StreamState) -> None:
        """The last client left: end the source; the ingest flushes what it holds, then the state goes."""
        state.closing = True
        state.source.close()

    async def _ingest(self, state: StreamState) -> None:
        loop = asyncio.get_running_loop()

        def committed(row: Any, segment: Any) -> None:  # in the ingest worker thread
            loop.call_soon_threadsafe(self._committed, state, row, segment)

        try:
            state.report = await self.app.ingest(
                state.source, stream=state.name, options=self._ingest_options(), on_segment=committed,
                on_status=self._status_changed,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, VidmemError):
                log.error("ingest of stream %s stopped: %s", state.name, exc)
                code, text = exc.code, f"the stream '{state.name}' stopped being recorded: {exc}"
            else:
                log.exception("ingest of stream %s failed", state.name)
                code, text = "internal", f"the stream '{state.name}' stopped being recorded: internal error"
            state.failed = text
            state.closing = True
            state.source.close()
            for client in list(state.clients):
                self._send(client, protocol.error(code, text))
        finally:
            self.finished.append(state.figures())
            if self.streams.get(state.name) is state:
                del self.streams[state.name]
            for client in list(state.clients):  # a failed stream's clients reconnect to a fresh one
                self._spawn(client.connection.close(1011, "the stream stopped being recorded"), "vidmem-close")

    def _status_changed(self, stream: str, status: Any) -> None:
        for callback in list(self.on_status):
            try:
                callback(stream, status)
            except Exception:  # one broken hook must not stop recording
                log.exception("an on_status callback failed for stream %s", stream)

    def _ingest_options(self) -> Any:
        if self.ingest_options is not None:
            return self.ingest_options
        from vidmem.stream.ingest import IngestOptions

        return IngestOptions(fps=self.limits.ingest_fps)

    def _committed(self, state: StreamState, row: Any, segment: Any) -> None:
        state.segments += 1
        state.frames_stored += len(segment)
        state.first_segment.set()
        for client in list(state.clients):  # so pages can show the stream's segment count as it grows
            self._ack(client)
        self._refresh_live(state)
        for callback in list(self.on_segment):
            try:
                callback(state.name, row, segment)
            except Exception:  # one broken hook must not stop recording
                log.exception("an on_segment callback failed for stream %s", state.name)

    def _refresh_live(self, state: StreamState) -> None:
        """Extend the stream's kept KV cache with the new segments, so a question about now prefills only itself.

        Model work at refresh priority, after questions and verification; one refresh queued per stream at most
        (a refresh takes every segment committed before it starts), so streams are refreshed in batches.
        """
        from vidmem.agents.scheduler import Priority

        refresh = getattr(self.app, "refresh_live", None)
        if refresh is None or not self.limits.prefill_live or self.stopping:
            return

        def run() -> None:
            try:
                refresh(state.name)
            except Exception:  # a failed refresh only costs the next question a longer prefill
                log.warning("refreshing the live window of stream %s failed", state.name, exc_info=True)

        try:
            self.app.scheduler.submit(Priority.REFRESH, run, key=("refresh", state.name))
        except VidmemError as exc:  # busy or shutting down: the next segment asks again
            log.debug("no refresh of stream %s now: %s", state.name, exc)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _response(status: int, body: bytes | str, kind: str = "text/plain; charset=utf-8") -> Response:
    import http

    if isinstance(body, str):
        body = body.encode()
    headers = Headers([
        ("Content-Type", kind), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"), ("Connection", "close"),
    ])
    if kind.startswith("text/html"):
        headers["Content-Security-Policy"] = CSP
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


# ---- the CLI --------------------------------------------------------------------------------------------
def serve_main(args: Any, settings: Any, *, attach: Callable[[LiveServer, Any], Any] | None = None) -> int:
    """`vidmem serve`: check the flags, load the models, serve until SIGINT or SIGTERM; returns the exit code.

    `attach(server, args)`, when given, returns an async context manager run for as long as the server (the CLI
    passes the MQTT monitor's for `--mqtt`); this module knows nothing of what it is.
    """
    from vidmem.agents.cluster import open_app
    from vidmem.agents.service import run_service

    host, port, token = args.host, args.port, args.token
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be from 0 to 65535, not {port}")
    if not token and not protocol.is_loopback(host):
        raise ConfigError(f"--token is required to listen on {host}, which other machines can reach; "
                          "set --token (or VIDMEM_TOKEN) or listen on 127.0.0.1")
    app = open_app(settings, address=getattr(args, "ray", None))  # --ray: on the cluster
    return run_service(app, functools.partial(_serve, app, args, attach), exit_process=True)


async def _serve(app: Any, args: Any, attach: Callable[[LiveServer, Any], Any] | None, stop: asyncio.Event) -> int:
    server = LiveServer(app, host=args.host, port=args.port, token=args.token)
    await server.start()
    attached = None
    try:
        if attach is not None:
            attached = attach(server, args)
            await attached.__aenter__()
        hint = " (add ?token=YOUR_TOKEN)" if server.token else ""
        sys.stderr.write(f"vidmem: serving {server.url}{hint}; websocket at ws://{args.host}:{server.port}{WS_PATH}"
                         f"?stream=NAME; Ctrl-C to stop\n")
        sys.stderr.flush()
        await stop.wait()
        sys.stderr.write("vidmem: stopping\n")
    finally:
        if attached is not None:
            await attached.__aexit__(None, None, None)
        await server.stop()
    return 0
