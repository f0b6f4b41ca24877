"""The assembled assistant: models, memory, ingest and answering behind one object.

The CLI, the websocket server and the MQTT monitor all hold one `Vidmem`. Models load lazily on first use, so a
command that only reads the memory (`vidmem stats`) never touches them. Model work is serialised by the
answerer's lock and by one ingest worker; the event loop only moves data between them.
"""
from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from vidmem.agents.answer import Answer, Answerer, KeptPrefix
from vidmem.agents.select import Level, Pick, SelectOptions, Selection, select
from vidmem.errors import BudgetError, ConfigError, UnknownStreamError, VidmemError

log = logging.getLogger(__name__)

LIVE_WINDOW_SECONDS = 32.0  # seconds of a live stream kept prefilled (the recent window)
LIVE_TOKEN_LIMIT = 3000  # tokens a kept live window may grow to before it is rebuilt (half the default budget)


@dataclass(frozen=True)
class Settings:
    """What a vidmem deployment is made of; the CLI fills it from its flags."""

    memory: Path = Path("vidmem-memory")  # the memory directory (created on first ingest)
    model: str | None = None  # VLM hub id or local directory; None: the default for the device
    embedder: str | None = None  # retrieval (CLIP) embedder hub id or local directory; None: clip-ViT-B-32
    caption_embedder: str | None = None  # text embedder for captions; None: all-MiniLM-L6-v2
    device: str = "auto"  # auto | cpu | cuda
    compressor: str = "timeperceiver"  # registry name (vidmem.compressors.available())
    compressor_weights: Path | None = None  # a `vidmem train` checkpoint (safetensors)
    captions: bool = False  # describe segments with the VLM at ingest and index the captions
    max_new_tokens: int = 256  # answer length limit
    feature_cache: bool = True  # STC cacher: reuse vision features of near-identical frames instead of re-encoding
    prune: float = 1.0  # STC pruner: share of each segment's tokens shown to the model; selection spends budget / prune
    token_dtype: str = "float16"  # how new segments store their tokens: float16, or int8 with one scale per token
    kv_cache_bytes: int = 2 << 30  # kept KV caches (live windows, conversations) held at most, least recent out first
    encode_batch_frames: int = 32  # frames a tower call may carry across streams (agents/encoding.py); 0: off
    encode_gather_ms: float = 5.0  # how long the shared encoder waits for other open streams' frames before a call
    runtime: str | None = None  # eager | fast | fast-lm (agents/runtime.py); None: $VIDMEM_RUNTIME, else fast on a CPU

    def __post_init__(self) -> None:
        from vidmem.agents.runtime import resolve

        resolve(self.runtime)  # a bad name fails here, before anything loads
        if not 0.0 < self.prune <= 1.0:
            raise ConfigError(f"prune must be a share of tokens in (0, 1], not {self.prune}")
        if self.encode_batch_frames < 0 or self.encode_gather_ms < 0:
            raise ConfigError("encode_batch_frames (--encode-batch; 0: off) and encode_gather_ms (--encode-gather-ms) "
                              "must not be negative")
        if self.token_dtype not in ("float16", "int8"):
            raise ConfigError(f"token dtype must be float16 or int8, not {self.token_dtype!r}")


@dataclass
class EncodedSegment:
    tokens: np.ndarray  # (N, H) float16, the language model's input space
    slow: int  # keyframe tokens among the N
    views: str  # JSON: how each detail level shows the segment (compressors.Views)
    embedding: np.ndarray  # (E,) float32, L2-normalised CLIP image embedding of the keyframe
    keyframe_jpeg: bytes


def jpeg(image: np.ndarray, *, quality: int = 85, max_side: int = 640) -> bytes:
    """A small JPEG of a frame for event snapshots."""
    from PIL import Image

    picture = Image.fromarray(image)
    picture.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def fuse(*rankings: list[tuple[object, float]], k: float = 60.0) -> list[tuple[object, float]]:
    """Reciprocal-rank fusion of several ranked candidate lists (their scores live on different scales)."""
    fused: dict[int, list] = {}
    for ranking in rankings:
        for rank, (row, _) in enumerate(ranking):
            entry = fused.setdefault(row.id, [row, 0.0])
            entry[1] += 1.0 / (k + rank + 1)
    return sorted(((row, score) for row, score in fused.values()), key=lambda item: -item[1])


class MemorySink:
    """The ingest loop's sink: encode + compress + embed segments, then store them in the memory."""

    def __init__(self, app: "Vidmem", stream: str, *, on_segment: Callable[[object, object], None] | None = None) -> None:
        self.app = app
        self.stream = stream
        self.on_segment = on_segment  # called (row, segment) after each commit, from the worker thread
        self.last_row = None
        self.encoder = app.encoder
        # tower and embedder calls shared with the other streams (agents/encoding.py), this stream's cache its own
        self.shared = app.encoding.open(stream, cache=app.settings.feature_cache) if app.encoding is not None else None
        if self.shared is not None:
            self.encoder = self.shared.cache or app.encoder
        elif app.settings.feature_cache:  # one cache per stream: its frames resemble each other, not other cameras'
            from vidmem.compressors.stc import CachedEncoder

            self.encoder = CachedEncoder(app.encoder)

    def encode(self, segments: list) -> list[EncodedSegment]:
        app = self.app
        images = [frame.image for segment in segments for frame in segment.frames]
        keyframes = [s.keyframe.image for s in segments]
        with torch.inference_mode():
            if self.shared is not None:
                features, embeddings = self.shared.encode(images, keyframes)  # (sum T, L, D), (B, E)
            else:
                features = self.encoder(images)  # (sum T, L, D)
                embeddings = app.embedder.embed_images(keyframes)  # (B, E)
            out, offset = [], 0
            for segment, embedding in zip(segments, embeddings):
                block = app.vlm.compress(app.compressor, features[offset : offset + len(segment)].to(app.compressor_dtype))
                offset += len(segment)
                tokens = block.tokens.detach().to("cpu", torch.float16).numpy()
                out.append(EncodedSegment(tokens, block.slow, block.views.to_json(), embedding.astype(np.float32),
                                          jpeg(segment.keyframe.image)))
        return out

    def close(self) -> None:
        """The stream's ingest has ended: the shared encoder stops waiting for its company."""
        if self.shared is not None:
            self.shared.close()

    def commit(self, segment, encoded: EncodedSegment) -> int:
        row = self.app.memory.add_segment(
            stream=self.stream, start=segment.start, end=segment.end, frames=len(segment), cut=segment.cut,
            tokens=encoded.tokens, slow=encoded.slow, embedding=encoded.embedding, keyframe_jpeg=encoded.keyframe_jpeg,
            views=encoded.views,
        )
        self.last_row = row
        if self.app.settings.captions:  # model work: after questions, verification and live refresh
            from vidmem.agents.scheduler import Priority

            self.app.scheduler.run(Priority.CAPTION, lambda: self.app.caption(row))
        if self.on_segment is not None:
            self.on_segment(row, segment)
        return row.tokens

    def extend(self, segment) -> None:
        last = self.last_row or self.app.memory.last_segment(self.stream)
        if last is None:
            return
        self.app.memory.extend_segment(last.id, end=segment.end, frames=last.frames + len(segment))


class Vidmem:
    """One deployment: a memory directory plus the models that fill and read it."""

    def __init__(self, settings: Settings, *, readonly: bool = False) -> None:
        self.settings = settings
        self.readonly = readonly
        self._lock = threading.RLock()
        self._memory = self._vlm = self._embedder = self._compressor = self._answerer = None
        self._caption_embedder = self._compressor_tag = None
        from vidmem.agents.kept import KeptCaches

        # Kept KV caches, bounded in bytes: live streams' recent windows (keyed by stream name) and conversations
        # (keyed by ("conversation", stream, id)) share one LRU.
        self.live = KeptCaches(settings.kv_cache_bytes)
        self._status_writer = None  # one thread recording sources' states in the memory, in order
        self._scheduler = None  # model work by priority (agents/scheduler.py), started on first use
        self._encoding = None  # the vision tower and embedder batched across streams (agents/encoding.py)

    @property
    def memory(self):
        """The memory directory, opened on first use (so a model that fails to load leaves no trace on disk)."""
        from vidmem.memory import Memory

        # FAISS searches on a GPU copy when the device asks for one and faiss has GPUs ("auto": when it has)
        device = "cuda" if self.settings.device.startswith("cuda") else self.settings.device
        return self._once("_memory", lambda: Memory.open(self.settings.memory, readonly=self.readonly, device=device,
                                                         token_dtype=self.settings.token_dtype))

    # ---- lazily loaded models -----------------------------------------------------------------------
    def _once(self, attribute: str, load: Callable[[], object]):
        """The value of `attribute`, loaded by `load()` on first use (thread-safe)."""
        with self._lock:
            if getattr(self, attribute) is None:
                setattr(self, attribute, load())
            return getattr(self, attribute)

    @property
    def scheduler(self):
        """The one queue of model work, by priority: questions, verification, live refresh, captions."""
        from vidmem.agents.scheduler import Scheduler

        return self._once("_scheduler", Scheduler)

    @property
    def encoding(self):
        """The encoder batcher every stream's ingest shares, or None when `encode_batch_frames` is 0."""
        if not self.settings.encode_batch_frames:
            return None
        from vidmem.agents.encoding import EncodeBatcher

        settings = self.settings
        return self._once("_encoding", lambda: EncodeBatcher(self.encoder, self.embedder.embed_images,
                                                             max_frames=settings.encode_batch_frames,
                                                             gather_seconds=settings.encode_gather_ms / 1000))

    def encoding_stats(self) -> dict | None:
        """The shared encoder's figures (calls, frames, streams per call), or None before any stream used it."""
        return self._encoding.stats() if self._encoding is not None else None

    @property
    def vlm(self):
        from vidmem.agents.models import load_vlm
        from vidmem.agents.runtime import apply_runtime

        def load():
            vlm = load_vlm(self.settings.model, device=self.settings.device)
            apply_runtime(vlm, self.settings.runtime)  # the CPU fast path, before anything is encoded
            return vlm

        return self._once("_vlm", load)

    @property
    def encoder(self):
        return self.vlm.encoder

    @property
    def embedder(self):
        from vidmem.agents.models import load_embedder

        return self._once("_embedder", lambda: load_embedder(self.settings.embedder, device=self.settings.device))

    @property
    def compressor_dtype(self) -> torch.dtype:
        return next(self.compressor.parameters(), torch.zeros(0, dtype=self.vlm.dtype)).dtype

    @property
    def compressor(self):
        return self._once("_compressor", self._load_compressor)

    def _load_compressor(self):
        from vidmem.compressors import build_compressor

        encoder = self.encoder
        weights = self.settings.compressor_weights
        if weights is not None:
            from vidmem.compressors.checkpoint import load_compressor

            # a checkpoint trained with --train-llm is refused unless its language model (--model DIR) is loaded
            compressor, projector = load_compressor(weights, encoder_fingerprint=encoder.fingerprint, dim=encoder.dim,
                                                    language_model=self.vlm.language_model)
            if projector:
                self.vlm.projector.load_state_dict(projector)
        else:
            compressor = build_compressor(self.settings.compressor, dim=encoder.dim, num_patches=encoder.num_patches)
        return compressor.to(self.vlm.device, self.vlm.dtype).eval()

    @property
    def answerer(self) -> Answerer:
        settings = self.settings
        return self._once("_answerer", lambda: Answerer(self.vlm, max_new_tokens=settings.max_new_tokens, prune=settings.prune))

    def compressor_tag(self) -> str:
        """The compressor's name, plus a digest of its trained weights when a checkpoint is used (hashed once)."""
        weights = self.settings.compressor_weights
        if weights is None:
            return self.settings.compressor

        def tag() -> str:
            import hashlib

            return f"{self.compressor.name}@{hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:12]}"

        return self._once("_compressor_tag", tag)

    def check_answering_weights(self) -> None:
        """A memory made with trained compressor weights is read with the projector trained beside them."""
        made_with = getattr(self.memory.manifest, "compressor", None)
        if made_with is None or "@" not in made_with:
            return
        if self.settings.compressor_weights is None:
            raise ConfigError(
                f"this memory's tokens were made with trained compressor weights ({made_with}); pass the same "
                "checkpoint to ask with --compressor-weights"
            )
        if self.compressor_tag() != made_with:
            raise ConfigError(
                f"--compressor-weights is not the checkpoint this memory was made with ({made_with}); pass that one"
            )

    def manifest(self):
        from vidmem.memory import Manifest

        self.compressor  # noqa: B018 - loads trained weights first: a trained projector changes the fingerprint
        return Manifest(
            encoder=self.vlm.fingerprint, encoder_name=self.encoder.name, compressor=self.compressor_tag(),
            dim=self.vlm.hidden_size,
            embedder=self.embedder.name, embed_dim=self.embedder.dim,
        )

    # ---- ingest -------------------------------------------------------------------------------------
    async def ingest(
        self,
        source,
        *,
        stream: str,
        options=None,
        progress: bool = False,
        stop: asyncio.Event | None = None,
        on_segment: Callable[[object, object], None] | None = None,
        on_status: Callable[[str, object], None] | None = None,
    ):
        """Run the ingest loop from `source` into `stream`; returns the stream stage's IngestReport.

        The source's state changes (live, reconnecting, ended) and gaps are recorded in the memory and passed to
        `on_status(stream, SourceStatus)` (from the thread that made the change). Retention is enforced after.
        """
        from vidmem.stream.ingest import IngestOptions, ingest

        await asyncio.to_thread(self._prepare_ingest)
        self.watch_source(source, stream, on_status)
        sink = MemorySink(self, stream, on_segment=on_segment)
        try:
            report = await ingest(source, sink, stream=stream, options=options or IngestOptions(), progress=progress,
                                  stop=stop)
            report.cached_frames = getattr(sink.encoder, "hits", 0)  # the STC cacher's reused frames, when it is on
            return report
        finally:
            sink.close()
            await asyncio.to_thread(self._after_ingest, stream)

    def watch_source(self, source, stream: str, on_status: Callable[[str, object], None] | None = None) -> None:
        """Record `source`'s state and gaps in the memory as they change, and pass them to `on_status`."""
        if getattr(source, "on_status", None) is None:
            return

        def listener(status) -> None:  # any thread; the memory write goes to one ordered worker
            if not self.readonly:
                self._record_status(stream, status)
            if on_status is not None:
                on_status(stream, status)

        source.on_status.append(listener)
        listener(source.status)  # the state it is in already

    def _record_status(self, stream: str, status) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with self._lock:
            if self._status_writer is None:
                self._status_writer = ThreadPoolExecutor(1, thread_name_prefix="vidmem-status")
            writer = self._status_writer

        def write() -> None:
            try:
                self.memory.record_source(stream, status.to_json(), status.new_gap)
            except VidmemError as exc:
                # a memory that cannot be written (a full disk) fails the segment writes too, which report it to
                # the user once; the state is bookkeeping, so its own failure stays out of the way
                log.info("could not record the state of stream %s: %s", stream, exc)

        try:
            writer.submit(write)
        except RuntimeError:  # closing
            pass

    def _after_ingest(self, stream: str) -> None:
        if self._status_writer is not None:  # the states recorded so far land before the memory closes
            self._status_writer.submit(lambda: None).result()
        try:
            self.memory.apply_retention(stream)
        except VidmemError as exc:
            log.info("enforcing retention after ingesting stream %s failed: %s", stream, exc)

    def _prepare_ingest(self) -> None:
        self.memory.bind(self.manifest())  # refuses a memory made with another encoder before any work

    # ---- captions -----------------------------------------------------------------------------------
    CAPTION_PROMPT = "Describe what happens in this video segment in one short sentence."

    @property
    def caption_embedder(self):
        from vidmem.agents.models import load_caption_embedder

        settings = self.settings
        return self._once("_caption_embedder", lambda: load_caption_embedder(settings.caption_embedder, device=settings.device))

    def caption(self, row, *, memory=None) -> str:
        """Describe one stored segment with the VLM and index the caption's text embedding (blocking). `memory`:
        where to store it, when this app reads its memory read-only (an answer replica on a Ray cluster)."""
        pick = Pick(row, Level.FULL, 0.0, "caption")
        text = self.answerer.answer(self.CAPTION_PROMPT, [pick], self.memory.read_tokens, keep=False).text
        (memory or self.memory).set_caption(row.id, text, self.caption_embedder.embed_texts([text])[0])
        return text

    # ---- watch rules ---------------------------------------------------------------------------------
    def yes_probability(self, question: str, picks: list) -> float:
        """A watch rule's VLM verification: P(yes) of the yes/no `question` over exactly `picks`
        (agents/monitor.py `yes_probability`). On a Ray cluster it runs on an answer replica."""
        from vidmem.agents.monitor import yes_probability

        return yes_probability(self, question, picks)

    def _has_captions(self) -> bool:
        return bool(self.memory.caption_dim)  # set once the first caption embedding is stored

    # ---- questions ----------------------------------------------------------------------------------
    def _check_streams(self, streams: Sequence[str] | None) -> list[str] | None:
        if not streams:
            return None
        for name in streams:
            if not self.memory.has_stream(name):
                known = ", ".join(s.name for s in self.memory.streams()) or "none yet"
                raise UnknownStreamError(f"unknown stream '{name}'; the memory holds: {known}")
        return list(streams)

    def select(
        self,
        question: str,
        *,
        streams: Sequence[str] | None = None,
        budget: int = 6000,
        since: float | None = None,
        until: float | None = None,
        live_streams: Sequence[str] = (),
        options: SelectOptions | None = None,
        query: np.ndarray | None = None,
    ) -> Selection:
        """Evidence for `question`; `query` replaces its text embedding (e.g. an image embedding to search by)."""
        streams = self._check_streams(streams)
        if all(self.memory.span(stream=name, since=since, until=until) is None for name in (streams or [None])):
            where = f"stream '{streams[0]}'" if streams and len(streams) == 1 else "the memory"
            span = " in that time range" if since is not None or until is not None else ""
            raise VidmemError(f"{where} holds no segments{span}; ingest some video first")
        if query is None:
            query = self.embedder.embed_texts([question])[0]
        opts = options or SelectOptions()
        where = dict(k=opts.candidates, streams=streams, since=since, until=until)
        candidates = self.memory.search(query, kinds=["image"], **where)
        if self._has_captions():
            text_query = self.caption_embedder.embed_texts([question])[0]
            candidates = fuse(candidates, self.memory.search(text_query, kinds=["caption"], **where))
        if budget < 1:
            raise BudgetError(f"a budget of {budget} visual tokens holds nothing; give a positive --budget")
        # With the pruner on, select for the larger budget its pruning brings back within `budget`.
        spend = int(budget / self.settings.prune)
        room = self.context_room(question)
        opts = replace(opts, budget=min(spend, room))
        timeline = self.evidence_timeline(streams, since, until, candidates, live_streams, opts)
        selection = select(timeline, candidates, options=opts, live_streams=live_streams)
        # the timestamps and newlines around each segment take room in the model's context too
        overhead = len(selection.picks) * self.vlm.span_tokens
        if selection.visual_tokens + overhead > room:
            fit = replace(opts, budget=max(1, room - overhead))
            selection = select(timeline, candidates, options=fit, live_streams=live_streams)
        selection.budget = budget
        return selection

    def context_room(self, question: str) -> int:
        """Visual tokens and timestamps that fit in the model's context beside the template, question and answer."""
        vlm = self.vlm
        asked = vlm.count_tokens(question)
        if asked > vlm.context_length // 2:
            raise BudgetError(
                f"the question is {asked} tokens long, more than half the model's context ({vlm.context_length}); "
                "ask a shorter question"
            )
        text = vlm.count_tokens(vlm.layout.head) + vlm.count_tokens(vlm.layout.tail(question))
        return vlm.context_length - self.settings.max_new_tokens - text

    ANCHOR_SAMPLES = 2  # anchor candidates drawn per anchor the budget could hold (selection spaces them evenly)
    ANCHOR_TOKENS = 49  # a typical low-detail view (TimePerceiver's fast tokens), to size the anchor sample

    def evidence_timeline(self, streams, since, until, candidates, live_streams, options: SelectOptions) -> list:
        """The rows selection may choose from, found by index lookups rather than loading the range: the
        candidates and their neighbours, each live stream's recent window, and segments spread evenly in time over
        the range for anchors. A question's cost so stays the same over a day or a month of footage."""
        memory = self.memory
        rows = {row.id: row for row, _ in candidates}
        for row, _ in candidates[: options.candidates]:
            for near in memory.neighbours(row, options.neighbours):
                if (since is None or near.end >= since) and (until is None or near.start <= until):
                    rows.setdefault(near.id, near)
        for name in live_streams:
            bounds = memory.span(stream=name, since=since, until=until)
            if bounds is not None:
                window = memory.segments(stream=name, since=max(bounds[1] - options.recent_seconds, since or bounds[0]),
                                         until=until)
                rows.update((row.id, row) for row in window)
        anchors = max(1, min(1024, self.ANCHOR_SAMPLES * (options.budget // self.ANCHOR_TOKENS)))
        names = streams or [None]
        for name in names:
            for row in memory.spread(max(1, anchors // len(names)), stream=name, since=since, until=until):
                rows.setdefault(row.id, row)
        return sorted(rows.values(), key=lambda r: (r.start, r.stream, r.id))

    def ask(
        self,
        question: str,
        *,
        streams: Sequence[str] | None = None,
        budget: int = 6000,
        since: float | None = None,
        until: float | None = None,
        on_token: Callable[[str], None] | None = None,
        live: bool = False,
        follow_up: bool = False,
        query: np.ndarray | None = None,
    ) -> Answer:
        """Answer a question over the memory; blocking (run it in a worker thread from async code).

        live: `streams` names one live stream; its kept window answers without being prefilled again.
        follow_up: answer from the evidence of the previous question, whose KV cache is kept, so only the new
        question is prefilled (a conversation about the same moments).
        query: an embedding to retrieve by instead of the question's text embedding (an image, say).
        """
        if not question or not question.strip():
            raise VidmemError("the question is empty")
        self.check_answering_weights()
        kept = self.answerer.kept
        if follow_up and kept is not None:
            return self.answerer.answer(question, kept.picks, self.memory.read_tokens, on_token=on_token)
        if live and streams and len(streams) == 1 and since is None and until is None:
            return self.ask_live(question, stream=streams[0], budget=budget, on_token=on_token, query=query)
        selection = self.select(
            question, streams=streams, budget=budget, since=since, until=until, live_streams=streams if live else (),
            query=query,
        )
        return self.answerer.answer(question, selection.picks, self.memory.read_tokens, on_token=on_token)

    # ---- conversations: follow-ups reuse the first question's evidence and its kept cache ------------
    def ask_conversation(
        self,
        conversation: str,
        question: str,
        *,
        streams: Sequence[str] | None = None,
        budget: int = 6000,
        since: float | None = None,
        until: float | None = None,
        on_token: Callable[[str], None] | None = None,
        live: bool = False,
    ) -> Answer:
        """A question in conversation `conversation`: the first one selects evidence (the live stream's recent
        window among it when `live`) and keeps its KV cache; each follow-up is answered on that evidence,
        prefilling only itself (`cached_tokens` > 0). Conversations live in the byte-bounded LRU of kept caches:
        one evicted or never seen starts afresh. Blocking: run it in a worker thread from async code."""
        if not question or not question.strip():
            raise VidmemError("the question is empty")
        self.check_answering_weights()
        key = ("conversation", tuple(streams or ()), conversation)
        answerer = self.answerer
        with answerer.lock:
            kept = self.live.get(key)
            if kept is not None:
                return answerer.answer(question, [], self.memory.read_tokens, on_token=on_token, prefix=kept)
            selection = self.select(question, streams=streams, budget=budget, since=since, until=until,
                                    live_streams=streams if live else ())
            answer = answerer.answer(question, selection.picks, self.memory.read_tokens, on_token=on_token)
            if answerer.kept is not None:
                self.live[key] = answerer.kept
            return answer

    def end_conversation(self, conversation: str, streams: Sequence[str] | None = None) -> bool:
        """Forget a conversation's kept cache; True when there was one."""
        return self.live.pop(("conversation", tuple(streams or ()), conversation)) is not None

    # ---- live streams: a kept KV cache of the recent window ------------------------------------------
    def refresh_live(self, stream: str) -> KeptPrefix | None:
        """Bring `stream`'s kept window up to date with what the memory holds; blocking (model work).

        New segments are appended to the kept cache (prefilling only them); when the window has slid by more than
        its own length, or a budget's worth of tokens has piled up, it is rebuilt from the newest segments.
        Called after each live segment is committed, so a question about now prefills only itself.
        """
        window = LIVE_WINDOW_SECONDS
        last = self.memory.last_segment(stream)
        if last is None:
            return None
        rows = self.memory.segments(stream=stream, since=last.end - window)
        picks = [Pick(row, Level.FULL, 0.0, "recent") for row in rows]
        answerer = self.answerer
        with answerer.lock:
            kept = self.live.get(stream)
            if kept is not None:
                have = {p.row.id for p in kept.picks}
                newest = kept.picks[-1].row.start if kept.picks else float("-inf")
                # Only what came after the kept window: rows a rebuild left out stay out (time order holds).
                new = [p for p in picks if p.row.id not in have and p.row.start > newest]
                oldest = kept.picks[0].row.start if kept.picks else last.start
                tokens = sum(p.tokens for p in kept.picks) + sum(p.tokens for p in new)
                if oldest >= last.end - 2 * window and tokens <= LIVE_TOKEN_LIMIT:
                    if new:
                        answerer.extend(kept, new, self.memory.read_tokens)
                        self.live.refresh(stream)  # it grew in place
                    return kept
            self.live[stream] = kept = answerer.prefill(self._fit(picks), self.memory.read_tokens)
            return kept

    def _fit(self, picks: list[Pick]) -> list[Pick]:
        """The newest picks whose tokens fit the live limit, in time order."""
        kept, total = [], 0
        for pick in reversed(picks):
            if total + pick.tokens > LIVE_TOKEN_LIMIT // 2 and kept:
                break
            kept.append(pick)
            total += pick.tokens
        return kept[::-1]

    def ask_live(
        self,
        question: str,
        *,
        stream: str,
        budget: int = 6000,
        on_token: Callable[[str], None] | None = None,
        query: np.ndarray | None = None,
    ) -> Answer:
        """A question on a live stream: the kept window's cache plus older evidence the question retrieves."""
        started = time.perf_counter()  # the time to first token includes bringing the window up to date
        kept = self.refresh_live(stream)
        if kept is None:
            return self.ask(question, streams=[stream], budget=budget, on_token=on_token)
        window_tokens = sum(p.tokens for p in kept.picks)
        if window_tokens > budget:  # a budget smaller than the kept window: select afresh within it
            selection = self.select(question, streams=[stream], budget=budget, live_streams=[stream])
            return self.answerer.answer(question, selection.picks, self.memory.read_tokens, on_token=on_token)
        window_start = kept.picks[0].row.start
        # Older moments join only when they match the question better than anything in the window does (a
        # question about the past); a question about now then prefills nothing but itself. They are prefilled
        # after the kept window, out of time order; their timestamps say when they were.
        if query is None:
            query = self.embedder.embed_texts([question])[0]
        window_hits = self.memory.search(query, k=len(kept.picks), streams=[stream], since=window_start, kinds=["image"])
        bar = max((score for _, score in window_hits), default=float("-inf"))
        try:
            older = self.select(question, streams=[stream], budget=budget - window_tokens, until=window_start, query=query)
        except VidmemError:  # nothing before the window, or no room left for it
            older = None
        have = {p.row.id for p in kept.picks}
        extra = [
            p for p in (older.picks if older else [])
            if p.reason == "clip" and p.score > bar and p.row.id not in have and p.row.end <= window_start
        ]
        extra.sort(key=lambda p: p.row.start)
        return self.answerer.answer(
            question, [], self.memory.read_tokens, on_token=on_token, extra=extra, prefix=kept, started=started
        )

    def load_models(self) -> None:
        """Load every model now (the CLI does, so a missing model fails before the memory is touched)."""
        self.compressor, self.embedder  # noqa: B018 - properties load on access

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
        if self._encoding is not None:
            self._encoding.close()
        if self._status_writer is not None:
            self._status_writer.shutdown(wait=True)
            self._status_writer = None
        if self._memory is not None:
            self._memory.close()
