"""The monitor's configuration and its outbox, without a broker: URLs, rules files, --source, what a full queue drops."""
from __future__ import annotations

import asyncio

import pytest

from vidmem.agents.monitor import Outbox, Outgoing, load_rules_file, parse_mqtt_url, parse_source_args
from vidmem.errors import ConfigError


def test_mqtt_urls():
    b = parse_mqtt_url("mqtt://hass:p%40ss@broker.local:1884")
    assert (b.host, b.port, b.username, b.password, b.tls) == ("broker.local", 1884, "hass", "p@ss", False)
    assert parse_mqtt_url("mqtts://broker").port == 8883 and parse_mqtt_url("mqtt://broker").port == 1883
    for bad, words in [("http://broker", "mqtt://"), ("mqtt://", "no host"), ("mqtt://h:99999", "port"),
                       ("mqtt://h/topic", "no path")]:
        with pytest.raises(ConfigError, match=words):
            parse_mqtt_url(bad)
    with pytest.raises(ConfigError, match="mqtts"):
        parse_mqtt_url("mqtt://h", insecure=True)


def test_rules_files_in_yaml_and_json(tmp_path):
    good = tmp_path / "rules.yaml"
    good.write_text("rules:\n  - stream: porch\n    id: person\n    condition: a person on the porch\n"
                    "    threshold: 0.27\n    verify: true\n")
    ((stream, rule),) = load_rules_file(good)
    assert stream == "porch" and rule.id == "person" and rule.verify and rule.cooldown == 30.0
    as_json = tmp_path / "rules.json"
    as_json.write_text('[{"stream": "porch", "id": "car", "condition": "a car in the driveway"}]')
    assert load_rules_file(as_json)[0][1].condition == "a car in the driveway"

    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - stream: porch\n    id: person\n    condition: someone\n    min_duration: soon\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: rules\[0\].*'min_duration'"):
        load_rules_file(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_rules_file(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_rules_file(tmp_path / "missing.yaml")


def test_source_arguments():
    assert parse_source_args(["porch=rtsp://cam/1", "door=/videos/a.mp4"]) == {"porch": "rtsp://cam/1",
                                                                               "door": "/videos/a.mp4"}
    for bad in (["rtsp://cam/1"], ["=x"], ["a=1", "a=2"], ["../x=y"]):
        with pytest.raises(ConfigError):
            parse_source_args(bad)


def test_a_full_outbox_drops_answers_before_events_and_counts_both():
    box = Outbox(max_messages=3, max_bytes=10_000)
    box.put(Outgoing("vidmem/events", b"e1", event=True))
    box.put(Outgoing("vidmem/cam/answer", b"a1"))
    box.put(Outgoing("vidmem/events", b"e2", event=True))
    box.put(Outgoing("vidmem/events", b"e3", event=True))  # full: the answer goes, not an event
    assert [m.payload for m in box._items] == [b"e1", b"e2", b"e3"] and box.dropped == 1
    box.put(Outgoing("vidmem/events", b"e4", event=True))  # only events left: the oldest event goes
    assert [m.payload for m in box._items] == [b"e2", b"e3", b"e4"] and box.dropped_events == 1


def test_retained_messages_replace_queued_ones_for_the_same_topic_and_bytes_are_bounded():
    box = Outbox(max_messages=100, max_bytes=100)
    box.put(Outgoing("vidmem/cam/rule/r/state", b"ON", retain=True))
    box.put(Outgoing("vidmem/events", b"x" * 10, event=True))
    box.put(Outgoing("vidmem/cam/rule/r/state", b"OFF", retain=True))
    assert [m.payload for m in box._items] == [b"x" * 10, b"OFF"]
    box.put(Outgoing("vidmem/errors", b"y" * 88))  # 101 bytes: the oldest non-event (the state) goes
    assert [m.topic for m in box._items] == ["vidmem/events", "vidmem/errors"] and box.dropped == 1
    box.put(Outgoing("vidmem/errors", b"z" * 50))  # still too big: non-events go, oldest first, events stay
    assert [m.payload[:1] for m in box._items] == [b"x", b"z"] and box.dropped == 2 and box.dropped_events == 0


def test_the_message_being_published_stays_until_acknowledged():
    async def scenario():
        box = Outbox(max_messages=2, max_bytes=10_000)
        box.put(Outgoing("vidmem/cam/answer", b"a1"))
        head = await box.head()
        box.put(Outgoing("vidmem/events", b"e1", event=True))
        box.put(Outgoing("vidmem/events", b"e2", event=True))  # full, but the in-flight answer is not dropped
        assert head in box._items and box.dropped_events == 1
        box.done(head)
        assert [m.payload for m in box._items] == [b"e2"]
        waiter = asyncio.create_task(box.head())
        await asyncio.sleep(0)
        assert (await waiter).payload == b"e2"

    asyncio.run(scenario())


def test_the_monitor_remembers_a_bounded_number_of_stream_names():
    """Clients inventing a new stream name with every request cannot grow the monitor's memory: it keeps the most
    recent names (the memory itself answers for every stream that committed a segment)."""
    from vidmem.agents.monitor import RecentNames

    names = RecentNames(3, ["door"])
    for name in ("yard", "a", "b", "yard", "c"):
        names.add(name)
    assert len(names) == 3 and list(names) == ["b", "yard", "c"]
    assert "door" not in names and "yard" in names
    assert names | {"door"} == {"b", "yard", "c", "door"}
