"""Play the Home Assistant automation's part over MQTT: ask vidmem a question, then send a motion trigger.

    python examples/home_assistant/automation.py --mqtt mqtt://127.0.0.1:1883 --stream front_door

Prints one JSON line per reply: {"answer": ...} for the question, {"event": ...} for the trigger's event.
Exits 1 with a message on stderr when vidmem reports an error or does not reply in time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from urllib.parse import unquote, urlsplit

import aiomqtt


async def run(args: argparse.Namespace) -> int:
    url = urlsplit(args.mqtt)
    tls = {"tls_params": aiomqtt.TLSParameters()} if url.scheme == "mqtts" else {}
    prefix, stream = args.prefix, args.stream
    ask_id, trigger_id = f"ask-{uuid.uuid4().hex[:8]}", f"motion-{uuid.uuid4().hex[:8]}"
    async with aiomqtt.Client(
        url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts" else 1883),
        username=unquote(url.username) if url.username else None,
        password=unquote(url.password) if url.password else None, **tls,
    ) as client:
        for topic in (f"{prefix}/{stream}/answer", f"{prefix}/events", f"{prefix}/errors"):
            await client.subscribe(topic, qos=1)
        # What the automation does: ask a question, then (a motion sensor fired) ask for a description.
        await client.publish(f"{prefix}/{stream}/ask", json.dumps({"id": ask_id, "question": args.question}), qos=1)
        await client.publish(f"{prefix}/{stream}/trigger", json.dumps(
            {"id": trigger_id, "window_seconds": args.window, "prompt": args.prompt}), qos=1)
        waiting = {"answer", "event"}
        try:
            async with asyncio.timeout(args.timeout):
                async for message in client.messages:
                    body = json.loads(message.payload)
                    topic = str(message.topic)
                    if topic.endswith("/errors") and body.get("id") in (ask_id, trigger_id):
                        sys.stderr.write(f"vidmem refused {body['topic']}: {body['message']}\n")
                        return 1
                    if topic.endswith("/answer") and body.get("id") == ask_id and "answer" in waiting:
                        print(json.dumps({"answer": body}), flush=True)
                        waiting.discard("answer")
                    elif topic.endswith("/events") and body["event"].get("trigger_id") == trigger_id \
                            and body["type"] == "new" and "event" in waiting:
                        print(json.dumps({"event": body["event"]}), flush=True)
                        waiting.discard("event")
                    if not waiting:
                        return 0
        except TimeoutError:
            pass
    sys.stderr.write(f"no {' or '.join(sorted(waiting))} from vidmem within {args.timeout:g} s "
                     f"(is `vidmem monitor` running with a stream named '{stream}'?)\n")
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mqtt", default="mqtt://127.0.0.1:1883", help="broker URL (mqtt://[user:pass@]host:port)")
    parser.add_argument("--prefix", default="vidmem", help="vidmem's topic prefix")
    parser.add_argument("--stream", default="front_door", help="the stream to ask about")
    parser.add_argument("--question", default="Is anyone at the front door?")
    parser.add_argument("--prompt", default="Who or what is at the front door, and what are they doing?")
    parser.add_argument("--window", type=float, default=10.0, help="seconds the trigger looks back")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the replies")
    args = parser.parse_args()
    try:
        return asyncio.run(run(args))
    except aiomqtt.MqttError as exc:
        sys.stderr.write(f"cannot talk to the broker at {args.mqtt}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
