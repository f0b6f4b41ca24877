"""`Memory`: one directory holding many streams' segments, their tokens and a searchable index.

Layout of a memory directory:
    memory.sqlite (+ -wal, -shm)   streams, segments, retrieval vectors, change log, rules, events, manifest
    tokens/<stream>/<chunk>.tok    append-only token records, rotated in chunks (retention deletes whole chunks)
    index/<kind>.{faiss,npz,json}  the FAISS index cache, rebuilt from SQLite when missing or stale

Adding a segment: its bytes are written and fsynced, then its rows are committed in one transaction that holds
SQLite's write lock (so writers in several processes never interleave inside a token file), then any index
catches up from the change log at its next search. A crash at any instant therefore loses at most the segment
in flight, and bytes a killed writer left past a chunk's committed end are simply overwritten by the next one.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from vidmem.errors import ConfigError, EncoderMismatchError, MemoryStoreError, UnknownStreamError
from vidmem.memory import tokens as tok
from vidmem.memory.index import IndexOptions, IndexSet
from vidmem.memory.postgres import is_memory_url
from vidmem.memory.retention import (RETENTION_KEY, age_cutoff, chunks_to_drop, enforce_budget, memory_retention,
                                     retention_json, stream_chunk_limit)
from vidmem.memory.schema import SCHEMA_VERSION, connect
from vidmem.memory.types import Manifest, Retention, SegmentRow, StreamInfo, check_stream_name

log = logging.getLogger(__name__)

DB_NAME = "memory.sqlite"
CHUNK_BYTES = 64 << 20  # token chunk file size before rotation, when no byte limit asks for smaller
CHANGES_KEPT = 5_000_000  # change-log rows kept at most; an index lagging further behind rebuilds from SQLite
CHANGES_MIN_KEPT = 10_000  # ... and at least (an index this far behind catches up instead of rebuilding)
GAPS_KEPT = 10_000  # recorded gaps kept per stream (the newest)
INDEX_UPKEEP_SECONDS = 60.0  # a writer brings its index up to date and saves it this often (readers load it)

_SEGMENT_COLUMNS = "s.id, t.name, s.start, s.end, s.frames, s.cut, s.tokens, s.slow, s.caption, s.views"


def _row(r: tuple) -> SegmentRow:
    return SegmentRow(id=r[0], stream=r[1], start=r[2], end=r[3], frames=r[4], cut=bool(r[5]), tokens=r[6],
                      slow=r[7], caption=r[8], views=r[9])


def _check_views(views: str | None, count: int) -> str | None:
    """The views JSON of a segment of `count` tokens, checked to index inside it."""
    if views is None:
        return None
    from vidmem.compressors.base import Views

    try:
        Views.from_json(views, count)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"segment views {views!r} do not describe {count} tokens: {exc}.") from exc
    return views


class Memory:
    """A durable temporal memory; one writer and any number of readers, in threads or processes."""

    _PARAM = "?"  # SQL parameter marker (the shared memory borrows methods written with it)
    _LOCK_ROW = ""  # SQLite's write transaction locks the whole database

    def __init__(self, path: Path, conn: sqlite3.Connection, *, readonly: bool, device: str,
                 token_dtype: str, index_options: IndexOptions, chunk_bytes: int) -> None:
        self.path = path
        self.chunk_bytes = chunk_bytes
        self.readonly = readonly
        self.device = device
        self.token_dtype = token_dtype
        self._conn = conn
        self._lock = threading.RLock()  # one sqlite3 connection, shared by the worker and event-loop threads
        self._files = tok.TokenFiles(path / "tokens", readonly=readonly)
        self._index_options = index_options
        self._indexes: IndexSet | None = None
        self._upkeep: threading.Thread | None = None  # a writer's index upkeep in the background
        self._upkeep_last = float("-inf")  # time.monotonic() of the last one
        self.instance = self._meta("instance") or ""
        manifest = self._meta("manifest")
        self.manifest: Manifest | None = Manifest.from_dict(json.loads(manifest)) if manifest else None

    # -- opening -----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False, device: str = "cpu", token_dtype: str = "float16",
             index_options: IndexOptions | None = None, chunk_bytes: int = CHUNK_BYTES) -> Memory:
        """Open (or, unless readonly, create) the memory at `path`.

        token_dtype: how new segments store their tokens ("float16", or "int8" with one scale per token).
        index_options: FAISS index choices (see IndexOptions); device="cuda" searches on a GPU copy.
        chunk_bytes: token file size before rotation (a stream's byte limit may ask for smaller chunks).
        A postgresql:// URL instead of a directory opens a shared memory (memory/shared.py) with the same interface.
        """
        if is_memory_url(path):
            from vidmem.memory.shared import SharedMemory

            return SharedMemory.open(path, readonly=readonly, device=device, token_dtype=token_dtype,  # type: ignore[return-value]
                                     chunk_bytes=chunk_bytes)
        path = Path(path).expanduser()
        db = path / DB_NAME
        if token_dtype not in tok.DTYPES:
            raise ConfigError(f"token_dtype must be one of {', '.join(tok.DTYPES)}, not {token_dtype!r}.")
        if device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be cpu, cuda or auto, not {device!r}.")
        if readonly and not db.is_file():
            raise MemoryStoreError(f"no vidmem memory at {path}; run `vidmem ingest` first.")
        if not readonly:
            if path.exists() and not path.is_dir():
                raise MemoryStoreError(f"the memory path {path} is a file, not a directory.")
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise MemoryStoreError(f"cannot create the memory directory {path}: {exc.strerror}.") from exc
        conn = connect(db, readonly=readonly)
        if not readonly:
            with _transaction(conn):
                if conn.execute("SELECT value FROM meta WHERE key='instance'").fetchone() is None:
                    conn.execute("INSERT INTO meta VALUES ('instance', ?)", (secrets.token_hex(8),))
                    conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        try:
            version = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise MemoryStoreError(f"{db} is not a vidmem memory: {exc}.") from exc
        if version is None or int(version[0]) > SCHEMA_VERSION:
            conn.close()
            raise MemoryStoreError(f"{db} was written by a newer or unknown vidmem (schema {version}); upgrade vidmem.")
        if int(version[0]) < SCHEMA_VERSION and readonly:
            conn.close()
            raise MemoryStoreError(f"{db} was written by an older vidmem (schema {version[0]}); its tokens cannot be "
                                   "shown to the model by this version: ingest the footage again into a new --memory.")
        if device == "auto":
            device = "cuda" if _faiss_gpus() else "cpu"
        options = index_options or IndexOptions()
        if options.device != device:
            options = IndexOptions(**{**options.__dict__, "device": device})
        if chunk_bytes < tok.ALIGN:
            raise ConfigError(f"chunk_bytes must be at least {tok.ALIGN}, not {chunk_bytes}.")
        return cls(path, conn, readonly=readonly, device=device, token_dtype=token_dtype, index_options=options,
                   chunk_bytes=chunk_bytes)

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        upkeep = self._upkeep
        if upkeep is not None:
            upkeep.join()
        with self._lock:
            if isinstance(self._conn, _Closed):
                return
            if self._indexes is not None:
                if not self.readonly:  # leave the index current for the readers that load it
                    try:
                        for kind in list(self._indexes.dims):
                            self._indexes.get(kind)
                    except (sqlite3.Error, MemoryStoreError) as exc:
                        log.warning("could not bring the index up to date before closing: %s", exc)
                self._indexes.close()
            self._files.close()
            self._conn.close()
            self._conn = _Closed(self.path)  # type: ignore[assignment]

    # -- small helpers -----------------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _check_writable(self) -> None:
        if self.readonly:
            raise MemoryStoreError(f"the memory at {self.path} was opened read-only.")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """Hold the thread lock and SQLite's write lock for one transaction."""
        self._check_writable()
        with self._lock, _transaction(self._conn) as conn:
            yield conn

    def _stream_id(self, name: str) -> int:
        row = self._conn.execute("SELECT id FROM streams WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownStreamError(f"no stream named {name!r} in the memory at {self.path}.")
        return row[0]

    def _index_set(self) -> IndexSet | None:
        with self._lock:
            if self.manifest is None:  # another process may have bound it since we opened
                stored = self._meta("manifest")
                if stored is None:
                    return None
                self.manifest = Manifest.from_dict(json.loads(stored))
            if self._indexes is not None and "caption" not in self._indexes.dims:
                caption_dim = self._meta("caption_dim")  # captions may have started arriving since
                if caption_dim:
                    self._indexes.dims["caption"] = int(caption_dim)
            if self._indexes is None:
                dims = {"image": self.manifest.embed_dim}
                caption_dim = self._meta("caption_dim")
                if caption_dim:
                    dims["caption"] = int(caption_dim)
                self._indexes = IndexSet(self.path / DB_NAME, self.path / "index", self.instance, dims,
                                         self._index_options, persist=not self.readonly)
            return self._indexes

    # -- manifest ----------------------------------------------------------------------------------------
    def bind(self, manifest: Manifest) -> None:
        """Record what makes this memory's tokens; refuse a different encoder, compressor or embedder."""
        with self._lock:
            if self.manifest is None and self.readonly:
                stored = self._meta("manifest")  # a writer may have bound it since we opened
                self.manifest = Manifest.from_dict(json.loads(stored)) if stored else None
            if self.manifest is None and not self.readonly:
                with _transaction(self._conn) as conn:
                    stored = conn.execute("SELECT value FROM meta WHERE key='manifest'").fetchone()
                    if stored is None:
                        conn.execute("INSERT INTO meta VALUES ('manifest', ?)", (json.dumps(manifest.to_dict()),))
                        self.manifest = manifest
                        return
                    self.manifest = Manifest.from_dict(json.loads(stored[0]))
            if self.manifest is None:
                raise MemoryStoreError(f"the memory at {self.path} is empty and was opened read-only.")
            self.manifest.check_compatible(manifest, str(self.path))

    # -- adding ------------------------------------------------------------------------------------------
    def add_segment(self, *, stream: str, start: float, end: float, frames: int, cut: bool, tokens: np.ndarray,
                    slow: int, embedding: np.ndarray, keyframe_jpeg: bytes | None = None,
                    caption: str | None = None, views: str | None = None) -> SegmentRow:
        """Store one segment durably; it is visible to readers once this returns.

        views: the compressor's declaration of how the segment is shown at each detail level (JSON text, see
        `vidmem.compressors.Views`); None for segments stored without one (the keyframe-first layout).
        """
        return self.add_segments([dict(stream=stream, start=start, end=end, frames=frames, cut=cut, tokens=tokens,
                                       slow=slow, embedding=embedding, keyframe_jpeg=keyframe_jpeg,
                                       caption=caption, views=views)])[0]

    def add_segments(self, items: Sequence[dict]) -> list[SegmentRow]:
        """Store several segments in one transaction (one fsync per touched chunk): all or none."""
        self._check_writable()
        if self.manifest is None:
            raise MemoryStoreError("bind a manifest (vision encoder, compressor, embedder) before adding segments.")
        records = [self._prepare(item) for item in items]
        incoming: dict[str, int] = {}
        for rec in records:
            incoming[rec["stream"]] = incoming.get(rec["stream"], 0) + rec["record_bytes"]
        for name, nbytes in incoming.items():
            self._make_room(name, nbytes)
        self._enforce_budget(sum(incoming.values()))
        rows: list[SegmentRow] = []
        now = time.time()
        with self._write() as conn:
            streams: dict[str, list] = {}
            for rec in records:
                st = streams.get(rec["stream"])
                if st is None:
                    st = streams[rec["stream"]] = self._stream_state(conn, rec["stream"], now)
                sid, chunk, chunk_end, limit = st
                if chunk_end > 0 and chunk_end + rec["record_bytes"] > limit:
                    self._files.seal(rec["stream"], chunk, chunk_end)
                    chunk, chunk_end = chunk + 1, 0
                self._files.write(rec["stream"], chunk, chunk_end, rec["payload"])
                rec.update(stream_id=sid, chunk=chunk, offset=chunk_end)
                st[1], st[2] = chunk, chunk_end + rec["record_bytes"]
            self._files.sync()  # bytes durable before any row that points at them commits
            for rec in records:
                cur = conn.execute(
                    "INSERT INTO segments (stream_id, start, end, frames, cut, tokens, slow, dim, dtype, chunk, offset,"
                    " nbytes, checksum, jpeg_bytes, jpeg_checksum, record_bytes, caption, created, views)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (rec["stream_id"], rec["start"], rec["end"], rec["frames"], rec["cut"], rec["n"], rec["slow"],
                     rec["d"], self.token_dtype, rec["chunk"], rec["offset"], rec["nbytes"], rec["checksum"],
                     rec["jpeg_bytes"], rec["jpeg_checksum"], rec["record_bytes"], rec["caption"], now,
                     rec["views"]))
                seg_id = cur.lastrowid
                self._add_vector(conn, seg_id, "image", rec["embedding"])
                conn.execute("UPDATE streams SET bytes = bytes + ?, max_span = MAX(max_span, ?) WHERE id = ?",
                             (rec["record_bytes"], rec["end"] - rec["start"], rec["stream_id"]))
                rows.append(SegmentRow(id=seg_id, stream=rec["stream"], start=rec["start"], end=rec["end"],
                                       frames=rec["frames"], cut=bool(rec["cut"]), tokens=rec["n"], slow=rec["slow"],
                                       caption=rec["caption"], views=rec["views"]))
            for name, (sid, chunk, chunk_end, _) in streams.items():
                conn.execute("UPDATE streams SET chunk = ?, chunk_end = ? WHERE id = ?", (chunk, chunk_end, sid))
        for name in incoming:
            self._age_out(name)
        self._index_upkeep_later()
        return rows

    def _index_upkeep_later(self) -> None:
        """A writer keeps the index current and saved, in the background, at most every INDEX_UPKEEP_SECONDS, so
        readers (`vidmem ask`) load it and replay a short tail instead of rebuilding it."""
        if self.readonly:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._upkeep_last < INDEX_UPKEEP_SECONDS or (self._upkeep is not None and self._upkeep.is_alive()):
                return
            self._upkeep_last = now

            def upkeep() -> None:
                try:
                    indexes = self._index_set()
                    if indexes is None:
                        return
                    for kind in list(indexes.dims):
                        indexes.get(kind)
                    indexes.save()
                except (MemoryStoreError, sqlite3.Error, OSError) as exc:  # a cache: the next upkeep tries again
                    log.warning("index upkeep of %s failed: %s", self.path, exc)

            self._upkeep = threading.Thread(target=upkeep, name="vidmem-index-upkeep", daemon=True)
            self._upkeep.start()

    def _prepare(self, item: dict) -> dict:
        """Check one segment and encode its record, outside any lock."""
        assert self.manifest is not None
        name = check_stream_name(item["stream"])
        tokens = np.asarray(item["tokens"])
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ConfigError(f"segment tokens must be a non-empty (N, D) array, got shape {tokens.shape}.")
        n, d = tokens.shape
        if d != self.manifest.dim:
            raise EncoderMismatchError(f"the memory at {self.path} holds tokens of width {self.manifest.dim} "
                                       f"({self.manifest.encoder_name}), not {d}; use another --memory directory.")
        if not np.isfinite(tokens).all():
            raise ConfigError("segment tokens contain NaN or infinite values.")
        slow = int(item["slow"])
        if not 0 <= slow <= n:
            raise ConfigError(f"slow token count {slow} is outside 0..{n}.")
        start, end = float(item["start"]), float(item["end"])
        if not (np.isfinite(start) and np.isfinite(end)) or end < start:
            raise ConfigError(f"segment time range {start}..{end} is not a valid range of seconds.")
        embedding = self._check_embedding(item["embedding"], self.manifest.embed_dim)
        data = tok.encode(tokens, self.token_dtype)
        jpeg = bytes(item.get("keyframe_jpeg") or b"")
        payload = data + jpeg
        record_bytes = tok.padded(len(payload))
        payload += b"\0" * (record_bytes - len(payload))
        return dict(stream=name, start=start, end=end, frames=int(item["frames"]), cut=int(bool(item["cut"])),
                    n=n, d=d, slow=slow, embedding=embedding, caption=item.get("caption"), payload=payload,
                    views=_check_views(item.get("views"), n),
                    nbytes=len(data), checksum=tok.checksum(data), jpeg_bytes=len(jpeg),
                    jpeg_checksum=tok.checksum(jpeg) if jpeg else 0, record_bytes=record_bytes)

    @staticmethod
    def _check_embedding(embedding: np.ndarray, dim: int) -> np.ndarray:
        vec = np.asarray(embedding, dtype=np.float32).reshape(-1)  # (E,)
        if vec.shape[0] != dim:
            raise EncoderMismatchError(f"retrieval embedding has width {vec.shape[0]}, the memory's embedder "
                                       f"makes {dim}.")
        if not np.isfinite(vec).all():
            raise ConfigError("retrieval embedding contains NaN or infinite values.")
        return vec

    def _stream_state(self, conn: sqlite3.Connection, name: str, now: float) -> list:
        """[stream id, chunk, committed chunk end, chunk size limit], creating the stream when new."""
        row = conn.execute("SELECT id, chunk, chunk_end, max_bytes FROM streams WHERE name = ?", (name,)).fetchone()
        if row is None:
            cur = conn.execute("INSERT INTO streams (name, created) VALUES (?, ?)", (name, now))
            row = (cur.lastrowid, 0, 0, None)
        budget = self._memory_retention(conn).max_bytes  # shared by the streams: chunks small enough to share it
        streams = conn.execute("SELECT COUNT(*) FROM streams").fetchone()[0] if budget is not None else 1
        return [row[0], row[1], row[2], stream_chunk_limit(row[3], budget, streams, self.chunk_bytes)]

    def _add_vector(self, conn: sqlite3.Connection, seg_id: int, kind: str, vec: np.ndarray) -> None:
        cur = conn.execute("INSERT INTO vectors (segment_id, kind, vec) VALUES (?, ?, ?)",
                           (seg_id, kind, vec.tobytes()))
        conn.execute("INSERT INTO changes (op, kind, vid, segment_id) VALUES ('add', ?, ?, ?)",
                     (kind, cur.lastrowid, seg_id))

    def extend_segment(self, segment_id: int, *, end: float, frames: int) -> None:
        """Grow a segment's time range (the static check found a repeat of it)."""
        with self._write() as conn:
            row = conn.execute("SELECT start, end, stream_id FROM segments WHERE id = ?", (segment_id,)).fetchone()
            if row is None:
                raise MemoryStoreError(f"segment {segment_id} is not in the memory at {self.path}.")
            if not end >= row[0]:
                raise ConfigError(f"segment end {end} is before its start {row[0]}.")
            conn.execute("UPDATE segments SET end = ?, frames = ? WHERE id = ?", (float(end), int(frames), segment_id))
            conn.execute("UPDATE streams SET max_span = MAX(max_span, ?) WHERE id = ?", (end - row[0], row[2]))
            conn.execute("INSERT INTO changes (op, kind, vid, segment_id) SELECT 'extend', kind, vid, segment_id "
                         "FROM vectors WHERE segment_id = ?", (segment_id,))

    def set_caption(self, segment_id: int, caption: str, embedding: np.ndarray | None = None) -> None:
        """Attach a caption; its embedding (any width, one width per memory) goes to a second index."""
        vec = None
        if embedding is not None:
            vec = np.asarray(embedding, dtype=np.float32).reshape(-1)  # (E',)
            known = self._meta("caption_dim")
            vec = self._check_embedding(vec, int(known) if known else vec.shape[0])
        with self._write() as conn:
            if conn.execute("UPDATE segments SET caption = ? WHERE id = ?", (caption, segment_id)).rowcount == 0:
                raise MemoryStoreError(f"segment {segment_id} is not in the memory at {self.path}.")
            if vec is None:
                return
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('caption_dim', ?)", (str(vec.shape[0]),))
            conn.execute("INSERT INTO changes (op, kind, vid, segment_id) SELECT 'del', kind, vid, segment_id "
                         "FROM vectors WHERE segment_id = ? AND kind = 'caption'", (segment_id,))
            conn.execute("DELETE FROM vectors WHERE segment_id = ? AND kind = 'caption'", (segment_id,))
            self._add_vector(conn, segment_id, "caption", vec)
        if self._indexes is not None and "caption" not in self._indexes.dims:
            self._indexes.dims["caption"] = vec.shape[0]

    # -- reading -----------------------------------------------------------------------------------------
    def _locate(self, segment_id: int) -> tuple:
        with self._lock:
            row = self._conn.execute(
                "SELECT t.name, s.chunk, s.offset, s.nbytes, s.checksum, s.tokens, s.dim, s.dtype, s.jpeg_bytes, "
                "s.jpeg_checksum FROM segments s JOIN streams t ON t.id = s.stream_id WHERE s.id = ?",
                (segment_id,)).fetchone()
        if row is None:
            raise MemoryStoreError(f"segment {segment_id} is no longer in the memory at {self.path} "
                                   "(deleted by retention?).")
        return row

    def read_tokens(self, row: SegmentRow | int) -> np.ndarray:
        """The segment's (N, D) float16 tokens, memory-mapped; raises MemoryStoreError on a checksum mismatch."""
        seg_id = row if isinstance(row, int) else row.id
        name, chunk, offset, nbytes, crc, n, d, dtype, _, _ = self._locate(seg_id)
        with self._lock:  # the mapping cache is shared by threads
            view = self._files.view(name, chunk, offset, nbytes)
        if tok.checksum(view) != crc:
            raise MemoryStoreError(f"segment {seg_id} of stream {name!r} failed its checksum; its token file "
                                   f"{self._files.path(name, chunk)} is damaged.")
        return tok.decode(view, n, d, dtype)

    def keyframe_jpeg(self, row: SegmentRow | int) -> bytes | None:
        seg_id = row if isinstance(row, int) else row.id
        name, chunk, offset, nbytes, _, _, _, _, jpeg_bytes, jpeg_crc = self._locate(seg_id)
        if not jpeg_bytes:
            return None
        with self._lock:
            view = self._files.view(name, chunk, offset + nbytes, jpeg_bytes)
        if tok.checksum(view) != jpeg_crc:
            raise MemoryStoreError(f"the keyframe of segment {seg_id} failed its checksum.")
        return bytes(view)

    def segments(self, *, stream: str | None = None, since: float | None = None, until: float | None = None,
                 limit: int | None = None) -> list[SegmentRow]:
        """Segments overlapping [since, until], chronological by start."""
        where, params = self._range_filter(stream, since, until)
        sql = f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t ON t.id = s.stream_id {where} " \
              "ORDER BY s.start, s.id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._lock:
            return [_row(r) for r in self._conn.execute(sql, params)]

    def _range_filter(self, stream: str | None, since: float | None, until: float | None) -> tuple[str, list]:
        clauses, params = [], []
        with self._lock:
            if stream is not None:
                clauses.append("s.stream_id = ?")
                params.append(self._stream_id(stream))
            if since is not None:
                # end >= since, with a start bound the (stream, start) index can use: no segment is longer
                # than the longest span seen.
                span = self._conn.execute("SELECT COALESCE(MAX(max_span), 0) FROM streams").fetchone()[0]
                clauses.append("s.start >= ? AND s.end >= ?")
                params += [float(since) - span, float(since)]
            if until is not None:
                clauses.append("s.start <= ?")
                params.append(float(until))
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params

    # -- windows for question evidence: index lookups, never a scan of the range ------------------------------
    def span(self, *, stream: str | None = None, since: float | None = None,
             until: float | None = None) -> tuple[float, float] | None:
        """(first start, last end) of the segments overlapping [since, until], or None when there are none."""
        where, params = self._range_filter(stream, since, until)
        with self._lock:
            first = self._conn.execute(f"SELECT s.start FROM segments s {where} ORDER BY s.start LIMIT 1",
                                       params).fetchone()
            if first is None:
                return None
            # The last end lies within the longest span of the last start: an index range, not a scan.
            last = self._conn.execute(f"SELECT s.start FROM segments s {where} ORDER BY s.start DESC LIMIT 1",
                                      params).fetchone()[0]
            span = self._conn.execute("SELECT COALESCE(MAX(max_span), 0) FROM streams").fetchone()[0]
            sep = " AND " if where else "WHERE "
            end = self._conn.execute(f"SELECT MAX(s.end) FROM segments s {where}{sep}s.start >= ?",
                                     [*params, last - span]).fetchone()[0]
        return float(first[0]), float(end)

    def neighbours(self, row: SegmentRow, count: int) -> list[SegmentRow]:
        """Up to `count` segments of the same stream on each side of `row`, chronological."""
        if count <= 0:
            return []
        # Plain range conditions, so the (stream, start) index serves them; ties on start are sorted out here.
        with self._lock:
            sid = self._stream_id(row.stream)
            before = self._conn.execute(
                f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t ON t.id = s.stream_id WHERE s.stream_id = ? "
                "AND s.start <= ? ORDER BY s.start DESC, s.id DESC LIMIT ?", (sid, row.start, count + 8)).fetchall()
            after = self._conn.execute(
                f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t ON t.id = s.stream_id WHERE s.stream_id = ? "
                "AND s.start >= ? ORDER BY s.start, s.id LIMIT ?", (sid, row.start, count + 8)).fetchall()
        before = [r for r in before if r[2] < row.start or r[0] < row.id][:count]
        after = [r for r in after if r[2] > row.start or r[0] > row.id][:count]
        return [_row(r) for r in reversed(before)] + [_row(r) for r in after]

    def spread(self, count: int, *, stream: str | None = None, since: float | None = None,
               until: float | None = None) -> list[SegmentRow]:
        """About `count` segments evenly spaced in time over the range: one index lookup each, whatever its length."""
        bounds = self.span(stream=stream, since=since, until=until)
        if bounds is None or count <= 0:
            return []
        lo, hi = bounds
        where, params = self._range_filter(stream, since, until)
        sep = " AND " if where else "WHERE "
        sql = f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t ON t.id = s.stream_id {where}{sep}s.start >= ? " \
              "ORDER BY s.start, s.id LIMIT 1"
        step = (hi - lo) / count
        out: dict[int, SegmentRow] = {}
        with self._lock:
            for k in range(count):
                r = self._conn.execute(sql, [*params, lo + k * step]).fetchone()
                if r is not None:
                    out.setdefault(r[0], _row(r))
        return sorted(out.values(), key=lambda r: (r.start, r.id))

    def last_segment(self, stream: str) -> SegmentRow | None:
        with self._lock:
            sid = self._stream_id(stream)
            r = self._conn.execute(f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t ON t.id = s.stream_id "
                                   "WHERE s.stream_id = ? ORDER BY s.start DESC, s.id DESC LIMIT 1", (sid,)).fetchone()
        return _row(r) if r else None

    def get_segment(self, segment_id: int) -> SegmentRow | None:
        with self._lock:
            r = self._conn.execute(f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t ON t.id = s.stream_id "
                                   "WHERE s.id = ?", (segment_id,)).fetchone()
        return _row(r) if r else None

    def _rows_by_id(self, ids: list[int]) -> dict[int, SegmentRow]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._conn.execute(f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t "
                                      f"ON t.id = s.stream_id WHERE s.id IN ({marks})", ids).fetchall()
        return {r[0]: _row(r) for r in rows}

    def has_stream(self, name: str) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM streams WHERE name = ?", (name,)).fetchone() is not None

    def streams(self) -> list[StreamInfo]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT t.name, COUNT(s.id), t.bytes, MIN(s.start), MAX(s.end), COALESCE(SUM(s.end - s.start), 0) "
                "FROM streams t LEFT JOIN segments s ON s.stream_id = t.id GROUP BY t.id ORDER BY t.name").fetchall()
        return [StreamInfo(name=r[0], segments=r[1], bytes=r[2], start=r[3], end=r[4], seconds_covered=float(r[5]))
                for r in rows]

    def stats(self) -> dict:
        """Streams, segments, bytes, time covered, each source's state and gaps, and the retention in force."""
        infos = self.streams()
        sources = self.sources()
        with self._lock:
            limits = {r[0]: Retention(max_age_seconds=r[1], max_bytes=r[2]) for r in
                      self._conn.execute("SELECT name, max_age, max_bytes FROM streams")}
            try:
                gaps = dict(self._conn.execute("SELECT stream, COUNT(*) FROM gaps GROUP BY stream").fetchall())
            except sqlite3.OperationalError:  # a memory from before gaps were recorded, opened read-only
                gaps = {}
            wide = self._memory_retention(self._conn)
        streams = [{"name": i.name, "segments": i.segments, "bytes": i.bytes, "start": i.start, "end": i.end,
                    "seconds": i.seconds_covered, "retention": retention_json(limits.get(i.name, Retention())),
                    "source": sources.get(i.name), "gaps": gaps.get(i.name, 0)} for i in infos]
        return {
            "path": str(self.path),
            "manifest": self.manifest.to_dict() if self.manifest else None,
            "streams": streams,
            "segments": sum(i.segments for i in infos),
            "bytes": sum(i.bytes for i in infos),
            "disk_bytes": self.disk_usage(),
            "seconds_covered": sum(i.seconds_covered for i in infos),
            "retention": retention_json(wide),
        }

    def disk_usage(self) -> int:
        """Bytes the whole memory takes on disk: token files, the database (with its WAL) and the index cache."""
        total = 0
        for folder in (self.path, self.path / "index"):
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            total += sum(_size_of(e) for e in entries)
        return total + self._files.total_bytes()

    def disk_bytes(self, stream: str | None = None) -> int:
        """Bytes of token files on disk (all streams, or one)."""
        names = [stream] if stream is not None else [i.name for i in self.streams()]
        return sum(sum(self._files.chunks_on_disk(n).values()) for n in names)

    # -- search ------------------------------------------------------------------------------------------
    def search(self, query: np.ndarray, *, k: int = 32, streams: list[str] | None = None,
               since: float | None = None, until: float | None = None,
               kinds: list[str] | None = None) -> list[tuple[SegmentRow, float]]:
        """Segments whose keyframe (or caption) embedding best matches `query`, best first, by inner product.

        kinds: which indexes to search ("image", "caption"); by default every index as wide as the query, and
        a segment found in both counts once, with its better score.
        """
        indexes = self._index_set()
        if indexes is None or k <= 0:
            return []
        q = np.asarray(query, dtype=np.float32).reshape(-1)  # (E,)
        if kinds is not None and not set(kinds) <= {"image", "caption"}:
            raise ConfigError(f"unknown index kinds {sorted(set(kinds) - {'image', 'caption'})}; use image or caption.")
        wanted = [kind for kind in indexes.dims if kinds is None or kind in kinds]
        if not wanted:
            return []  # e.g. captions asked for before any caption was stored
        kinds = [kind for kind in wanted if indexes.dims[kind] == q.shape[0]]
        if not kinds:
            raise ConfigError(f"the query embedding has width {q.shape[0]}; this memory's {'/'.join(wanted)} "
                              f"embeddings have width {', '.join(str(indexes.dims[w]) for w in wanted)}.")
        stream_ids = None
        if streams is not None:
            with self._lock:
                stream_ids = [self._stream_id(check_stream_name(s)) for s in streams]
        best: dict[int, float] = {}
        with indexes.lock:
            for kind in kinds:
                for _, seg, score in indexes.get(kind).search(q, k, stream_ids, since, until):
                    if score > best.get(seg, -np.inf):
                        best[seg] = score
        ranked = sorted(best.items(), key=lambda kv: -kv[1])[:k]
        rows = self._rows_by_id([seg for seg, _ in ranked])
        return [(rows[seg], score) for seg, score in ranked if seg in rows]

    @property
    def caption_dim(self) -> int | None:
        """Width of the caption embeddings once the first one is stored, else None."""
        with self._lock:
            value = self._meta("caption_dim")
        return int(value) if value else None

    def rebuild_index(self) -> None:
        """Drop the FAISS indexes and rebuild them from the vectors stored in SQLite."""
        indexes = self._index_set()
        if indexes is None:
            return
        with indexes.lock:
            for kind in list(indexes.dims):
                indexes.rebuild(kind)
            indexes.save()

    def index_ids(self, kind: str = "image") -> set[int]:
        """Segment ids the (caught-up) FAISS index holds; for consistency checks."""
        indexes = self._index_set()
        if indexes is None or kind not in indexes.dims:
            return set()
        with indexes.lock:
            index = indexes.get(kind)
            alive = np.flatnonzero(index.stream >= 0)
            return {int(s) for s in index.seg[alive]}

    def verify(self) -> dict:
        """Check every segment's checksums and the index against SQLite; returns counts and the bad ids."""
        bad: list[int] = []
        rows = self.segments()
        for row in rows:
            try:
                self.read_tokens(row)
                self.keyframe_jpeg(row)
            except MemoryStoreError:
                bad.append(row.id)
        ids = {r.id for r in rows}
        indexed = self.index_ids()
        return {"segments": len(rows), "bad": bad, "missing_from_index": sorted(ids - indexed),
                "extra_in_index": sorted(indexed - ids)}

    # -- retention ---------------------------------------------------------------------------------------
    def set_retention(self, stream: str | None, retention: Retention) -> None:
        """Set a stream's retention, or with `stream=None` the memory's: a default age for streams without their
        own, and a disk budget (`max_bytes`) for the whole memory directory."""
        if stream is None:
            with self._write() as conn:
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             (RETENTION_KEY, json.dumps(retention_json(retention))))
            return
        name = check_stream_name(stream)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM streams WHERE name = ?", (name,)).fetchone() is None:
                conn.execute("INSERT INTO streams (name, created) VALUES (?, ?)", (name, time.time()))
            conn.execute("UPDATE streams SET max_age = ?, max_bytes = ? WHERE name = ?",
                         (retention.max_age_seconds, retention.max_bytes, name))

    def retention(self, stream: str | None = None) -> Retention:
        """A stream's own retention, or with `stream=None` the memory's (default age, disk budget)."""
        with self._lock:
            if stream is None:
                return self._memory_retention(self._conn)
            row = self._conn.execute("SELECT max_age, max_bytes FROM streams WHERE name = ?", (stream,)).fetchone()
        if row is None:
            raise UnknownStreamError(f"no stream named {stream!r} in the memory at {self.path}.")
        return Retention(max_age_seconds=row[0], max_bytes=row[1])

    @staticmethod
    def _memory_retention(conn: sqlite3.Connection) -> Retention:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (RETENTION_KEY,)).fetchone()
        return memory_retention(row[0] if row else None)

    def apply_retention(self, stream: str | None = None) -> int:
        """Enforce retention: each stream's age and byte limits (one stream's, or all), then the memory's disk
        budget, oldest footage first; the change log, gaps and events are pruned with it. Returns the segments
        deleted."""
        self._check_writable()
        names = [stream] if stream is not None else [i.name for i in self.streams()]
        deleted = sum(self._age_out(name) + self._make_room(name, 0) for name in names)
        deleted += self._enforce_budget(0)
        self.prune_logs()
        return deleted

    def delete_stream(self, stream: str) -> int:
        """Delete a stream with all its segments and files; returns how many segments were deleted."""
        with self._write() as conn:
            sid = self._stream_id(stream)
            deleted = self._delete_segments(conn, "stream_id = ?", (sid,))
            conn.execute("DELETE FROM streams WHERE id = ?", (sid,))
            conn.execute("DELETE FROM sources WHERE stream = ?", (stream,))
            conn.execute("DELETE FROM gaps WHERE stream = ?", (stream,))
        self._files.remove_stream(stream)
        return deleted

    def _age_out(self, name: str) -> int:
        with self._lock:
            row = self._conn.execute("SELECT id, max_age, max_span FROM streams WHERE name = ?", (name,)).fetchone()
            if row is None:
                return 0
            sid, max_age, span = row
            if max_age is None:
                max_age = self._memory_retention(self._conn).max_age_seconds
            if max_age is None:
                return 0
            # The newest end lies within max_span of the newest start: two index lookups, not a scan.
            newest = self._conn.execute(
                "SELECT MAX(end) FROM segments WHERE stream_id = ? AND start >= "
                "(SELECT MAX(start) FROM segments WHERE stream_id = ?) - ?", (sid, sid, span)).fetchone()[0]
            if newest is None:
                return 0
            cutoff = age_cutoff(newest, max_age)
            with self._write() as conn:
                deleted = self._delete_segments(conn, "stream_id = ? AND start < ? AND end < ?", (sid, cutoff, cutoff))
        if deleted:
            self._free_chunks(name)
            log.info("retention removed %d segments older than %.0f s from stream %s", deleted, max_age, name)
        return deleted

    def _make_room(self, name: str, incoming: int) -> int:
        """Delete the stream's oldest chunks until its files plus `incoming` bytes fit its byte limit."""
        with self._lock:
            row = self._conn.execute("SELECT id, max_bytes FROM streams WHERE name = ?", (name,)).fetchone()
            if row is None or row[1] is None:
                return 0
            with self._write() as conn:
                sid, chunk, chunk_end, max_bytes = conn.execute(
                    "SELECT id, chunk, chunk_end, max_bytes FROM streams WHERE id = ?", (row[0],)).fetchone()
                sizes = self._files.chunks_on_disk(name)
                sizes[chunk] = chunk_end  # past the committed end is garbage a writer will overwrite
                victims = chunks_to_drop(name, sizes, incoming, max_bytes)
                if not victims:
                    return 0
            deleted = self._drop_chunks(name, victims)
        if deleted:
            log.info("retention removed %d segments from stream %s to stay under %d bytes", deleted, name, max_bytes)
        return deleted

    def _drop_chunks(self, name: str, victims: list[int]) -> int:
        """Delete whole chunks of a stream (rows first, committed, then their files); returns segments deleted."""
        with self._lock:
            with self._write() as conn:
                deleted = self._drop_chunk_rows(conn, name, victims)
            for c in victims:  # rows are committed as deleted before their bytes go
                self._files.delete_chunk(name, c)
        return deleted

    def _drop_chunk_rows(self, conn: Any, name: str, victims: list[int]) -> int:
        """Inside a write transaction: delete the segments in a stream's chunks `victims`, its row locked where the
        database locks rows (the shared memory runs this too); the caller deletes the files once this commits."""
        p = self._PARAM
        row = conn.execute(f"SELECT id, chunk, chunk_end FROM streams WHERE name = {p}{self._LOCK_ROW}",
                           (name,)).fetchone()
        if row is None:
            return 0
        sid, chunk, chunk_end = row
        if chunk in victims:  # the active chunk goes too: new records start a fresh one
            self._files.seal(name, chunk, chunk_end)
            conn.execute(f"UPDATE streams SET chunk = {p}, chunk_end = 0 WHERE id = {p}", (chunk + 1, sid))
        marks = ",".join([p] * len(victims))
        return self._delete_segments(conn, f"stream_id = {p} AND chunk IN ({marks})", (sid, *victims))

    def _enforce_budget(self, incoming: int) -> int:
        """Delete the memory's oldest chunks (any stream) until it fits its disk budget with `incoming` bytes more."""
        with self._lock:
            return enforce_budget(self, self._memory_retention(self._conn).max_bytes, incoming)

    def _stream_names(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT name FROM streams ORDER BY name")]

    def _first_stored(self, stream: str, chunk: int) -> float | None:
        """When the first segment in a chunk of `stream` was stored (None: the chunk holds none)."""
        return self._conn.execute("SELECT MIN(s.created) FROM segments s JOIN streams t ON t.id = s.stream_id "
                                  "WHERE t.name = ? AND s.chunk = ?", (stream, chunk)).fetchone()[0]

    def _compact(self) -> None:
        """Give freed database pages back to the file system and fold the WAL into the database."""
        with self._lock:
            try:
                self._conn.execute("PRAGMA incremental_vacuum")
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.OperationalError as exc:  # readers in other processes hold it: next time
                log.debug("compacting %s deferred: %s", self.path, exc)

    def prune_logs(self) -> None:
        """Bound the bookkeeping tables: the change log (an index further behind rebuilds from SQLite anyway),
        gaps older than the stream's footage or past the newest GAPS_KEPT, events older than their stream's
        footage."""
        with self._write() as conn:
            head = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
            vectors = conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
            keep = min(CHANGES_KEPT, max(CHANGES_MIN_KEPT, vectors))
            conn.execute("DELETE FROM changes WHERE seq <= ?", (head - keep,))
            oldest = {}  # one (stream, start) index lookup per stream, not a scan of every segment
            for sid, name in conn.execute("SELECT id, name FROM streams").fetchall():
                start = conn.execute("SELECT MIN(start) FROM segments WHERE stream_id = ?", (sid,)).fetchone()[0]
                if start is not None:
                    oldest[name] = start
            for name, start in oldest.items():
                conn.execute("DELETE FROM gaps WHERE stream = ? AND end < ?", (name, start))
                conn.execute("DELETE FROM gaps WHERE stream = ? AND id <= COALESCE((SELECT id FROM gaps WHERE "
                             "stream = ? ORDER BY id DESC LIMIT 1 OFFSET ?), -1)", (name, name, GAPS_KEPT))
                conn.execute("DELETE FROM events WHERE stream = ? AND start_time < ?", (name, start))
        self._compact()

    # -- sources -------------------------------------------------------------------------------------------
    def record_source(self, stream: str, status: dict, gap: tuple[float, float] | None = None) -> None:
        """Store what a stream's source is doing (a SourceStatus's JSON) and, when one closed, its gap."""
        name = check_stream_name(stream)
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO sources (stream, body, updated) VALUES (?, ?, ?)",
                         (name, json.dumps(status), time.time()))
            if gap is not None:
                conn.execute("INSERT INTO gaps (stream, start, end) VALUES (?, ?, ?)",
                             (name, float(gap[0]), float(gap[1])))

    def sources(self) -> dict[str, dict]:
        """Each stream's last recorded source state, with `updated` (unix seconds)."""
        with self._lock:
            try:
                rows = self._conn.execute("SELECT stream, body, updated FROM sources").fetchall()
            except sqlite3.OperationalError:  # a memory from before source states were recorded, read-only
                return {}
        return {name: {**json.loads(body), "updated": round(updated, 3)} for name, body, updated in rows}

    def gaps(self, stream: str | None = None) -> list[tuple[str, float, float]]:
        """Recorded gaps (stream, start, end), oldest first."""
        sql, params = "SELECT stream, start, end FROM gaps", ()
        if stream is not None:
            sql, params = sql + " WHERE stream = ?", (stream,)
        with self._lock:
            try:
                return [tuple(r) for r in self._conn.execute(sql + " ORDER BY start, id", params)]
            except sqlite3.OperationalError:
                return []

    def _free_chunks(self, name: str) -> None:
        """Delete chunk files no live segment points into (all but the active chunk)."""
        with self._lock:
            row = self._conn.execute("SELECT id, chunk FROM streams WHERE name = ?", (name,)).fetchone()
            if row is None:
                return
            used = {r[0] for r in self._conn.execute("SELECT DISTINCT chunk FROM segments WHERE stream_id = ?",
                                                     (row[0],))}
            for c in self._files.chunks_on_disk(name):
                if c < row[1] and c not in used:
                    self._files.delete_chunk(name, c)

    def _delete_segments(self, conn: sqlite3.Connection, where: str, params: tuple) -> int:
        """Delete matching segments with their vectors, logging the removals for every index."""
        ids = [r[0] for r in conn.execute(f"SELECT id FROM segments WHERE {where}", params)]
        if not ids:
            return 0
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS doomed (id INTEGER PRIMARY KEY)")
        conn.execute("DELETE FROM temp.doomed")
        conn.executemany("INSERT INTO temp.doomed VALUES (?)", ((i,) for i in ids))
        conn.execute("INSERT INTO changes (op, kind, vid, segment_id) SELECT 'del', kind, vid, segment_id "
                     "FROM vectors WHERE segment_id IN (SELECT id FROM temp.doomed)")
        conn.execute("DELETE FROM vectors WHERE segment_id IN (SELECT id FROM temp.doomed)")
        conn.execute("UPDATE streams SET bytes = bytes - COALESCE((SELECT SUM(record_bytes) FROM segments "
                     "WHERE id IN (SELECT id FROM temp.doomed) AND stream_id = streams.id), 0)")
        conn.execute("DELETE FROM segments WHERE id IN (SELECT id FROM temp.doomed)")
        head = conn.execute("SELECT MAX(seq) FROM changes").fetchone()[0] or 0
        if head > CHANGES_KEPT:
            conn.execute("DELETE FROM changes WHERE seq <= ?", (head - CHANGES_KEPT,))
        return len(ids)

    # -- rules and events ----------------------------------------------------------------------------------
    def put_rule(self, stream: str, rule: dict) -> None:
        name = check_stream_name(stream)
        rule_id = rule.get("id") if isinstance(rule, dict) else None
        if not isinstance(rule_id, str) or not rule_id:
            raise ConfigError("a rule needs a non-empty string 'id'.")
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO rules (stream, id, body, updated) VALUES (?, ?, ?, ?)",
                         (name, rule_id, json.dumps(rule), time.time()))

    def delete_rule(self, stream: str, rule_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM rules WHERE stream = ? AND id = ?", (stream, rule_id)).rowcount > 0

    def rules(self, stream: str | None = None) -> list[dict]:
        sql, params = "SELECT stream, body FROM rules", ()
        if stream is not None:
            sql, params = sql + " WHERE stream = ?", (stream,)
        with self._lock:
            out = []
            for name, body in self._conn.execute(sql + " ORDER BY stream, updated, id", params):
                rule = json.loads(body)
                rule.setdefault("stream", name)
                out.append(rule)
        return out

    def add_event(self, event: dict) -> None:
        event_id = event.get("id")
        if not isinstance(event_id, str) or not event_id:
            raise ConfigError("an event needs a non-empty string 'id'.")
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO events (id, stream, start_time, body) VALUES (?, ?, ?, ?)",
                         (event_id, event.get("stream"), event.get("start_time"), json.dumps(event)))

    def update_event(self, event_id: str, **fields: object) -> None:
        with self._write() as conn:
            row = conn.execute("SELECT body FROM events WHERE id = ?", (event_id,)).fetchone()
            if row is None:
                raise MemoryStoreError(f"no event {event_id!r} in the memory at {self.path}.")
            event = {**json.loads(row[0]), **fields}
            conn.execute("UPDATE events SET stream = ?, start_time = ?, body = ? WHERE id = ?",
                         (event.get("stream"), event.get("start_time"), json.dumps(event), event_id))

    def events(self, *, stream: str | None = None, since: float | None = None) -> list[dict]:
        clauses, params = [], []
        if stream is not None:
            clauses.append("stream = ?")
            params.append(stream)
        if since is not None:
            clauses.append("start_time >= ?")
            params.append(float(since))
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._lock:
            return [json.loads(r[0]) for r in
                    self._conn.execute(f"SELECT body FROM events {where} ORDER BY start_time, id", params)]


class _Closed:
    """Stands in for the connection after close(), so any later use fails with one clear error."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __getattr__(self, name: str) -> object:
        raise MemoryStoreError(f"the memory at {self.path} is closed.")


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (take the write lock now, so the read-then-write inside never deadlocks), COMMIT or ROLLBACK."""
    if conn.in_transaction:  # nested use inside one of our own transactions
        yield conn
        return
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        raise MemoryStoreError(f"the memory is busy or read-only: {exc}.") from exc
    try:
        yield conn
    except sqlite3.OperationalError as exc:  # a full disk or an I/O error inside the transaction
        _rollback(conn)
        raise MemoryStoreError(f"the memory could not be written: {exc}.") from exc
    except BaseException:
        _rollback(conn)
        raise
    try:
        conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:  # SQLite could not grow its files: nothing of this transaction stays
        _rollback(conn)
        raise MemoryStoreError(f"the memory could not be written: {exc}.") from exc


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _faiss_gpus() -> int:
    try:
        import faiss

        return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001 - a broken faiss-gpu simply means no GPU
        return 0


def _size_of(entry: os.DirEntry) -> int:
    """A plain file's size, 0 for anything else or for a file gone since its folder was listed (an index save's
    temporary file renamed meanwhile)."""
    try:
        return entry.stat(follow_symlinks=False).st_size if entry.is_file(follow_symlinks=False) else 0
    except FileNotFoundError:
        return 0
