"""`vidmem`: ingest recorded footage, ask about it, serve live cameras, monitor over MQTT, train, and inspect.

Every command takes --memory, --model, --embedder, --device and --json (one JSON object on stdout). Errors
print one line on stderr and exit non-zero, with no traceback (set VIDMEM_DEBUG=1 to see one).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Sequence

from vidmem.errors import ConfigError, VidmemError

log = logging.getLogger("vidmem")

EXIT_ERROR = 2  # a VidmemError: bad input, missing model, unknown stream...
EXIT_INTERRUPTED = 130


def parse_time(text: str | None) -> float | None:
    """Seconds ("90", "1:30", "01:02:03") into recorded footage, or an ISO date-time for live streams."""
    if text is None:
        return None
    try:
        if ":" in text and "T" not in text and "-" not in text:
            seconds = 0.0
            for part in text.split(":"):
                seconds = seconds * 60 + float(part)
            return seconds
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ConfigError(f"cannot read the time '{text}': give seconds, HH:MM:SS, or an ISO date-time") from None


def memory_spec(text: str) -> Path | str:
    """--memory: a directory (embedded memory) or a postgresql:// URL (shared memory), kept as a string."""
    from vidmem.memory.postgres import is_memory_url

    return text if is_memory_url(text) else Path(text)


def _ray_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", metavar="ADDRESS", default=None,
                        help="run on the Ray cluster at ADDRESS (or $VIDMEM_RAY_ADDRESS); needs a shared --memory URL")


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("common options")
    group.add_argument("--memory", type=memory_spec, default=memory_spec(os.environ.get("VIDMEM_MEMORY", "vidmem-memory")),
                       help="memory directory (default: ./vidmem-memory or $VIDMEM_MEMORY), or a shared memory's "
                            "postgresql://...?index=milvus://HOST:PORT&tokens=DIR (or s3://BUCKET/PREFIX) URL (docs/deploy.md)")
    group.add_argument("--model", default=os.environ.get("VIDMEM_MODEL"),
                       help="LLaVA-OneVision hub id or local checkpoint directory (default: 0.5B on CPU, 7B on GPU)")
    group.add_argument("--embedder", default=os.environ.get("VIDMEM_EMBEDDER"),
                       help="CLIP sentence-transformers hub id or local directory (default: clip-ViT-B-32)")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where models run")
    group.add_argument("--runtime", choices=("eager", "fast", "fast-lm"), default=os.environ.get("VIDMEM_RUNTIME"),
                       help="CPU runtime: fast (default on a CPU: int8 vision tower), eager (fp32 throughout), "
                            "fast-lm (also an int8 language model); $VIDMEM_RUNTIME")
    group.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    group.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidmem", description="A streaming video assistant with memory.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="add a video file or stream URL to the memory")
    p.add_argument("source", help="video file, rtsp/http(s) URL, or camera (/dev/video0, camera:0)")
    p.add_argument("--stream", help="stream name (default: the file's name)")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second (default 1)")
    p.add_argument("--frame-budget", type=int, help="files: keep only the N most informative frames (AVS top-k)")
    p.add_argument("--motion", action="store_true",
                   help="motion-gated sampling: --fps becomes a cap; frames are taken when parts of the picture "
                        "change, and at least one every 10 s")
    p.add_argument("--compressor", default="timeperceiver", help="token compressor (default timeperceiver)")
    p.add_argument("--compressor-weights", type=Path, help="a `vidmem train` checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--captions", action="store_true", help="describe each segment with the VLM and index the captions")
    _caption_embedder(p)
    _feature_cache(p)
    _token_dtype(p)
    _ray_flag(p)
    _common(p)

    p = sub.add_parser("ask", help="answer a question from the memory")
    p.add_argument("question")
    p.add_argument("--stream", action="append", help="limit to this stream (repeatable)")
    p.add_argument("--budget", type=int, default=6000, help="visual-token budget (default 6000)")
    p.add_argument("--since", help="from this time (seconds, HH:MM:SS, or ISO date-time)")
    p.add_argument("--until", help="up to this time")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens")
    p.add_argument("--prune", type=float, default=1.0,
                   help="show this share of each segment's most salient tokens and cover more segments (STC pruner)")
    p.add_argument("--compressor-weights", type=Path, help="the checkpoint used at ingest (loads its projector)")
    _caption_embedder(p)
    p.add_argument("--conversation", help="with --ray: a conversation id; its questions reach the same answer replica")
    _ray_flag(p)
    _common(p)

    p = sub.add_parser("serve", help="websocket server and page for live cameras")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=os.environ.get("VIDMEM_TOKEN"), help="required bearer token")
    p.add_argument("--mqtt", help="also monitor the live streams over MQTT (mqtt://[user:pass@]host:port)")
    p.add_argument("--rules", type=Path, help="watch rules (YAML or JSON) for --mqtt")
    p.add_argument("--prefix", default="vidmem", help="MQTT topic prefix for --mqtt (default vidmem)")
    p.add_argument("--mqtt-ca", type=Path, help="CA certificate file to check an mqtts:// broker with")
    p.add_argument("--mqtt-insecure", action="store_true", help="mqtts:// without checking the certificate (testing only)")
    p.add_argument("--mqtt-client-id", help="fixed MQTT client id (default: derived from --prefix and --memory)")
    _feature_cache(p)
    _caption_embedder(p)
    _token_dtype(p)
    _kv_cache(p)
    _encode_batch(p)
    _ray_flag(p)
    _common(p)

    p = sub.add_parser("monitor", help="ingest sources and watch them, with events and questions over MQTT")
    p.add_argument("--mqtt", required=True, help="broker URL: mqtt://[user:pass@]host:port (mqtts:// for TLS)")
    p.add_argument("--rules", type=Path, help="watch rules (YAML or JSON)")
    p.add_argument("--source", action="append", default=[], metavar="NAME=URL", help="a source to ingest (repeatable)")
    p.add_argument("--prefix", default="vidmem", help="MQTT topic prefix (default vidmem)")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second from the sources (default 1)")
    p.add_argument("--mqtt-ca", type=Path, help="CA certificate file to check an mqtts:// broker with")
    p.add_argument("--mqtt-insecure", action="store_true", help="mqtts:// without checking the certificate (testing only)")
    p.add_argument("--mqtt-client-id", help="fixed MQTT client id (default: derived from --prefix and --memory)")
    p.add_argument("--reconnect-max", type=float, default=30.0, help="longest wait between reconnects, seconds (default 30)")
    p.add_argument("--source-backoff-max", type=float, default=30.0,
                   help="longest wait between a lost camera's reconnection attempts, seconds (default 30; it never "
                        "gives up)")
    _feature_cache(p)
    _caption_embedder(p)
    _token_dtype(p)
    _kv_cache(p)
    _encode_batch(p)
    _ray_flag(p)
    _common(p)

    _train_parser(sub)

    p = sub.add_parser("stats", help="streams, segments, bytes, time covered, source states and retention")
    _common(p)

    p = sub.add_parser("chat", help="an interactive conversation over the memory (follow-ups reuse the kept cache)")
    p.add_argument("--stream", action="append", help="limit to this stream (repeatable; /stream changes it)")
    p.add_argument("--budget", type=int, default=6000, help="visual-token budget per conversation (default 6000)")
    p.add_argument("--since", help="from this time (seconds, HH:MM:SS, or ISO date-time; /since changes it)")
    p.add_argument("--until", help="up to this time (/until changes it)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens")
    p.add_argument("--compressor-weights", type=Path, help="the checkpoint used at ingest (loads its projector)")
    _kv_cache(p)
    _common(p)

    p = sub.add_parser("retention", help="how much footage to keep: per stream, or a disk budget for the memory")
    p.add_argument("--stream", help="set this stream's limits (default: the whole memory's)")
    p.add_argument("--max-age", help="drop footage older than this: 90s, 30m, 12h, 7d (or 'none')")
    p.add_argument("--max-bytes", help="keep the stream (or the whole memory) under this size: 500MB, 20GB (or 'none')")
    _common(p)

    p = sub.add_parser("migrate", help="copy an embedded memory directory into a shared memory and verify it")
    p.add_argument("source", type=Path, help="the embedded memory directory")
    p.add_argument("target", help="postgresql://USER[:PASS]@HOST:PORT/DB?index=milvus://HOST:PORT&tokens=DIR "
                                  "(or tokens=s3://BUCKET/PREFIX&s3_endpoint=URL)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr")
    return parser


def _kv_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache-mb", type=float, default=2048.0,
                        help="kept KV caches (live windows, conversations) held at most, in MB; least recent go first")


def _encode_batch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encode-batch", type=int, default=32, metavar="FRAMES",
                        help="frames one vision-tower call may carry across the live streams (default 32; 0: each "
                             "stream encodes alone)")
    parser.add_argument("--encode-gather-ms", type=float, default=5.0, metavar="MS",
                        help="how long the shared encoder waits for other streams' frames before a call, while "
                             "more than one stream is open (default 5)")


def _caption_embedder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--caption-embedder", help="text embedder for captions, the one the memory's captions were "
                                                   "indexed with (default: all-MiniLM-L6-v2)")


def _feature_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the vision features of a near-identical recent frame instead of running the tower "
                             "again (STC cacher, per stream; on by default, --no-feature-cache turns it off)")


def _token_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token-dtype", choices=("float16", "int8"), default="float16",
                        help="how new segments store their tokens (int8: half the disk, one scale per token)")


def _settings(args: argparse.Namespace):
    from vidmem.agents.app import Settings

    return Settings(
        memory=args.memory, model=args.model, embedder=args.embedder, device=args.device,
        compressor=getattr(args, "compressor", "timeperceiver"),
        compressor_weights=getattr(args, "compressor_weights", None),
        max_new_tokens=getattr(args, "max_new_tokens", 256),
        captions=getattr(args, "captions", False),
        feature_cache=getattr(args, "feature_cache", True),
        prune=getattr(args, "prune", 1.0),
        caption_embedder=getattr(args, "caption_embedder", None),
        token_dtype=getattr(args, "token_dtype", "float16"),
        kv_cache_bytes=_kv_cache_bytes(getattr(args, "kv_cache_mb", 2048.0)),
        encode_batch_frames=getattr(args, "encode_batch", 32),
        encode_gather_ms=getattr(args, "encode_gather_ms", 5.0),
        runtime=args.runtime,
    )


def _kv_cache_bytes(megabytes: float) -> int:
    if not megabytes >= 0:
        raise ConfigError(f"--kv-cache-mb must be zero or more megabytes, not {megabytes}")
    return int(megabytes * 2**20)


def _emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    if args.json:
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        sys.stdout.write(text.rstrip() + "\n")
    sys.stdout.flush()


def _stream_name(source: str) -> str:
    import re

    from vidmem.memory import check_stream_name

    stem = Path(source.split("?")[0].rstrip("/")).stem or "stream"
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.-]+", "-", stem)).strip("-.") or "stream"
    name = name[:64] if name[0].isalnum() else "s" + name[:63]
    return check_stream_name(name.rstrip("-."))  # the memory's one rule decides


def cmd_ingest(args: argparse.Namespace) -> int:
    from vidmem.agents.app import Vidmem
    from vidmem.stream import IngestOptions, open_source
    from vidmem.stream.motion import MotionOptions

    from vidmem.memory import check_stream_name

    stream = check_stream_name(args.stream) if args.stream else _stream_name(args.source)
    address = _ray_address(args)
    if address:
        return _ingest_on_ray(args, stream, address)
    source = open_source(args.source)  # a missing or unreadable file fails here, before anything else
    app = Vidmem(_settings(args))
    try:
        app.load_models()
        stop = asyncio.Event()

        async def run():
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            options = IngestOptions(fps=args.fps, frame_budget=args.frame_budget,
                                    motion=MotionOptions() if args.motion else None)
            return await app.ingest(
                source, stream=stream, options=options,
                progress=not args.no_progress and sys.stderr.isatty(), stop=stop,
            )

        report = asyncio.run(run())
    finally:
        app.close()
    payload = report.to_json()
    text = (
        f"{payload['stream']}: {payload['segments']} segments from {payload['frames']} frames, "
        f"{payload['visual_tokens']} visual tokens for {payload['video_seconds']:.1f} s of video "
        f"in {payload['wall_seconds']:.1f} s; cuts at {', '.join(f'{c:.1f}' for c in payload['cuts']) or 'none'}"
    )
    _emit(args, payload, text)
    return 0


def _ray_address(args: argparse.Namespace) -> str | None:
    from vidmem.agents.cluster import ray_address

    return ray_address(getattr(args, "ray", None))


def _ingest_on_ray(args: argparse.Namespace, stream: str, address: str) -> int:
    from vidmem.agents import cluster
    from vidmem.stream import IngestOptions, open_source

    settings = _settings(args)
    cluster.check_settings(settings)
    open_source(args.source)  # a missing or unreadable file fails here (nodes read the same path)
    options = IngestOptions(fps=args.fps, frame_budget=args.frame_budget)
    payload = cluster.ingest(settings, {stream: str(args.source)}, address=address, ingest_options=options)[stream]
    _emit(args, payload, f"{payload['stream']}: {payload['segments']} segments from {payload['frames']} frames on "
                         f"node {payload['node'][:12]} of the Ray cluster at {address}")
    return 0


def _ask_on_ray(args: argparse.Namespace, address: str) -> int:
    from vidmem.agents import cluster

    settings = _settings(args)
    cluster.check_settings(settings)
    cluster.connect(address)
    streaming = not args.json and sys.stdout.isatty()  # as `ask` on one machine: tokens as the replica makes them

    def on_token(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    answer = cluster.Answerers(settings).ask(
        args.question, conversation=args.conversation, streams=args.stream, budget=args.budget,
        since=parse_time(args.since), until=parse_time(args.until), follow_up=bool(args.conversation),
        on_token=on_token if streaming else None)
    if streaming:
        sys.stdout.write("\n")
    cited = "; ".join(f"{s['stream']} {s['start']:.1f}-{s['end']:.1f}s" for s in answer["segments"][:12])
    text = "" if streaming else answer["answer"] + "\n"
    text += f"(from {len(answer['segments'])} segments, {answer['visual_tokens']} visual tokens: {cited})"
    _emit(args, answer, text)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from vidmem.agents.app import Vidmem

    address = _ray_address(args)
    if address:
        return _ask_on_ray(args, address)

    app = Vidmem(_settings(args), readonly=True)
    try:
        app.memory  # noqa: B018 - fail on a missing memory before loading any model
        streaming = not args.json and sys.stdout.isatty()

        def on_token(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        answer = app.ask(
            args.question, streams=args.stream, budget=args.budget, since=parse_time(args.since),
            until=parse_time(args.until), on_token=on_token if streaming else None,
        )
    finally:
        app.close()
    if streaming:
        sys.stdout.write("\n")
    cited = "; ".join(f"{s['stream']} {s['start']:.1f}-{s['end']:.1f}s" for s in answer.segments()[:12])
    text = "" if streaming else answer.text + "\n"
    text += f"(from {len(answer.picks)} segments, {answer.visual_tokens} visual tokens: {cited})"
    _emit(args, answer.to_json(), text)
    return 0


CHAT_HELP = """commands:
  /stream NAME [NAME...]  ask about these streams (/stream all: every stream)
  /since T, /until T      the time range (seconds, HH:MM:SS or ISO date-time; 'none' clears it)
  /new                    start a new conversation (new evidence for the next question)
  /history                the questions and answers so far
  /help, /quit"""


def cmd_chat(args: argparse.Namespace) -> int:
    """A terminal conversation: the first question of a conversation selects evidence, follow-ups reuse its kept
    cache (prefilling only themselves); changing the streams or the range starts a new conversation."""
    import uuid

    from vidmem.agents.app import Vidmem

    try:
        import readline  # noqa: F401 - line editing and history for input(), where the platform has it
    except ImportError:
        pass
    app = Vidmem(_settings(args), readonly=True)
    streams = list(args.stream) if args.stream else None
    since, until = parse_time(args.since), parse_time(args.until)
    history: list[tuple[str, str]] = []
    conversation = uuid.uuid4().hex[:12]
    interactive = sys.stdin.isatty() and not args.json

    def say(text: str) -> None:
        if not args.json:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    try:
        app.memory  # noqa: B018 - fail on a missing memory before loading any model
        if streams:
            app._check_streams(streams)
        say("vidmem chat: ask about the memory; /help for commands, /quit to leave")
        while True:
            try:
                line = input("> " if interactive else "").strip()
            except EOFError:
                break
            if not line:
                continue
            if line.startswith("/"):
                command, _, rest = line[1:].partition(" ")
                rest = rest.strip()
                try:
                    if command in ("quit", "exit", "q"):
                        break
                    if command == "help":
                        say(CHAT_HELP)
                    elif command == "history":
                        for question, answer in history:
                            say(f"> {question}\n{answer}")
                    elif command == "new":
                        conversation = uuid.uuid4().hex[:12]
                        say("(a new conversation)")
                    elif command == "stream":
                        names = rest.split() if rest and rest != "all" else None
                        if names:
                            app._check_streams(names)
                        streams, conversation = names, uuid.uuid4().hex[:12]
                        say(f"(streams: {', '.join(names) if names else 'all'}; a new conversation)")
                    elif command in ("since", "until"):
                        value = None if rest.lower() in ("", "none") else parse_time(rest)
                        if command == "since":
                            since = value
                        else:
                            until = value
                        conversation = uuid.uuid4().hex[:12]
                        say(f"({command} {rest or 'none'}; a new conversation)")
                    else:
                        raise ConfigError(f"unknown command /{command}; /help lists them")
                except VidmemError as exc:
                    sys.stderr.write(f"vidmem: error: {exc}\n")
                continue
            streaming = interactive

            def on_token(text: str) -> None:
                sys.stdout.write(text)
                sys.stdout.flush()

            try:
                answer = app.ask_conversation(conversation, line, streams=streams, budget=args.budget, since=since,
                                              until=until, on_token=on_token if streaming else None)
            except VidmemError as exc:  # one bad question does not end the conversation
                sys.stderr.write(f"vidmem: error: {exc}\n")
                continue
            history.append((line, answer.text))
            if args.json:
                sys.stdout.write(json.dumps({"conversation": conversation, "question": line, **answer.to_json()}) + "\n")
                sys.stdout.flush()
                continue
            if streaming:
                sys.stdout.write("\n")
            else:
                say(answer.text)
            cited = "; ".join(f"{s['stream']} {s['start']:.1f}-{s['end']:.1f}s" for s in answer.segments()[:6])
            say(f"({answer.visual_tokens} visual tokens from {len(answer.picks)} segments: {cited}; "
                f"{answer.cached_tokens} prompt tokens reused, {answer.prefill_tokens} computed)")
    finally:
        app.close()
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from vidmem.memory import Memory

    with Memory.open(args.memory, readonly=True) as memory:
        stats = memory.stats()
    lines = [f"{args.memory}: {stats['segments']} segments, {_size(stats['bytes'])} of tokens, "
             f"{_size(stats['disk_bytes'])} on disk, {stats['seconds_covered']:.1f} s covered; "
             f"retention: {_limits(stats['retention'], budget=True)}"]
    for s in stats["streams"]:
        span = f"{s['start']:.1f}-{s['end']:.1f} s" if s["start"] is not None else "empty"
        source = s.get("source")
        state = f"; source {source['state']} since {datetime.fromtimestamp(source['since']).isoformat(timespec='seconds')}" \
            if source else ""
        lines.append(f"  {s['name']}: {s['segments']} segments, {_size(s['bytes'])}, {span}{state}, "
                     f"{s['gaps']} gaps; retention: {_limits(s['retention'])}")
    _emit(args, stats, "\n".join(lines))
    return 0


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _limits(retention: dict, *, budget: bool = False) -> str:
    parts = []
    if retention.get("max_age_seconds") is not None:
        parts.append(f"max age {retention['max_age_seconds']:g} s")
    if retention.get("max_bytes") is not None:
        parts.append(f"{'disk budget' if budget else 'max'} {_size(retention['max_bytes'])}")
    return ", ".join(parts) or "keep everything"


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
              "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_duration(text: str) -> float | None:
    """'7d', '12h', '30m', '90s' or plain seconds -> seconds; 'none' -> None (no limit)."""
    import re

    if text.strip().lower() in ("none", "off", "0"):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"cannot read the age '{text}': give a positive number with s, m, h, d or w (e.g. 7d)")
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


def parse_size(text: str) -> int | None:
    """'20GB', '500MB', '1.5GiB' or plain bytes -> bytes; 'none' -> None (no limit)."""
    import re

    if text.strip().lower() in ("none", "off", "0"):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in ("", *SIZE_UNITS) or float(match.group(1)) <= 0:
        raise ConfigError(f"cannot read the size '{text}': give a positive number with kB, MB, GB or TB (e.g. 20GB)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2) or "b"])


def cmd_retention(args: argparse.Namespace) -> int:
    from vidmem.memory import Memory, Retention, check_stream_name

    stream = check_stream_name(args.stream) if args.stream else None
    change = args.max_age is not None or args.max_bytes is not None
    age = parse_duration(args.max_age) if args.max_age is not None else None
    size = parse_size(args.max_bytes) if args.max_bytes is not None else None
    with Memory.open(args.memory, readonly=not change) as memory:
        deleted = 0
        if change:
            current = memory.retention(stream) if stream is None or memory.has_stream(stream) else Retention()
            retention = Retention(max_age_seconds=age if args.max_age is not None else current.max_age_seconds,
                                  max_bytes=size if args.max_bytes is not None else current.max_bytes)
            memory.set_retention(stream, retention)
            deleted = memory.apply_retention()  # enforced now; every writer keeps enforcing it
        if stream is not None and not memory.has_stream(stream):
            raise ConfigError(f"unknown stream '{stream}'; the memory holds: "
                              f"{', '.join(s.name for s in memory.streams()) or 'none yet'}")
        retention = memory.retention(stream)
        disk = memory.disk_usage()
    payload = {"stream": stream, "max_age_seconds": retention.max_age_seconds, "max_bytes": retention.max_bytes,
               "deleted_segments": deleted, "disk_bytes": disk}
    who = f"stream {stream}" if stream else "the memory"
    text = f"retention of {who}: {_limits(payload, budget=stream is None)}"
    if change:
        text += f"; {deleted} segments deleted now, {_size(disk)} on disk"
    _emit(args, payload, text)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from vidmem.memory.postgres import is_memory_url
    from vidmem.memory.shared import migrate

    if not is_memory_url(args.target):
        raise ConfigError(f"the migrate target must be a postgresql:// memory URL, not '{args.target}'")
    report = migrate(args.source, args.target)
    _emit(args, report, f"copied {report['segments']} segments of {report['streams']} streams, {report['rules']} "
                        f"rules and {report['events']} events from {report['source']} to {report['target']}; verified")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The websocket server; with --mqtt, the MQTT monitor watches its streams (wired here: neither imports the
    other)."""
    from vidmem.agents.server import serve_main

    attach = None
    if args.mqtt:
        from vidmem.agents.monitor import attach_live, parse_mqtt_url

        parse_mqtt_url(args.mqtt, ca_file=args.mqtt_ca, insecure=args.mqtt_insecure)  # a bad URL fails first
        attach = attach_live
    elif args.rules or args.mqtt_ca or args.mqtt_insecure:
        raise ConfigError("--rules, --mqtt-ca and --mqtt-insecure need --mqtt")
    return serve_main(args, _settings(args), attach=attach)


def cmd_monitor(args: argparse.Namespace) -> int:
    from vidmem.agents.monitor import monitor_main

    return monitor_main(args, _settings(args))


def _key_values(pairs: list[str]) -> dict:
    """["depth=3", "mode=spatial"] -> {"depth": 3, "mode": "spatial"}; values parse as JSON when they can."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--compressor-option takes KEY=VALUE, not '{pair}'")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a compressor (Clapper stage 1, question answering, or SVC reconstruction)")
    p.add_argument("data", type=Path, help='JSONL of {"video", "caption"} (caption), {"video", "question", "answer"} '
                                           "(qa) or {\"video\"} (reconstruction); paths relative to the file")
    p.add_argument("--output", type=Path, required=True, help="checkpoint file to write (.safetensors)")
    p.add_argument("--compressor", default="timeperceiver", help="compressor to train (default timeperceiver)")
    p.add_argument("--compressor-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a compressor option, e.g. depth=3 (repeatable; values are JSON or strings)")
    p.add_argument("--objective", choices=("caption", "qa", "reconstruction"), default="caption",
                   help="caption: Clapper stage 1; qa: answers to questions over the video; "
                        "reconstruction: SVC video-only pretraining")
    p.add_argument("--prompt", default="Describe the video.", help="the question the caption objective asks")
    p.add_argument("--init", type=Path, help="start a new run from this checkpoint's weights")
    p.add_argument("--resume", type=Path, help="continue the run that saved this checkpoint (optimiser, step, rng)")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps in all (a resumed run continues up to this)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of training video, as ingest")
    p.add_argument("--max-frames", type=int, default=96, help="sampled frames of evidence per example at most")
    p.add_argument("--val", type=Path, help="JSONL of validation examples")
    p.add_argument("--val-split", type=float, default=0.0, help="else hold out this share of the training videos")
    p.add_argument("--cache-dir", type=Path, help="vision feature cache (default ~/.cache/vidmem/features)")
    p.add_argument("--save-every", type=int, default=0, help="also save checkpoint and state every N steps")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--freeze-projector", action="store_true", help="keep the VLM's projector as it is")
    p.add_argument("--train-llm", action="store_true",
                   help="also train the language model; the trained model is saved to --output-model")
    p.add_argument("--output-model", type=Path,
                   help="model directory --train-llm writes (default: OUTPUT's name + '-model'); ask with --model DIR")
    p.add_argument("--seed", type=int, default=0)
    _common(p)


def cmd_train(args: argparse.Namespace) -> int:
    from vidmem.compressors.checkpoint import load_state
    from vidmem.compressors.train import TrainOptions, load_examples, train

    options = TrainOptions(
        data=args.data, output=args.output, compressor=args.compressor,
        compressor_options=_key_values(args.compressor_option), init=args.init, resume=args.resume,
        objective=args.objective, prompt=args.prompt, steps=args.steps, lr=args.lr, warmup=args.warmup,
        batch_size=args.batch_size, grad_accum=args.grad_accum, fps=args.fps, max_frames=args.max_frames,
        val=args.val, val_split=args.val_split, cache_dir=args.cache_dir, save_every=args.save_every,
        precision=args.precision, seed=args.seed, train_projector=not args.freeze_projector, train_llm=args.train_llm,
        output_model=args.output_model, progress=sys.stderr.isatty(),
    ).validate()
    load_examples(options)  # bad flags, data and checkpoints fail before a model loads
    state = load_state(args.resume) if args.resume is not None else None
    model = args.model or (state.model_dir if state is not None else None)  # --train-llm resumes its saved model
    from vidmem.agents.models import load_vlm

    report = train(options, vlm=load_vlm(model, device=args.device))
    payload = report.to_json()
    val = "" if report.val_loss is None else f", validation loss {report.val_loss:.4f}"
    saved = f"saved {args.output}" + (f" and the model {report.model_dir}" if report.model_dir else "")
    _emit(args, payload, f"trained {args.compressor} for {payload['steps']} steps: loss "
                         f"{payload['first_loss']:.4f} -> {payload['last_loss']:.4f}{val}; {saved}")
    return 0


COMMANDS = {"ingest": cmd_ingest, "ask": cmd_ask, "serve": cmd_serve, "monitor": cmd_monitor, "train": cmd_train,
            "stats": cmd_stats, "retention": cmd_retention, "chat": cmd_chat, "migrate": cmd_migrate}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if level > logging.DEBUG:
        for noisy in ("transformers", "sentence_transformers", "huggingface_hub", "httpx", "torchao", "torch.utils._pytree",
                      "nncf"):  # optional accelerators transformers imports when installed talk at import
            logging.getLogger(noisy).setLevel(logging.ERROR)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if not sys.stderr.isatty():
            os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        return COMMANDS[args.command](args)
    except VidmemError as exc:
        if os.environ.get("VIDMEM_DEBUG"):
            raise
        sys.stderr.write(f"vidmem: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("vidmem: interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
