"""vidmem on a Ray cluster: sources as actors on any node, a batching encoder pool, answer replicas with affinity.

    vidmem ingest cam1.mp4 --ray 10.0.0.5:6379 --memory postgresql://...   (or VIDMEM_RAY_ADDRESS)

- **Sources.** Each source is a `SourceWorker` actor, spread over the nodes. It decodes and segments its source
  (stream/), sends segments to the encoder pool and commits the results to the shared memory itself. Ray restarts
  an actor whose node is lost on another node (`max_restarts=-1`) and retries its `run` (`max_task_retries=-1`):
  the new run resumes after the stream's last committed segment, so nothing committed is lost or stored twice.
  `ingest --ray` and `monitor --ray` run every source this way. A monitor's sources (`ClusterSources`) also get
  each frame's CLIP embedding back from the encoder and send the monitor, through a Ray queue, the committed
  rows with those (T, E) embeddings and their state changes, never frames; `stop()` ends a run after its segment
  in flight. The websocket server's sources stay in the front-end process, where the browsers' frames arrive
  (`ClusterVidmem.ingest`: decoded there, encoded on the pool).
- **Encoding.** `EncoderService` actors hold the vision tower, the compressor and the retrieval embedder, one per
  device (a GPU, or a share of one with `gpus_per_encoder`). Requests from every stream that arrive within
  `batch_wait_s` go through the models together (up to `batch_segments`), so a device sees full batches even
  when each camera yields a segment every few seconds. They are named, detached actors: every `ingest` and
  `monitor` on the cluster with the same models shares them.
- **Answering.** `AnswerService` replicas hold the language model. A conversation always goes to the same replica
  (a stable hash of its id), the one whose kept KV cache lets a follow-up prefill only the new question. Answers
  stream: a replica's `stream` is a Ray streaming generator yielding the text as the model produces it, then the
  `Answer`, so the websocket page and `vidmem ask --ray` show tokens as they come. A replica is a threaded actor
  whose model work all goes through one scheduler (agents/scheduler.py): questions, then watch rules' VLM
  verification (`yes_probability`, so a monitor's front-end never loads the language model), then live
  refreshes, then captions, one at a time.
- **Captions.** With `--captions`, each source commits its segment and hands its id to an answer replica without
  waiting (`caption.remote`); the replica queues it behind questions, describes the segment with the VLM and
  stores the caption and its embedding in the shared memory, where questions fuse caption search as on one
  machine. `ingest` returns once its segments are described. A caption still queued on a replica that dies, or
  just requested by a source whose node is lost, is lost: the segment stays, without a caption.
- **Memory.** Every node reaches the same shared memory (PostgreSQL + Milvus + tokens on shared storage or in an
  S3-compatible object store, memory/shared.py): `--ray` requires a postgresql:// `--memory`.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import queue
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from vidmem.agents.scheduler import Priority
from vidmem.errors import ConfigError, VidmemError

log = logging.getLogger(__name__)

ENV = "VIDMEM_RAY_ADDRESS"
NAMESPACE = "vidmem"


@dataclass(frozen=True)
class ClusterOptions:
    """How vidmem's work is laid out on the Ray cluster."""

    encoders: int = 1  # encoder actors (one per device)
    answerers: int = 1  # answer replicas
    batch_segments: int = 16  # segments per encoder forward pass at most, across streams
    batch_wait_s: float = 0.02  # how long an encoder waits for more streams' segments before running a batch
    cpus_per_source: float = 0.5  # Ray resources per actor (logical: they place actors, they do not pin cores)
    cpus_per_encoder: float = 1.0
    gpus_per_encoder: float = 0.0  # e.g. 0.5: two encoders share a GPU
    gpus_per_answerer: float = 0.0
    replay_speed: float | None = None  # files: deliver frames at this multiple of real time (replay as cameras)

    def __post_init__(self) -> None:
        if self.encoders < 1 or self.answerers < 1 or self.batch_segments < 1:
            raise ConfigError("the cluster needs at least one encoder, one answerer and a batch of one segment")
        if self.replay_speed is not None and not self.replay_speed > 0:
            raise ConfigError(f"replay_speed must be positive, not {self.replay_speed}")


def ray_address(flag: str | None) -> str | None:
    """--ray ADDRESS, else $VIDMEM_RAY_ADDRESS, else None (everything in this process)."""
    return flag or os.environ.get(ENV) or None


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'vidmem[cluster]'") from None
    return ray


def connect(address: str) -> None:
    """Join the Ray cluster at `address` as a driver; one clear error when it cannot be reached."""
    ray = _ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False,
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {str(exc).strip().splitlines()[0]}") from None


def check_settings(settings) -> None:
    from vidmem.memory.postgres import is_memory_url

    if not is_memory_url(settings.memory):
        raise ConfigError("--ray needs a shared memory every node reaches: give --memory postgresql://USER@HOST:PORT/DB"
                          "?index=milvus://HOST:PORT&tokens=DIR (docs/deploy.md), not a directory on this machine")


def _models_key(settings, *, memory: bool = False) -> str:
    """Actors with the same models (and memory, for answerers) are shared: their names carry a digest of them."""
    fields = (settings.model, settings.embedder, settings.device, settings.compressor, str(settings.compressor_weights),
              str(settings.memory) if memory else "", settings.max_new_tokens, settings.prune)
    if memory:  # answerers also embed questions for caption search, and caption segments
        fields += (str(settings.caption_embedder),)
    return hashlib.sha256("\0".join(map(str, fields)).encode()).hexdigest()[:10]


# -- encoding -------------------------------------------------------------------------------------------------
class EncoderService:
    """Vision tower + compressor + embedder on one device; batches the segments of every stream that calls it."""

    def __init__(self, settings, batch_segments: int, batch_wait_s: float) -> None:
        from vidmem.agents.app import Vidmem

        # The feature cache is per stream (its frames resemble each other): it stays with single-process ingest.
        self.app = Vidmem(replace(settings, feature_cache=False))
        self.app.load_models()
        self.batch_segments = batch_segments
        self.batch_wait_s = batch_wait_s
        self._pending: list[tuple[list, asyncio.Future, bool]] = []  # (segments, result, frame embeddings wanted)
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self.calls = self.segments = self.batches = 0

    def manifest(self) -> dict:
        return self.app.manifest().to_dict()

    def stats(self) -> dict:
        return {"calls": self.calls, "segments": self.segments, "batches": self.batches,
                "node": _node_id()}

    async def encode(self, segments: list) -> list:
        """EncodedSegments for `segments` (in order), computed in a batch with other streams' segments."""
        return await self._submit(segments, False)

    async def encode_watched(self, segments: list) -> list:
        """(EncodedSegment, (T, E) float32 CLIP embeddings of its T frames) for each of `segments`, in order: what a
        monitor's source sends its rules, so that no frame travels further than this encoder."""
        return await self._submit(segments, True)

    async def _submit(self, segments: list, frames: bool) -> list:
        loop = asyncio.get_running_loop()
        if self._runner is None or self._runner.done():
            self._wake = asyncio.Event()
            self._runner = loop.create_task(self._run())
        future = loop.create_future()
        self._pending.append((segments, future, frames))
        self.calls += 1
        assert self._wake is not None
        self._wake.set()
        return await future

    def _encode_batch(self, sink, flat: list, watched: list) -> tuple[list, np.ndarray | None]:
        """The batch's EncodedSegments, and the frame embeddings of the `watched` segments ((sum T, E) float32)."""
        encoded = sink.encode(flat)
        images = [frame.image for segment in watched for frame in segment.frames]
        vectors = np.asarray(self.app.embedder.embed_images(images), dtype=np.float32) if images else None
        return encoded, vectors

    async def _run(self) -> None:
        from vidmem.agents.app import MemorySink

        sink = MemorySink(self.app, "batch")
        while True:
            assert self._wake is not None
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.batch_wait_s)  # let other streams' segments join this batch
            while self._pending:
                batch, taken = [], 0
                while self._pending and (not batch or taken + len(self._pending[0][0]) <= self.batch_segments):
                    segments, future, frames = self._pending.pop(0)
                    batch.append((segments, future, frames))
                    taken += len(segments)
                flat = [segment for segments, _, _ in batch for segment in segments]
                watched = [segment for segments, _, frames in batch if frames for segment in segments]
                try:
                    encoded, vectors = await asyncio.to_thread(self._encode_batch, sink, flat, watched)
                except Exception as exc:  # noqa: BLE001 - each caller gets the error, the service keeps serving
                    for _, future, _ in batch:
                        future.set_exception(exc)
                    continue
                self.batches += 1
                self.segments += len(flat)
                offset = row = 0  # into `encoded` and into the rows of `vectors`
                for segments, future, frames in batch:
                    result = encoded[offset:offset + len(segments)]
                    offset += len(segments)
                    if frames:
                        split = []
                        for segment, item in zip(segments, result):
                            split.append((item, vectors[row:row + len(segment)]))  # (T, E)
                            row += len(segment)
                        result = split
                    future.set_result(result)


def encoder_pool(settings, options: ClusterOptions) -> list:
    """Handles of the named encoder actors for these models, created when missing."""
    ray = _ray()
    remote = ray.remote(EncoderService).options
    key = _models_key(settings)
    return [remote(name=f"vidmem-encoder-{key}-{i}", get_if_exists=True, lifetime="detached", max_restarts=-1,
                   max_task_retries=-1, num_cpus=options.cpus_per_encoder, num_gpus=options.gpus_per_encoder,
                   max_concurrency=1000).remote(settings, options.batch_segments, options.batch_wait_s)
            for i in range(options.encoders)]


# -- sources ------------------------------------------------------------------------------------------------
class _RemoteSink:
    """The ingest loop's sink on a cluster: encode on the pool, commit to the shared memory, skip what is stored."""

    def __init__(self, app, stream: str, encoder, resume_after: float | None, on_segment=None) -> None:
        self.app, self.stream = app, stream  # the app opens the memory only: the models live in the encoders
        self.on_segment = on_segment  # called (row, segment) after each commit (the monitor's rules)
        self.last_row = None
        self.encoder = encoder
        self.resume_after = resume_after
        self.skipped = 0
        # --captions: an answer replica captions each committed segment (the language model lives there)
        self.captioner = None
        self.caption_calls: list = []  # caption requests not yet received by the replica
        if app.settings.captions:
            replicas = captioners(app.settings)
            self.captioner = replicas[zlib.crc32(stream.encode()) % len(replicas)]

    def _done(self, segment) -> bool:
        return self.resume_after is not None and segment.start < self.resume_after

    def encode(self, segments: list) -> list:
        todo = [s for s in segments if not self._done(s)]
        encoded = iter(self._encode(todo) if todo else [])
        return [None if self._done(s) else next(encoded) for s in segments]

    def _encode(self, segments: list) -> list:
        """EncodedSegments of `segments` (none of them stored yet), from the encoder pool."""
        return _ray().get(self.encoder.encode.remote(segments))

    def commit(self, segment, encoded) -> int:
        if encoded is None:  # committed before this actor restarted
            self.skipped += 1
            return 0
        self.last_row = self.app.memory.add_segment(
            stream=self.stream, start=segment.start, end=segment.end, frames=len(segment), cut=segment.cut,
            tokens=encoded.tokens, slow=encoded.slow, embedding=encoded.embedding, keyframe_jpeg=encoded.keyframe_jpeg,
            views=encoded.views)
        if self.captioner is not None:
            # Not waited for: the replica queues it behind questions, so ingest never waits for the language
            # model. A caption queued on a replica that dies is lost; its segment stays, without a caption.
            ray = _ray()
            calls = [*self.caption_calls, self.captioner.caption.remote(self.last_row.id)]
            self.caption_calls = ray.wait(calls, num_returns=len(calls), timeout=0)[1]  # drop the received ones
        if self.on_segment is not None:
            self.on_segment(self.last_row, segment)
        return self.last_row.tokens

    def close(self) -> None:
        """The stream's ingest has ended: wait until the replicas hold its caption requests (not the captions), so
        that `captions_done` after this sees every one of them."""
        if self.caption_calls:
            _ray().get(self.caption_calls)
            self.caption_calls = []

    def extend(self, segment) -> None:
        if self.resume_after is not None and segment.end <= self.resume_after:
            return
        last = self.last_row or self.app.memory.last_segment(self.stream)
        if last is not None:
            self.app.memory.extend_segment(last.id, end=segment.end, frames=last.frames + len(segment))


class _WatchedSink(_RemoteSink):
    """A monitor's source: also gets each segment's frame embeddings from the encoder, for the monitor's rules.

    `on_watched(row, vectors)` is called after each commit with the committed row and the (T, E) float32 CLIP
    embeddings of its T frames.
    """

    def __init__(self, app, stream: str, encoder, resume_after: float | None, on_watched) -> None:
        super().__init__(app, stream, encoder, resume_after, on_segment=self._committed)
        self.on_watched = on_watched
        self._vectors: dict[int, np.ndarray] = {}  # id(segment) -> its frames' embeddings, until committed

    def _encode(self, segments: list) -> list:
        out = []
        for segment, (encoded, vectors) in zip(segments, _ray().get(self.encoder.encode_watched.remote(segments))):
            self._vectors[id(segment)] = vectors
            out.append(encoded)
        return out

    def _committed(self, row, segment) -> None:
        self.on_watched(row, self._vectors.pop(id(segment)))


class _Paced:
    """A file source delivering its frames at `speed` times real time (recordings replayed as cameras)."""

    live = True  # frames are analysed as they arrive, as a camera's are

    def __init__(self, source, speed: float, skip_until: float | None = None) -> None:
        self._source, self._speed, self._skip_until = source, speed, skip_until

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    async def frames(self):
        started, first = time.monotonic(), None
        async for frame in self._source.frames():
            if self._skip_until is not None and frame.ts < self._skip_until:
                yield frame  # already stored before a restart: catch up at decoding speed
                continue
            if first is None:
                started, first = time.monotonic(), frame.ts
            delay = (frame.ts - first) / self._speed - (time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            yield frame

    async def aclose(self) -> None:
        await self._source.aclose()


class SourceWorker:
    """One source on any node: decode and segment it, encode on the pool, commit to the shared memory.

    A monitor's sources also get a `feed` (a Ray queue): the worker puts ("segment", stream, row, (T, E) frame
    embeddings) after each commit and ("status", stream, SourceStatus, node) on each state change, never frames.
    The actor is threaded (two calls at a time), so `stop()` reaches it while `run()` ingests.
    """

    def __init__(self, settings, stream: str, source: str, ingest_options, encoder,
                 replay_speed: float | None, backoff=None, feed=None, feed_wait: float = 30.0) -> None:
        self.settings, self.stream, self.source = settings, stream, source
        self.ingest_options, self.encoder, self.replay_speed = ingest_options, encoder, replay_speed
        self.backoff = backoff  # how a camera reconnects (stream.Backoff); None: open_source's default
        self.feed, self.feed_wait = feed, feed_wait
        self.fed = self.unfed = 0  # messages put on the feed, and dropped after waiting `feed_wait` for room
        self._lock = threading.Lock()
        self._stopping = False
        self._stop: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def where(self) -> str:
        return _node_id()

    def stop(self) -> None:
        """End the run: stop reading, commit the segment in flight, return the report (`ingest`'s `stop`)."""
        with self._lock:
            self._stopping = True
            if self._stop is not None:
                loop, event = self._stop
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:  # the run's loop has closed: it is over already
                    pass

    def run(self) -> dict:
        """Ingest the source to its end (or `stop`); after a restart, resume after the last committed segment."""
        from vidmem.agents.app import Vidmem
        from vidmem.memory import Manifest
        from vidmem.stream import IngestOptions, open_source

        ray = _ray()
        app = Vidmem(self.settings)
        try:
            memory = app.memory
            memory.bind(Manifest.from_dict(ray.get(self.encoder.manifest.remote())))
            last = memory.last_segment(self.stream) if memory.has_stream(self.stream) else None
            resume = last.end if last is not None else None
            if self.feed is not None:
                sink: _RemoteSink = _WatchedSink(app, self.stream, self.encoder, resume, self._segment)
            else:
                sink = _RemoteSink(app, self.stream, self.encoder, resume)
            source = open_source(self.source, backoff=self.backoff) if self.backoff else open_source(self.source)
            if self.replay_speed:
                source = _Paced(source, self.replay_speed, skip_until=resume)
            app.watch_source(source, self.stream, self._status if self.feed is not None else None)
            report = asyncio.run(_ingest_until_stopped(self, source, sink, self.ingest_options or IngestOptions()))
            sink.close()
        finally:
            app.close()
        out = report.to_json()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        out.update(node=_node_id(), resumed_after=resume, skipped=sink.skipped, restarted=restarted,
                   stopped=report.stopped, fed=self.fed, unfed=self.unfed)
        return out

    def _put(self, message: tuple) -> None:
        try:
            self.feed.put(message, timeout=self.feed_wait)
            self.fed += 1
        except Exception as exc:  # noqa: BLE001 - full for too long, or the monitor has gone: ingest goes on
            self.unfed += 1
            log.warning("source %s: the monitor did not take a %s message within %.0f s (%s)", self.stream,
                        message[0], self.feed_wait, type(exc).__name__)

    def _segment(self, row, vectors: np.ndarray) -> None:
        self._put(("segment", self.stream, row, vectors))

    def _status(self, stream: str, status) -> None:
        self._put(("status", stream, status, _node_id()))


async def _ingest_until_stopped(worker: SourceWorker, source, sink, options):
    """`worker.stop()` sets the ingest loop's `stop` from another thread. (Not a method: an actor with a coroutine
    method would be an asyncio actor, whose blocking `run` would keep `stop` waiting.)"""
    from vidmem.stream.ingest import ingest

    stop = asyncio.Event()
    with worker._lock:
        worker._stop = (asyncio.get_running_loop(), stop)
        if worker._stopping:
            stop.set()
    return await ingest(source, sink, stream=worker.stream, options=options, stop=stop)


def start_sources(settings, sources: dict[str, str], *, ingest_options=None, options: ClusterOptions = ClusterOptions(),
                  encoders: list | None = None, backoff=None, feed=None, feed_wait: float = 30.0) -> dict[str, Any]:
    """A SourceWorker actor per source, spread over the nodes; returns {stream: actor handle}.

    `backoff`: how camera sources reconnect; `feed`: the monitor's queue for committed segments and states.
    """
    ray = _ray()
    check_settings(settings)
    if settings.captions:  # the replicas that caption, with these options, before the first segment
        Answerers(settings, options).prepare_captions()
    encoders = encoders or encoder_pool(settings, options)
    remote = ray.remote(SourceWorker).options
    # Round-robin over the encoders: each gets an even share of the streams (a hash of the names need not).
    return {stream: remote(max_restarts=-1, max_task_retries=-1, num_cpus=options.cpus_per_source,
                           scheduling_strategy="SPREAD", max_concurrency=2).remote(
                settings, stream, url, ingest_options, encoders[i % len(encoders)], options.replay_speed,
                backoff=backoff, feed=feed, feed_wait=feed_wait)
            for i, (stream, url) in enumerate(sources.items())}


class ClusterSources:
    """A monitor's sources as SourceWorker actors: what they commit and report, as messages in the monitor.

    `messages(stop)` yields, in the order each source sent them:
    ("segment", stream, row, (T, E) float32 frame embeddings), ("status", stream, SourceStatus, node id), and
    ("finished", stream, report dict or None, VidmemError or None) once a source's run has ended. Setting `stop`
    asks every actor to stop (each commits its segment in flight); the messages go on until every run has ended.
    `close()` kills what is left. Frames never leave the source's node: only rows and embeddings travel.
    """

    def __init__(self, settings, sources: dict[str, str], *, encoders: list, options: ClusterOptions, ingest_options,
                 backoff, queue_size: int = 64, feed_wait: float = 30.0) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(queue_size, actor_options={"num_cpus": 0})
        self.actors = start_sources(settings, sources, ingest_options=ingest_options, options=options,
                                    encoders=encoders, backoff=backoff, feed=self.queue, feed_wait=feed_wait)
        self.runs = {stream: actor.run.remote() for stream, actor in self.actors.items()}

    async def messages(self, stop: asyncio.Event):
        waits = [asyncio.create_task(self._finished(stream, run)) for stream, run in self.runs.items()]
        stopping = asyncio.create_task(self._stop_on(stop))
        running = set(self.runs)
        try:
            while running:
                message = await self.queue.get_async()
                if message[0] == "finished":
                    running.discard(message[1])
                yield message
        finally:
            for task in (*waits, stopping):
                task.cancel()
            await asyncio.gather(*waits, stopping, return_exceptions=True)

    async def _stop_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        for actor in self.actors.values():
            actor.stop.remote()

    async def _finished(self, stream: str, run) -> None:
        """Once the run has ended: its last message, after everything it sent (it waited for each put)."""
        ray = _ray()
        report = error = None
        try:
            with _cluster_errors("the source actor failed"):
                report = await run
        except VidmemError as exc:
            error = exc
        except ray.exceptions.RayError as exc:
            error = VidmemError(f"the source actor was lost: {type(exc).__name__}")
        await self.queue.put_async(("finished", stream, report, error))

    def close(self) -> None:
        ray = _ray()
        for actor in self.actors.values():
            ray.kill(actor)
        ray.kill(self.queue.actor)


def ingest(settings, sources: dict[str, str], *, address: str, ingest_options=None,
           options: ClusterOptions = ClusterOptions()) -> dict[str, dict]:
    """Ingest every source on the cluster at `address`; returns {stream: report} once all have finished."""
    connect(address)
    actors = start_sources(settings, sources, ingest_options=ingest_options, options=options)
    ray = _ray()
    with _cluster_errors("ingest failed on the cluster"):
        reports = ray.get([actor.run.remote() for actor in actors.values()])
    if settings.captions:  # as on one machine: the segments are described once ingest returns
        ray.get([replica.captions_done.remote() for replica in captioners(settings)])
    return dict(zip(actors, reports))


# -- answering ----------------------------------------------------------------------------------------------
class AnswerService:
    """One answer replica: the VLM, the read-only shared memory and the kept KV cache of its conversations.

    A threaded actor, so that a question streams its answer while other calls arrive (more questions, live
    refreshes, captions). The model still does one thing at a time: every piece of model work goes through the
    replica's scheduler (agents/scheduler.py): questions first, then watch rules' verification, then live
    refreshes, then captions.
    """

    CONCURRENCY = 16  # actor threads: questions streaming or waiting their turn, refreshes, caption flushes
    CAPTION_BACKLOG = 10_000  # segment ids waiting for a caption; beyond, new ones stay uncaptioned (counted)

    def __init__(self, settings) -> None:
        from vidmem.agents.app import Vidmem

        self.app = Vidmem(settings, readonly=True)  # captions are written through their own handle (`_writer`)
        self.app.load_models()
        self.app.answerer  # noqa: B018 - load the language model before the first question
        self.node = _node_id()
        self.conversation: str | None = None  # whose evidence the kept KV cache holds
        self._writer = None  # a writable handle on the shared memory, opened to write the first caption
        self._writer_lock = threading.Lock()
        # Segments to caption, in commit order: one caption job at a time reaches the scheduler, so a question
        # waits for at most the caption being written, never for the backlog.
        self._captions: queue.Queue = queue.Queue(self.CAPTION_BACKLOG)
        self._captioner: threading.Thread | None = None
        self._lock = threading.Lock()
        self.captioned = self.caption_failures = self.captions_dropped = 0

    def ready(self) -> str:
        """Returns once the models are loaded (the node's id)."""
        return self.node

    # ---- questions ------------------------------------------------------------------------------------
    def answer(self, question: str, conversation: str | None, kwargs: dict):
        """The `Answer` (agents/answer.py) to a question, as `Vidmem.ask` gives it, in one piece."""
        return self.app.scheduler.run(
            Priority.INTERACTIVE, functools.partial(self._answer, question, conversation, kwargs, None))

    def stream(self, question: str, conversation: str | None, kwargs: dict):
        """A streaming generator (the caller gets an ObjectRefGenerator): the answer's text in pieces as the model
        produces them, then the `Answer`. A replica error is raised in place of the next piece."""
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        cancelled = threading.Event()

        def on_token(text: str) -> None:  # on the model thread
            if cancelled.is_set():  # the caller went away (ray.cancel): free the model for the next job
                raise VidmemError("the question was cancelled")
            pieces.put(text)

        done = self.app.scheduler.submit(
            Priority.INTERACTIVE, functools.partial(self._answer, question, conversation, kwargs, on_token))
        done.add_done_callback(lambda _: pieces.put(None))
        context = _ray().get_runtime_context()
        finished = False
        try:
            while not finished:
                if context.is_canceled():  # ray.cancel on a threaded actor only sets this flag
                    cancelled.set()
                try:
                    piece = pieces.get(timeout=0.5)
                except queue.Empty:
                    continue
                text = []
                while piece is not None:  # what else is ready goes in the same piece (the caller may be slower)
                    text.append(piece)
                    try:
                        piece = pieces.get_nowait()
                    except queue.Empty:
                        break
                finished = piece is None
                if text:
                    yield "".join(text)
        finally:  # cancelled, or the stream broke: the model stops at its next token
            cancelled.set()
        yield done.result()

    def _answer(self, question: str, conversation: str | None, kwargs: dict, on_token):
        """On the model thread. `ask --conversation`: a follow-up reuses the kept cache only when it holds this
        conversation's evidence. `by_conversation` (the front-ends' conversations): `Vidmem.ask_conversation`, whose
        kept caches are many, by conversation id."""
        if kwargs.pop("by_conversation", False):
            answer = self.app.ask_conversation(conversation, question, on_token=on_token, **kwargs)
            follow_up, self.conversation = answer.cached_tokens > 0, None  # the answerer's kept cache is not ours
        else:
            follow_up = bool(kwargs.pop("follow_up", False)) and conversation is not None \
                and conversation == self.conversation
            answer = self.app.ask(question, follow_up=follow_up, on_token=on_token, **kwargs)
            self.conversation = conversation
        answer.follow_up, answer.replica = follow_up, self.node
        return answer

    def refresh_live(self, stream: str) -> None:
        """Bring this replica's kept window of a live stream up to date (the front-end calls it per segment)."""
        self.app.scheduler.run(Priority.REFRESH, functools.partial(self.app.refresh_live, stream),
                               key=("refresh", stream))

    def yes_probability(self, question: str, segment_ids: list[int]) -> float:
        """A watch rule's VLM verification (`Vidmem.yes_probability`) over exactly these segments, as model work
        between questions and live refreshes."""
        from vidmem.agents.select import Level, Pick

        rows = [self.app.memory.get_segment(i) for i in segment_ids]
        picks = [Pick(row, Level.FULL, 0.0, "verify") for row in rows if row is not None]
        if not picks:
            raise VidmemError("the segments to verify are no longer in the memory")
        return self.app.scheduler.run(Priority.VERIFY, functools.partial(self.app.yes_probability, question, picks))

    # ---- captions -------------------------------------------------------------------------------------
    def prepare_captions(self) -> None:
        """Load the caption embedder and open the memory for writing now, so that a missing embedder or an
        unwritable memory fails `ingest --captions` before any segment."""
        self.app.caption_embedder  # noqa: B018 - loads on access
        self._open_writer()

    def caption(self, segment_id: int) -> None:
        """Describe a committed segment and store its caption, after questions and refreshes; returns at once.
        With the backlog full (ingest far ahead of the language model) the segment stays without a caption."""
        self._start_captioner()
        try:
            self._captions.put_nowait(segment_id)
        except queue.Full:
            self.captions_dropped += 1
            if self.captions_dropped % 1000 == 1:
                log.warning("%d segments waiting for a caption: %d newer ones left without", self.CAPTION_BACKLOG,
                            self.captions_dropped)

    def captions_done(self) -> dict:
        """Wait until every caption queued before this call is stored (or has failed); the replica's counts."""
        marker = threading.Event()
        self._captions.put(marker)
        self._start_captioner()
        marker.wait()
        return {"captioned": self.captioned, "failed": self.caption_failures, "dropped": self.captions_dropped,
                "node": self.node}

    def _start_captioner(self) -> None:
        with self._lock:
            if self._captioner is None:
                self._captioner = threading.Thread(target=self._caption_loop, name="vidmem-captions", daemon=True)
                self._captioner.start()

    def _caption_loop(self) -> None:
        while True:
            item = self._captions.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                writer = self._open_writer()  # here, not on the model thread: opening may wait and retry
                self.app.scheduler.run(Priority.CAPTION, functools.partial(self._caption, item, writer))
            except Exception as exc:  # noqa: BLE001 - the segment is committed; it only stays without a caption
                self.caption_failures += 1
                log.warning("segment %s stays without a caption: %s", item, exc)
            else:
                self.captioned += 1

    def _caption(self, segment_id: int, writer) -> None:
        """On the model thread: the caption of one segment, stored through the writable handle."""
        row = writer.get_segment(segment_id)
        if row is not None:  # else deleted (retention) before its turn
            self.app.caption(row, memory=writer)

    def _open_writer(self, attempts: int = 3):
        """The writable handle on the shared memory, opened once; a transient failure to open (PostgreSQL
        restarting, say) is tried again."""
        from vidmem.errors import MemoryStoreError
        from vidmem.memory import Memory

        with self._writer_lock:
            for attempt in range(attempts):
                if self._writer is not None:
                    break
                try:
                    settings = self.app.settings
                    self._writer = Memory.open(settings.memory, token_dtype=settings.token_dtype)
                except MemoryStoreError as exc:
                    if attempt + 1 == attempts:
                        raise
                    log.warning("opening the memory to write captions, again in 1 s: %s", exc)
                    time.sleep(1.0)
            return self._writer


@contextlib.contextmanager
def _cluster_errors(failed: str):
    """A VidmemError raised in an actor reaches the caller as itself; any other error in it as one VidmemError line,
    `failed`: its last line."""
    ray = _ray()
    try:
        yield
    except ray.exceptions.RayTaskError as exc:
        if isinstance(getattr(exc, "cause", None), VidmemError):
            raise exc.cause from None
        raise VidmemError(f"{failed}: {str(exc).strip().splitlines()[-1]}") from None


class Answerers:
    """Answer replicas on the cluster; a conversation id always reaches the same replica."""

    def __init__(self, settings, options: ClusterOptions = ClusterOptions()) -> None:
        ray = _ray()
        check_settings(settings)
        remote = ray.remote(AnswerService).options
        self.replicas = [remote(name=_answerer_name(settings, i), get_if_exists=True, lifetime="detached",
                                max_restarts=-1, max_task_retries=-1, num_cpus=1, num_gpus=options.gpus_per_answerer,
                                max_concurrency=AnswerService.CONCURRENCY)
                         .remote(settings) for i in range(options.answerers)]

    def wait_ready(self) -> None:
        """Block until every replica has loaded its models."""
        _ray().get([replica.ready.remote() for replica in self.replicas])

    def replica(self, conversation: str | None):
        return self.replicas[zlib.crc32((conversation or "").encode()) % len(self.replicas)]

    def ask(self, question: str, *, conversation: str | None = None, on_token=None, **kwargs: Any) -> dict:
        """Blocking; returns the answer's JSON (see agents/answer.py) plus the replica's node."""
        answer = self.answer(question, conversation=conversation, on_token=on_token, **kwargs)
        return {**answer.to_json(), "replica": answer.replica, "follow_up": answer.follow_up}

    def answer(self, question: str, *, conversation: str | None = None, route: str | None = None,
               on_token: Callable[[str], None] | None = None, **kwargs: Any):
        """Blocking; returns the `Answer` object. With `on_token`, the text arrives in pieces as the replica's model
        produces them. `route` picks the replica (default: the conversation's)."""
        ray = _ray()
        replica = self.replica(route if route is not None else conversation)
        with _cluster_errors("the answer replica failed"):
            if on_token is None:
                return ray.get(replica.answer.remote(question, conversation, kwargs))
            pieces = replica.stream.remote(question, conversation, kwargs)  # an ObjectRefGenerator
            for ref in pieces:
                item = ray.get(ref)
                if not isinstance(item, str):
                    return item
                try:
                    on_token(item)
                except BaseException:  # e.g. the server is stopping: the replica stops at its next token
                    with contextlib.suppress(Exception):  # the listener's error is the one to raise
                        ray.cancel(pieces)
                    raise
        raise VidmemError("the answer replica ended the answer without its result")

    def prepare_captions(self) -> None:
        """Ready every replica to caption (one clear error now when the caption embedder is missing)."""
        with _cluster_errors("the answer replica failed"):
            _ray().get([replica.prepare_captions.remote() for replica in self.replicas])


def _answerer_name(settings, index: int) -> str:
    return f"vidmem-answer-{_models_key(settings, memory=True)}-{index}"


def captioners(settings) -> list:
    """The answer replicas for these settings that exist on the cluster (named actors), created when none does:
    the replicas that caption the segments a source commits."""
    ray = _ray()
    found = []
    while True:
        try:
            found.append(ray.get_actor(_answerer_name(settings, len(found)), namespace=NAMESPACE))
        except ValueError:
            return found or Answerers(settings).replicas


def _node_id() -> str:
    ray = _ray()
    return ray.get_runtime_context().get_node_id()


# -- the front-ends' app ------------------------------------------------------------------------------------
def open_app(settings, *, address: str | None, readonly: bool = False, options: ClusterOptions = ClusterOptions()):
    """The `Vidmem` the websocket server and the MQTT monitor hold: local, or reaching the cluster by handles."""
    from vidmem.agents.app import Vidmem

    address = ray_address(address)
    if address is None:
        return Vidmem(settings, readonly=readonly)
    return _cluster_app_class()(settings, address=address, readonly=readonly, options=options)


def _cluster_app_class():
    from vidmem.agents.app import Vidmem

    class ClusterVidmem(Vidmem):
        """A Vidmem whose encoding runs on the encoder pool and whose questions run on the answer replicas.

        The websocket server's sources stay in the front-end (browser frames arrive there) and commit to the shared
        memory through `ingest`; the monitor's run as actors (`watch_sources`). A live stream's questions always
        reach the replica keeping its window.
        """

        def __init__(self, settings, *, address: str, readonly: bool, options: ClusterOptions) -> None:
            super().__init__(settings, readonly=readonly)
            check_settings(settings)
            connect(address)
            self.options = options
            self.encoders = encoder_pool(settings, options)
            self.answerers = Answerers(settings, options)

        def load_models(self) -> None:
            self.embedder  # noqa: B018 - the text embedder serves rules and queries here; the rest is remote
            _ray().get([encoder.manifest.remote() for encoder in self.encoders])  # the pool is up

        def manifest(self):
            from vidmem.memory import Manifest

            return Manifest.from_dict(_ray().get(self.encoders[0].manifest.remote()))

        async def ingest(self, source, *, stream: str, options=None, progress: bool = False, stop=None,
                         on_segment=None):
            from vidmem.stream.ingest import IngestOptions, ingest

            await asyncio.to_thread(lambda: self.memory.bind(self.manifest()))
            encoder = self.encoders[zlib.crc32(stream.encode()) % len(self.encoders)]
            sink = _RemoteSink(self, stream, encoder, None, on_segment=on_segment)
            try:
                return await ingest(source, sink, stream=stream, options=options or IngestOptions(), progress=progress,
                                    stop=stop)
            finally:
                await asyncio.to_thread(sink.close)

        def watch_sources(self, sources: dict[str, str], *, ingest_options, backoff, queue_size: int = 64,
                          feed_wait: float = 30.0) -> ClusterSources:
            """`monitor --ray`: each source as an actor on any node, reporting to this process (ClusterSources)."""
            return ClusterSources(self.settings, sources, encoders=self.encoders, options=self.options,
                                  ingest_options=ingest_options, backoff=backoff, queue_size=queue_size,
                                  feed_wait=feed_wait)

        def refresh_live(self, stream: str) -> None:
            """The live window is kept on the replica that answers the stream's questions."""
            _ray().get(self.answerers.replica(stream).refresh_live.remote(stream))

        def ask(self, question: str, *, streams=None, on_token=None, live: bool = False, **kwargs):
            """On the replica keeping the live stream's window; `on_token` gets the text as the model makes it."""
            conversation = streams[0] if live and streams and len(streams) == 1 else None
            return self.answerers.answer(question, conversation=conversation, on_token=on_token, streams=streams,
                                         live=live, **kwargs)

        def yes_probability(self, question: str, picks: list) -> float:
            """A watch rule's VLM verification, on the replica that answers the segments' stream: the front-end
            never loads the language model."""
            stream = picks[0].row.stream if picks else None
            with _cluster_errors("the answer replica failed"):
                return _ray().get(self.answerers.replica(stream).yes_probability.remote(
                    question, [p.row.id for p in picks]))

        def ask_conversation(self, conversation: str, question: str, *, streams=None, on_token=None,
                             live: bool = False, **kwargs):
            """A conversation's questions go to one replica (the live stream's, when there is one), which keeps the
            conversation's KV cache as `Vidmem.ask_conversation` does on one machine."""
            route = streams[0] if live and streams and len(streams) == 1 else conversation
            return self.answerers.answer(question, conversation=conversation, route=route, on_token=on_token,
                                         streams=streams, live=live, by_conversation=True, **kwargs)

    return ClusterVidmem
