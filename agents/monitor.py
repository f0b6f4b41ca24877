"""MQTT event monitoring: watch rules over new segments, questions and triggers over MQTT, Home Assistant discovery.

    vidmem monitor --mqtt mqtt://user:pass@broker:1883 --rules rules.yaml --source porch=rtsp://cam/stream

One `Monitor` holds one broker connection (aiomqtt, QoS 1, a persistent session under a fixed client id, the
retained `offline` availability as last will). Everything it sends goes through a bounded outbox that outlives
the connection: while the broker is away, events wait there and are delivered after the reconnect (the
reconnect is an explicit loop with exponential backoff). The rule lifecycle itself is pure logic in
`vidmem.agents.rules`; this module only connects it to the models, the memory and the broker.

Topics (DESIGN.md, "MQTT"): `<prefix>/available`, `<prefix>/<stream>/ask` -> `<prefix>/<stream>/answer`,
`<prefix>/<stream>/trigger`, `<prefix>/<stream>/rules/set` -> `<prefix>/<stream>/rules` (retained),
`<prefix>/events`, `<prefix>/errors`, `<prefix>/<stream>/rule/<id>/state` (ON/OFF, retained) and the Home
Assistant discovery configs under `homeassistant/binary_sensor/`.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import signal
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import unquote, urlsplit

import numpy as np

from vidmem.agents.rules import (
    Event,
    EventChange,
    Rule,
    RuleTracker,
    Topics,
    discovery_payload,
    parse_ask,
    parse_rule_set,
    parse_rules_document,
    parse_trigger,
)
from vidmem.errors import BrokerError, ConfigError, ProtocolError, VidmemError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
VERIFY_PROMPT = "Answer with yes or no only. Is the following true in this video: {condition}?"


# ---- configuration --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BrokerConfig:
    """Where the broker is and how to log in (from `mqtt://[user:pass@]host:port`)."""

    host: str  # broker host name or address
    port: int  # TCP port
    username: str | None = None  # MQTT user name
    password: str | None = None  # MQTT password
    tls: bool = False  # mqtts://: TLS on the connection
    ca_file: Path | None = None  # CA bundle to check the broker's certificate with (default: the system's)
    insecure: bool = False  # accept any certificate and host name (testing only)

    @property
    def where(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_mqtt_url(url: str, *, ca_file: Path | None = None, insecure: bool = False) -> BrokerConfig:
    """`mqtt://[user:pass@]host[:port]` or `mqtts://...`; ConfigError with the reason otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"cannot read the MQTT URL: {exc}; use mqtt://[user:pass@]host:port.") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ConfigError(f"the MQTT URL must start with mqtt:// or mqtts://, got {scheme or 'no scheme'}.")
    if not parts.hostname:
        raise ConfigError("the MQTT URL names no host; use mqtt://[user:pass@]host:port.")
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError("the MQTT URL takes no path or query; use mqtt://[user:pass@]host:port.")
    if (ca_file is not None or insecure) and scheme != "mqtts":
        raise ConfigError("--mqtt-ca and --mqtt-insecure only apply to an mqtts:// URL.")
    if ca_file is not None and not Path(ca_file).is_file():
        raise ConfigError(f"the MQTT CA file {ca_file} does not exist.")
    return BrokerConfig(
        host=parts.hostname, port=port or DEFAULT_PORTS[scheme],
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=scheme == "mqtts", ca_file=Path(ca_file) if ca_file else None, insecure=insecure,
    )


@dataclass(frozen=True)
class MonitorOptions:
    """How the monitor talks to the broker and how much it holds in memory."""

    prefix: str = "vidmem"  # topic prefix
    discovery_prefix: str = "homeassistant"  # Home Assistant discovery prefix
    client_id: str | None = None  # fixed MQTT client id (persistent session); None: derived from prefix + memory
    qos: int = 1  # QoS of every publish and subscription
    keepalive: int = 30  # seconds; the broker sends the last will after 1.5x this without traffic
    connect_timeout: float = 10.0  # seconds for a connection attempt
    publish_timeout: float = 10.0  # seconds to wait for a PUBACK before treating the connection as broken
    reconnect_min: float = 0.5  # first reconnect delay, seconds
    reconnect_max: float = 30.0  # backoff cap, seconds
    fail_fast: bool = True  # the first connection failing raises BrokerError instead of retrying
    outbox_messages: int = 2000  # messages waiting for the broker; beyond, the oldest non-event is dropped
    outbox_bytes: int = 64 * 2**20  # bytes waiting for the broker (snapshots are the big part)
    max_payload: int = 64 * 1024  # bytes; bigger inbound messages are refused with an error
    work_queue: int = 16  # questions and triggers waiting for the VLM; beyond, they are refused (busy)
    segment_queue: int = 64  # segments waiting to be scored; beyond, ingest waits (files) up to segment_wait
    segment_wait: float = 30.0  # seconds a committed segment may wait for room before it is dropped unscored
    verify_budget: int = 1000  # visual tokens for a rule's yes/no verification question (one segment)
    trigger_budget: int = 6000  # visual tokens for a trigger's description
    snapshots: bool = True  # attach the keyframe JPEG (base64) to events
    fps: float = 1.0  # sampled frames per second for --source ingest
    allow_new_streams: bool = False  # accept rules for streams not seen yet (the live server's future cameras)

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ConfigError(f"the MQTT prefix {self.prefix!r} must be non-empty, without '+', '#' or outer '/'.")
        if self.qos not in (0, 1, 2):
            raise ConfigError(f"qos must be 0, 1 or 2, got {self.qos}.")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ConfigError("reconnect_min must be positive and at most reconnect_max.")


def load_rules_file(path: str | Path) -> list[tuple[str, Rule]]:
    """(stream, rule) pairs from a YAML or JSON rules file, validated; ConfigError names the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the rules file {path}: {exc}.") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)  # safe_load: a rules file never constructs Python objects
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: one message either way
        raise ConfigError(f"the rules file {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}.") from None
    try:
        return parse_rules_document(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_source_args(items: list[str]) -> dict[str, str]:
    """`NAME=URL` pairs from --source; ConfigError for a missing name or a duplicate."""
    from vidmem.memory import check_stream_name

    out: dict[str, str] = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ConfigError(f"--source expects NAME=URL (e.g. porch=rtsp://camera/stream), got {item!r}.")
        check_stream_name(name)
        if name in out:
            raise ConfigError(f"--source names the stream '{name}' twice.")
        out[name] = url
    return out


# ---- the outbox -----------------------------------------------------------------------------------------------
@dataclass
class Outgoing:
    topic: str
    payload: bytes
    retain: bool = False
    event: bool = False  # an event message: dropped only when nothing else is left to drop


class Outbox:
    """Messages waiting for the broker, in order; bounded in count and bytes.

    When full, the oldest non-event message goes first (answers, errors, states can be asked for again or are
    republished; events cannot), then the oldest event; both are counted. A retained message replaces a queued
    one for the same topic, since only the last value of a retained topic matters.
    """

    def __init__(self, *, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._items: deque[Outgoing] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()
        self.in_flight: Outgoing | None = None  # the head being published (never dropped or replaced)
        self.dropped = 0  # non-event messages dropped because the outbox was full
        self.dropped_events = 0  # events dropped because the outbox was full of events

    def __len__(self) -> int:
        return len(self._items)

    def put(self, message: Outgoing) -> None:
        if message.retain:
            for old in list(self._items):
                if old.topic == message.topic and old is not self.in_flight:
                    self._remove(old)
        self._items.append(message)
        self._bytes += len(message.payload)
        while len(self._items) > 1 and (len(self._items) > self.max_messages or self._bytes > self.max_bytes):
            victim = next((m for m in self._items if not m.event and m is not self.in_flight), None)
            if victim is None:
                victim = next(m for m in self._items if m is not self.in_flight)
                self.dropped_events += 1
                log.warning("MQTT outbox full: dropped the oldest event message (%d so far)", self.dropped_events)
            else:
                self.dropped += 1
                log.info("MQTT outbox full: dropped a %s message (%d so far)", victim.topic, self.dropped)
            self._remove(victim)
        self._ready.set()

    def _remove(self, message: Outgoing) -> None:
        self._items.remove(message)
        self._bytes -= len(message.payload)

    async def head(self) -> Outgoing:
        """The oldest message, waiting for one; it stays queued until `done` (so a failed publish is retried)."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        self.in_flight = self._items[0]
        return self.in_flight

    def done(self, message: Outgoing) -> None:
        if self._items and self._items[0] is message:
            self._remove(message)
        self.in_flight = None


# ---- the monitor ----------------------------------------------------------------------------------------------
class Monitor:
    """Watch rules, questions and triggers over MQTT for one vidmem deployment.

    `run(stop)` connects, ingests the given sources and serves until `stop` is set. The live server attaches
    it without sources: it calls `on_segment(row, segment)` for each committed segment of its websocket
    streams (any thread) and passes `on_event(stream, event_message)` to hear about events.
    """

    def __init__(
        self,
        app,
        mqtt_url: str,
        *,
        prefix: str | None = None,
        rules_file: str | Path | None = None,
        rules: list[tuple[str, Rule]] | None = None,
        sources: Mapping[str, Any] | None = None,
        options: MonitorOptions | None = None,
        on_event: Callable[[str, dict], None] | None = None,
        ca_file: Path | None = None,
        insecure: bool = False,
    ) -> None:
        from dataclasses import replace

        self.app = app
        options = options or MonitorOptions()
        self.options = replace(options, prefix=prefix) if prefix is not None and prefix != options.prefix else options
        self.broker = parse_mqtt_url(mqtt_url, ca_file=ca_file, insecure=insecure)
        self.topics = Topics(self.options.prefix, self.options.discovery_prefix)
        self.file_rules = list(rules or []) + (load_rules_file(rules_file) if rules_file else [])
        self.sources = dict(sources or {})
        self.on_event = on_event
        self.trackers: dict[str, dict[str, RuleTracker]] = {}  # stream -> rule id -> tracker
        self.streams: set[str] = set(self.sources)  # streams known besides the memory's
        self.outbox = Outbox(max_messages=self.options.outbox_messages, max_bytes=self.options.outbox_bytes)
        self.stats = {"connects": 0, "events": 0, "answers": 0, "errors": 0, "segments_scored": 0,
                      "segments_dropped": 0, "busy": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._segments: asyncio.Queue | None = None
        self._work: asyncio.Queue | None = None
        self._closing: asyncio.Event | None = None
        self._text_cache: dict[str, np.ndarray] = {}
        self._snapshots: dict[int, str | None] = {}
        self._embed_lock = threading.Lock()
        self._triggers = 0
        self.ready: asyncio.Event | None = None  # set by run() once connected and the rules are loaded

    # ---- public hooks -----------------------------------------------------------------------------------------
    @property
    def client_id(self) -> str:
        if self.options.client_id:
            return self.options.client_id
        where = str(Path(self.app.settings.memory).resolve())
        return f"vidmem-{self.options.prefix.replace('/', '-')}-{hashlib.sha1(where.encode()).hexdigest()[:10]}"

    def add_stream(self, name: str) -> None:
        """Make a stream known (the live server does when a camera connects), so rules may be set for it."""
        self.streams.add(name)

    def on_segment(self, row, segment) -> None:
        """A segment was committed (called from the ingest worker thread): queue it for scoring.

        From a worker thread this waits for room (a file source slows down rather than skipping rules); from
        the event loop's own thread, or after `segment_wait` seconds, a segment that finds no room is dropped
        and counted.
        """
        loop = self._loop
        if loop is None or self._segments is None or loop.is_closed():
            return
        self.streams.add(row.stream)
        item = (row, segment.keyframe.image)
        if _on_loop_thread(loop):
            self._put_segment_nowait(item)
            return
        future = asyncio.run_coroutine_threadsafe(self._put_segment(item), loop)
        try:
            future.result(timeout=self.options.segment_wait + 1)
        except Exception:  # timed out or the loop went away: counted, never raised into the ingest worker
            future.cancel()

    # ---- run ----------------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Connect, load the rules, ingest the sources and serve until `stop` is set; publishes offline on the way out.

        With `options.fail_fast`, a first connection that fails raises BrokerError before the memory is touched.
        """
        self._loop = asyncio.get_running_loop()
        self._segments = asyncio.Queue(self.options.segment_queue)
        self._work = asyncio.Queue(self.options.work_queue)
        self._closing = asyncio.Event()
        self.ready = self.ready or asyncio.Event()
        first = self._loop.create_future()
        connection = asyncio.create_task(self._connection_loop(first), name="mqtt-connection")
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({first, connection, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if connection.done() and connection.exception() is not None:
            stopping.cancel()
            raise connection.exception()
        tasks: list[asyncio.Task] = []
        ingests: list[asyncio.Task] = []
        try:
            if not stop.is_set():
                await asyncio.to_thread(self._load_rules)
                for stream in list(self.trackers):
                    self._publish_rules_state(stream)
                tasks.append(asyncio.create_task(self._score_loop(), name="mqtt-score"))
                tasks.append(asyncio.create_task(self._work_loop(), name="mqtt-work"))
                for name, source in self.sources.items():
                    ingests.append(asyncio.create_task(self._ingest(name, source, stop), name=f"ingest-{name}"))
                self.ready.set()
                await stop.wait()
        finally:
            stopping.cancel()
            if ingests:  # they see `stop` and finish their segment in flight; scoring keeps running meanwhile
                await asyncio.wait(ingests, timeout=self.options.segment_wait)
            for task in ingests + tasks:
                task.cancel()
            await asyncio.gather(*ingests, *tasks, return_exceptions=True)
            for stream, trackers in self.trackers.items():
                for tracker in trackers.values():
                    for change in tracker.close():
                        await self._emit(change)
            self._closing.set()
            try:
                await asyncio.wait_for(connection, timeout=self.options.publish_timeout + 5)
            except (asyncio.TimeoutError, MqttErrorTypes) as exc:
                log.warning("MQTT: stopped without a clean goodbye (%s)", exc)
            finally:
                connection.cancel()
            if len(self.outbox):
                log.warning("MQTT: %d messages were still waiting for the broker at shutdown", len(self.outbox))

    # ---- connection -------------------------------------------------------------------------------------------
    @staticmethod
    def _tls_context(b: BrokerConfig) -> ssl.SSLContext | None:
        if not b.tls:
            return None
        context = ssl.create_default_context(cafile=str(b.ca_file) if b.ca_file else None)
        if b.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _client(self):
        import aiomqtt

        b, o = self.broker, self.options
        tls_context = self._tls_context(b)
        return aiomqtt.Client(
            b.host, b.port, username=b.username, password=b.password, identifier=self.client_id,
            clean_session=False,  # persistent session: the broker keeps our subscriptions and queued questions
            will=aiomqtt.Will(self.topics.available, "offline", qos=o.qos, retain=True),
            keepalive=o.keepalive, timeout=o.connect_timeout, tls_context=tls_context,
            tls_insecure=True if b.tls and b.insecure else None, logger=logging.getLogger(__name__ + ".paho"),
        )

    async def _connection_loop(self, first: asyncio.Future) -> None:
        """Connect, serve, and on any failure wait and reconnect (exponential backoff up to reconnect_max)."""
        import aiomqtt

        delay = self.options.reconnect_min
        while not self._closing.is_set():
            try:
                async with self._client() as client:
                    self.stats["connects"] += 1
                    delay = self.options.reconnect_min
                    log.info("MQTT: connected to %s as %s", self.broker.where, self.client_id)
                    await client.subscribe([(t, self.options.qos) for t in self.topics.subscriptions()],
                                           timeout=self.options.publish_timeout)
                    await client.publish(self.topics.available, "online", qos=self.options.qos, retain=True,
                                         timeout=self.options.publish_timeout)
                    for stream in list(self.trackers):  # a broker that lost its retained messages gets them back
                        self._publish_rules_state(stream)
                    if not first.done():
                        first.set_result(None)
                    await self._serve(client)
                    if self._closing.is_set():
                        await client.publish(self.topics.available, "offline", qos=self.options.qos, retain=True,
                                             timeout=self.options.publish_timeout)
                        log.info("MQTT: disconnected from %s (offline published)", self.broker.where)
                        return
            except Exception as exc:  # MqttError above all; anything else is logged and retried the same way
                if not isinstance(exc, aiomqtt.MqttError):
                    log.exception("MQTT: unexpected failure of the connection")
                reason = describe_mqtt_error(exc, self.broker)
                if not first.done():
                    if self.options.fail_fast:
                        raise BrokerError(reason) from None
                log.warning("MQTT: %s; reconnecting in %.1f s (%d messages waiting)", reason, delay, len(self.outbox))
            if self._closing.is_set():
                return
            try:
                await asyncio.wait_for(self._closing.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, self.options.reconnect_max)

    async def _serve(self, client) -> None:
        """Read and write until the connection breaks (MqttError) or the monitor closes and the outbox is flushed."""
        reader = asyncio.create_task(self._read(client))
        writer = asyncio.create_task(self._write(client))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raises the MqttError that broke the connection
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)

    async def _write(self, client) -> None:
        while True:
            if self._closing.is_set() and not len(self.outbox):
                return
            head = asyncio.create_task(self.outbox.head())
            closing = asyncio.create_task(self._closing.wait())
            await asyncio.wait({head, closing}, return_when=asyncio.FIRST_COMPLETED)
            closing.cancel()
            if not head.done():
                head.cancel()
                continue
            message = head.result()
            try:
                await client.publish(message.topic, message.payload, qos=self.options.qos, retain=message.retain,
                                     timeout=self.options.publish_timeout)
            finally:
                self.outbox.in_flight = None
            self.outbox.done(message)

    async def _read(self, client) -> None:
        async for message in client.messages:
            self._handle(str(message.topic), message.payload)

    # ---- inbound ----------------------------------------------------------------------------------------------
    def _handle(self, topic: str, payload: Any) -> None:
        """Validate one inbound message and hand it on; every problem becomes an error message, never an exception."""
        data = payload if isinstance(payload, (bytes, bytearray)) else str(payload if payload is not None else "").encode()
        if topic == self.topics.discovery_status:
            if bytes(data).strip() == b"online":
                for stream in list(self.trackers):
                    self._publish_rules_state(stream)
            return
        route = self.topics.parse(topic)
        if route is None:
            return  # not ours (a wildcard match on a topic we do not serve)
        stream, action = route
        if len(data) > self.options.max_payload:
            self._error(topic, "too_large", f"the payload has {len(data)} bytes; the limit is {self.options.max_payload}.")
            return
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            self._error(topic, ProtocolError.code, "the payload is not UTF-8 text.")
            return
        try:
            if action == "rules/set":
                request = parse_rule_set(text)
            elif action == "ask":
                request = parse_ask(text)
            else:
                request = parse_trigger(text)
        except VidmemError as exc:
            self._error(topic, exc.code, str(exc))
            return
        try:
            self._work.put_nowait((topic, stream, action, request))
        except asyncio.QueueFull:
            self.stats["busy"] += 1
            self._error(topic, "busy", "too many questions are waiting; try again later.", getattr(request, "id", None))

    async def _work_loop(self) -> None:
        """Questions, triggers and rule changes, one at a time (the VLM answers one question at a time anyway)."""
        while True:
            topic, stream, action, request = await self._work.get()
            try:
                if action == "rules/set":
                    await self._set_rule(stream, request)
                elif action == "ask":
                    await self._answer(stream, request)
                else:
                    await self._trigger(stream, request)
            except VidmemError as exc:
                self._error(topic, exc.code, str(exc), getattr(request, "id", None))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not take the monitor down: report it and keep serving
                log.exception("MQTT: handling %s failed", topic)
                self._error(topic, "internal", f"the request failed: {type(exc).__name__}: {exc}",
                            getattr(request, "id", None))

    async def _check_stream(self, stream: str, *, for_rules: bool = False) -> None:
        from vidmem.errors import UnknownStreamError
        from vidmem.memory import check_stream_name

        check_stream_name(stream)
        if stream in self.streams or stream in self.trackers:
            return
        if for_rules and self.options.allow_new_streams:
            return
        if await asyncio.to_thread(self.app.memory.has_stream, stream):
            self.streams.add(stream)
            return
        known = sorted(self.streams | set(s.name for s in await asyncio.to_thread(self.app.memory.streams)))
        raise UnknownStreamError(f"unknown stream '{stream}'; known streams: {', '.join(known) or 'none yet'}.")

    async def _answer(self, stream: str, request) -> None:
        await self._check_stream(stream)
        answer = await asyncio.to_thread(self.app.ask, request.question, streams=[stream], budget=request.budget)
        body = answer.to_json()
        self.stats["answers"] += 1
        self._publish(self.topics.answer(stream), {
            "id": request.id, "question": request.question, "answer": answer.text, "segments": body["segments"],
            "ts": time.time(), "visual_tokens": body["visual_tokens"], "seconds": body["seconds"],
        })

    async def _trigger(self, stream: str, request) -> None:
        """Look at the stream's last `window_seconds` and publish an event describing them."""
        await self._check_stream(stream)
        memory = self.app.memory
        last = await asyncio.to_thread(lambda: memory.last_segment(stream) if memory.has_stream(stream) else None)
        if last is None:
            raise VidmemError(f"stream '{stream}' holds no segments yet; nothing to look at.")
        until, since = last.end, last.end - request.window_seconds
        answer = await asyncio.to_thread(self.app.ask, request.prompt, streams=[stream], since=since, until=until,
                                         budget=self.options.trigger_budget)
        self._triggers += 1
        start = max(since, min((p.row.start for p in answer.picks), default=since))
        event = Event(
            id=f"{int(round(until * 1000))}-{stream}-trigger-{self._triggers}", stream=stream, rule="trigger",
            start_time=round(start, 3), end_time=round(until, 3), score=None, verified=None,
            description=answer.text.strip(), ref=last.id,
        )
        for kind in ("new", "end"):
            await self._emit(EventChange(kind, event), extra={"trigger_id": request.id, "prompt": request.prompt})

    async def _set_rule(self, stream: str, change) -> None:
        await self._check_stream(stream, for_rules=True)
        memory = self.app.memory
        if change.rule is None:
            removed = await asyncio.to_thread(memory.delete_rule, stream, change.delete_id)
            tracker = self.trackers.get(stream, {}).pop(change.delete_id, None)
            if not removed and tracker is None:
                raise ConfigError(f"stream '{stream}' has no rule '{change.delete_id}' to delete.")
            if tracker is not None:
                for c in tracker.close():
                    await self._emit(c)
            self._publish(self.topics.discovery_config(stream, change.delete_id), b"", retain=True)
            self._publish(self.topics.state(stream, change.delete_id), b"", retain=True)
        else:
            await asyncio.to_thread(memory.put_rule, stream, change.rule.to_dict())
            self._install(stream, change.rule)
        self._publish_rules_state(stream)
        log.info("MQTT: rules of %s are now %s", stream, ", ".join(self.trackers.get(stream, {})) or "none")

    # ---- rules and scoring ------------------------------------------------------------------------------------
    def _load_rules(self) -> None:
        """The memory's stored rules, then the file's (which replace stored ones with the same id, and are stored)."""
        memory = self.app.memory
        for stream, rule in self.file_rules:
            memory.put_rule(stream, rule.to_dict())
        for body in memory.rules():
            stream = body.pop("stream", None)
            try:
                rule = Rule.from_dict(body)
            except ConfigError as exc:  # stored by an older version, say: skip it, loudly
                log.warning("MQTT: ignoring the stored rule %r of %s: %s", body.get("id"), stream, exc)
                continue
            self._install(stream, rule)

    def _install(self, stream: str, rule: Rule) -> None:
        trackers = self.trackers.setdefault(stream, {})
        old = trackers.get(rule.id)
        if old is not None and old.rule == rule:
            return
        tracker = RuleTracker(rule, stream)
        if old is not None:  # keep an open event and the cooldown going across an edit of the same rule
            tracker.event, tracker.last_end, tracker.last_ts, tracker.counter = old.event, old.last_end, old.last_ts, old.counter
        trackers[rule.id] = tracker

    def _publish_rules_state(self, stream: str) -> None:
        trackers = self.trackers.get(stream, {})
        self._publish(self.topics.rules(stream), [t.rule.to_dict() for t in trackers.values()], retain=True)
        for rule_id, tracker in trackers.items():
            self._publish(self.topics.discovery_config(stream, rule_id),
                          discovery_payload(self.topics, stream, tracker.rule), retain=True)
            self._publish(self.topics.state(stream, rule_id), b"ON" if tracker.active else b"OFF", retain=True)

    async def _put_segment(self, item) -> None:
        try:
            await asyncio.wait_for(self._segments.put(item), timeout=self.options.segment_wait)
        except asyncio.TimeoutError:
            self._count_dropped_segment(item)

    def _put_segment_nowait(self, item) -> None:
        try:
            self._segments.put_nowait(item)
        except asyncio.QueueFull:
            self._count_dropped_segment(item)

    def _count_dropped_segment(self, item) -> None:
        self.stats["segments_dropped"] += 1
        log.warning("MQTT: scoring fell behind; segment %s of %s was not checked against the rules",
                    getattr(item[0], "id", "?"), getattr(item[0], "stream", "?"))

    async def _score_loop(self) -> None:
        while True:
            row, image = await self._segments.get()
            if row == "close":  # a source finished: end its open events once its segments are scored
                for tracker in list(self.trackers.get(image, {}).values()):
                    for change in tracker.close():
                        await self._emit(change)
                continue
            if not self.trackers.get(row.stream):
                continue
            try:
                await self._score(row, image)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("MQTT: scoring segment %s failed", row.id)
                self._error(f"{self.options.prefix}/{row.stream}", "internal", f"scoring a segment failed: {exc}")

    async def _score(self, row, image: np.ndarray) -> None:
        """CLIP similarity of each rule's condition with the keyframe; VLM verification of candidates if asked."""
        trackers = list(self.trackers.get(row.stream, {}).values())
        conditions = [t.rule.condition for t in trackers]
        image_vec, text_vecs = await asyncio.to_thread(self._embed, image, conditions)
        self.stats["segments_scored"] += 1
        for tracker, text_vec in zip(trackers, text_vecs):
            if self.trackers.get(row.stream, {}).get(tracker.rule.id) is not tracker:
                continue  # the rule was changed or deleted meanwhile
            score = float(np.dot(image_vec, text_vec))
            verified = None
            if tracker.rule.verify and tracker.is_candidate(row.start, score):
                verified = await asyncio.to_thread(self._verify, tracker.rule, row)
            for change in tracker.observe(row.start, score, verified, end=row.end, ref=row.id):
                await self._emit(change)

    def _embed(self, image: np.ndarray, conditions: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        embedder = self.app.embedder
        with self._embed_lock:  # one embedder call at a time from the monitor (the ingest worker has its own)
            image_vec = np.asarray(embedder.embed_images([image])[0], dtype=np.float32)  # (E,)
            missing = [c for c in dict.fromkeys(conditions) if c not in self._text_cache]
            if missing:
                for condition, vec in zip(missing, embedder.embed_texts(missing)):  # (M, E)
                    self._text_cache[condition] = np.asarray(vec, dtype=np.float32)
        return image_vec, [self._text_cache[c] for c in conditions]

    def _verify(self, rule: Rule, row) -> bool:
        """A yes/no question to the VLM restricted to the segment's time range."""
        try:
            answer = self.app.ask(VERIFY_PROMPT.format(condition=rule.condition), streams=[row.stream],
                                  since=row.start, until=row.end, budget=self.options.verify_budget)
        except VidmemError as exc:
            log.warning("MQTT: verifying rule %s on segment %s failed: %s", rule.id, row.id, exc)
            return False
        return answer.text.strip().lower().lstrip("\"'*").startswith("yes")

    # ---- sources ------------------------------------------------------------------------------------------------
    async def _ingest(self, name: str, source: Any, stop: asyncio.Event) -> None:
        """Ingest one source until it ends or `stop`; a source that ends or fails leaves the monitor running."""
        from vidmem.stream import IngestOptions, open_source

        try:
            if isinstance(source, (str, Path)):
                source = await asyncio.to_thread(open_source, str(source))
            report = await self.app.ingest(source, stream=name, options=IngestOptions(fps=self.options.fps), stop=stop,
                                           on_segment=self.on_segment)
            log.info("source %s finished: %d segments, %.1f s of video", name, report.segments, report.video_seconds)
        except VidmemError as exc:
            log.error("source %s failed: %s", name, exc)
            self._error(f"{self.options.prefix}/{name}", exc.code, f"source '{name}': {exc}")
        finally:
            if not stop.is_set():
                await self._segments.put(("close", name))

    # ---- outbound -----------------------------------------------------------------------------------------------
    async def _emit(self, change: EventChange, *, extra: dict | None = None) -> None:
        """Persist, publish on <prefix>/events, set the rule's ON/OFF state, tell the live server."""
        event = change.event
        snapshot = await asyncio.to_thread(self._snapshot, event.ref) if self.options.snapshots else None
        body = change.to_json()
        body["event"]["snapshot"] = snapshot
        if extra:
            body["event"].update(extra)
        stored = {**body["event"], "snapshot": None, "segment": event.ref, "status": change.type}
        try:
            await asyncio.to_thread(self.app.memory.add_event, stored)
        except VidmemError as exc:
            log.warning("MQTT: could not store event %s: %s", event.id, exc)
        self.stats["events"] += 1
        self._publish(self.topics.events, body, event=True)
        if event.rule in self.trackers.get(event.stream, {}) and change.type in ("new", "end"):
            self._publish(self.topics.state(event.stream, event.rule), b"ON" if change.type == "new" else b"OFF",
                          retain=True)
        if self.on_event is not None:
            try:
                self.on_event(event.stream, body)
            except Exception:  # the server's hook must not break the monitor
                log.exception("MQTT: the on_event hook failed")

    def _snapshot(self, segment_id: Any) -> str | None:
        if not isinstance(segment_id, int):
            return None
        if segment_id not in self._snapshots:
            try:
                data = self.app.memory.keyframe_jpeg(segment_id)
            except VidmemError:
                data = None
            if len(self._snapshots) > 64:
                self._snapshots.pop(next(iter(self._snapshots)))
            self._snapshots[segment_id] = base64.b64encode(data).decode("ascii") if data else None
        return self._snapshots[segment_id]

    def _publish(self, topic: str, payload: Any, *, retain: bool = False, event: bool = False) -> None:
        if not isinstance(payload, (bytes, bytearray)):
            payload = json.dumps(payload, separators=(",", ":"), allow_nan=False,
                                 default=lambda o: None if isinstance(o, float) and not math.isfinite(o) else str(o)).encode()
        self.outbox.put(Outgoing(topic, bytes(payload), retain=retain, event=event))

    def _error(self, topic: str, code: str, message: str, request_id: str | None = None) -> None:
        self.stats["errors"] += 1
        log.warning("MQTT: %s: %s (%s)", topic, message, code)
        body = {"topic": topic, "code": code, "message": message}
        if request_id is not None:
            body["id"] = request_id
        self._publish(self.topics.errors, body)


try:  # the exception types a closing connection task may end with
    from aiomqtt import MqttError as _MqttError

    MqttErrorTypes: tuple = (_MqttError, VidmemError)
except ImportError:  # pragma: no cover - aiomqtt is a dependency
    MqttErrorTypes = (VidmemError,)


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def describe_mqtt_error(exc: Exception, broker: BrokerConfig) -> str:
    """One sentence for a connection failure: unreachable, refused credentials, not authorised, or lost."""
    import aiomqtt

    text = str(exc)
    if isinstance(exc, aiomqtt.MqttCodeError) and getattr(exc, "rc", None) is not None:
        rc = exc.rc
        value = getattr(rc, "value", rc)
        reason = str(rc) if not isinstance(rc, int) else text
        if value in (4, 5, 134, 135):
            who = f"user '{broker.username}'" if broker.username else "an anonymous client"
            return f"the MQTT broker at {broker.where} refused the credentials of {who} ({reason})"
        return f"the MQTT broker at {broker.where} refused the connection ({reason})"
    if "Disconnected" in text or "timed out" in text.lower():
        return f"lost the connection to the MQTT broker at {broker.where} ({text})"
    return f"cannot reach the MQTT broker at {broker.where} ({text})"


# ---- hookups ---------------------------------------------------------------------------------------------------
class LiveMonitor:
    """`vidmem serve --mqtt`: a Monitor over the live server's websocket streams, as an async context manager.

    Entering connects (a broker that cannot be reached raises BrokerError) and registers the hooks: the server's
    `on_segment` callbacks feed the rules, and events go to the stream's websocket clients via `publish_event`.
    """

    def __init__(self, server, monitor: Monitor) -> None:
        self.server = server
        self.monitor = monitor
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def _segment(self, stream: str, row, segment) -> None:
        self.monitor.on_segment(row, segment)

    async def __aenter__(self) -> LiveMonitor:
        self.monitor.ready = asyncio.Event()
        self._task = asyncio.create_task(self.monitor.run(self._stop), name="mqtt-monitor")
        ready = asyncio.create_task(self.monitor.ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            ready.cancel()
            self._task.result()  # raises BrokerError / ConfigError
        self.server.on_segment.append(self._segment)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._segment in self.server.on_segment:
            self.server.on_segment.remove(self._segment)
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def attach_live(server, args) -> LiveMonitor:
    """The monitor for `vidmem serve --mqtt URL [--rules FILE]` (rules may name streams that connect later)."""
    rules = load_rules_file(args.rules) if getattr(args, "rules", None) else []
    options = MonitorOptions(prefix=getattr(args, "prefix", None) or "vidmem", allow_new_streams=True,
                             client_id=getattr(args, "mqtt_client_id", None))
    monitor = Monitor(server.app, args.mqtt, rules=rules, options=options, on_event=server.publish_event,
                      ca_file=getattr(args, "mqtt_ca", None), insecure=bool(getattr(args, "mqtt_insecure", False)))
    return LiveMonitor(server, monitor)


async def probe_broker(broker: BrokerConfig, options: MonitorOptions) -> None:
    """Connect once and leave (a throwaway clean session): an unreachable broker or refused credentials raise
    BrokerError before any model loads or the memory is touched."""
    import aiomqtt

    client = aiomqtt.Client(
        broker.host, broker.port, username=broker.username, password=broker.password, clean_session=True,
        timeout=options.connect_timeout, tls_context=Monitor._tls_context(broker),
        tls_insecure=True if broker.tls and broker.insecure else None,
    )
    try:
        async with client:
            pass
    except aiomqtt.MqttError as exc:
        raise BrokerError(describe_mqtt_error(exc, broker)) from None


# ---- the CLI entry point --------------------------------------------------------------------------------------
def monitor_main(args, settings) -> int:
    """`vidmem monitor`: check everything the user gave, load the models, connect, then ingest and watch."""
    from vidmem.agents.cluster import open_app
    from vidmem.stream import open_source

    options = MonitorOptions(
        prefix=args.prefix, client_id=getattr(args, "mqtt_client_id", None),
        reconnect_max=getattr(args, "reconnect_max", 30.0) or 30.0, fps=getattr(args, "fps", 1.0) or 1.0,
    )
    ca_file, insecure = getattr(args, "mqtt_ca", None), bool(getattr(args, "mqtt_insecure", False))
    parse_mqtt_url(args.mqtt, ca_file=ca_file, insecure=insecure)  # a bad URL fails before any model loads
    rules = load_rules_file(args.rules) if args.rules else []
    specs = parse_source_args(args.source)
    sources = {name: open_source(url) for name, url in specs.items()}  # a missing file fails here
    asyncio.run(probe_broker(parse_mqtt_url(args.mqtt, ca_file=ca_file, insecure=insecure), options))
    app = open_app(settings, address=getattr(args, "ray", None))  # --ray: on the cluster
    try:
        app.load_models()
        monitor = Monitor(app, args.mqtt, prefix=options.prefix, rules=rules, sources=sources, options=options,
                          ca_file=ca_file, insecure=insecure)

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await monitor.run(stop)

        asyncio.run(main())
    finally:
        app.close()
    return 0
