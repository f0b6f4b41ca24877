"""One encoder for every stream: the vision tower and the retrieval embedder batched across streams, fairly.

Each stream's ingest loop used to run the vision tower and the embedder in its own worker thread, so eight live
cameras made eight small tower calls at once, contending for the same cores. Here every stream submits its
segments' frames to one `EncodeBatcher` per deployment and waits on a future; the batcher's one thread gathers what
is waiting from all streams, runs one tower call and one embedder call over it, and hands each request its own
rows back. The compressor still runs per segment in the stream's thread, on the features it got back.

- Size: a call carries at most `max_frames` tower frames; a request larger than that runs alone.
- Fairness: when more waits than fits, requests are taken round-robin over streams, one per stream per turn,
  starting after the stream served first last time, so a busy camera cannot starve a quiet one.
- Company: when more than one stream is open, the thread waits up to `gather_seconds` for the other streams'
  requests before a call that holds fewer streams than are open; with one stream it never waits.
- Failures: an exception in a call goes to every request in it; the batcher carries on.
- STC's feature cache (`CachedEncoder`) stays per stream: the stream's thread looks its frames up in its own
  cache, and only the frames that miss are sent here (`StreamEncoder`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np
import torch

from vidmem.errors import VidmemError

log = logging.getLogger(__name__)

Tower = Callable[[list[np.ndarray]], torch.Tensor]  # list of (H, W, 3) uint8 -> (B, L, D)
Embed = Callable[[list[np.ndarray]], np.ndarray]  # list of (H, W, 3) uint8 -> (B, E) float32


@dataclass
class _Request:
    stream: Hashable
    frames: list[np.ndarray]  # for the vision tower
    keyframes: list[np.ndarray]  # for the embedder
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class Call:
    """One batched call, as the stats remember the most recent ones."""

    streams: tuple[Hashable, ...]  # the streams of its requests, in the order they were taken
    frames: int
    keyframes: int


class EncodeBatcher:
    """Gathers encode requests from many streams into shared tower and embedder calls (`close` to end)."""

    def __init__(self, tower: Tower, embed: Embed, *, max_frames: int = 32, gather_seconds: float = 0.005,
                 name: str = "vidmem-encode", history: int = 64) -> None:
        if max_frames < 1 or gather_seconds < 0:
            raise ValueError("EncodeBatcher needs max_frames >= 1 and gather_seconds >= 0")
        self.tower, self.embed = tower, embed
        self.max_frames, self.gather_seconds, self.name = max_frames, gather_seconds, name
        self._queues: OrderedDict[Hashable, deque[_Request]] = OrderedDict()  # streams in round-robin order
        self._open: dict[Hashable, int] = {}  # streams with an open StreamEncoder (ingest running), counted
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.calls = self.frames = self.keyframes = self.requests = 0
        self.multi_stream_calls = 0  # calls that carried requests of more than one stream
        self._stream_sum = 0  # streams per call, summed
        self.recent: deque[Call] = deque(maxlen=history)

    # ---- streams -------------------------------------------------------------------------------------
    def open(self, stream: Hashable, *, cache: bool = False) -> "StreamEncoder":
        """The encoder one stream's sink uses; `close` it when the stream's ingest ends."""
        with self._cond:
            self._open[stream] = self._open.get(stream, 0) + 1
        return StreamEncoder(self, stream, cache=cache)

    def _release(self, stream: Hashable) -> None:
        with self._cond:
            left = self._open.get(stream, 0) - 1
            if left > 0:
                self._open[stream] = left
            else:
                self._open.pop(stream, None)
            self._cond.notify_all()

    # ---- requests ------------------------------------------------------------------------------------
    def submit(self, stream: Hashable, frames: list[np.ndarray], keyframes: list[np.ndarray]) -> Future:
        """Queue frames for the tower and keyframes for the embedder; a Future of ((F, L, D) tensor, (K, E) array)."""
        request = _Request(stream, list(frames), list(keyframes))
        with self._cond:
            if self._closed:
                raise VidmemError("the encoder is shutting down")
            self._queues.setdefault(stream, deque()).append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return request.future

    def encode(self, stream: Hashable, frames: list[np.ndarray],
               keyframes: list[np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
        """Submit and wait (from a stream's thread, never the batcher's own)."""
        if threading.current_thread() is self._thread:
            return self._run([_Request(stream, list(frames), list(keyframes))])[0]
        return self.submit(stream, frames, keyframes).result()

    def stats(self) -> dict:
        """Figures since start: calls, frames, keyframes, requests, mean streams per call, multi-stream calls."""
        with self._cond:
            return {
                "calls": self.calls, "frames": self.frames, "keyframes": self.keyframes, "requests": self.requests,
                "streams_per_call": round(self._stream_sum / self.calls, 3) if self.calls else 0.0,
                "multi_stream_calls": self.multi_stream_calls,
                "max_frames": self.max_frames, "open_streams": len(self._open),
                "waiting": sum(len(q) for q in self._queues.values()),
            }

    # ---- the worker ----------------------------------------------------------------------------------
    def _take(self) -> list[_Request]:
        """Round-robin over streams, one request per stream per turn, while the frames fit (caller holds the lock)."""
        taken: list[_Request] = []
        frames = 0
        while True:
            progressed = False
            for stream in list(self._queues):
                queue = self._queues[stream]
                if not queue:
                    continue
                size = len(queue[0].frames)
                if taken and frames + size > self.max_frames:
                    continue  # a smaller request of another stream may still fit
                taken.append(queue.popleft())
                frames += size
                progressed = True
                # served: this stream goes to the back of the rotation
                self._queues.move_to_end(stream)
            if not progressed or frames >= self.max_frames:
                break
        for stream in [s for s, q in self._queues.items() if not q and s not in self._open]:
            del self._queues[stream]  # nothing keyed by a finished stream's name stays
        return taken

    def _ready(self) -> bool:
        return any(self._queues.values())

    def _gather(self) -> list[_Request] | None:
        with self._cond:
            while not self._ready():
                if self._closed:
                    return None
                self._cond.wait()
            if self.gather_seconds > 0 and len(self._open) > 1:
                # wait a moment for the other open streams, unless they are all here or the call is full already
                deadline = time.monotonic() + self.gather_seconds
                while not self._closed:
                    waiting = [q for q in self._queues.values() if q]
                    frames = sum(len(r.frames) for q in waiting for r in q)
                    if len(waiting) >= len(self._open) or frames >= self.max_frames:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            return self._take()

    def _run(self, requests: list[_Request]) -> list[tuple[torch.Tensor, np.ndarray]]:
        frames = [f for r in requests for f in r.frames]
        keyframes = [k for r in requests for k in r.keyframes]
        with torch.inference_mode():
            features = self.tower(frames) if frames else None  # (sum F, L, D)
            embeddings = self.embed(keyframes) if keyframes else None  # (sum K, E)
        out, f, k = [], 0, 0
        for r in requests:
            mine = features[f : f + len(r.frames)] if features is not None else None
            embedded = embeddings[k : k + len(r.keyframes)] if embeddings is not None else np.zeros((0, 0), np.float32)
            out.append((mine, embedded))
            f += len(r.frames)
            k += len(r.keyframes)
        streams = tuple(dict.fromkeys(r.stream for r in requests))
        with self._cond:
            self.calls += 1
            self.frames += len(frames)
            self.keyframes += len(keyframes)
            self.requests += len(requests)
            self._stream_sum += len(streams)
            self.multi_stream_calls += len(streams) > 1
            self.recent.append(Call(tuple(r.stream for r in requests), len(frames), len(keyframes)))
        return out

    def _work(self) -> None:
        while True:
            requests = self._gather()
            if requests is None:
                return
            requests = [r for r in requests if r.future.set_running_or_notify_cancel()]
            if not requests:
                continue
            try:
                results = self._run(requests)
            except BaseException as exc:  # every request of the failed call gets it; the worker carries on
                log.debug("a batched encode of %d requests failed: %s", len(requests), exc)
                for r in requests:
                    r.future.set_exception(exc)
                continue
            for r, result in zip(requests, results, strict=True):
                r.future.set_result(result)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, fail the waiting ones, and wait for the running call."""
        with self._cond:
            self._closed = True
            for queue in self._queues.values():
                while queue:
                    request = queue.popleft()
                    if request.future.set_running_or_notify_cancel():
                        request.future.set_exception(VidmemError("the encoder is shutting down"))
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


class StreamEncoder:
    """One stream's door to the batcher: `encode(frames, keyframes)` -> (features, embeddings), blocking.

    With `cache`, the stream's own STC `CachedEncoder` answers frames like recently encoded ones, in the stream's
    thread, and only its misses travel to the shared tower call (with the keyframes for the embedder).
    """

    def __init__(self, batcher: EncodeBatcher, stream: Hashable, *, cache: bool = False) -> None:
        self.batcher, self.stream = batcher, stream
        self._keyframes: list[np.ndarray] | None = None  # keyframes riding along with the cache's tower call
        self._embedded: np.ndarray | None = None
        self._closed = False
        self.cache = None
        if cache:
            from vidmem.compressors.stc import CachedEncoder

            self.cache = CachedEncoder(self)  # type: ignore[arg-type]  # it calls back `self(images)` for misses

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        """The cache's tower: its misses, plus the pending keyframes, in one request."""
        keyframes, self._keyframes = self._keyframes or [], None
        features, self._embedded = self.batcher.encode(self.stream, images, keyframes)
        return features

    def encode(self, frames: list[np.ndarray], keyframes: list[np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
        """(F, L, D) features of `frames` and (K, E) embeddings of `keyframes`."""
        if self.cache is None:
            return self.batcher.encode(self.stream, frames, keyframes)
        self._keyframes, self._embedded = list(keyframes), None
        features = self.cache(frames)
        if self._embedded is None:  # every frame was a cache hit: the keyframes go alone
            self._keyframes = None
            _, self._embedded = self.batcher.encode(self.stream, [], keyframes)
        embedded, self._embedded = self._embedded, None
        return features, embedded

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.batcher._release(self.stream)

