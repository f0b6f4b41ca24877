"""The FAISS index over retrieval embeddings: derived data, rebuilt from SQLite whenever it is missing or stale.

Each kind of vector ('image' keyframe embeddings, 'caption' embeddings) has its own index. Every change to the
vectors is appended to the `changes` log in the same SQLite transaction, so an index in any process catches up
by replaying the log from the last sequence number it applied: another process's new segments are searchable at
the next search, and a saved index that is behind is brought up to date instead of rebuilt.

Index type follows size; chosen from `python bench/memory.py` on this 2-core machine (512-d, k=32, clustered
synthetic embeddings, `Memory.search` end to end, wall-clock p50 with other work running beside it):
- up to `flat_max` (10k) vectors: exact IndexFlatIP behind an IndexIDMap2 (1.2 ms at 10k, recall 1.0);
- past it: IndexIVFScalarQuantizer (8-bit, inner product) with ~2*sqrt(n) lists (512 at 100k, 2048 at 1M),
  probing 24: 0.4 ms at 100k, 2.2 ms at 1M (p99 6.6 ms), recall@10 0.97-0.98; 1.06 GB resident at 1M
  (codes plus the int8 copy below), built from SQLite in 74 s, loaded from its saved file in 1.2 s.
  IVF supports removing ids, which retention needs; HNSW does not (it would need tombstones and periodic
  rebuilds) and, by faiss's published build rates (not measured here), would take far longer for 1M vectors. 8-bit codes quarter the bytes scanned; recall did not move
  between nprobe 12 and 24, so the probe is not what limits it.
The IVF is retrained when the index has grown `grow_factor` times past the size it was trained for.

Filters: stream and time metadata (and an int8 copy of each vector) are kept beside the index, indexed by
local id (insertion order). A filter is a few vectorised comparisons (a `since` bound first skips, by binary
search over a running maximum of end times, every id that ended earlier); up to `exact_max` candidates are
scored exactly from the int8 copy, more are searched in the IVF with an IDSelectorBitmap and a wider probe.
"""
from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vidmem.errors import ConfigError, MemoryStoreError
from vidmem.memory.atomic import atomic_write as _atomic

try:
    import faiss
except ImportError as exc:  # the `cpu` or the `gpu` extra brings it (never both: the wheels clash)
    raise ConfigError("FAISS is not installed: pip install 'vidmem[cpu]', or 'vidmem[gpu]' on a CUDA machine.") from exc

log = logging.getLogger(__name__)

BATCH = 10_000  # vectors read from SQLite per batch when rebuilding or catching up (bounds the transient RAM)
TRAIN_PER_LIST = 40  # k-means sample size per IVF list (faiss warns below 39)
GPU_RECOPY_SECONDS = 30.0  # a changed index is copied to the GPU again at most this often
SAVE_MIN_FREE = 64 << 20  # bytes a disk must keep free beyond the index's own size for the index cache to be saved
KMEANS_ITERATIONS = 10  # faiss's default is 25; 10 loses no measurable recall here and trains 2.5x faster


@dataclass(frozen=True)
class IndexOptions:
    """How the retrieval index is built and searched."""

    flat_max: int = 10_000  # vectors; above this an IVF index replaces the exact flat one
    nprobe: int = 24  # IVF lists probed per unfiltered search
    exact_max: int = 16_384  # filtered searches with at most this many candidates are scored exactly
    grow_factor: float = 4.0  # retrain the IVF once the index has grown this many times past its training size
    device: str = "cpu"  # "cuda": unfiltered searches run on a GPU copy when faiss has GPUs


def _ivf_nlist(n: int) -> int:
    """About 2*sqrt(n) lists, a power of two: 512 at 100k, 2048 at 1M."""
    return int(min(65536, max(64, 2 ** round(math.log2(2 * math.sqrt(max(n, 1)))))))


class VectorIndex:
    """One kind's FAISS index plus per-vector metadata (segment, stream, start, end, int8 copy) for filters.

    FAISS ids are local: `vid - base`, where `base` is the smallest vid when the index was built. Every
    per-vector array is indexed by local id, so a filter is a few vectorised comparisons and its result is
    directly the bitmap FAISS's IDSelectorBitmap wants. Retention deletes the oldest vids, so the id span only
    grows with time; the index is rebuilt (re-based) once the span is more than twice the live count.
    """

    def __init__(self, kind: str, dim: int, options: IndexOptions, base: int = 0) -> None:
        self.kind = kind
        self.dim = dim
        self.options = options
        self.base = base  # vid of local id 0
        self.applied_seq = 0  # last `changes.seq` replayed
        self.built_n = 1  # vectors when the index type was chosen (IVF training size)
        self.index: faiss.Index = self._new_flat()
        self.ivf = False
        self.span = 0  # local ids in use: 0..span-1
        self.count = 0  # live vectors
        self.seg = np.zeros(0, np.int64)
        self.stream = np.zeros(0, np.int32)  # -1 marks a local id that is not (or no longer) in the index
        self.start = np.zeros(0, np.float64)
        self.end = np.zeros(0, np.float64)
        # end_max[i] = max(end[0..i]): non-decreasing, so a `since` filter skips, by binary search, the prefix of
        # local ids that all ended before it (ids follow insertion order, which follows time on every stream).
        self.end_max = np.zeros(0, np.float64)
        # An int8 copy (one scale per vector) scores small filtered sets directly: IVF cannot reconstruct
        # quickly (78 ms for 3,600 vectors from IVF-SQ8 with a hashtable direct map) and numpy's fp16 -> fp32
        # conversion is 13x slower than int8's (5.4 vs 0.4 ms for 2,500 x 512), measured on this machine.
        self.vec8 = np.zeros((0, dim), np.int8)
        self.scale = np.zeros(0, np.float32)
        self._gpu: faiss.Index | None = None
        self._gpu_stale = True
        self._gpu_time = 0.0
        self.unsaved = 0  # changes since the index was loaded or saved

    def _new_flat(self) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    # -- metadata arrays ---------------------------------------------------------------------------------
    def _reserve(self, span: int) -> None:
        size = len(self.seg)
        if span <= size:
            return
        new = max(span, int(size * 1.5), 1024)
        grow = new - size
        self.seg = np.concatenate([self.seg, np.zeros(grow, np.int64)])
        self.stream = np.concatenate([self.stream, np.full(grow, -1, np.int32)])
        self.start = np.concatenate([self.start, np.zeros(grow, np.float64)])
        self.end = np.concatenate([self.end, np.zeros(grow, np.float64)])
        self.end_max = np.concatenate([self.end_max, np.zeros(grow, np.float64)])
        self.vec8 = np.concatenate([self.vec8, np.zeros((grow, self.dim), np.int8)])  # (new, E)
        self.scale = np.concatenate([self.scale, np.zeros(grow, np.float32)])

    def _local(self, vids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(local ids, whether each vid is in the index)."""
        local = np.asarray(vids, np.int64) - self.base
        ok = (local >= 0) & (local < self.span)
        ok[ok] = self.stream[local[ok]] >= 0
        return local, ok

    # -- changes -----------------------------------------------------------------------------------------
    def add(self, vids: np.ndarray, segs: np.ndarray, streams: np.ndarray, starts: np.ndarray, ends: np.ndarray,
            vecs: np.ndarray) -> None:
        """Add vectors whose vids are larger than any added before (the change log's order)."""
        if len(vids) == 0:
            return
        local = np.asarray(vids, np.int64) - self.base
        if local.min() < self.span:
            raise MemoryStoreError("the retrieval index received vectors out of order; run `rebuild_index`.")
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # bulk work: use every core
        self._reserve(int(local.max()) + 1)
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)  # (n, E)
        self.index.add_with_ids(vecs, local)
        self.seg[local], self.stream[local], self.start[local], self.end[local] = segs, streams, starts, ends
        scale = np.abs(vecs).max(axis=1) / 127.0  # (n,)
        self.scale[local] = scale
        self.vec8[local] = np.rint(vecs / np.where(scale > 0, scale, 1.0)[:, None]).astype(np.int8)  # (n, E)
        first = self.span
        self.span = int(local.max()) + 1
        self._refresh_end_max(first)
        self.count += len(local)
        self.unsaved += len(local)
        self._gpu_stale = True

    def remove(self, vids: np.ndarray) -> None:
        local, ok = self._local(vids)
        local = local[ok]
        if len(local) == 0:
            return
        self.index.remove_ids(local)
        self.stream[local] = -1
        self.count -= len(local)
        self.unsaved += len(local)
        self._gpu_stale = True

    def update_times(self, vids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        local, ok = self._local(vids)
        self.start[local[ok]], self.end[local[ok]] = starts[ok], ends[ok]
        self.unsaved += int(ok.sum())
        if ok.any():
            self._refresh_end_max(int(local[ok].min()))

    def _refresh_end_max(self, first: int) -> None:
        """Recompute end_max from local id `first` on (an extension is usually of the newest segment)."""
        n = self.span
        if first >= n:
            return
        tail = np.maximum.accumulate(self.end[first:n])
        if first > 0:
            np.maximum(tail, self.end_max[first - 1], out=tail)
        self.end_max[first:n] = tail

    def present(self, vids: np.ndarray) -> np.ndarray:
        return self._local(vids)[1]

    def live_vids(self) -> np.ndarray:
        return np.flatnonzero(self.stream[:self.span] >= 0) + self.base

    def wants_rebuild(self) -> bool:
        if self.span > 2 * self.count + 4096:
            return True  # mostly deleted ids: re-base to keep the arrays proportional to what is live
        if not self.ivf:
            return self.count > self.options.flat_max
        grow = self.options.grow_factor
        return self.count > self.built_n * grow or self.count < self.built_n / (2 * grow)

    # -- search ------------------------------------------------------------------------------------------
    def search(self, query: np.ndarray, k: int, streams: list[int] | None, since: float | None,
               until: float | None) -> list[tuple[int, int, float]]:
        """Best-first (vid, segment id, inner product) for one query vector."""
        if self.count == 0 or k <= 0:
            return []
        # One query is too little work to split: OpenMP threads only spin and, on a busy machine, multiply the
        # latency (measured 3.3 ms -> 25 ms for a 10k flat search on 2 cores). The setting is per thread, and
        # torch shares the OpenMP runtime: restored afterwards, or the caller's next prefill runs on one core.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self._search(query, k, streams, since, until)
        finally:
            faiss.omp_set_num_threads(threads)

    def _search(self, query: np.ndarray, k: int, streams: list[int] | None, since: float | None,
                until: float | None) -> list[tuple[int, int, float]]:
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)  # (1, E)
        if streams is None and since is None and until is None:
            scores, ids = self._plain_search(q, k)
        else:
            n = self.span
            lo = 0 if since is None else int(np.searchsorted(self.end_max[:n], since, side="left"))
            sl = self.stream[lo:n]
            if streams is None:
                mask = sl >= 0
            elif len(streams) == 1:
                mask = sl == streams[0]
            else:
                mask = np.isin(sl, np.asarray(streams, np.int32))
            if since is not None:
                mask &= self.end[lo:n] >= since
            if until is not None:
                mask &= self.start[lo:n] <= until
            selected = int(np.count_nonzero(mask))
            if selected == 0:
                return []
            if selected == self.count:  # the filter keeps everything (one stream, the whole range): no selector
                scores, ids = self._plain_search(q, k)
            elif selected <= self.options.exact_max:
                scores, ids = self._exact(q, np.flatnonzero(mask) + lo, k)
            else:
                if lo:
                    full = np.zeros(n, bool)
                    full[lo:] = mask
                    mask = full
                scores, ids = self._selected_search(q, k, mask, selected)
        return [(int(i) + self.base, int(self.seg[i]), float(s)) for s, i in zip(scores, ids) if i >= 0]

    def _plain_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._search_index()
        if self.ivf:
            faiss.extract_index_ivf(index).nprobe = self.options.nprobe
        scores, ids = index.search(q, min(k, self.count))
        return scores[0], ids[0]

    def _exact(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        vecs = self.vec8[cand].astype(np.float32)  # (C, E)
        scores = np.empty(len(cand), np.float32)  # (C,)
        # faiss's single-threaded SIMD kernel: a BLAS gemv here wakes every BLAS thread for 1M multiply-adds.
        faiss.fvec_inner_products_ny(faiss.swig_ptr(scores), faiss.swig_ptr(q[0]), faiss.swig_ptr(vecs),
                                     self.dim, len(cand))
        scores *= self.scale[cand]
        top = np.argpartition(-scores, k - 1)[:k] if len(cand) > k else np.arange(len(cand))
        top = top[np.argsort(-scores[top], kind="stable")]
        return scores[top], cand[top]

    def _selected_search(self, q: np.ndarray, k: int, mask: np.ndarray, selected: int
                         ) -> tuple[np.ndarray, np.ndarray]:
        bitmap = np.packbits(mask, bitorder="little")  # bit i set when local id i passes the filters
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        if not self.ivf:
            params = faiss.SearchParameters(sel=selector)
        else:
            # A filter keeping a fraction f of the vectors leaves fewer hits per probed list; the true neighbours
            # still sit in the nearest lists, so probing 1/sqrt(f) times more (at most 4x) keeps recall (measured).
            widen = min(4.0, math.sqrt(self.count / max(selected, 1)))
            nlist = faiss.extract_index_ivf(self.index).nlist
            params = faiss.SearchParametersIVF(sel=selector, nprobe=min(nlist, int(self.options.nprobe * widen)))
        scores, ids = self.index.search(q, k, params=params)
        return scores[0], ids[0]

    def _search_index(self) -> faiss.Index:
        """The GPU copy when there is one and it is current; the CPU index (always current) otherwise."""
        if self.options.device != "cuda" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            return self.index
        if self._gpu is None or self._gpu_stale:
            if self._gpu is not None and time.monotonic() - self._gpu_time < GPU_RECOPY_SECONDS:
                return self.index  # copying on every new segment would cost more than it saves
            try:
                self._resources = getattr(self, "_resources", None) or faiss.StandardGpuResources()
                self._gpu = faiss.index_cpu_to_gpu(self._resources, 0, self.index)
                self._gpu_time = time.monotonic()
            except RuntimeError as exc:  # an index type faiss-gpu cannot hold: search on the CPU
                log.warning("cannot move the %s index to the GPU (%s); searching on the CPU", self.kind, exc)
                self.options = IndexOptions(**{**self.options.__dict__, "device": "cpu"})
                return self.index
            self._gpu_stale = False
        return self._gpu

    # -- building ----------------------------------------------------------------------------------------
    def build(self, n: int, training: np.ndarray | None) -> None:
        """Become empty, with the index type that suits `n` vectors (`training` is a sample for IVF)."""
        self.built_n = max(n, 1)
        self._gpu_stale = True
        if n <= self.options.flat_max or training is None or len(training) < 64:
            self.index, self.ivf = self._new_flat(), False
            return
        nlist = min(_ivf_nlist(n), max(1, len(training) // TRAIN_PER_LIST))
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        quantizer = faiss.IndexFlatIP(self.dim)
        # 8-bit scalar quantisation: a quarter of the bytes to scan per probed vector (the search is memory
        # bound), ranking indistinguishable from exact at recall@10 (see bench/memory.py).
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT)
        ivf.own_fields = True
        quantizer.this.disown()
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.train(np.ascontiguousarray(training, dtype=np.float32))
        ivf.make_direct_map(True)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # removal by id without scanning every list
        self.index, self.ivf = ivf, True
        log.info("built an IVF index (%d lists) for %d %s vectors", nlist, n, self.kind)

    # -- persistence -------------------------------------------------------------------------------------
    def save(self, folder: Path, instance: str) -> None:
        """Atomically write the index, its metadata and a JSON stamp tying them to this database."""
        folder.mkdir(parents=True, exist_ok=True)
        stamp = secrets.token_hex(8)
        n = self.span
        _atomic(folder / f"{self.kind}.faiss", lambda p: faiss.write_index(self.index, str(p)))
        _atomic(folder / f"{self.kind}.npz", lambda p: _savez(p, seg=self.seg[:n], stream=self.stream[:n],
                                                               start=self.start[:n], end=self.end[:n],
                                                               vec8=self.vec8[:n], scale=self.scale[:n],
                                                               stamp=np.array(stamp)))
        info = {"instance": instance, "stamp": stamp, "kind": self.kind, "dim": self.dim, "ivf": self.ivf,
                "built_n": self.built_n, "applied_seq": self.applied_seq, "count": self.count, "base": self.base,
                "span": self.span}
        _atomic(folder / f"{self.kind}.json", lambda p: p.write_text(json.dumps(info)))
        self.unsaved = 0

    @classmethod
    def load(cls, folder: Path, kind: str, dim: int, options: IndexOptions, instance: str) -> VectorIndex | None:
        """The saved index, or None when absent or not matching this database (it is then rebuilt)."""
        try:
            info = json.loads((folder / f"{kind}.json").read_text())
            if info["instance"] != instance or info["dim"] != dim or info["kind"] != kind:
                return None
            with np.load(folder / f"{kind}.npz", allow_pickle=False) as arrays:
                if str(arrays["stamp"]) != info["stamp"]:
                    return None
                meta = {name: arrays[name] for name in ("seg", "stream", "start", "end", "vec8", "scale")}
            index = faiss.read_index(str(folder / f"{kind}.faiss"))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.info("saved %s index unusable (%s); rebuilding from SQLite", kind, exc)
            return None
        self = cls(kind, dim, options, base=int(info["base"]))
        self.index, self.ivf = index, bool(info["ivf"])
        self.seg, self.stream, self.start, self.end = meta["seg"], meta["stream"], meta["start"], meta["end"]
        self.vec8, self.scale = meta["vec8"], meta["scale"]
        self.count, self.built_n, self.applied_seq = int(info["count"]), int(info["built_n"]), int(info["applied_seq"])
        self.span = int(info["span"])
        self.end_max = np.zeros(self.span, np.float64)
        self._refresh_end_max(0)
        if (index.d != dim or index.ntotal != self.count or len(self.seg) != self.span
                or self.vec8.shape != (self.span, dim) or len(self.scale) != self.span or int((self.stream >= 0).sum()) != self.count):
            return None
        return self


def _trim_heap() -> None:
    """Hand the rebuild's freed batches back to the OS (glibc keeps them otherwise: 670 -> 470 MB at 300k)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _savez(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


class IndexSet:
    """The per-kind indexes of one memory, kept in step with SQLite through the `changes` log.

    Reads go through a private read-only connection so that rebuilding never holds up the writer. Upkeep stays off
    the query path: a rebuild (the log pruned past the index, too much to replay, a flat index grown past
    `flat_max`, an IVF grown past its training) runs in a background thread with its own connection while the
    old index keeps serving (caught up by replay where it can be), and is swapped in when done. Only an index
    that does not exist at all is built while a search waits (there is nothing to serve meanwhile). A read-only
    set (`persist=False`: `vidmem ask` beside a writer) never rebuilds what it can replay: the writer saves the
    index periodically (`Memory`'s upkeep), so a reader loads it and replays the short tail.
    """

    def __init__(self, db: Path, folder: Path, instance: str, dims: dict[str, int], options: IndexOptions,
                 *, persist: bool) -> None:
        self.db = db
        self.folder = folder
        self.instance = instance
        self.dims = dims  # kind -> width; grows when captions get embeddings
        self.options = options
        self.persist = persist
        self.lock = threading.RLock()
        self.indexes: dict[str, VectorIndex] = {}
        self.rebuilds = 0  # rebuilds done (in the foreground or the background), for tests and logs
        self._conn: sqlite3.Connection | None = None
        self._fresh: dict[str, VectorIndex] = {}  # built in the background, waiting to be swapped in
        self._building: dict[str, threading.Thread] = {}
        self._closed = False

    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = _read_connection(self.db)
        return self._conn

    def get(self, kind: str) -> VectorIndex:
        """The index for `kind`, caught up with every committed change it can replay."""
        with self.lock:
            fresh = self._fresh.pop(kind, None)
            if fresh is not None:
                self.indexes[kind] = fresh
            index = self.indexes.get(kind)
            if index is None:
                index = VectorIndex.load(self.folder, kind, self.dims[kind], self.options, self.instance)
                if index is None:
                    index = self._rebuild(kind, self.conn())
                self.indexes[kind] = index
            self._catch_up(index)
            return index

    def rebuild(self, kind: str) -> VectorIndex:
        """Build `kind` afresh now (the caller waits)."""
        with self.lock:
            self._fresh.pop(kind, None)
            self.indexes[kind] = self._rebuild(kind, self.conn())
            return self.indexes[kind]

    def rebuilding(self) -> bool:
        """True while a background rebuild runs."""
        with self.lock:
            return any(t.is_alive() for t in self._building.values())

    def wait(self, timeout: float | None = None) -> None:
        """Wait for background rebuilds to finish (tests, benches, close)."""
        for thread in list(self._building.values()):
            thread.join(timeout)

    def _rebuild_later(self, kind: str) -> None:
        """Start building `kind` afresh in a background thread (once at a time); `get` swaps it in when done."""
        with self.lock:
            thread = self._building.get(kind)
            if self._closed or (thread is not None and thread.is_alive()) or kind in self._fresh:
                return

            def build() -> None:
                conn = _read_connection(self.db)
                try:
                    fresh = self._rebuild(kind, conn)
                except Exception:  # noqa: BLE001 - the old index keeps serving; the next search tries again
                    log.exception("rebuilding the %s index in the background failed", kind)
                    return
                finally:
                    conn.close()
                with self.lock:
                    if not self._closed:
                        self._fresh[kind] = fresh

            thread = threading.Thread(target=build, name=f"vidmem-index-{kind}", daemon=True)
            self._building[kind] = thread
            thread.start()

    def _rebuild(self, kind: str, conn: sqlite3.Connection) -> VectorIndex:
        index = VectorIndex(kind, self.dims[kind], self.options)
        conn.execute("BEGIN")  # one snapshot: the vectors read and the sequence number agree
        try:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
            n, base = conn.execute("SELECT COUNT(*), COALESCE(MIN(vid), 0) FROM vectors WHERE kind = ?",
                                   (kind,)).fetchone()
            index.base = base
            training = None
            if n > self.options.flat_max:
                # Every step-th vector as the k-means sample.
                want = TRAIN_PER_LIST * _ivf_nlist(n)
                step = max(1, n // want)
                rows = conn.execute("SELECT vec FROM vectors WHERE kind = ? AND vid % ? = 0", (kind, step)).fetchall()
                training = _vecs([r[0] for r in rows], index.dim)
            index.build(n, training)
            last = 0
            while True:
                rows = conn.execute(
                    "SELECT v.vid, v.segment_id, s.stream_id, s.start, s.end, v.vec FROM vectors v "
                    "JOIN segments s ON s.id = v.segment_id WHERE v.kind = ? AND v.vid > ? ORDER BY v.vid LIMIT ?",
                    (kind, last, BATCH)).fetchall()
                if not rows:
                    break
                _add_rows(index, rows)
                last = rows[-1][0]
            index.applied_seq = seq
            index.unsaved = index.count  # a fresh build is worth saving
        finally:
            conn.execute("COMMIT")
        _trim_heap()
        self.rebuilds += 1
        log.info("rebuilt the %s index from SQLite: %d vectors", kind, index.count)
        return index

    def _catch_up(self, index: VectorIndex) -> None:
        conn = self.conn()
        head = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
        if head != index.applied_seq:
            oldest = conn.execute("SELECT MIN(seq) FROM changes").fetchone()[0]
            lost = head < index.applied_seq or (oldest is not None and oldest > index.applied_seq + 1)
            if lost:
                # The log was pruned past us, or the database is older than the saved index: replay cannot
                # bring it up to date. A long-running process keeps serving the old one while a fresh one is
                # built; a one-shot reader must answer from the present, so it builds now.
                if self.persist and index.count:
                    self._rebuild_later(index.kind)
                    return
                fresh = self._rebuild(index.kind, conn)
                index.__dict__.update(fresh.__dict__)
                return
            self._replay(index, conn, head)  # idempotent and proportional to what changed
        if index.wants_rebuild() and self.persist:
            self._rebuild_later(index.kind)

    def _replay(self, index: VectorIndex, conn: sqlite3.Connection, head: int) -> None:
        while index.applied_seq < head:
            # A vid still present in `vectors` must be in the index with its segment's current times; a vid gone
            # from `vectors` must not be: the replay is idempotent and its order does not matter.
            rows = conn.execute(
                "SELECT c.seq, c.vid, v.vid, v.segment_id, s.stream_id, s.start, s.end, v.vec FROM changes c "
                "LEFT JOIN vectors v ON v.vid = c.vid LEFT JOIN segments s ON s.id = v.segment_id "
                "WHERE c.seq > ? AND c.seq <= ? AND c.kind = ? ORDER BY c.seq LIMIT ?",
                (index.applied_seq, head, index.kind, BATCH)).fetchall()
            if not rows:
                index.applied_seq = head
                break
            gone = np.array(sorted({r[1] for r in rows if r[2] is None or r[4] is None}), dtype=np.int64)
            index.remove(gone)
            live = {r[2]: r for r in rows if r[2] is not None and r[4] is not None}
            vids = np.array(sorted(live), dtype=np.int64)
            have = index.present(vids)
            if have.any():
                old = [live[v] for v in vids[have]]
                index.update_times(vids[have], np.array([r[5] for r in old]), np.array([r[6] for r in old]))
            _add_rows(index, [live[v][2:] for v in vids[~have]])
            index.applied_seq = rows[-1][0] if len(rows) == BATCH else head

    def save(self) -> None:
        if not self.persist:
            return
        with self.lock:
            for index in self.indexes.values():
                # A cache never takes the last of the disk from the footage: skip it when space is short.
                need = SAVE_MIN_FREE + 2 * index.span * (index.dim * 5 + 48)  # fp32 codes, int8 copy, metadata
                try:
                    free = shutil.disk_usage(self.folder.parent).free
                except OSError:
                    free = 0
                if free < need:
                    log.info("not saving the %s index: %d bytes free on disk, %d wanted", index.kind, free, need)
                    continue
                # Saving costs about as much as replaying a few percent of the index: skip small deltas.
                if index.unsaved and (index.unsaved * 20 >= index.count or index.unsaved >= 10_000):
                    try:
                        index.save(self.folder, self.instance)
                    except OSError as exc:  # only a cache: the next open rebuilds it
                        log.warning("could not save the %s index: %s", index.kind, exc)

    def close(self) -> None:
        with self.lock:
            self._closed = True
        self.wait()
        with self.lock:
            self._fresh.clear()
            self.save()
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self.indexes.clear()


def _read_connection(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False, isolation_level=None, timeout=30)


def _vecs(blobs: list[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), np.float32)
    arr = np.frombuffer(b"".join(blobs), dtype=np.float32)
    if arr.size != len(blobs) * dim:
        raise MemoryStoreError("stored retrieval embeddings have the wrong width; run `rebuild_index` after "
                               "checking the memory's manifest.")
    return arr.reshape(len(blobs), dim)  # (n, E)


def _add_rows(index: VectorIndex, rows: list[tuple]) -> None:
    """rows: (vid, segment_id, stream_id, start, end, vec blob)."""
    if not rows:
        return
    index.add(np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.int64),
              np.array([r[2] for r in rows], np.int32), np.array([r[3] for r in rows], np.float64),
              np.array([r[4] for r in rows], np.float64), _vecs([r[5] for r in rows], index.dim))
