"""The Milvus side of a shared memory: one collection per vector kind, kept in step with PostgreSQL's change log.

The index is derived data. Every change to the `vectors` table appends to `changes` in the same PostgreSQL
transaction, under an advisory lock, so sequence numbers commit in order. Any process (a writer right after its
commit, a reader before it searches) replays the log from `meta.index_seq` under a second advisory lock: an
upsert for a vector still present (with its segment's current times), a delete for one that is gone. Replay is
idempotent, and `index_seq` advances in the same PostgreSQL transaction only after Milvus took the batch, so a
crash at any instant replays at most one batch again. A missing collection (a wiped Milvus) or a pruned log means
a rebuild from the `vectors` table.
"""
from __future__ import annotations

import json
import logging

import numpy as np

from vidmem.errors import MemoryStoreError
from vidmem.memory.postgres import SYNC_LOCK, require, transaction

log = logging.getLogger(__name__)

BATCH = 2_000  # changes replayed (or vectors rebuilt) per Milvus call
TIMEOUT_S = 10.0  # per Milvus call; an unreachable server fails with one line naming it
MAX_TOPK = 16_384  # Milvus's limit on k
KEEPALIVE = {"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": 0}


class MilvusIndex:
    """Collections `vidmem_<instance>_<kind>` on one Milvus server, for one shared memory."""

    def __init__(self, uri: str, instance: str) -> None:
        self.uri = uri
        self.instance = instance
        self._client = None
        self._existing: set[str] = set()  # kinds whose collection this process has seen

    # -- connection --------------------------------------------------------------------------------------
    def client(self):
        if self._client is None:
            MilvusClient = require("pymilvus").MilvusClient  # noqa: N806 - the library's class
            try:
                # pymilvus pings every 10 s; a gRPC server that allows fewer pings (Milvus Lite's allows one per
                # 5 minutes, gRPC's default) answers "too many pings" and drops the connection of an idle reader.
                self._client = MilvusClient(uri=self.uri, timeout=TIMEOUT_S, grpc_options=KEEPALIVE)
            except Exception as exc:  # noqa: BLE001 - pymilvus raises several types for one cause
                raise MemoryStoreError(f"cannot reach Milvus at {self.uri}: {_reason(exc)}") from None
        return self._client

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MemoryStoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise MemoryStoreError(f"Milvus at {self.uri} failed to {what}: {_reason(exc)}") from None

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection is not worth an error
                pass
            self._client = None

    def name(self, kind: str) -> str:
        return f"vidmem_{self.instance}_{kind}"

    def has(self, kind: str) -> bool:
        if kind not in self._existing:
            if self._call("list collections", self.client().has_collection, self.name(kind)):
                self._existing.add(kind)
        return kind in self._existing

    def create(self, kind: str, dim: int) -> None:
        from pymilvus import DataType, MilvusClient

        client = self.client()
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("vid", DataType.INT64, is_primary=True)
        schema.add_field("segment_id", DataType.INT64)
        schema.add_field("stream_id", DataType.INT64)
        schema.add_field("t_start", DataType.DOUBLE)
        schema.add_field("t_end", DataType.DOUBLE)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=int(dim))
        params = client.prepare_index_params()
        # AUTOINDEX: Milvus picks the index for its deployment (standalone and distributed build HNSW or IVF).
        params.add_index("vec", index_type="AUTOINDEX", metric_type="IP")
        self._call("create a collection", client.create_collection, self.name(kind), schema=schema,
                   index_params=params)

    def drop(self, kind: str) -> None:
        client = self.client()
        self._existing.discard(kind)
        if self.has(kind):
            self._call("drop a collection", client.drop_collection, self.name(kind))
        self._existing.discard(kind)

    def drop_all(self) -> None:
        for kind in ("image", "caption"):
            self.drop(kind)

    # -- keeping up with PostgreSQL ------------------------------------------------------------------------
    def sync(self, conn, dims: dict[str, int]) -> None:
        """Replay committed changes into Milvus (see the module docstring); cheap when nothing changed."""
        head = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
        applied = _applied(conn)
        if head == applied and all(self.has(kind) for kind in dims):
            return
        with transaction(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SYNC_LOCK,))
            applied = _applied(conn)  # another process may have replayed while we waited
            self._existing.clear()  # look again: a lost collection must be noticed by someone
            made = _made(conn)
            missing = [kind for kind in dims if not self.has(kind)]
            oldest = conn.execute("SELECT MIN(seq) FROM changes").fetchone()[0]
            if set(missing) & made or (oldest is not None and oldest > applied + 1):
                self._rebuild_locked(conn, dims)  # Milvus lost data it had, or the log no longer reaches back
                return
            for kind in missing:
                self.create(kind, dims[kind])
            _set_made(conn, made | set(missing))
            head = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
            while applied < head:
                rows = conn.execute(
                    "SELECT c.seq, c.vid, c.kind, v.vid, v.segment_id, s.stream_id, s.t_start, s.t_end, v.vec "
                    "FROM changes c LEFT JOIN vectors v ON v.vid = c.vid LEFT JOIN segments s ON s.id = v.segment_id "
                    "WHERE c.seq > %s AND c.seq <= %s ORDER BY c.seq LIMIT %s", (applied, head, BATCH)).fetchall()
                if not rows:
                    break
                for kind in {r[2] for r in rows}:
                    if kind not in dims:
                        continue  # a kind whose width is not known yet cannot have vectors: nothing to replay
                    mine = [r for r in rows if r[2] == kind]
                    gone = sorted({r[1] for r in mine if r[3] is None or r[5] is None})
                    live = {r[3]: r[3:] for r in mine if r[3] is not None and r[5] is not None}
                    if gone:
                        self._call("delete vectors", self.client().delete, self.name(kind), ids=gone)
                    self._upsert(kind, dims[kind], list(live.values()))
                applied = rows[-1][0]
            _set_applied(conn, head)

    def rebuild(self, conn, dims: dict[str, int]) -> None:
        """Drop the collections and load every stored vector again from PostgreSQL."""
        with transaction(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SYNC_LOCK,))
            self._rebuild_locked(conn, dims)

    def _rebuild_locked(self, conn, dims: dict[str, int]) -> None:
        # Holding the sync lock: writers keep committing, and whatever commits after `head` is replayed later
        # (an upsert of a vector loaded here is harmless).
        head = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
        for kind, dim in dims.items():
            self.drop(kind)
            self.create(kind, dim)
            last = 0
            while True:
                rows = conn.execute(
                    "SELECT v.vid, v.segment_id, s.stream_id, s.t_start, s.t_end, v.vec FROM vectors v "
                    "JOIN segments s ON s.id = v.segment_id WHERE v.kind = %s AND v.vid > %s ORDER BY v.vid LIMIT %s",
                    (kind, last, BATCH)).fetchall()
                if not rows:
                    break
                self._upsert(kind, dim, rows)
                last = rows[-1][0]
        _set_applied(conn, head)
        _set_made(conn, set(dims))
        log.info("rebuilt the Milvus collections of memory %s from PostgreSQL", self.instance)

    def _upsert(self, kind: str, dim: int, rows: list[tuple]) -> None:
        """rows: (vid, segment_id, stream_id, start, end, vec bytes)."""
        if not rows:
            return
        data = []
        for vid, seg, stream, start, end, vec in rows:
            v = np.frombuffer(bytes(vec), dtype=np.float32)  # (E,)
            if v.shape[0] != dim:
                raise MemoryStoreError(f"a stored retrieval embedding has width {v.shape[0]}, not {dim}.")
            data.append({"vid": int(vid), "segment_id": int(seg), "stream_id": int(stream), "t_start": float(start),
                         "t_end": float(end), "vec": v.tolist()})
        self._call("store vectors", self.client().upsert, self.name(kind), data)

    # -- reading -------------------------------------------------------------------------------------------
    def search(self, kind: str, query: np.ndarray, k: int, streams: list[int] | None, since: float | None,
               until: float | None) -> list[tuple[int, float]]:
        """Best-first (segment id, inner product)."""
        clauses = []
        if streams is not None:
            clauses.append(f"stream_id in [{', '.join(str(int(s)) for s in streams)}]")
        if since is not None:
            clauses.append(f"t_end >= {float(since)!r}")
        if until is not None:
            clauses.append(f"t_start <= {float(until)!r}")
        hits = self._call("search", self.client().search, self.name(kind), [np.asarray(query, np.float32).tolist()],
                          limit=min(int(k), MAX_TOPK), filter=" and ".join(clauses), output_fields=["segment_id"],
                          search_params={"metric_type": "IP"}, consistency_level="Strong")
        return [(int(h["entity"]["segment_id"]), float(h["distance"])) for h in hits[0]]

    def segment_ids(self, kind: str, max_vid: int) -> set[int]:
        """Every segment id the collection holds, scanning vids 0..max_vid in ranges (for consistency checks)."""
        if not self.has(kind):
            return set()
        out: set[int] = set()
        for lo in range(0, int(max_vid) + 1, BATCH):
            rows = self._call("list vectors", self.client().query, self.name(kind),
                              filter=f"vid >= {lo} and vid < {lo + BATCH}", output_fields=["segment_id"],
                              limit=BATCH, consistency_level="Strong")
            out.update(int(r["segment_id"]) for r in rows)
        return out


def _applied(conn) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'index_seq'").fetchone()
    return int(row[0]) if row else 0


def _set_applied(conn, seq: int) -> None:
    conn.execute("INSERT INTO meta VALUES ('index_seq', %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                 (str(seq),))


def _made(conn) -> set[str]:
    """Kinds whose collections were created and filled: one of them missing means Milvus lost it."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'index_kinds'").fetchone()
    return set(json.loads(row[0])) if row else set()


def _set_made(conn, kinds: set[str]) -> None:
    conn.execute("INSERT INTO meta VALUES ('index_kinds', %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                 (json.dumps(sorted(kinds)),))


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "message", "") or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
