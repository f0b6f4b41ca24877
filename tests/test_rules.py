"""Watch rules as a user meets them: validation messages, and the event lifecycle driven by controlled scores."""
from __future__ import annotations

import json

import pytest

from vidmem.agents.rules import (
    Rule,
    RuleTracker,
    Topics,
    discovery_payload,
    parse_ask,
    parse_rule_set,
    parse_rules_document,
    parse_trigger,
)
from vidmem.errors import ConfigError, ProtocolError


def tracker(**overrides) -> RuleTracker:
    body = {"id": "door", "condition": "a person at the front door", "threshold": 0.3, "min_duration": 0,
            "cooldown": 0, **overrides}
    return RuleTracker(Rule.from_dict(body), stream="front")


def feed(t: RuleTracker, scores, *, step: float = 1.0, verified=None) -> list[tuple[float, str]]:
    """Observe one segment per `step` seconds; returns (segment time, change type) for every change."""
    out = []
    for i, score in enumerate(scores):
        ts = i * step
        v = verified[i] if verified is not None else None
        out += [(ts, c.type) for c in t.observe(ts, score, v, end=ts + step, ref=i)]
    return out


# ---- lifecycle ------------------------------------------------------------------------------------------------
def test_event_opens_updates_and_ends_with_the_condition():
    t = tracker()
    changes = []
    for i, score in enumerate([0.1, 0.35, 0.5, 0.4, 0.2, 0.1]):
        changes += t.observe(float(i), score, end=i + 1.0, ref=i)
    assert [c.type for c in changes] == ["new", "update", "update", "end"]
    new, *updates, end = changes
    assert new.event.start_time == 1.0 and new.event.score == 0.35
    assert updates[0].event.score == 0.5 and updates[0].event.end_time == 3.0
    # the best score and its segment survive a lower one; the end time keeps growing
    assert updates[1].event.score == 0.5 and updates[1].event.ref == 2 and updates[1].event.end_time == 4.0
    assert end.event.end_time == 4.0 and end.event.id == new.event.id
    assert not t.active


def test_min_duration_delays_the_event_until_the_condition_has_held_long_enough():
    t = tracker(min_duration=3)
    # holds from t=1; segments are 1 s long, so it has held 3 s at the end of the segment starting at t=3
    changes = feed(t, [0.0, 0.9, 0.9, 0.9, 0.9, 0.0])
    assert changes == [(3.0, "new"), (4.0, "update"), (5.0, "end")]
    opened = tracker(min_duration=3)
    new = [c for c in opened.observe(1, 0.9, end=2) + opened.observe(2, 0.9, end=3) + opened.observe(3, 0.9, end=4)]
    assert new[0].event.start_time == 1.0  # the event starts when the condition started holding


def test_a_short_blip_below_min_duration_opens_nothing():
    t = tracker(min_duration=3)
    assert feed(t, [0.9, 0.9, 0.0, 0.9, 0.9, 0.0, 0.9]) == []


def test_cooldown_suppresses_new_events_after_an_end():
    t = tracker(cooldown=5)
    changes = feed(t, [0.9, 0.0, 0.9, 0.9, 0.0, 0.0, 0.9, 0.0, 0.9])
    # ends at t=1 (end_time 1.0): no new event until t >= 6; the hit at t=6 opens one, which ends at 7
    assert changes == [(0.0, "new"), (1.0, "end"), (6.0, "new"), (7.0, "end")]


def test_cooldown_zero_allows_back_to_back_events_with_distinct_ids():
    t = tracker(cooldown=0)
    ids = [c.event.id for c in t.observe(0, 0.9, end=1) + t.observe(1, 0.0) + t.observe(2, 0.9, end=3) if c.type == "new"]
    assert len(ids) == 2 and len(set(ids)) == 2


def test_verification_gates_candidates():
    t = tracker(verify=True)
    assert t.is_candidate(0, 0.9) and not t.is_candidate(0, 0.1)
    changes = feed(t, [0.9, 0.9, 0.9, 0.9], verified=[False, True, True, False])
    assert changes == [(1.0, "new"), (2.0, "update"), (3.0, "end")]
    assert t.last_end == 3.0 and not t.active


def test_close_ends_an_open_event_and_out_of_order_observations_are_ignored():
    t = tracker()
    assert [c.type for c in t.observe(10, 0.9, end=11)] == ["new"]
    assert t.observe(5, 0.0) == []  # earlier than what was seen: ignored, the event stays open
    (end,) = t.close()
    assert end.type == "end" and end.event.end_time == 11
    assert t.close() == []


def test_event_json_matches_the_mqtt_contract():
    t = tracker()
    (change,) = t.observe(2.0, 0.42, end=3.0, ref=7)
    body = json.loads(json.dumps(change.to_json()))
    assert body["type"] == "new"
    assert set(body["event"]) == {"id", "stream", "rule", "start_time", "end_time", "score", "verified",
                                  "description", "snapshot",  # the contract
                                  "raw_score", "calibrated_score", "verify_probability"}  # extensions
    assert body["event"]["stream"] == "front" and body["event"]["rule"] == "door" and body["event"]["snapshot"] is None


# ---- validation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, key",
    [
        ({"condition": "x"}, "'id'"),
        ({"id": "a/b", "condition": "x"}, "'id'"),
        ({"id": "door"}, "'condition'"),
        ({"id": "door", "condition": "x", "threshold": "high"}, "'threshold'"),
        ({"id": "door", "condition": "x", "threshold": 2}, "'threshold'"),
        ({"id": "door", "condition": "x", "threshold": True}, "'threshold'"),
        ({"id": "door", "condition": "x", "min_duration": -1}, "'min_duration'"),
        ({"id": "door", "condition": "x", "cooldown": None}, "'cooldown'"),
        ({"id": "door", "condition": "x", "verify": "yes"}, "'verify'"),
        ({"id": "door", "condition": "x", "treshold": 0.2}, "'treshold'"),
    ],
)
def test_bad_rules_are_refused_with_a_message_naming_the_key(body, key):
    with pytest.raises(ConfigError) as info:
        Rule.from_dict(body)
    assert key in str(info.value)


def test_rules_document_names_the_bad_entry():
    doc = {"rules": [{"stream": "front", "id": "a", "condition": "a cat"},
                     {"stream": "front", "id": "b", "condition": "a dog", "cooldown": "soon"}]}
    with pytest.raises(ConfigError, match=r"rules\[1\].*'cooldown'"):
        parse_rules_document(doc)
    with pytest.raises(ConfigError, match=r"rules\[0\].*'stream'"):
        parse_rules_document([{"id": "a", "condition": "a cat"}])
    with pytest.raises(ConfigError, match="used twice"):
        parse_rules_document([{"stream": "s", "id": "a", "condition": "x"}] * 2)
    pairs = parse_rules_document(doc["rules"][:1])
    assert pairs == [("front", Rule("a", "a cat"))]


def test_message_parsers_accept_the_documented_forms_and_reject_the_rest():
    assert parse_ask("is the stove on?").question == "is the stove on?"
    ask = parse_ask('{"id": "q1", "question": "who came?", "budget": 2000}')
    assert (ask.id, ask.question, ask.budget) == ("q1", "who came?", 2000)
    for bad in ("", "{not json", '["a list"]', '{"question": ""}', '{"question": "x", "budget": -5}',
                '{"question": "x", "extra": 1}'):
        with pytest.raises(ProtocolError):
            parse_ask(bad)
    trig = parse_trigger('{"id": "m1", "window_seconds": 5, "prompt": "who is there?"}')
    assert (trig.id, trig.window_seconds, trig.prompt) == ("m1", 5.0, "who is there?")
    assert parse_trigger("").window_seconds > 0
    for bad in ("nope", '{"window_seconds": 0}', '{"window_seconds": "ten"}', '{"prompt": 3}'):
        with pytest.raises(ProtocolError):
            parse_trigger(bad)
    assert parse_rule_set('{"id": "door", "delete": true}').delete_id == "door"
    assert parse_rule_set('{"id": "door", "condition": "a person"}').rule.id == "door"
    with pytest.raises(ProtocolError, match="'threshold'"):
        parse_rule_set('{"id": "door", "condition": "a person", "threshold": "x"}')


def test_topics_and_home_assistant_discovery():
    topics = Topics("vidmem")
    assert topics.parse("vidmem/front/ask") == ("front", "ask")
    assert topics.parse("vidmem/front/rules/set") == ("front", "rules/set")
    assert topics.parse("vidmem/front/answer") is None and topics.parse("other/front/ask") is None
    config = discovery_payload(topics, "front", Rule("door", "a person at the door"))
    assert topics.discovery_config("front", "door") == "homeassistant/binary_sensor/vidmem_front_door/config"
    assert config["state_topic"] == "vidmem/front/rule/door/state"
    assert config["availability_topic"] == "vidmem/available"


# ---- hysteresis and calibration -------------------------------------------------------------------------------
def test_hysteresis_rides_out_a_dip_between_the_enter_and_exit_thresholds():
    t = tracker(threshold=0.3, exit_threshold=0.2)
    # 0.25 is under the enter threshold but over the exit one: an open event survives it, a closed one waits
    assert feed(t, [0.25, 0.35, 0.25, 0.22, 0.35, 0.1]) == [(1.0, "new"), (2.0, "update"), (3.0, "update"),
                                                          (4.0, "update"), (5.0, "end")]
    plain = tracker(threshold=0.3, exit_threshold=0.3)
    assert feed(plain, [0.25, 0.35, 0.25, 0.35]) == [(1.0, "new"), (2.0, "end"), (3.0, "new")]


def test_exit_threshold_defaults_below_the_threshold_and_may_not_exceed_it():
    assert Rule.from_dict({"id": "a", "condition": "x", "threshold": 0.3}).exit == pytest.approx(0.28)
    with pytest.raises(ConfigError, match="exit_threshold"):
        Rule.from_dict({"id": "a", "condition": "x", "threshold": 0.3, "exit_threshold": 0.4})


def test_calibrated_rules_fire_against_the_streams_own_baseline_and_events_carry_both_scores():
    # A scene whose every frame scores about 0.28 against the sentence (its baseline), then the real thing: 0.36.
    baseline = [0.28 + 0.005 * ((i * 7) % 5 - 2) for i in range(40)]
    raw_rule = tracker(threshold=0.25)  # a raw threshold under the scene's baseline fires on the empty scene
    assert feed(raw_rule, baseline)[0] == (0.0, "new")
    t = tracker(threshold=0.05, calibrate=True)  # 0.05 above the baseline
    assert feed(t, baseline) == []  # silent while calibrating and on the empty scene
    changes = t.observe(40.0, 0.36, end=41.0, ref=40)
    assert [c.type for c in changes] == ["new"]
    event = changes[0].event
    assert event.raw_score == event.score == 0.36
    assert event.calibrated_score == pytest.approx(0.36 - 0.28, abs=0.006)
