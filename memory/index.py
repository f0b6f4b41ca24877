"""The FAISS index over retrieval embeddings: derived data, rebuilt from SQLite whenever it is missing or stale.

Each kind of vector ('image' keyframe embeddings, 'caption' embeddings) has its own index whose FAISS ids are
the `vectors.vid` of SQLite. Every change to the vectors is also appended to the `changes` log in the same
transaction, so an index in any process catches up by replaying the log from the last sequence number it
applied (another process's new segments become searchable at the next search).

Index type follows size (figures from `python bench/memory.py`, 512-d, this 2-core machine):
- up to `flat_max` vectors an exact IndexFlatIP behind an IndexIDMap2;
- past it an IndexIVFFlat (inner product) with nlist ~ 2*sqrt(n) lists, probed `nprobe` at a time. IVF keeps
  exact vectors (removals and reconstruction work, no PQ recall loss) and, unlike HNSW, supports removing ids,
  which retention needs, and builds in seconds rather than tens of minutes at 1M on two cores.
Stream and time filters use per-vector metadata kept beside the index: small candidate sets are scored
exactly; large ones are searched with an IDSelectorBitmap and a wider probe.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sqlite3
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from vidmem.errors import MemoryStoreError

log = logging.getLogger(__name__)

BATCH = 50_000  # vectors read from SQLite per batch when rebuilding or catching up


@dataclass(frozen=True)
class IndexOptions:
    """How the retrieval index is built and searched."""

    flat_max: int = 20_000  # vectors; above this an IVF index replaces the exact flat one
    nprobe: int = 24  # IVF lists probed per unfiltered search
    exact_max: int = 8_192  # filtered searches with at most this many candidates are scored exactly
    grow_factor: float = 4.0  # retrain the IVF once the index has grown this many times past its training size
    device: str = "cpu"  # "cuda": unfiltered searches run on a GPU copy when faiss has GPUs


def _ivf_nlist(n: int) -> int:
    return int(min(65536, max(64, 2 ** round(math.log2(2 * math.sqrt(max(n, 1)))))))


class VectorIndex:
    """One kind's FAISS index plus per-vid metadata (segment, stream, start, end) for filters."""

    def __init__(self, kind: str, dim: int, options: IndexOptions) -> None:
        self.kind = kind
        self.dim = dim
        self.options = options
        self.applied_seq = 0  # last `changes.seq` replayed
        self.built_n = 0  # vectors when the index type was chosen (IVF training size)
        self.index: faiss.Index = self._new_flat()
        self.ivf = False
        self.dirty = False  # changed since it was saved
        # Metadata indexed by vid; stream = -1 marks an absent vid.
        self.seg = np.zeros(0, dtype=np.int64)
        self.stream = np.zeros(0, dtype=np.int32)
        self.start = np.zeros(0, dtype=np.float64)
        self.end = np.zeros(0, dtype=np.float64)
        self.count = 0
        self._gpu: faiss.Index | None = None
        self._gpu_stale = True

    def _new_flat(self) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    # -- metadata arrays ---------------------------------------------------------------------------------
    def _reserve(self, max_vid: int) -> None:
        size = len(self.seg)
        if max_vid < size:
            return
        new = max(max_vid + 1, size * 2, 1024)
        self.seg = np.concatenate([self.seg, np.zeros(new - size, np.int64)])
        self.stream = np.concatenate([self.stream, np.full(new - size, -1, np.int32)])
        self.start = np.concatenate([self.start, np.zeros(new - size, np.float64)])
        self.end = np.concatenate([self.end, np.zeros(new - size, np.float64)])

    def present(self, vids: np.ndarray) -> np.ndarray:
        inside = vids < len(self.stream)
        out = np.zeros(len(vids), dtype=bool)
        out[inside] = self.stream[vids[inside]] >= 0
        return out

    # -- changes -----------------------------------------------------------------------------------------
    def add(self, vids: np.ndarray, segs: np.ndarray, streams: np.ndarray, starts: np.ndarray, ends: np.ndarray,
            vecs: np.ndarray) -> None:
        if len(vids) == 0:
            return
        self._reserve(int(vids.max()))
        self.index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), vids.astype(np.int64))
        self.seg[vids], self.stream[vids], self.start[vids], self.end[vids] = segs, streams, starts, ends
        self.count += len(vids)
        self.dirty = self._gpu_stale = True

    def remove(self, vids: np.ndarray) -> None:
        vids = vids[self.present(vids)]
        if len(vids) == 0:
            return
        self.index.remove_ids(vids.astype(np.int64))
        self.stream[vids] = -1
        self.count -= len(vids)
        self.dirty = self._gpu_stale = True

    def update_times(self, vids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        keep = self.present(vids)
        self.start[vids[keep]], self.end[vids[keep]] = starts[keep], ends[keep]
        self.dirty = True

    def wants_rebuild(self, n: int) -> bool:
        if not self.ivf:
            return n > self.options.flat_max
        return n > self.built_n * self.options.grow_factor or n < self.built_n / (2 * self.options.grow_factor)

    # -- search ------------------------------------------------------------------------------------------
    def search(self, query: np.ndarray, k: int, streams: list[int] | None, since: float | None,
               until: float | None) -> list[tuple[int, int, float]]:
        """Best-first (vid, segment id, inner product) for one query vector."""
        if self.count == 0 or k <= 0:
            return []
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)  # (1, E)
        if streams is None and since is None and until is None:
            scores, ids = self._plain_search(q, k)
        else:
            n = len(self.stream)
            mask = self.stream >= 0 if streams is None else np.isin(self.stream, np.asarray(streams, np.int32))
            if since is not None:
                mask &= self.end[:n] >= since
            if until is not None:
                mask &= self.start[:n] <= until
            cand = np.flatnonzero(mask)
            if len(cand) == 0:
                return []
            if len(cand) <= self.options.exact_max or not self.ivf:
                scores, ids = self._exact(q, cand, k)
            else:
                scores, ids = self._selected_search(q, k, mask, len(cand))
        return [(int(i), int(self.seg[i]), float(s)) for s, i in zip(scores, ids) if i >= 0]

    def _plain_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._search_index()
        if self.ivf:
            faiss.extract_index_ivf(index).nprobe = self.options.nprobe
        scores, ids = index.search(q, min(k, self.count))
        return scores[0], ids[0]

    def _exact(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        vecs = self.index.reconstruct_batch(cand.astype(np.int64))  # (C, E)
        scores = vecs @ q[0]  # (C,)
        top = np.argpartition(-scores, k - 1)[:k] if len(cand) > k else np.arange(len(cand))
        top = top[np.argsort(-scores[top], kind="stable")]
        return scores[top], cand[top]

    def _selected_search(self, q: np.ndarray, k: int, mask: np.ndarray, selected: int
                         ) -> tuple[np.ndarray, np.ndarray]:
        bitmap = np.packbits(mask, bitorder="little")  # bit i set when vid i passes the filters
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        ivf = faiss.extract_index_ivf(self.index)
        # A filter that keeps a fraction f of the vectors needs about 1/f as many lists for the same recall.
        widen = min(8.0, self.count / max(selected, 1))
        params = faiss.SearchParametersIVF(sel=selector, nprobe=min(ivf.nlist, int(self.options.nprobe * widen)))
        scores, ids = self.index.search(q, k, params=params)
        return scores[0], ids[0]

    def _search_index(self) -> faiss.Index:
        if self.options.device != "cuda" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            return self.index
        if self._gpu is None or self._gpu_stale:
            self._resources = getattr(self, "_resources", None) or faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._resources, 0, self.index)
            self._gpu_stale = False
        return self._gpu

    # -- building ----------------------------------------------------------------------------------------
    def build(self, n: int, training: np.ndarray | None) -> None:
        """Start empty with the index type that suits `n` vectors (`training` is a sample for IVF)."""
        self.seg = np.zeros(0, np.int64)
        self.stream = np.zeros(0, np.int32)
        self.start = np.zeros(0, np.float64)
        self.end = np.zeros(0, np.float64)
        self.count = 0
        self.built_n = max(n, 1)
        self._gpu_stale = True
        self.dirty = True
        if n <= self.options.flat_max or training is None or len(training) < 64:
            self.index, self.ivf = self._new_flat(), False
            return
        nlist = min(_ivf_nlist(n), max(1, len(training) // 39))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.own_fields = True
        quantizer.this.disown()
        ivf.train(np.ascontiguousarray(training, dtype=np.float32))
        ivf.make_direct_map(True)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # ids are sparse vids: removal and reconstruct by id
        self.index, self.ivf = ivf, True
        log.info("built an IVF index (%d lists) for %d %s vectors", nlist, n, self.kind)

    # -- persistence -------------------------------------------------------------------------------------
    def save(self, folder: Path, instance: str) -> None:
        """Atomically write the index, its metadata and a JSON stamp tying them to this database."""
        folder.mkdir(parents=True, exist_ok=True)
        stamp = secrets.token_hex(8)
        _atomic(folder / f"{self.kind}.faiss", lambda p: faiss.write_index(self.index, str(p)))
        n = len(self.seg)
        _atomic(folder / f"{self.kind}.npz", lambda p: _savez(p, seg=self.seg[:n], stream=self.stream[:n],
                                                               start=self.start[:n], end=self.end[:n],
                                                               stamp=np.array(stamp)))
        info = {"instance": instance, "stamp": stamp, "kind": self.kind, "dim": self.dim, "ivf": self.ivf,
                "built_n": self.built_n, "applied_seq": self.applied_seq, "count": self.count}
        _atomic(folder / f"{self.kind}.json", lambda p: p.write_text(json.dumps(info)))
        self.dirty = False

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
                meta = {name: arrays[name] for name in ("seg", "stream", "start", "end")}
            index = faiss.read_index(str(folder / f"{kind}.faiss"))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.info("saved %s index unusable (%s); rebuilding from SQLite", kind, exc)
            return None
        self = cls(kind, dim, options)
        self.index, self.ivf = index, bool(info["ivf"])
        self.seg, self.stream, self.start, self.end = meta["seg"], meta["stream"], meta["start"], meta["end"]
        self.count, self.built_n, self.applied_seq = int(info["count"]), int(info["built_n"]), int(info["applied_seq"])
        if index.d != dim or index.ntotal != self.count or int((self.stream >= 0).sum()) != self.count:
            return None
        self.dirty = False
        return self


def _savez(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync it, rename over `path`, fsync the folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        tmp_path.unlink(missing_ok=True)


class IndexSet:
    """The per-kind indexes of one memory, kept in step with SQLite through the `changes` log.

    Reads go through a private read-only connection so that rebuilding never holds up the writer.
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
        self._conn: sqlite3.Connection | None = None

    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, check_same_thread=False,
                                         isolation_level=None, timeout=30)
        return self._conn

    def get(self, kind: str) -> VectorIndex:
        """The index for `kind`, caught up with every committed change."""
        with self.lock:
            index = self.indexes.get(kind)
            if index is None:
                index = VectorIndex.load(self.folder, kind, self.dims[kind], self.options, self.instance)
                if index is None:
                    index = self._rebuild(kind)
                self.indexes[kind] = index
            self._catch_up(index)
            return index

    def rebuild(self, kind: str) -> VectorIndex:
        with self.lock:
            self.indexes[kind] = self._rebuild(kind)
            return self.indexes[kind]

    def _rebuild(self, kind: str) -> VectorIndex:
        conn = self.conn()
        index = VectorIndex(kind, self.dims[kind], self.options)
        conn.execute("BEGIN")  # one snapshot: the vectors read and the sequence number agree
        try:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
            n = conn.execute("SELECT COUNT(*) FROM vectors WHERE kind = ?", (kind,)).fetchone()[0]
            training = None
            if n > self.options.flat_max:
                # Every step-th vector, about 64 per list, as the k-means sample.
                want = 64 * _ivf_nlist(n)
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
        finally:
            conn.execute("COMMIT")
        log.info("rebuilt the %s index from SQLite: %d vectors", kind, index.count)
        return index

    def _catch_up(self, index: VectorIndex) -> None:
        conn = self.conn()
        head = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
        if head == index.applied_seq:
            return
        oldest = conn.execute("SELECT MIN(seq) FROM changes").fetchone()[0]
        if head < index.applied_seq or (oldest is not None and oldest > index.applied_seq + 1):
            # The log was pruned past us or the database is older than the saved index.
            self.indexes[index.kind] = fresh = self._rebuild(index.kind)
            index.__dict__.update(fresh.__dict__)
            return
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
        if index.wants_rebuild(index.count):
            fresh = self._rebuild(index.kind)
            index.__dict__.update(fresh.__dict__)

    def save(self) -> None:
        if not self.persist:
            return
        with self.lock:
            for index in self.indexes.values():
                if index.dirty:
                    try:
                        index.save(self.folder, self.instance)
                    except OSError as exc:  # only a cache: the next open rebuilds it
                        log.warning("could not save the %s index: %s", index.kind, exc)

    def close(self) -> None:
        with self.lock:
            self.save()
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self.indexes.clear()


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
