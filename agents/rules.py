"""Watch rules and their events, with no I/O: validation, the event lifecycle, and the MQTT message formats.

A rule ("a person is at the front door") is scored against each new segment of its stream (CLIP text-image
similarity over every frame of the segment, its best frame counting, optionally verified by a yes/no question to
the VLM); `RuleTracker` turns that sequence of (time, score, verified) observations into Frigate-style event
changes: `new` once the condition has held for `min_duration` seconds, `update` while it keeps holding (end time
and best score grow), `end` at the first segment where it no longer holds, and no new event for `cooldown`
seconds after an end.

Holding has hysteresis: a score must reach `threshold` to start, and the condition keeps holding until the score
drops below `exit_threshold` (lower), so one dip of noise does not end an event. Each tracker calibrates its
scores against the stream's own recent footage: the calibrated score is the raw score minus the median raw score
of the last `CALIBRATION_WINDOW` segments for this condition (CLIP gives every scene its own baseline similarity
to any sentence). A rule with `calibrate: true` compares its thresholds with the calibrated score (a margin above
the stream's baseline) and holds nothing until `CALIBRATION_MIN` segments were seen; events carry both scores.

The monitor (agents/monitor.py) connects this to the memory, the models and the broker; everything here is
plain data in, plain data out, so it is tested with controlled scores.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vidmem.errors import ConfigError, ProtocolError

# A rule id becomes part of MQTT topics and of a Home Assistant object id: no '/', '+', '#' or spaces.
RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_CONDITION_CHARS = 500  # a condition is one sentence for CLIP (77 tokens) and the VLM, not a document
MAX_QUESTION_CHARS = 2000  # questions arriving over MQTT
MAX_BUDGET = 100_000  # visual tokens; far above what any context holds, it only catches nonsense values
MAX_WINDOW_SECONDS = 3600.0  # a trigger looks at most at the last hour
DEFAULT_WINDOW_SECONDS = 10.0  # a trigger's default look-back
DEFAULT_TRIGGER_PROMPT = "Describe what is happening in these moments."

RULE_KEYS = ("id", "condition", "threshold", "exit_threshold", "min_duration", "cooldown", "verify", "calibrate")
RULE_DEFAULTS = {"threshold": 0.25, "exit_threshold": None, "min_duration": 0.0, "cooldown": 30.0, "verify": False,
                 "calibrate": False}
HYSTERESIS = 0.02  # default gap between the enter and exit thresholds (CLIP cosine units)
CALIBRATION_WINDOW = 512  # recent segments a tracker's baseline is taken over
CALIBRATION_MIN = 16  # segments seen before calibrated scores exist


# ---- rules ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One natural-language watch rule of one stream."""

    id: str  # unique within its stream; appears in topics (vidmem/<stream>/rule/<id>/state)
    condition: str  # what to watch for, as a sentence ("a person is at the front door")
    threshold: float = 0.25  # CLIP cosine similarity in [-1, 1] at which the condition starts holding
    min_duration: float = 0.0  # seconds the condition must hold before an event opens
    cooldown: float = 30.0  # seconds after an event ends during which the rule opens no new event
    verify: bool = False  # confirm candidates with a yes/no question to the VLM over the event's segments
    exit_threshold: float | None = None  # below this the condition stops holding; None: threshold - HYSTERESIS
    calibrate: bool = False  # thresholds apply to the calibrated score (raw minus the stream's recent baseline)

    @property
    def exit(self) -> float:
        return self.threshold - HYSTERESIS if self.exit_threshold is None else self.exit_threshold

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "rule") -> Rule:
        """Validate a user-given rule; ConfigError names the bad key (`where` says which rule, e.g. rules[2])."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be an object with keys {', '.join(RULE_KEYS)}, got {_kind(data)}.")
        unknown = sorted(set(data) - set(RULE_KEYS))
        if unknown:
            raise ConfigError(f"{where} has unknown key '{unknown[0]}'; expected keys: {', '.join(RULE_KEYS)}.")
        rule_id = data.get("id")
        if not isinstance(rule_id, str) or not RULE_ID.match(rule_id):
            raise ConfigError(
                f"{where}: 'id' must be 1-64 letters, digits, '_' or '-' starting with a letter or digit, got {rule_id!r}."
            )
        where = f"rule '{rule_id}'" if where == "rule" else f"{where} ('{rule_id}')"
        condition = data.get("condition")
        if not isinstance(condition, str) or not condition.strip():
            raise ConfigError(f"{where}: 'condition' must be a non-empty sentence, got {condition!r}.")
        if len(condition) > MAX_CONDITION_CHARS:
            raise ConfigError(f"{where}: 'condition' is longer than {MAX_CONDITION_CHARS} characters.")
        values = {**RULE_DEFAULTS, **{k: data[k] for k in RULE_DEFAULTS if k in data}}
        threshold = _number(values["threshold"], f"{where}: 'threshold'")
        if not -1.0 <= threshold <= 1.0:
            raise ConfigError(f"{where}: 'threshold' must lie between -1 and 1 (a cosine similarity), got {threshold}.")
        min_duration = _number(values["min_duration"], f"{where}: 'min_duration'")
        cooldown = _number(values["cooldown"], f"{where}: 'cooldown'")
        for key, value in (("min_duration", min_duration), ("cooldown", cooldown)):
            if value < 0:
                raise ConfigError(f"{where}: '{key}' must be zero or more seconds, got {value}.")
        for key in ("verify", "calibrate"):
            if not isinstance(values[key], bool):
                raise ConfigError(f"{where}: '{key}' must be true or false, got {values[key]!r}.")
        exit_threshold = values["exit_threshold"]
        if exit_threshold is not None:
            exit_threshold = _number(exit_threshold, f"{where}: 'exit_threshold'")
            if not -1.0 <= exit_threshold <= threshold:
                raise ConfigError(f"{where}: 'exit_threshold' must lie between -1 and the threshold ({threshold}), "
                                  f"got {exit_threshold}.")
        return cls(rule_id, condition.strip(), threshold, min_duration, cooldown, values["verify"], exit_threshold,
                   values["calibrate"])


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a number, got {value!r}.")
    return float(value)


def parse_rules_document(data: Any) -> list[tuple[str, Rule]]:
    """(stream, rule) pairs from a parsed rules file: `{"rules": [{"stream": ..., <rule keys>}, ...]}` or the list.

    Each entry names its stream; ids are unique per stream. Errors name the entry (rules[i]) and the key.
    """
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"rules"})
        if unknown:
            raise ConfigError(f"the rules file has unknown top-level key '{unknown[0]}'; expected 'rules'.")
        data = data.get("rules", [])
    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError(f"the rules file's 'rules' must be a list of rules, got {_kind(data)}.")
    out: list[tuple[str, Rule]] = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(data):
        where = f"rules[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be an object with a 'stream' and rule keys, got {_kind(entry)}.")
        stream = entry.get("stream")
        if not isinstance(stream, str) or not stream:
            raise ConfigError(f"{where}: 'stream' must name the stream the rule watches, got {stream!r}.")
        rule = Rule.from_dict({k: v for k, v in entry.items() if k != "stream"}, where=where)
        if (stream, rule.id) in seen:
            raise ConfigError(f"{where}: 'id' '{rule.id}' is used twice for stream '{stream}'.")
        seen.add((stream, rule.id))
        out.append((stream, rule))
    return out


# ---- events ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """A Frigate-style event (the `event` object of `vidmem/events`)."""

    id: str  # unique: "<start ms>-<stream>-<rule>"
    stream: str  # stream name
    rule: str  # rule id, or "trigger" for an external trigger
    start_time: float  # seconds (file time for recordings, unix seconds for live streams)
    end_time: float | None  # None while the event is open
    score: float | None  # best CLIP similarity seen during the event (None for a trigger)
    verified: bool | None  # the VLM confirmed it (None: the rule does not verify)
    description: str  # what happened, in words
    snapshot: str | None = None  # base64 JPEG of the best keyframe, filled in by the monitor
    raw_score: float | None = None  # the best segment's raw CLIP similarity (the same as `score`)
    calibrated_score: float | None = None  # ... minus the stream's recent baseline (None before calibration)
    verify_probability: float | None = None  # the VLM's P(yes) / (P(yes) + P(no)) when the rule verifies
    ref: Any = None  # opaque reference to the best segment (the monitor's segment id), not published

    def to_json(self) -> dict:
        body = asdict(self)
        body.pop("ref")
        return body


@dataclass(frozen=True)
class EventChange:
    """One message for `vidmem/events`: what changed (`new`, `update`, `end`) and the event after the change."""

    type: str  # "new" | "update" | "end"
    event: Event

    def to_json(self) -> dict:
        return {"type": self.type, "event": self.event.to_json()}


class Calibrator:
    """The recent raw scores of one rule on one stream, and the baseline they give (their median)."""

    def __init__(self, window: int = CALIBRATION_WINDOW, minimum: int = CALIBRATION_MIN) -> None:
        from collections import deque

        self.scores: deque[float] = deque(maxlen=window)
        self.minimum = minimum

    def calibrated(self, raw: float) -> float | None:
        """`raw` against the scores seen before it; None while fewer than `minimum` were seen."""
        if len(self.scores) < self.minimum:
            return None
        ordered = sorted(self.scores)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
        return raw - median

    def add(self, raw: float) -> None:
        self.scores.append(raw)


@dataclass
class RuleTracker:
    """The event lifecycle of one rule on one stream, fed one observation per segment in time order."""

    rule: Rule
    stream: str
    event: Event | None = None  # the open event
    pending_since: float | None = None  # when the condition started holding, before min_duration was met
    pending_score: float = -math.inf  # best score while pending
    pending_ref: Any = None
    pending_verified: bool | None = None
    pending_calibrated: float | None = None
    pending_probability: float | None = None
    last_end: float | None = None  # end time of the last event (cooldown runs from here)
    last_ts: float | None = None  # last observation, to ignore out-of-order ones
    counter: int = field(default=0)  # events opened, to keep ids unique when start times collide
    calibrator: Calibrator = field(default_factory=Calibrator)

    @property
    def active(self) -> bool:
        return self.event is not None

    @property
    def holding(self) -> bool:
        """True while the condition holds (an open event, or one waiting for min_duration)."""
        return self.event is not None or self.pending_since is not None

    @property
    def span_start(self) -> float | None:
        """Where the current stretch of the condition began (the open or pending event's start)."""
        return self.event.start_time if self.event is not None else self.pending_since

    def in_cooldown(self, ts: float) -> bool:
        return self.event is None and self.last_end is not None and ts < self.last_end + self.rule.cooldown

    def value(self, score: float) -> float | None:
        """The score the thresholds apply to: raw, or calibrated for a rule that calibrates (None: not yet)."""
        return self.calibrator.calibrated(score) if self.rule.calibrate else score

    def is_candidate(self, ts: float, score: float) -> bool:
        """True when a verification question could change the outcome (over the threshold that applies now, not
        in cooldown)."""
        value = self.value(score)
        if value is None:
            return False
        return value >= (self.rule.exit if self.holding else self.rule.threshold) and not self.in_cooldown(ts)

    def observe(self, ts: float, score: float, verified: bool | None = None, *, end: float | None = None,
                ref: Any = None, probability: float | None = None) -> list[EventChange]:
        """Feed the segment [ts, end) with its raw score (and VLM verdict when the rule verifies); returns the changes.

        The condition starts holding when the score that applies (raw or calibrated) reaches the threshold, keeps
        holding while it stays at or above the exit threshold, and needs a verdict that is not False (a rule that
        verifies and got no verdict counts as unverified, i.e. not holding).
        """
        end = ts if end is None else max(end, ts)
        if self.last_ts is not None and ts < self.last_ts:
            return []  # out of order (a restarted source): the lifecycle only moves forward in time
        self.last_ts = ts
        calibrated = self.calibrator.calibrated(score)
        self.calibrator.add(score)
        value = calibrated if self.rule.calibrate else score
        bar = self.rule.exit if self.holding else self.rule.threshold
        holds = value is not None and value >= bar and (verified is True if self.rule.verify else verified is not False)
        if not holds:
            return self._false(ts)
        if self.event is not None:
            return self._extend(end, score, verified, ref, calibrated, probability)
        if self.in_cooldown(ts):
            return []
        if self.pending_since is None:
            self.pending_since, self.pending_score, self.pending_ref = ts, -math.inf, None
        if score > self.pending_score:
            self.pending_score, self.pending_ref, self.pending_verified = score, ref, verified
            self.pending_calibrated, self.pending_probability = calibrated, probability
        if end - self.pending_since < self.rule.min_duration:
            return []
        return [self._open(end)]

    def close(self, ts: float | None = None) -> list[EventChange]:
        """End the open event now (the source finished or the monitor stops); `ts` defaults to its end time."""
        self.pending_since = None
        if self.event is None:
            return []
        return [self._end(self.event.end_time if ts is None else ts)]

    def _open(self, end: float) -> EventChange:
        start = self.pending_since
        self.counter += 1
        self.event = Event(
            id=f"{int(round(start * 1000))}-{self.stream}-{self.rule.id}" + (f"-{self.counter}" if self.counter > 1 else ""),
            stream=self.stream, rule=self.rule.id, start_time=start, end_time=end, score=round(self.pending_score, 4),
            verified=self.pending_verified if self.rule.verify else None,
            description=f"{self.rule.condition} (similarity {self.pending_score:.2f})", ref=self.pending_ref,
            raw_score=round(self.pending_score, 4), calibrated_score=_round(self.pending_calibrated),
            verify_probability=_round(self.pending_probability) if self.rule.verify else None,
        )
        self.pending_since = None
        return EventChange("new", self.event)

    def _extend(self, end: float, score: float, verified: bool | None, ref: Any, calibrated: float | None,
                probability: float | None) -> list[EventChange]:
        event = self.event
        better = score > event.score
        self.event = replace(
            event, end_time=max(event.end_time or end, end), score=round(max(score, event.score), 4),
            ref=ref if better else event.ref, verified=(event.verified or verified) if self.rule.verify else None,
            description=f"{self.rule.condition} (similarity {max(score, event.score):.2f})",
            raw_score=round(max(score, event.score), 4),
            calibrated_score=_round(calibrated) if better else event.calibrated_score,
            verify_probability=(_round(probability) if better and probability is not None else event.verify_probability)
            if self.rule.verify else None,
        )
        return [EventChange("update", self.event)] if self.event != event else []

    def _false(self, ts: float) -> list[EventChange]:
        self.pending_since = None
        if self.event is None:
            return []
        return [self._end(self.event.end_time if self.event.end_time is not None else ts)]

    def _end(self, end_time: float) -> EventChange:
        ended = replace(self.event, end_time=end_time)
        self.event = None
        self.last_end = end_time
        return EventChange("end", ended)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# ---- MQTT messages --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Topics:
    """The topic layout under one prefix (DESIGN.md, "MQTT")."""

    prefix: str = "vidmem"  # topic prefix
    discovery: str = "homeassistant"  # Home Assistant discovery prefix

    @property
    def available(self) -> str:
        return f"{self.prefix}/available"

    @property
    def events(self) -> str:
        return f"{self.prefix}/events"

    @property
    def errors(self) -> str:
        return f"{self.prefix}/errors"

    @property
    def discovery_status(self) -> str:
        """Home Assistant announces `online` here when it (re)starts: the cue to republish discovery configs."""
        return f"{self.discovery}/status"

    def subscriptions(self) -> list[str]:
        return [f"{self.prefix}/+/ask", f"{self.prefix}/+/trigger", f"{self.prefix}/+/rules/set", self.discovery_status]

    def answer(self, stream: str) -> str:
        return f"{self.prefix}/{stream}/answer"

    def rules(self, stream: str) -> str:
        return f"{self.prefix}/{stream}/rules"

    def state(self, stream: str, rule_id: str) -> str:
        return f"{self.prefix}/{stream}/rule/{rule_id}/state"

    def source_state(self, stream: str) -> str:
        """Retained: what the stream's source is doing (`{"state": "live" | "reconnecting" | "ended", ...}`)."""
        return f"{self.prefix}/{stream}/state"

    def object_id(self, stream: str, rule_id: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "_", f"{self.prefix}_{stream}_{rule_id}")

    def discovery_config(self, stream: str, rule_id: str) -> str:
        return f"{self.discovery}/binary_sensor/{self.object_id(stream, rule_id)}/config"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """(stream, action) for an input topic (`ask`, `trigger`, `rules/set`), else None."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head):]
        for action in ("rules/set", "ask", "trigger"):
            if rest.endswith("/" + action):
                stream = rest[: -len(action) - 1]
                if stream and "/" not in stream:
                    return stream, action
        return None


def discovery_payload(topics: Topics, stream: str, rule: Rule) -> dict:
    """Home Assistant MQTT discovery config: the rule as a binary_sensor that is ON while an event is open."""
    object_id = topics.object_id(stream, rule.id)
    return {
        "name": rule.condition[:80],
        "unique_id": object_id,
        "object_id": object_id,
        "state_topic": topics.state(stream, rule.id),
        "payload_on": "ON",
        "payload_off": "OFF",
        "availability_topic": topics.available,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": {"identifiers": [f"{topics.prefix}_{stream}"], "name": f"vidmem {stream}", "manufacturer": "vidmem"},
    }


@dataclass(frozen=True)
class AskRequest:
    id: str | None  # echoed in the answer; None for a plain-text question
    question: str  # the question
    budget: int  # visual-token budget
    conversation: str | None = None  # asks in one conversation reuse the first one's evidence and kept cache


@dataclass(frozen=True)
class TriggerRequest:
    id: str | None  # echoed in the event (trigger_id)
    window_seconds: float  # how far back to look from the stream's latest segment
    prompt: str  # what to ask the VLM about that window


@dataclass(frozen=True)
class RuleChange:
    rule: Rule | None  # the rule to add or replace; None when deleting
    delete_id: str | None = None  # the rule to remove


def _json_object(text: str, what: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"the {what} payload is not valid JSON ({exc.msg} at character {exc.pos}).") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"the {what} payload must be a JSON object, got {_kind(data)}.")
    return data


def _request_id(data: dict, what: str) -> str | None:
    value = data.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or len(str(value)) > 128:
        raise ProtocolError(f"the {what} payload's 'id' must be a string of at most 128 characters, got {value!r}.")
    return str(value)


def _check_keys(data: dict, allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ProtocolError(f"the {what} payload has unknown key '{unknown[0]}'; expected keys: {', '.join(allowed)}.")


def parse_ask(text: str, *, default_budget: int = 6000) -> AskRequest:
    """An ask payload: JSON {"id", "question", "budget", "conversation"} or a plain-text question."""
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        if not stripped:
            raise ProtocolError("the ask payload is empty; send a question as text or JSON {\"id\", \"question\"}.")
        if len(stripped) > MAX_QUESTION_CHARS:
            raise ProtocolError(f"the question is longer than {MAX_QUESTION_CHARS} characters.")
        return AskRequest(None, stripped, default_budget)
    data = _json_object(stripped, "ask")
    _check_keys(data, ("id", "question", "budget", "conversation"), "ask")
    request_id = _request_id(data, "ask")
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ProtocolError(f"the ask payload's 'question' must be a non-empty string, got {question!r}.")
    if len(question) > MAX_QUESTION_CHARS:
        raise ProtocolError(f"the ask payload's 'question' is longer than {MAX_QUESTION_CHARS} characters.")
    budget = data.get("budget", default_budget)
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= MAX_BUDGET:
        raise ProtocolError(f"the ask payload's 'budget' must be a whole number of visual tokens from 1 to {MAX_BUDGET}, got {budget!r}.")
    conversation = data.get("conversation")
    if conversation is not None and (not isinstance(conversation, str) or not 1 <= len(conversation) <= 128):
        raise ProtocolError(f"the ask payload's 'conversation' must be a string of 1 to 128 characters, got {conversation!r}.")
    return AskRequest(request_id, question.strip(), budget, conversation)


def parse_trigger(text: str) -> TriggerRequest:
    """A trigger payload: JSON {"id", "window_seconds", "prompt"} (all optional; empty means the defaults)."""
    data = _json_object(text.strip() or "{}", "trigger")
    _check_keys(data, ("id", "window_seconds", "prompt"), "trigger")
    request_id = _request_id(data, "trigger")
    window = data.get("window_seconds", DEFAULT_WINDOW_SECONDS)
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 < window <= MAX_WINDOW_SECONDS:
        raise ProtocolError(f"the trigger payload's 'window_seconds' must be a number of seconds in (0, {MAX_WINDOW_SECONDS:g}], got {window!r}.")
    prompt = data.get("prompt", DEFAULT_TRIGGER_PROMPT)
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_QUESTION_CHARS:
        raise ProtocolError(f"the trigger payload's 'prompt' must be a non-empty string of at most {MAX_QUESTION_CHARS} characters.")
    return TriggerRequest(request_id, float(window), prompt.strip())


def parse_rule_set(text: str) -> RuleChange:
    """A rules/set payload: a rule object, or {"id", "delete": true} to remove one."""
    data = _json_object(text, "rules/set")
    if "delete" in data:
        if data.get("delete") is not True or set(data) - {"id", "delete"}:
            raise ProtocolError("a rule deletion must be exactly {\"id\": ..., \"delete\": true}.")
        rule_id = data.get("id")
        if not isinstance(rule_id, str) or not RULE_ID.match(rule_id):
            raise ProtocolError(f"the rule to delete needs a valid 'id', got {rule_id!r}.")
        return RuleChange(None, rule_id)
    try:
        return RuleChange(Rule.from_dict(data))
    except ConfigError as exc:
        raise ProtocolError(str(exc)) from None
