"""MQTT event monitoring: watch rules over new segments, questions and triggers over MQTT, Home Assistant discovery.

    vidmem monitor --mqtt mqtt://user:pass@broker:1883 --rules rules.yaml --source porch=rtsp://cam/stream

One `Monitor` is the behaviour: what a question, a trigger, a rule change or a committed segment leads to, and what
is published. The transport is `vidmem.agents.mqtt` (`MqttLink`: one broker connection with a persistent session,
the retained `offline` last will, and a bounded outbox that outlives the connection, so events queued while the
broker is away are delivered after the reconnect). The rule lifecycle itself is pure logic in
`vidmem.agents.rules`; model work goes through the app's scheduler (`vidmem.agents.scheduler`).

Topics (DESIGN.md, "MQTT"): `<prefix>/available`, `<prefix>/<stream>/ask` -> `<prefix>/<stream>/answer`,
`<prefix>/<stream>/trigger`, `<prefix>/<stream>/rules/set` -> `<prefix>/<stream>/rules` (retained),
`<prefix>/events`, `<prefix>/errors`, `<prefix>/<stream>/rule/<id>/state` (ON/OFF, retained), the sources' state
`<prefix>/<stream>/state` (retained) and the Home Assistant discovery configs under `homeassistant/binary_sensor/`.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

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
from vidmem.agents.mqtt import (  # noqa: F401 - re-exported: the transport's names, where they used to be
    DEFAULT_PORTS,
    BrokerConfig,
    LinkOptions,
    MqttErrorTypes,
    MqttLink,
    Outbox,
    Outgoing,
    describe_mqtt_error,
    parse_mqtt_url,
    probe_broker,
)
from vidmem.agents.scheduler import Priority
from vidmem.errors import ConfigError, ProtocolError, VidmemError

log = logging.getLogger(__name__)

VERIFY_PROMPT = "Answer with yes or no only. Is the following true in this video: {condition}?"


# ---- configuration --------------------------------------------------------------------------------------------
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
    verify_segments: int = 4  # the newest segments of an event a verification question looks at
    trigger_budget: int = 6000  # visual tokens for a trigger's description
    snapshots: bool = True  # attach the keyframe JPEG (base64) to events
    fps: float = 1.0  # sampled frames per second for --source ingest
    source_backoff_max: float = 30.0  # seconds: the longest wait between a lost source's reconnection attempts
    source_backoff_min: float = 0.5  # seconds before a lost source's first reconnection attempt
    token_dtype: str = "float16"  # how --source ingest stores tokens (the app's setting decides; kept for messages)
    allow_new_streams: bool = False  # accept rules for streams not seen yet (the live server's future cameras)

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ConfigError(f"the MQTT prefix {self.prefix!r} must be non-empty, without '+', '#' or outer '/'.")
        if self.qos not in (0, 1, 2):
            raise ConfigError(f"qos must be 0, 1 or 2, got {self.qos}.")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ConfigError("reconnect_min must be positive and at most reconnect_max.")
        if not 0 < self.source_backoff_min <= self.source_backoff_max:
            raise ConfigError("source_backoff_min must be positive and at most source_backoff_max.")


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


# ---- the monitor ----------------------------------------------------------------------------------------------
KNOWN_STREAMS = 4096  # stream names the monitor remembers beside the memory's


class RecentNames:
    """A set of at most `limit` names; adding one past the limit forgets the least recently added or seen."""

    def __init__(self, limit: int, names=()) -> None:
        self.limit = limit
        self._names: collections.OrderedDict[str, None] = collections.OrderedDict()
        for name in names:
            self.add(name)

    def add(self, name: str) -> None:
        self._names[name] = None
        self._names.move_to_end(name)
        while len(self._names) > self.limit:
            self._names.popitem(last=False)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def __or__(self, other: set[str]) -> set[str]:
        return set(self._names) | set(other)


class Monitor:
    """Watch rules, questions and triggers over MQTT for one vidmem deployment.

    `run(stop)` connects, ingests the given sources and serves until `stop` is set. With an app on a Ray cluster
    (`monitor --ray`: one with `watch_sources`), the sources run as actors there and send back their committed
    rows with the frames' embeddings, scored here all the same (`_ingest_on_cluster`). The live server attaches
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
        # streams known besides the memory's (sources, cameras connected but not yet committed): the most recent
        # KNOWN_STREAMS names, so clients inventing names cannot grow it; the memory answers for the rest
        self.streams = RecentNames(KNOWN_STREAMS, self.sources)
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

    def on_source_status(self, stream: str, status, node: str | None = None) -> None:
        """A source's state changed (any thread): publish it, retained, on `<prefix>/<stream>/state` (with the Ray
        node that runs the source, for `monitor --ray`)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        body = status.to_json()
        if node is not None:
            body["node"] = node
        try:
            loop.call_soon_threadsafe(self._publish, self.topics.source_state(stream), body, True)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def on_segment(self, row, segment) -> None:
        """A segment was committed (called from the ingest worker thread): queue it for scoring.

        From a worker thread this waits for room (a file source slows down rather than skipping rules); from
        the event loop's own thread, or after `segment_wait` seconds, a segment that finds no room is dropped
        and counted.
        """
        loop = self._loop
        if loop is None or self._segments is None or loop.is_closed():
            return
        item = (row, [frame.image for frame in segment.frames], None)  # every frame: a rule scores the whole segment
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
        link = MqttLink(self.broker, LinkOptions(
            client_id=self.client_id, available=self.topics.available, subscriptions=tuple(self.topics.subscriptions()),
            qos=self.options.qos, keepalive=self.options.keepalive, connect_timeout=self.options.connect_timeout,
            publish_timeout=self.options.publish_timeout, reconnect_min=self.options.reconnect_min,
            reconnect_max=self.options.reconnect_max, fail_fast=self.options.fail_fast,
        ), self.outbox, on_message=self._handle, on_connect=self._connected)
        connection = asyncio.create_task(link.run(first, self._closing), name="mqtt-connection")
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
                if self.sources and hasattr(self.app, "watch_sources"):  # monitor --ray: sources as actors
                    ingests.append(asyncio.create_task(self._ingest_on_cluster(stop), name="ingest-cluster"))
                else:
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
    def _connected(self) -> None:
        """After each (re)connect: count it, and republish the retained rule states a broker may have lost."""
        self.stats["connects"] += 1
        for stream in list(self.trackers):
            self._publish_rules_state(stream)

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
        if request.conversation is not None:
            call = functools.partial(self.app.ask_conversation, request.conversation, request.question,
                                     streams=[stream], budget=request.budget)
        else:
            call = functools.partial(self.app.ask, request.question, streams=[stream], budget=request.budget)
        answer = await self._model(Priority.INTERACTIVE, call)
        body = answer.to_json()
        self.stats["answers"] += 1
        self._publish(self.topics.answer(stream), {
            "id": request.id, "question": request.question, "answer": answer.text, "segments": body["segments"],
            "ts": time.time(), "visual_tokens": body["visual_tokens"], "seconds": body["seconds"],
            "conversation": request.conversation, "prefill_tokens": body["prefill_tokens"],
            "cached_tokens": body["cached_tokens"],
        })

    async def _trigger(self, stream: str, request) -> None:
        """Look at the stream's last `window_seconds` and publish an event describing them."""
        await self._check_stream(stream)
        memory = self.app.memory
        last = await asyncio.to_thread(lambda: memory.last_segment(stream) if memory.has_stream(stream) else None)
        if last is None:
            raise VidmemError(f"stream '{stream}' holds no segments yet; nothing to look at.")
        until, since = last.end, last.end - request.window_seconds
        answer = await self._model(Priority.INTERACTIVE, functools.partial(
            self.app.ask, request.prompt, streams=[stream], since=since, until=until, budget=self.options.trigger_budget))
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

    async def _model(self, priority: Priority, call: Callable[[], Any]) -> Any:
        """Run model work through the app's scheduler (BusyError when its queue for `priority` is full)."""
        return await asyncio.wrap_future(self.app.scheduler.submit(priority, call))

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
            row, images, vectors = await self._segments.get()  # (row, frame images or None, (T, E) or None)
            try:
                if row == "close":  # a source finished: end its open events once its segments are scored
                    for tracker in list(self.trackers.get(images, {}).values()):
                        for change in tracker.close():
                            await self._emit(change)
                    continue
                if not self.trackers.get(row.stream):
                    continue
                try:
                    await self._score(row, images, vectors)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.exception("MQTT: scoring segment %s failed", row.id)
                    self._error(f"{self.options.prefix}/{row.stream}", "internal", f"scoring a segment failed: {exc}")
            finally:
                self._segments.task_done()  # `join` waits for the segments queued so far (monitor --ray's stop)

    async def _score(self, row, images: list[np.ndarray] | None, vectors: np.ndarray | None = None) -> None:
        """CLIP similarity of each rule's condition with every frame of the segment (its best frame counts: an
        object seen in one of them is in the segment); VLM verification of candidates if asked.

        The frames come as images (embedded here) or, from a source actor on a cluster, already embedded by the
        encoder pool as `vectors` (T, E)."""
        trackers = list(self.trackers.get(row.stream, {}).values())
        conditions = [t.rule.condition for t in trackers]
        image_vecs, text_vecs = await asyncio.to_thread(self._embed, images, conditions, vectors)
        self.stats["segments_scored"] += 1
        for tracker, text_vec in zip(trackers, text_vecs):
            if self.trackers.get(row.stream, {}).get(tracker.rule.id) is not tracker:
                continue  # the rule was changed or deleted meanwhile
            score = float(np.max(image_vecs @ text_vec))  # (T, E) @ (E,) -> (T,): the segment's best frame
            verified = probability = None
            if tracker.rule.verify and tracker.is_candidate(row.start, score):
                try:
                    probability = await self._model(Priority.VERIFY, functools.partial(self._verify, tracker, row))
                except VidmemError as exc:  # busy: the segment counts as unverified
                    log.warning("MQTT: no verification of rule %s on segment %s: %s", tracker.rule.id, row.id, exc)
                verified = None if probability is None else probability >= 0.5
            for change in tracker.observe(row.start, score, verified, end=row.end, ref=row.id,
                                          probability=probability):
                await self._emit(change)

    def _embed(self, images: list[np.ndarray] | None, conditions: list[str],
               vectors: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        embedder = self.app.embedder
        with self._embed_lock:  # one embedder call at a time from the monitor (the ingest worker has its own)
            if vectors is None:
                vectors = embedder.embed_images(images)
            image_vecs = np.asarray(vectors, dtype=np.float32)  # (T, E)
            missing = [c for c in dict.fromkeys(conditions) if c not in self._text_cache]
            if missing:
                if len(self._text_cache) > 256:  # conditions come and go with rule edits: keep it bounded
                    self._text_cache.clear()
                for condition, vec in zip(missing, embedder.embed_texts(missing)):  # (M, E)
                    self._text_cache[condition] = np.asarray(vec, dtype=np.float32)
        return image_vecs, [self._text_cache[c] for c in conditions]

    def event_rows(self, tracker: RuleTracker, row) -> list:
        """The segments of the event `row` would belong to: from where the condition started holding (or `row`
        itself) to `row`, nothing before or after, at most the newest `verify_segments`."""
        since = tracker.span_start if tracker.span_start is not None else row.start
        rows = [r for r in self.app.memory.segments(stream=row.stream, since=since, until=row.end)
                if r.start >= since and r.end <= row.end]
        return rows[-self.options.verify_segments:] or [row]

    def _verify(self, tracker: RuleTracker, row) -> float | None:
        """P(yes) of a yes/no question to the VLM over exactly the event's segments (the stretch the condition has
        held so far, up to `row`; at most `verify_segments` of the newest), from the model's probabilities for
        the two answers; None when it cannot be asked."""
        from vidmem.agents.select import Level, Pick

        try:
            picks = [Pick(r, Level.FULL, 0.0, "verify") for r in self.event_rows(tracker, row)]
            return self.app.yes_probability(VERIFY_PROMPT.format(condition=tracker.rule.condition), picks)
        except VidmemError as exc:
            log.warning("MQTT: verifying rule %s on segment %s failed: %s", tracker.rule.id, row.id, exc)
            return None

    # ---- sources ------------------------------------------------------------------------------------------------
    async def _ingest(self, name: str, source: Any, stop: asyncio.Event) -> None:
        """Ingest one source until it ends or `stop`; a source that ends or fails leaves the monitor running."""
        from vidmem.stream import IngestOptions, open_source

        try:
            if isinstance(source, (str, Path)):
                source = await asyncio.to_thread(open_source, str(source), backoff=self.source_backoff())
            report = await self.app.ingest(source, stream=name, options=IngestOptions(fps=self.options.fps), stop=stop,
                                           on_segment=self.on_segment, on_status=self.on_source_status)
            log.info("source %s finished: %d segments, %.1f s of video", name, report.segments, report.video_seconds)
        except VidmemError as exc:
            log.error("source %s failed: %s", name, exc)
            self._error(f"{self.options.prefix}/{name}", exc.code, f"source '{name}': {exc}")
        finally:
            if not stop.is_set():
                await self._segments.put(("close", name, None))

    async def _ingest_on_cluster(self, stop: asyncio.Event) -> None:
        """`monitor --ray`: every source runs as an actor on any node of the cluster (agents/cluster.py) and sends
        back its committed rows with their frames' embeddings and its state changes, scored and published here as
        a local source's. On `stop` the actors commit their segment in flight; this returns once those are scored."""
        from vidmem.stream import IngestOptions

        sources = await asyncio.to_thread(
            self.app.watch_sources, {name: str(url) for name, url in self.sources.items()},
            ingest_options=IngestOptions(fps=self.options.fps), backoff=self.source_backoff(),
            queue_size=self.options.segment_queue, feed_wait=self.options.segment_wait)
        try:
            async with contextlib.aclosing(sources.messages(stop)) as messages:
                async for kind, name, *rest in messages:
                    if kind == "segment":
                        await self._segments.put((rest[0], None, rest[1]))  # waits for room; so does the actor
                    elif kind == "status":
                        self.on_source_status(name, rest[0], node=rest[1])
                    elif kind == "finished":
                        report, error = rest
                        if error is not None:
                            log.error("source %s failed: %s", name, error)
                            self._error(f"{self.options.prefix}/{name}", error.code, f"source '{name}': {error}")
                        else:
                            log.info("source %s finished on node %s: %d segments, %.1f s of video", name,
                                     report["node"], report["segments"], report["video_seconds"])
                        if not stop.is_set():
                            await self._segments.put(("close", name, None))
            await self._segments.join()  # the segments committed before the stop are scored before events close
        finally:
            await asyncio.to_thread(sources.close)

    def source_backoff(self):
        """How the monitor's cameras reconnect: forever, from the first connection on (a camera may be down when
        the monitor starts), waiting at most `source_backoff_max` seconds between attempts."""
        from vidmem.stream import Backoff

        return Backoff(initial=self.options.source_backoff_min, cap=self.options.source_backoff_max, retry_first=True)

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

    def _publish(self, topic: str, payload: Any, retain: bool = False, *, event: bool = False) -> None:
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


YES_WORDS = ("yes", "Yes", " yes", " Yes", "YES")
NO_WORDS = ("no", "No", " no", " No", "NO")


def yes_probability(app, question: str, picks: list) -> float:
    """P(yes) / (P(yes) + P(no)) for the first token of the answer to `question` over exactly `picks`.

    The prompt is the VLM adapter's own (`prompt_embeds`: the checkpoint's chat template around the timestamped
    evidence and the question, generation prompt included); the probabilities of the spellings of "yes" and of
    "no" (their first tokens) are summed from the language model's logits after it. Nothing is generated or parsed.
    """
    import torch

    vlm = app.vlm

    def first_ids(words: tuple[str, ...]) -> list[int]:
        return sorted({int(vlm.ids(w)[0]) for w in words if vlm.count_tokens(w)})

    yes, no = first_ids(YES_WORDS), first_ids(NO_WORDS)
    answerer = app.answerer
    with answerer.lock, torch.inference_mode():
        evidence, _ = answerer.evidence(picks, app.memory.read_tokens)
        logits = vlm.forward(vlm.prompt_embeds(question, evidence))[0].float()  # (vocab,)
    probs = torch.softmax(logits, dim=-1)
    p_yes, p_no = float(probs[yes].sum()), float(probs[no].sum())
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


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

    def _status(self, stream: str, status) -> None:
        self.monitor.on_source_status(stream, status)

    async def __aenter__(self) -> LiveMonitor:
        self.monitor.ready = asyncio.Event()
        self._task = asyncio.create_task(self.monitor.run(self._stop), name="mqtt-monitor")
        ready = asyncio.create_task(self.monitor.ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            ready.cancel()
            self._task.result()  # raises BrokerError / ConfigError
        self.server.on_segment.append(self._segment)
        self.server.on_status.append(self._status)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._segment in self.server.on_segment:
            self.server.on_segment.remove(self._segment)
        if self._status in self.server.on_status:
            self.server.on_status.remove(self._status)
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


# ---- the CLI entry point --------------------------------------------------------------------------------------
def monitor_main(args, settings) -> int:
    """`vidmem monitor`: check everything the user gave, load the models, connect, then ingest and watch."""
    from vidmem.agents.cluster import open_app
    from vidmem.agents.service import run_service
    from vidmem.stream import Backoff, open_source

    options = MonitorOptions(
        prefix=args.prefix, client_id=getattr(args, "mqtt_client_id", None),
        reconnect_max=getattr(args, "reconnect_max", 30.0) or 30.0, fps=getattr(args, "fps", 1.0) or 1.0,
        source_backoff_max=getattr(args, "source_backoff_max", 30.0) or 30.0,
        source_backoff_min=min(0.5, getattr(args, "source_backoff_max", 30.0) or 30.0),
    )
    ca_file, insecure = getattr(args, "mqtt_ca", None), bool(getattr(args, "mqtt_insecure", False))
    parse_mqtt_url(args.mqtt, ca_file=ca_file, insecure=insecure)  # a bad URL fails before any model loads
    rules = load_rules_file(args.rules) if args.rules else []
    specs = parse_source_args(args.source)
    backoff = Backoff(initial=min(options.source_backoff_min, options.source_backoff_max),
                      cap=options.source_backoff_max, retry_first=True)
    sources = {name: open_source(url, backoff=backoff) for name, url in specs.items()}  # a missing file fails here
    asyncio.run(probe_broker(parse_mqtt_url(args.mqtt, ca_file=ca_file, insecure=insecure), options))
    app = open_app(settings, address=getattr(args, "ray", None))  # --ray: on the cluster
    if hasattr(app, "watch_sources"):  # each source runs as an actor on the cluster, which opens it there
        asyncio.run(_close_all(sources.values()))
        sources = {name: _node_independent(url) for name, url in specs.items()}
    monitor = Monitor(app, args.mqtt, prefix=options.prefix, rules=rules, sources=sources, options=options,
                      ca_file=ca_file, insecure=insecure)

    async def main(stop: asyncio.Event) -> int:
        await monitor.run(stop)
        return 0

    return run_service(app, main, exit_process=True)


async def _close_all(sources) -> None:
    await asyncio.gather(*(source.aclose() for source in sources))


def _node_independent(spec: str) -> str:
    """A source as every node of a cluster names it: a relative file path made absolute (on shared storage)."""
    if "://" in spec or spec.startswith(("camera:", "/dev/")):
        return spec
    return str(Path(spec).resolve())
