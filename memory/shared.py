"""`SharedMemory`: the memory of a deployment past one machine, behind the same interface as the embedded `Memory`.

    Memory.open("postgresql://vidmem@db:5432/vidmem?index=milvus://milvus:19530&tokens=/mnt/vidmem/tokens")

- PostgreSQL holds streams, segments, retrieval vectors, the change log, rules, events and the manifest
  (memory/postgres.py); every node and process connects to it.
- Milvus holds the retrieval index (memory/milvus.py): derived data, replayed from the change log, rebuilt from
  the `vectors` table when lost.
- A directory on shared storage (NFS, CephFS, a Kubernetes ReadWriteMany volume) holds the token files, in the
  embedded layout (memory/tokens.py), or an S3-compatible object store holds them, one object per record
  (`tokens=s3://BUCKET/PREFIX`, memory/objectstore.py).

The guarantees are the embedded memory's. Adding a segment locks its stream's row (`SELECT ... FOR UPDATE`,
so writers on different nodes never interleave inside a token file), writes and fsyncs the record at the
stream's committed chunk end, then commits the rows: a segment is visible only once its tokens and its row are
committed, and bytes a killed writer left past the committed end are overwritten by the next one. Retention
commits the deletions before it removes files. Writers take stream row locks (in name order) before the
change-log lock, so two writers never wait on each other in a cycle.

Retention is the embedded memory's (memory/retention.py): each stream's age and byte limits, and the memory's own
default age and disk budget, stored in the `meta` table under the same key and JSON as in SQLite (an existing
shared memory needs no new tables). The disk budget counts `disk_usage()`: the token files on the shared storage
plus PostgreSQL's size of this memory's tables; Milvus holds derived data and is sized with the deployment, not by
the budget. Writers keep the budget before each write and after each ingest, `serve` and `monitor` every minute;
one process at a time (an advisory lock) drops the oldest chunks.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from vidmem.errors import ConfigError, MemoryStoreError, UnknownStreamError
from vidmem.memory import tokens as tok
from vidmem.memory.milvus import MilvusIndex
from vidmem.memory.objectstore import ObjectTokens
from vidmem.memory.postgres import CHANGES_LOCK, SCHEMA, SCHEMA_VERSION, SharedSpec, connect, transaction
from vidmem.memory.retention import (RETENTION_KEY, age_cutoff, chunks_to_drop, enforce_budget, memory_retention,
                                     retention_json, stream_chunk_limit)
from vidmem.memory.store import CHANGES_KEPT, CHUNK_BYTES, Memory
from vidmem.memory.types import Manifest, Retention, SegmentRow, StreamInfo, check_stream_name

log = logging.getLogger(__name__)

MARKER = ".vidmem-memory"  # in the token directory: the instance id of the memory it belongs to
BUDGET_LOCK = 0x7669646F  # advisory lock (beside memory/postgres.py's): one process at a time keeps the disk budget
TABLES = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA))  # the relations this memory owns
_SEGMENT_COLUMNS = "s.id, t.name, s.t_start, s.t_end, s.frames, s.cut, s.tokens, s.slow, s.caption, s.views"


def _row(r: tuple) -> SegmentRow:
    return SegmentRow(id=r[0], stream=r[1], start=r[2], end=r[3], frames=r[4], cut=bool(r[5]), tokens=r[6],
                      slow=r[7], caption=r[8], views=r[9])


class SharedMemory:
    """A memory in PostgreSQL + Milvus + shared token files; any number of writers and readers on any nodes."""

    # Checking and encoding a segment is the embedded memory's code: the same rules, the same record bytes.
    _prepare = Memory._prepare
    _check_embedding = staticmethod(Memory._check_embedding)
    # So is deleting whole chunks of a stream, with the stream's row locked against writers in other processes.
    _PARAM = "%s"
    _LOCK_ROW = " FOR UPDATE"
    _drop_chunks = Memory._drop_chunks
    _drop_chunk_rows = Memory._drop_chunk_rows
    # Reading a located segment's bytes and checking them, too, and what a closed or read-only memory does.
    read_tokens = Memory.read_tokens
    keyframe_jpeg = Memory.keyframe_jpeg
    _check_writable = Memory._check_writable
    __exit__ = Memory.__exit__

    def __init__(self, spec: SharedSpec, conn, *, readonly: bool, device: str, token_dtype: str,
                 chunk_bytes: int, files: ObjectTokens | None = None) -> None:
        self.spec = spec
        self.path = spec.display  # what messages call this memory
        self.readonly = readonly
        self.device = device
        self.token_dtype = token_dtype
        self.chunk_bytes = chunk_bytes
        self._conn = conn
        self._lock = threading.RLock()  # one connection, shared by the worker and event-loop threads
        self.instance = self._meta("instance") or ""
        self._files = files if files is not None else tok.TokenFiles(spec.tokens, readonly=readonly)
        self.index = MilvusIndex(spec.index, self.instance)
        manifest = self._meta("manifest")
        self.manifest: Manifest | None = Manifest.from_dict(json.loads(manifest)) if manifest else None

    # -- opening -----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, *, readonly: bool = False, device: str = "cpu", token_dtype: str = "float16",
             chunk_bytes: int = CHUNK_BYTES, **_: object) -> SharedMemory:
        """Open (or, unless readonly, create) the shared memory named by `url` (see memory/postgres.py)."""
        spec = SharedSpec.parse(url)
        if token_dtype not in tok.DTYPES:
            raise ConfigError(f"token_dtype must be one of {', '.join(tok.DTYPES)}, not {token_dtype!r}.")
        if chunk_bytes < tok.ALIGN:
            raise ConfigError(f"chunk_bytes must be at least {tok.ALIGN}, not {chunk_bytes}.")
        conn = connect(spec, create=not readonly)
        try:
            if conn.execute("SELECT to_regclass('meta')").fetchone()[0] is None:
                raise MemoryStoreError(f"no vidmem memory at {spec.display}; run `vidmem ingest` first.")
            if not readonly:
                conn.execute("INSERT INTO meta VALUES ('instance', %s), ('schema', %s) ON CONFLICT (key) DO NOTHING",
                             (secrets.token_hex(8), str(SCHEMA_VERSION)))
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if version is None or int(version[0]) > SCHEMA_VERSION:
                raise MemoryStoreError(f"{spec.display} was written by a newer or unknown vidmem (schema {version}); "
                                       "upgrade vidmem.")
            instance = conn.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()[0]
            if spec.objects is None:
                _check_token_dir(spec, instance, readonly=readonly)
        except BaseException:
            conn.close()
            raise
        store = None
        if spec.objects is not None:  # reachable, its bucket there, its prefix this memory's: one line otherwise
            try:
                store = ObjectTokens(spec.objects, endpoint=spec.s3_endpoint, readonly=readonly)
                store.claim(instance, MARKER, spec.display)
            except BaseException:
                if store is not None:
                    store.close()
                conn.close()
                raise
        memory = cls(spec, conn, readonly=readonly, device="cpu" if device == "auto" else device,
                     token_dtype=token_dtype, chunk_bytes=chunk_bytes, files=store)
        try:
            memory.index.client()  # an unreachable Milvus fails now, with one line, not at the first search
            memory.index.has("image")
        except BaseException:
            memory.close()
            raise
        return memory

    def __enter__(self) -> SharedMemory:
        return self

    def close(self) -> None:
        with self._lock:
            if self._conn is None:
                return
            self.index.close()
            self._files.close()
            self._conn.close()
            self._conn = None

    # -- small helpers -----------------------------------------------------------------------------------
    def _db(self):
        if self._conn is None:
            raise MemoryStoreError(f"the memory at {self.path} is closed.")
        return self._conn

    def _q(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._lock:
            return _fetch(self._db(), sql, params)

    def _meta(self, key: str) -> str | None:
        rows = self._q("SELECT value FROM meta WHERE key = %s", (key,))
        return rows[0][0] if rows else None

    @contextmanager
    def _write(self) -> Iterator:
        """Hold the thread lock and one PostgreSQL transaction."""
        self._check_writable()
        with self._lock, transaction(self._db()) as conn:
            yield conn

    def _stream_id(self, name: str) -> int:
        rows = self._q("SELECT id FROM streams WHERE name = %s", (name,))
        if not rows:
            raise UnknownStreamError(f"no stream named {name!r} in the memory at {self.path}.")
        return rows[0][0]

    def _dims(self) -> dict[str, int]:
        dims = {"image": self.manifest.embed_dim} if self.manifest else {}
        caption = self._meta("caption_dim")
        if caption:
            dims["caption"] = int(caption)
        return dims

    def _sync_index(self) -> dict[str, int]:
        """Bring Milvus up to every committed change; returns the kinds and their widths."""
        with self._lock:
            if self.manifest is None:
                stored = self._meta("manifest")  # another process may have bound it since we opened
                if stored is None:
                    return {}
                self.manifest = Manifest.from_dict(json.loads(stored))
            dims = self._dims()
            self.index.sync(self._db(), dims)
            return dims

    def _log_changes(self, conn, sql: str, params: Sequence) -> None:
        """Append change-log rows; the advisory lock makes sequence numbers commit in order."""
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHANGES_LOCK,))
        conn.execute(sql, params)

    def _after_commit(self) -> None:
        """A writer pushes its own changes into Milvus at once, so they are searchable without waiting for a reader."""
        try:
            self._sync_index()
        except MemoryStoreError as exc:  # committed is committed: the next search replays it
            log.warning("the index will catch up later: %s", exc)

    # -- manifest ----------------------------------------------------------------------------------------
    def bind(self, manifest: Manifest) -> None:
        """Record what makes this memory's tokens; refuse a different encoder, compressor or embedder."""
        with self._lock:
            if self.manifest is None:
                stored = self._meta("manifest")
                if stored is None and not self.readonly:
                    self._q("INSERT INTO meta VALUES ('manifest', %s) ON CONFLICT (key) DO NOTHING",
                            (json.dumps(manifest.to_dict()),))
                    stored = self._meta("manifest")
                self.manifest = Manifest.from_dict(json.loads(stored)) if stored else None
            if self.manifest is None:
                raise MemoryStoreError(f"the memory at {self.path} is empty and was opened read-only.")
            self.manifest.check_compatible(manifest, self.path)

    # -- adding ------------------------------------------------------------------------------------------
    def add_segment(self, *, stream: str, start: float, end: float, frames: int, cut: bool, tokens: np.ndarray,
                    slow: int, embedding: np.ndarray, keyframe_jpeg: bytes | None = None,
                    caption: str | None = None, views: str | None = None) -> SegmentRow:
        """Store one segment durably; it is visible to readers on every node once this returns."""
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
            streams = self._lock_streams(conn, sorted(incoming), now)
            for rec in records:
                st = streams[rec["stream"]]
                sid, chunk, chunk_end, limit = st
                if chunk_end > 0 and chunk_end + rec["record_bytes"] > limit:
                    self._files.seal(rec["stream"], chunk, chunk_end)
                    chunk, chunk_end = chunk + 1, 0
                self._files.write(rec["stream"], chunk, chunk_end, rec["payload"])
                rec.update(stream_id=sid, chunk=chunk, offset=chunk_end)
                st[1], st[2] = chunk, chunk_end + rec["record_bytes"]
            self._files.sync()  # bytes durable before any row that points at them commits
            for rec in records:
                seg_id = conn.execute(
                    "INSERT INTO segments (stream_id, t_start, t_end, frames, cut, tokens, slow, dim, dtype, chunk,"
                    " byte_offset, nbytes, checksum, jpeg_bytes, jpeg_checksum, record_bytes, caption, views, created)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (rec["stream_id"], rec["start"], rec["end"], rec["frames"], bool(rec["cut"]), rec["n"], rec["slow"],
                     rec["d"], self.token_dtype, rec["chunk"], rec["offset"], rec["nbytes"], rec["checksum"],
                     rec["jpeg_bytes"], rec["jpeg_checksum"], rec["record_bytes"], rec["caption"], rec["views"],
                     now)).fetchone()[0]
                rec["id"] = seg_id
                rec["vid"] = conn.execute("INSERT INTO vectors (segment_id, kind, vec) VALUES (%s, 'image', %s) "
                                          "RETURNING vid", (seg_id, rec["embedding"].tobytes())).fetchone()[0]
                conn.execute("UPDATE streams SET bytes = bytes + %s, max_span = GREATEST(max_span, %s) WHERE id = %s",
                             (rec["record_bytes"], rec["end"] - rec["start"], rec["stream_id"]))
                rows.append(SegmentRow(id=seg_id, stream=rec["stream"], start=rec["start"], end=rec["end"],
                                       frames=rec["frames"], cut=bool(rec["cut"]), tokens=rec["n"], slow=rec["slow"],
                                       caption=rec["caption"], views=rec["views"]))
            for sid, chunk, chunk_end, _ in streams.values():
                conn.execute("UPDATE streams SET chunk = %s, chunk_end = %s WHERE id = %s", (chunk, chunk_end, sid))
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHANGES_LOCK,))
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO changes (op, kind, vid, segment_id) VALUES ('add', 'image', %s, %s)",
                                [(rec["vid"], rec["id"]) for rec in records])
        for name in incoming:
            self._age_out(name)
        self._after_commit()
        return rows

    def _lock_streams(self, conn, names: list[str], now: float) -> dict[str, list]:
        """{name: [stream id, chunk, committed chunk end, chunk size limit]}, rows locked, created when new."""
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO streams (name, created) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                            [(n, now) for n in names])
        rows = conn.execute("SELECT name, id, chunk, chunk_end, max_bytes FROM streams WHERE name = ANY(%s) "
                            "ORDER BY name FOR UPDATE", (names,)).fetchall()
        budget = self._memory_retention().max_bytes  # shared by the streams: chunks small enough to share it
        count = conn.execute("SELECT COUNT(*) FROM streams").fetchone()[0] if budget is not None else 1
        return {r[0]: [r[1], r[2], r[3], stream_chunk_limit(r[4], budget, count, self.chunk_bytes)] for r in rows}

    def extend_segment(self, segment_id: int, *, end: float, frames: int) -> None:
        """Grow a segment's time range (the static check found a repeat of it)."""
        with self._write() as conn:
            row = conn.execute("SELECT s.t_start, t.name FROM segments s JOIN streams t ON t.id = s.stream_id "
                               "WHERE s.id = %s", (segment_id,)).fetchone()
            if row is None:
                raise MemoryStoreError(f"segment {segment_id} is not in the memory at {self.path}.")
            if not end >= row[0]:
                raise ConfigError(f"segment end {end} is before its start {row[0]}.")
            conn.execute("SELECT id FROM streams WHERE name = %s FOR UPDATE", (row[1],))
            conn.execute("UPDATE segments SET t_end = %s, frames = %s WHERE id = %s",
                         (float(end), int(frames), segment_id))
            conn.execute("UPDATE streams SET max_span = GREATEST(max_span, %s) WHERE name = %s",
                         (float(end) - row[0], row[1]))
            self._log_changes(conn, "INSERT INTO changes (op, kind, vid, segment_id) SELECT 'extend', kind, vid, "
                                    "segment_id FROM vectors WHERE segment_id = %s", (segment_id,))
        self._after_commit()

    def set_caption(self, segment_id: int, caption: str, embedding: np.ndarray | None = None) -> None:
        """Attach a caption; its embedding (any width, one width per memory) goes to a second index."""
        vec = None
        if embedding is not None:
            vec = np.asarray(embedding, dtype=np.float32).reshape(-1)  # (E',)
            known = self._meta("caption_dim")
            vec = self._check_embedding(vec, int(known) if known else vec.shape[0])
        with self._write() as conn:
            if conn.execute("UPDATE segments SET caption = %s WHERE id = %s", (caption, segment_id)).rowcount == 0:
                raise MemoryStoreError(f"segment {segment_id} is not in the memory at {self.path}.")
            if vec is None:
                return
            conn.execute("INSERT INTO meta VALUES ('caption_dim', %s) ON CONFLICT (key) DO NOTHING",
                         (str(vec.shape[0]),))
            self._log_changes(conn, "INSERT INTO changes (op, kind, vid, segment_id) SELECT 'del', kind, vid, "
                                    "segment_id FROM vectors WHERE segment_id = %s AND kind = 'caption'", (segment_id,))
            conn.execute("DELETE FROM vectors WHERE segment_id = %s AND kind = 'caption'", (segment_id,))
            vid = conn.execute("INSERT INTO vectors (segment_id, kind, vec) VALUES (%s, 'caption', %s) RETURNING vid",
                               (segment_id, vec.tobytes())).fetchone()[0]
            conn.execute("INSERT INTO changes (op, kind, vid, segment_id) VALUES ('add', 'caption', %s, %s)",
                         (vid, segment_id))
        self._after_commit()

    # -- reading -----------------------------------------------------------------------------------------
    def _locate(self, segment_id: int) -> tuple:
        rows = self._q("SELECT t.name, s.chunk, s.byte_offset, s.nbytes, s.checksum, s.tokens, s.dim, s.dtype, "
                       "s.jpeg_bytes, s.jpeg_checksum FROM segments s JOIN streams t ON t.id = s.stream_id "
                       "WHERE s.id = %s", (segment_id,))
        if not rows:
            raise MemoryStoreError(f"segment {segment_id} is no longer in the memory at {self.path} "
                                   "(deleted by retention?).")
        return rows[0]

    def segments(self, *, stream: str | None = None, since: float | None = None, until: float | None = None,
                 limit: int | None = None) -> list[SegmentRow]:
        """Segments overlapping [since, until], chronological by start."""
        where, params = self._range_filter(stream, since, until)
        sql = f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t ON t.id = s.stream_id {where} " \
              "ORDER BY s.t_start, s.id"
        if limit is not None:
            sql += " LIMIT %s"
            params.append(int(limit))
        return [_row(r) for r in self._q(sql, params)]

    def _range_filter(self, stream: str | None, since: float | None, until: float | None) -> tuple[str, list]:
        clauses, params = [], []
        if stream is not None:
            clauses.append("s.stream_id = %s")
            params.append(self._stream_id(stream))
        if since is not None:
            span = self._q("SELECT COALESCE(MAX(max_span), 0) FROM streams")[0][0]
            clauses.append("s.t_start >= %s AND s.t_end >= %s")
            params += [float(since) - span, float(since)]
        if until is not None:
            clauses.append("s.t_start <= %s")
            params.append(float(until))
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params

    def span(self, *, stream: str | None = None, since: float | None = None,
             until: float | None = None) -> tuple[float, float] | None:
        """(first start, last end) of the segments overlapping [since, until], or None when there are none."""
        where, params = self._range_filter(stream, since, until)
        rows = self._q(f"SELECT MIN(s.t_start), MAX(s.t_end) FROM segments s {where}", params)
        if not rows or rows[0][0] is None:
            return None
        return float(rows[0][0]), float(rows[0][1])

    def neighbours(self, row: SegmentRow, count: int) -> list[SegmentRow]:
        """Up to `count` segments of the same stream on each side of `row`, chronological."""
        if count <= 0:
            return []
        sid = self._stream_id(row.stream)
        before = self._q(f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t ON t.id = s.stream_id "
                         "WHERE s.stream_id = %s AND (s.t_start < %s OR (s.t_start = %s AND s.id < %s)) "
                         "ORDER BY s.t_start DESC, s.id DESC LIMIT %s", (sid, row.start, row.start, row.id, count))
        after = self._q(f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t ON t.id = s.stream_id "
                        "WHERE s.stream_id = %s AND (s.t_start > %s OR (s.t_start = %s AND s.id > %s)) "
                        "ORDER BY s.t_start, s.id LIMIT %s", (sid, row.start, row.start, row.id, count))
        return [_row(r) for r in reversed(before)] + [_row(r) for r in after]

    def spread(self, count: int, *, stream: str | None = None, since: float | None = None,
               until: float | None = None) -> list[SegmentRow]:
        """About `count` segments evenly spaced in time over the range: one index lookup each."""
        bounds = self.span(stream=stream, since=since, until=until)
        if bounds is None or count <= 0:
            return []
        lo, hi = bounds
        where, params = self._range_filter(stream, since, until)
        sep = " AND " if where else "WHERE "
        sql = f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t ON t.id = s.stream_id {where}{sep}" \
              "s.t_start >= %s ORDER BY s.t_start, s.id LIMIT 1"
        step = (hi - lo) / count
        out: dict[int, SegmentRow] = {}
        for k in range(count):
            rows = self._q(sql, [*params, lo + k * step])
            if rows:
                out.setdefault(rows[0][0], _row(rows[0]))
        return sorted(out.values(), key=lambda r: (r.start, r.id))

    def last_segment(self, stream: str) -> SegmentRow | None:
        sid = self._stream_id(stream)
        rows = self._q(f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t ON t.id = s.stream_id "
                       "WHERE s.stream_id = %s ORDER BY s.t_start DESC, s.id DESC LIMIT 1", (sid,))
        return _row(rows[0]) if rows else None

    def get_segment(self, segment_id: int) -> SegmentRow | None:
        rows = self._q(f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t ON t.id = s.stream_id "
                       "WHERE s.id = %s", (segment_id,))
        return _row(rows[0]) if rows else None

    def _rows_by_id(self, ids: list[int]) -> dict[int, SegmentRow]:
        if not ids:
            return {}
        rows = self._q(f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN streams t ON t.id = s.stream_id "
                       "WHERE s.id = ANY(%s)", (list(ids),))
        return {r[0]: _row(r) for r in rows}

    def has_stream(self, name: str) -> bool:
        return bool(self._q("SELECT 1 FROM streams WHERE name = %s", (name,)))

    def streams(self) -> list[StreamInfo]:
        rows = self._q("SELECT t.name, COUNT(s.id), t.bytes, MIN(s.t_start), MAX(s.t_end), "
                       "COALESCE(SUM(s.t_end - s.t_start), 0) FROM streams t LEFT JOIN segments s ON s.stream_id = t.id "
                       "GROUP BY t.id ORDER BY t.name")
        return [StreamInfo(name=r[0], segments=r[1], bytes=r[2], start=r[3], end=r[4], seconds_covered=float(r[5]))
                for r in rows]

    def stats(self) -> dict:
        """Streams, segments, bytes, time covered, each source's state and gaps, and the retention in force."""
        infos = self.streams()
        sources = self.sources()
        limits = {r[0]: Retention(max_age_seconds=r[1], max_bytes=r[2])
                  for r in self._q("SELECT name, max_age, max_bytes FROM streams")}
        gaps = dict(self._q("SELECT stream, COUNT(*) FROM gaps GROUP BY stream"))
        streams = [{"name": i.name, "segments": i.segments, "bytes": i.bytes, "start": i.start, "end": i.end,
                    "seconds": i.seconds_covered, "retention": retention_json(limits.get(i.name, Retention())),
                    "source": sources.get(i.name), "gaps": gaps.get(i.name, 0)} for i in infos]
        return {
            "path": self.path,
            "manifest": self.manifest.to_dict() if self.manifest else None,
            "streams": streams,
            "segments": sum(i.segments for i in infos),
            "bytes": sum(i.bytes for i in infos),
            "disk_bytes": self.disk_usage(),
            "seconds_covered": sum(i.seconds_covered for i in infos),
            "retention": retention_json(self.retention()),
        }

    def disk_usage(self) -> int:
        """Bytes this memory takes, as its disk budget counts them: the token files on the shared storage (the
        footage, nearly all of it) plus PostgreSQL's size of this memory's tables (`pg_total_relation_size`: rows,
        indexes, TOAST). Milvus's index is derived data, rebuilt from PostgreSQL, and is sized with the deployment
        (bench/scale.py's sizing table), not counted here."""
        return self._files.total_bytes() + self._table_bytes()

    def _table_bytes(self) -> int:
        return int(self._q("SELECT COALESCE(SUM(pg_total_relation_size(to_regclass(t))), 0)::bigint "
                           "FROM unnest(%s::text[]) AS t", (list(TABLES),))[0][0])

    def disk_bytes(self, stream: str | None = None) -> int:
        """Bytes of token files on the shared storage, or of token objects in the store (all streams, or one)."""
        names = [stream] if stream is not None else [i.name for i in self.streams()]
        return sum(sum(self._files.chunks_on_disk(n).values()) for n in names)

    # -- search ------------------------------------------------------------------------------------------
    def search(self, query: np.ndarray, *, k: int = 32, streams: list[str] | None = None,
               since: float | None = None, until: float | None = None,
               kinds: list[str] | None = None) -> list[tuple[SegmentRow, float]]:
        """Segments whose keyframe (or caption) embedding best matches `query`, best first, by inner product."""
        dims = self._sync_index()
        if not dims or k <= 0:
            return []
        q = np.asarray(query, dtype=np.float32).reshape(-1)  # (E,)
        if kinds is not None and not set(kinds) <= {"image", "caption"}:
            raise ConfigError(f"unknown index kinds {sorted(set(kinds) - {'image', 'caption'})}; use image or caption.")
        wanted = [kind for kind in dims if kinds is None or kind in kinds]
        if not wanted:
            return []
        kinds = [kind for kind in wanted if dims[kind] == q.shape[0]]
        if not kinds:
            raise ConfigError(f"the query embedding has width {q.shape[0]}; this memory's {'/'.join(wanted)} "
                              f"embeddings have width {', '.join(str(dims[w]) for w in wanted)}.")
        stream_ids = None
        if streams is not None:
            stream_ids = [self._stream_id(check_stream_name(s)) for s in streams]
        best: dict[int, float] = {}
        with self._lock:
            for kind in kinds:
                for seg, score in self.index.search(kind, q, k, stream_ids, since, until):
                    if score > best.get(seg, -np.inf):
                        best[seg] = score
        ranked = sorted(best.items(), key=lambda kv: -kv[1])[:k]
        rows = self._rows_by_id([seg for seg, _ in ranked])  # committed rows only: deleted ones drop out
        return [(rows[seg], score) for seg, score in ranked if seg in rows]

    @property
    def caption_dim(self) -> int | None:
        """Width of the caption embeddings once the first one is stored, else None."""
        value = self._meta("caption_dim")
        return int(value) if value else None

    def rebuild_index(self) -> None:
        """Drop the Milvus collections and rebuild them from the vectors stored in PostgreSQL."""
        self._sync_index()
        with self._lock:
            if self.manifest is not None:
                self.index.rebuild(self._db(), self._dims())

    def index_ids(self, kind: str = "image") -> set[int]:
        """Segment ids the (caught-up) Milvus collection holds; for consistency checks."""
        dims = self._sync_index()
        if kind not in dims:
            return set()
        with self._lock:
            max_vid = self._q("SELECT last_value FROM vectors_vid_seq")[0][0]
            return self.index.segment_ids(kind, max_vid)

    def verify(self) -> dict:
        """Check every segment's checksums and the index against PostgreSQL; returns counts and the bad ids."""
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
        own, and a disk budget (`max_bytes`) for the whole memory, as `disk_usage` counts it."""
        if stream is None:
            with self._write() as conn:
                conn.execute("INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                             (RETENTION_KEY, json.dumps(retention_json(retention))))
            return
        name = check_stream_name(stream)
        with self._write() as conn:
            conn.execute("INSERT INTO streams (name, created) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                         (name, time.time()))
            conn.execute("UPDATE streams SET max_age = %s, max_bytes = %s WHERE name = %s",
                         (retention.max_age_seconds, retention.max_bytes, name))

    def retention(self, stream: str | None = None) -> Retention:
        """A stream's own retention, or with `stream=None` the memory's (default age, disk budget)."""
        if stream is None:
            return self._memory_retention()
        rows = self._q("SELECT max_age, max_bytes FROM streams WHERE name = %s", (stream,))
        if not rows:
            raise UnknownStreamError(f"no stream named {stream!r} in the memory at {self.path}.")
        return Retention(max_age_seconds=rows[0][0], max_bytes=rows[0][1])

    def _memory_retention(self) -> Retention:
        return memory_retention(self._meta(RETENTION_KEY))

    def apply_retention(self, stream: str | None = None) -> int:
        """Enforce retention: each stream's age and byte limits (one stream's, or all), then the memory's disk
        budget, oldest footage first; gaps and events are pruned with it. Returns the segments deleted."""
        self._check_writable()
        names = [stream] if stream is not None else [i.name for i in self.streams()]
        deleted = sum(self._age_out(name) + self._make_room(name, 0) for name in names)
        deleted += self._enforce_budget(0)
        self.prune_logs()
        if deleted:
            self._after_commit()
        return deleted

    def delete_stream(self, stream: str) -> int:
        """Delete a stream with all its segments and files; returns how many segments were deleted."""
        with self._write() as conn:
            sid = self._stream_id(stream)
            conn.execute("SELECT id FROM streams WHERE id = %s FOR UPDATE", (sid,))
            deleted = self._delete_segments(conn, "stream_id = %s", (sid,))
            conn.execute("DELETE FROM streams WHERE id = %s", (sid,))
        self._files.remove_stream(stream)
        self._after_commit()
        return deleted

    def _age_out(self, name: str) -> int:
        with self._lock:
            rows = self._q("SELECT id, max_age, max_span FROM streams WHERE name = %s", (name,))
            if not rows:
                return 0
            sid, max_age, span = rows[0]
            if max_age is None:
                max_age = self._memory_retention().max_age_seconds
            if max_age is None:
                return 0
            newest = self._q("SELECT MAX(t_end) FROM segments WHERE stream_id = %s AND t_start >= "
                             "(SELECT MAX(t_start) FROM segments WHERE stream_id = %s) - %s", (sid, sid, span))[0][0]
            if newest is None:
                return 0
            cutoff = age_cutoff(newest, max_age)
            with self._write() as conn:
                conn.execute("SELECT id FROM streams WHERE id = %s FOR UPDATE", (sid,))
                deleted = self._delete_segments(conn, "stream_id = %s AND t_start < %s AND t_end < %s",
                                                (sid, cutoff, cutoff))
        if deleted:
            self._free_chunks(name)
            log.info("retention removed %d segments older than %.0f s from stream %s", deleted, max_age, name)
        return deleted

    def _make_room(self, name: str, incoming: int) -> int:
        """Delete the stream's oldest chunks until its files plus `incoming` bytes fit its byte limit."""
        with self._lock:
            rows = self._q("SELECT id, max_bytes FROM streams WHERE name = %s", (name,))
            if not rows or rows[0][1] is None:
                return 0
            with self._write() as conn:
                chunk, chunk_end, max_bytes = conn.execute("SELECT chunk, chunk_end, max_bytes FROM streams "
                                                           "WHERE id = %s FOR UPDATE", (rows[0][0],)).fetchone()
                sizes = self._files.chunks_on_disk(name)
                sizes[chunk] = chunk_end  # past the committed end is garbage a writer will overwrite
                victims = chunks_to_drop(name, sizes, incoming, max_bytes)
                deleted = self._drop_chunk_rows(conn, name, victims) if victims else 0
            for c in victims:  # rows are committed as deleted before their bytes go
                self._files.delete_chunk(name, c)
        if deleted:
            log.info("retention removed %d segments from stream %s to stay under %d bytes", deleted, name, max_bytes)
        return deleted

    def _enforce_budget(self, incoming: int) -> int:
        """Delete the memory's oldest chunks (any stream) until it fits its disk budget with `incoming` bytes more.
        Processes take turns (a session advisory lock), so two never drop footage for the same overrun."""
        with self._lock:
            budget = self._memory_retention().max_bytes
            if budget is None:
                return 0
            _fetch(self._db(), "SELECT pg_advisory_lock(%s)", (BUDGET_LOCK,))
            try:
                return enforce_budget(self, budget, incoming)
            finally:
                with suppress(MemoryStoreError):  # a lost connection has released it already
                    _fetch(self._db(), "SELECT pg_advisory_unlock(%s)", (BUDGET_LOCK,))

    def _stream_names(self) -> list[str]:
        return [r[0] for r in self._q("SELECT name FROM streams ORDER BY name")]

    def _first_stored(self, stream: str, chunk: int) -> float | None:
        """When the first segment in a chunk of `stream` was stored (None: the chunk holds none and is not being
        written). A writer in another process may have written the active chunk's first record and not yet
        committed it: that chunk counts as stored now."""
        created, active = self._q("SELECT MIN(s.created), MAX(t.chunk) FROM streams t LEFT JOIN segments s "
                                  "ON s.stream_id = t.id AND s.chunk = %s WHERE t.name = %s", (chunk, stream))[0]
        if created is None and active is not None and chunk >= active:
            return time.time()
        return created

    def _compact(self) -> None:
        """Nothing to fold: PostgreSQL gives the space of deleted rows to new rows (autovacuum), not back to the file
        system, so its share of the budget stays near its high-water mark."""

    def _free_chunks(self, name: str) -> None:
        """Delete chunk files no live segment points into (all but the active chunk)."""
        with self._lock:
            rows = self._q("SELECT id, chunk FROM streams WHERE name = %s", (name,))
            if not rows:
                return
            sid, active = rows[0]
            used = {r[0] for r in self._q("SELECT DISTINCT chunk FROM segments WHERE stream_id = %s", (sid,))}
            for c in self._files.chunks_on_disk(name):
                if c < active and c not in used:
                    self._files.delete_chunk(name, c)

    def _delete_segments(self, conn, where: str, params: tuple) -> int:
        """Delete matching segments with their vectors, logging the removals for the index."""
        ids = [r[0] for r in conn.execute(f"SELECT id FROM segments WHERE {where}", params).fetchall()]
        if not ids:
            return 0
        self._log_changes(conn, "INSERT INTO changes (op, kind, vid, segment_id) SELECT 'del', kind, vid, segment_id "
                                "FROM vectors WHERE segment_id = ANY(%s)", (ids,))
        conn.execute("DELETE FROM vectors WHERE segment_id = ANY(%s)", (ids,))
        conn.execute("UPDATE streams SET bytes = bytes - d.total FROM (SELECT stream_id, SUM(record_bytes) AS total "
                     "FROM segments WHERE id = ANY(%s) GROUP BY stream_id) d WHERE streams.id = d.stream_id", (ids,))
        conn.execute("DELETE FROM segments WHERE id = ANY(%s)", (ids,))
        head = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
        if head > CHANGES_KEPT:
            conn.execute("DELETE FROM changes WHERE seq <= %s", (head - CHANGES_KEPT,))
        return len(ids)

    # -- sources and bookkeeping -----------------------------------------------------------------------------
    def record_source(self, stream: str, status: dict, gap: tuple[float, float] | None = None) -> None:
        """Store what a stream's source is doing (a SourceStatus's JSON) and, when one closed, its gap."""
        name = check_stream_name(stream)
        with self._write() as conn:
            conn.execute("INSERT INTO sources (stream, body, updated) VALUES (%s, %s, %s) ON CONFLICT (stream) "
                         "DO UPDATE SET body = EXCLUDED.body, updated = EXCLUDED.updated",
                         (name, json.dumps(status), time.time()))
            if gap is not None:
                conn.execute("INSERT INTO gaps (stream, t_start, t_end) VALUES (%s, %s, %s)",
                             (name, float(gap[0]), float(gap[1])))

    def sources(self) -> dict[str, dict]:
        """Each stream's last recorded source state, with `updated` (unix seconds)."""
        return {name: {**json.loads(body), "updated": round(updated, 3)}
                for name, body, updated in self._q("SELECT stream, body, updated FROM sources")}

    def gaps(self, stream: str | None = None) -> list[tuple[str, float, float]]:
        """Recorded gaps (stream, start, end), oldest first."""
        sql, params = "SELECT stream, t_start, t_end FROM gaps", ()
        if stream is not None:
            sql, params = sql + " WHERE stream = %s", (stream,)
        return [tuple(r) for r in self._q(sql + " ORDER BY t_start, id", params)]

    def prune_logs(self) -> None:
        """Drop gaps and events older than their stream's footage (the change log is bounded as it grows)."""
        with self._write() as conn:
            for name, start in conn.execute("SELECT t.name, MIN(s.t_start) FROM streams t JOIN segments s "
                                            "ON s.stream_id = t.id GROUP BY t.name").fetchall():
                conn.execute("DELETE FROM gaps WHERE stream = %s AND t_end < %s", (name, start))
                conn.execute("DELETE FROM events WHERE stream = %s AND start_time < %s", (name, start))

    # -- rules and events ----------------------------------------------------------------------------------
    def put_rule(self, stream: str, rule: dict) -> None:
        name = check_stream_name(stream)
        rule_id = rule.get("id") if isinstance(rule, dict) else None
        if not isinstance(rule_id, str) or not rule_id:
            raise ConfigError("a rule needs a non-empty string 'id'.")
        with self._write() as conn:
            conn.execute("INSERT INTO rules (stream, id, body, updated) VALUES (%s, %s, %s, %s) ON CONFLICT "
                         "(stream, id) DO UPDATE SET body = EXCLUDED.body, updated = EXCLUDED.updated",
                         (name, rule_id, json.dumps(rule), time.time()))

    def delete_rule(self, stream: str, rule_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM rules WHERE stream = %s AND id = %s", (stream, rule_id)).rowcount > 0

    def rules(self, stream: str | None = None) -> list[dict]:
        sql, params = "SELECT stream, body FROM rules", ()
        if stream is not None:
            sql, params = sql + " WHERE stream = %s", (stream,)
        out = []
        for name, body in self._q(sql + " ORDER BY stream, updated, id", params):
            rule = json.loads(body)
            rule.setdefault("stream", name)
            out.append(rule)
        return out

    def add_event(self, event: dict) -> None:
        event_id = event.get("id")
        if not isinstance(event_id, str) or not event_id:
            raise ConfigError("an event needs a non-empty string 'id'.")
        with self._write() as conn:
            conn.execute("INSERT INTO events (id, stream, start_time, body) VALUES (%s, %s, %s, %s) ON CONFLICT (id) "
                         "DO UPDATE SET stream = EXCLUDED.stream, start_time = EXCLUDED.start_time, body = EXCLUDED.body",
                         (event_id, event.get("stream"), event.get("start_time"), json.dumps(event)))

    def update_event(self, event_id: str, **fields: object) -> None:
        with self._write() as conn:
            row = conn.execute("SELECT body FROM events WHERE id = %s FOR UPDATE", (event_id,)).fetchone()
            if row is None:
                raise MemoryStoreError(f"no event {event_id!r} in the memory at {self.path}.")
            event = {**json.loads(row[0]), **fields}
            conn.execute("UPDATE events SET stream = %s, start_time = %s, body = %s WHERE id = %s",
                         (event.get("stream"), event.get("start_time"), json.dumps(event), event_id))

    def events(self, *, stream: str | None = None, since: float | None = None) -> list[dict]:
        clauses, params = [], []
        if stream is not None:
            clauses.append("stream = %s")
            params.append(stream)
        if since is not None:
            clauses.append("start_time >= %s")
            params.append(float(since))
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        return [json.loads(r[0]) for r in self._q(f"SELECT body FROM events {where} ORDER BY start_time, id", params)]


def _fetch(conn, sql: str, params: Sequence) -> list[tuple]:
    import psycopg

    try:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []
    except psycopg.OperationalError as exc:
        raise MemoryStoreError(f"lost the connection to PostgreSQL: {str(exc).strip()}") from None


def _check_token_dir(spec: SharedSpec, instance: str, *, readonly: bool) -> None:
    """The token directory belongs to this memory (a marker names its instance); created unless readonly."""
    root = spec.tokens
    marker = root / MARKER
    if not readonly:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not marker.exists():
                marker.write_text(instance + "\n")
        except OSError as exc:
            raise MemoryStoreError(f"cannot create the token directory {root}: {exc.strerror}.") from None
    if not root.is_dir():
        raise MemoryStoreError(f"the token directory {root} of {spec.display} is missing; is the shared storage "
                               "mounted on this node?")
    owner = marker.read_text().strip() if marker.is_file() else None
    if owner is not None and owner != instance:
        raise MemoryStoreError(f"the token directory {root} belongs to another vidmem memory ({owner}), not to "
                               f"{spec.display} ({instance}); give each memory its own tokens=DIR.")


# -- migrate -------------------------------------------------------------------------------------------------
MIGRATE_BATCH = 64  # segments per transaction when copying


def migrate(source: str | Path, url: str, *, on_progress=None) -> dict:
    """Copy the embedded memory at `source` into the shared memory at `url`, then verify the copy.

    Streams, segments (tokens, keyframes, retrieval and caption embeddings, captions), retention settings (each
    stream's, and the memory's default age and disk budget), rules and events are copied; segment ids are the
    target's own. The copy is verified segment by segment (times, token bytes, keyframes) and the target's index is
    checked against its rows. Streams already present in the target are refused, so a memory is never merged into
    itself twice.
    """
    import sqlite3

    from vidmem.memory.store import DB_NAME

    with Memory.open(source, readonly=True) as src, SharedMemory.open(url) as dst:
        if src.manifest is None:
            raise MemoryStoreError(f"the memory at {src.path} holds no segments; nothing to migrate.")
        dst.bind(src.manifest)
        names = [info.name for info in src.streams()]
        clash = [name for name in names if dst.has_stream(name)]
        if clash:
            raise MemoryStoreError(f"{dst.path} already holds stream(s) {', '.join(clash)}; migrate into an empty "
                                   "shared memory.")
        vectors = sqlite3.connect(f"file:{Path(source).expanduser() / DB_NAME}?mode=ro", uri=True)
        try:
            pairs: list[tuple[SegmentRow, SegmentRow]] = []
            for name in names:
                rows = sorted(src.segments(stream=name), key=lambda r: r.id)  # insertion order: chunks age in order
                for lo in range(0, len(rows), MIGRATE_BATCH):
                    batch = rows[lo:lo + MIGRATE_BATCH]
                    pairs += zip(batch, _copy_batch(src, dst, vectors, batch))
                    if on_progress is not None:
                        on_progress(len(pairs))
                dst.set_retention(name, src.retention(name))
        finally:
            vectors.close()
        for rule in src.rules():
            dst.put_rule(rule["stream"], rule)
        events = src.events()
        for event in events:
            dst.add_event(event)
        report = _verify_copy(src, dst, pairs)
        wide = src.retention()
        if wide != Retention():  # the memory's own default age and budget, once the copy is whole and verified
            dst.set_retention(None, wide)
        report.update(source=str(src.path), target=dst.path, streams=len(names), rules=len(src.rules()),
                      events=len(events))
        return report


def _copy_batch(src: Memory, dst: SharedMemory, vectors, batch: list[SegmentRow]) -> list[SegmentRow]:
    marks = ",".join("?" * len(batch))
    stored = {(seg, kind): vec for seg, kind, vec in vectors.execute(
        f"SELECT segment_id, kind, vec FROM vectors WHERE segment_id IN ({marks})", [r.id for r in batch])}
    dtypes = dict(vectors.execute(f"SELECT id, dtype FROM segments WHERE id IN ({marks})", [r.id for r in batch]))
    items = []
    for row in batch:
        if (row.id, "image") not in stored:
            raise MemoryStoreError(f"segment {row.id} of {src.path} has no retrieval embedding; run "
                                   "`rebuild_index` there first.")
        items.append(dict(stream=row.stream, start=row.start, end=row.end, frames=row.frames, cut=row.cut,
                          tokens=src.read_tokens(row), slow=row.slow, keyframe_jpeg=src.keyframe_jpeg(row),
                          embedding=np.frombuffer(stored[row.id, "image"], dtype=np.float32), caption=row.caption,
                          views=row.views))
    copied: list[tuple[int, SegmentRow]] = []  # (index in batch, the copy)
    # Each segment keeps the dtype it was stored with (a memory may hold fp16 and int8 records).
    for dtype in sorted(set(dtypes.values())):
        dst.token_dtype = dtype
        chosen = [i for i, row in enumerate(batch) if dtypes[row.id] == dtype]
        for i, new in zip(chosen, dst.add_segments([items[i] for i in chosen])):
            copied.append((i, new))
    copied.sort(key=lambda pair: pair[0])
    out = [new for _, new in copied]
    for row, new in zip(batch, out):
        vec = stored.get((row.id, "caption"))
        if vec is not None:
            dst.set_caption(new.id, row.caption or "", np.frombuffer(vec, dtype=np.float32))
    return out


def _verify_copy(src: Memory, dst: SharedMemory, pairs: list[tuple[SegmentRow, SegmentRow]]) -> dict:
    mismatched = []
    for old, new in pairs:
        again = dst.get_segment(new.id)
        same = again is not None and (again.stream, again.start, again.end, again.frames, again.cut, again.tokens,
                                      again.slow, again.caption, again.views) == (old.stream, old.start, old.end,
                                                                                   old.frames, old.cut, old.tokens,
                                                                                   old.slow, old.caption, old.views)
        same = same and np.array_equal(dst.read_tokens(new), src.read_tokens(old)) \
            and dst.keyframe_jpeg(new) == src.keyframe_jpeg(old)
        if not same:
            mismatched.append(old.id)
    check = dst.verify()
    counts = {s.name: s.segments for s in src.streams()}
    copied = {s.name: s.segments for s in dst.streams() if s.name in counts}
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} segments differ from the source (first: {mismatched[:5]})")
    if check["bad"]:
        problems.append(f"{len(check['bad'])} segments fail their checksums")
    if check["missing_from_index"] or check["extra_in_index"]:
        problems.append(f"the index misses {len(check['missing_from_index'])} and has "
                        f"{len(check['extra_in_index'])} extra segments")
    if copied != counts:
        problems.append(f"segment counts differ: source {counts}, copy {copied}")
    if problems:
        raise MemoryStoreError(f"the copy in {dst.path} failed verification: {'; '.join(problems)}.")
    return {"segments": len(pairs), "verified": True,
            "captions": sum(1 for old, _ in pairs if old.caption), "bytes": sum(s.bytes for s in dst.streams())}
