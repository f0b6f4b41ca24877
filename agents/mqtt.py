"""The MQTT transport: a broker connection that outlives outages, apart from what the monitor does with it.

`MqttLink` holds one connection (aiomqtt, QoS 1, a persistent session under a fixed client id, the retained
`offline` availability as last will, `online` on each connect). Everything sent goes through a bounded `Outbox`
that outlives the connection: while the broker is away, messages wait there and are delivered after the
reconnect (an explicit loop with exponential backoff). Incoming messages go to one callback; what they mean is the
monitor's business (agents/monitor.py), as is what to republish after a reconnect (another callback).
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from vidmem.errors import BrokerError, ConfigError, VidmemError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


# ---- where the broker is ------------------------------------------------------------------------------------------
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


def tls_context(b: BrokerConfig) -> ssl.SSLContext | None:
    """The TLS context for an mqtts:// broker (its CA file, or nothing checked with `insecure`); None for mqtt://."""
    if not b.tls:
        return None
    context = ssl.create_default_context(cafile=str(b.ca_file) if b.ca_file else None)
    if b.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


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


# ---- the link -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkOptions:
    """How the link talks to the broker (the monitor fills it from MonitorOptions)."""

    client_id: str
    available: str  # the availability topic: `online` on connect, `offline` as last will and on a clean close
    subscriptions: tuple[str, ...]
    qos: int = 1
    keepalive: int = 30
    connect_timeout: float = 10.0
    publish_timeout: float = 10.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    fail_fast: bool = True  # the first connection failing raises BrokerError instead of retrying


class MqttLink:
    """One broker connection kept up for as long as `run` runs; messages in go to `on_message(topic, payload)`,
    `on_connect()` runs after each (re)connect (to republish retained state), messages out wait in `outbox`."""

    def __init__(self, broker: BrokerConfig, options: LinkOptions, outbox: Outbox, *,
                 on_message: Callable[[str, Any], None], on_connect: Callable[[], None] | None = None) -> None:
        self.broker = broker
        self.options = options
        self.outbox = outbox
        self.on_message = on_message
        self.on_connect = on_connect
        self.connects = 0
        self._closing = asyncio.Event()

    def _client(self):
        import aiomqtt

        b, o = self.broker, self.options
        return aiomqtt.Client(
            b.host, b.port, username=b.username, password=b.password, identifier=o.client_id,
            clean_session=False,  # persistent session: the broker keeps our subscriptions and queued questions
            will=aiomqtt.Will(o.available, "offline", qos=o.qos, retain=True),
            keepalive=o.keepalive, timeout=o.connect_timeout, tls_context=tls_context(b),
            tls_insecure=True if b.tls and b.insecure else None, logger=logging.getLogger(__name__ + ".paho"),
        )

    async def run(self, first: asyncio.Future, closing: asyncio.Event) -> None:
        """Connect, serve, and on any failure wait and reconnect (exponential backoff up to reconnect_max), until
        `closing` is set and the outbox is flushed (then `offline` is published). `first` is resolved on the first
        connection; with `fail_fast`, a first connection that fails raises BrokerError."""
        import aiomqtt

        self._closing = closing
        o = self.options
        delay = o.reconnect_min
        while not closing.is_set():
            try:
                async with self._client() as client:
                    self.connects += 1
                    delay = o.reconnect_min
                    log.info("MQTT: connected to %s as %s", self.broker.where, o.client_id)
                    await client.subscribe([(t, o.qos) for t in o.subscriptions], timeout=o.publish_timeout)
                    await client.publish(o.available, "online", qos=o.qos, retain=True, timeout=o.publish_timeout)
                    if self.on_connect is not None:  # a broker that lost its retained messages gets them back
                        self.on_connect()
                    if not first.done():
                        first.set_result(None)
                    await self._serve(client)
                    if closing.is_set():
                        await client.publish(o.available, "offline", qos=o.qos, retain=True,
                                             timeout=o.publish_timeout)
                        log.info("MQTT: disconnected from %s (offline published)", self.broker.where)
                        return
            except Exception as exc:  # MqttError above all; anything else is logged and retried the same way
                if not isinstance(exc, aiomqtt.MqttError):
                    log.exception("MQTT: unexpected failure of the connection")
                reason = describe_mqtt_error(exc, self.broker)
                if not first.done() and o.fail_fast:
                    raise BrokerError(reason) from None
                log.warning("MQTT: %s; reconnecting in %.1f s (%d messages waiting)", reason, delay, len(self.outbox))
            if closing.is_set():
                return
            try:
                await asyncio.wait_for(closing.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, o.reconnect_max)

    async def _serve(self, client) -> None:
        """Read and write until the connection breaks (MqttError) or the link closes and the outbox is flushed."""
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
        closing = self._closing
        while True:
            if closing.is_set() and not len(self.outbox):
                return
            head = asyncio.create_task(self.outbox.head())
            waiting = asyncio.create_task(closing.wait())
            await asyncio.wait({head, waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
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
            self.on_message(str(message.topic), message.payload)


try:  # the exception types a closing connection task may end with
    from aiomqtt import MqttError as _MqttError

    MqttErrorTypes: tuple = (_MqttError, VidmemError)
except ImportError:  # pragma: no cover - aiomqtt is a dependency
    MqttErrorTypes = (VidmemError,)


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


async def probe_broker(broker: BrokerConfig, options: Any) -> None:
    """Connect once and leave (a throwaway clean session): an unreachable broker or refused credentials raise
    BrokerError before any model loads or the memory is touched."""
    import aiomqtt

    client = aiomqtt.Client(
        broker.host, broker.port, username=broker.username, password=broker.password, clean_session=True,
        timeout=options.connect_timeout, tls_context=tls_context(broker),
        tls_insecure=True if broker.tls and broker.insecure else None,
    )
    try:
        async with client:
            pass
    except aiomqtt.MqttError as exc:
        raise BrokerError(describe_mqtt_error(exc, broker)) from None
