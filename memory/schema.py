"""The SQLite side of a memory: schema and connection settings.

WAL mode lets readers (other threads or processes) run while one writer commits; a reader sees a segment only
once its row is committed, and the row is committed only after its token bytes were fsynced.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

from vidmem.errors import MemoryStoreError

SCHEMA_VERSION = 2  # 2: segments.views (how each detail level shows the segment)
BUSY_TIMEOUT_MS = 30_000  # writers from other processes wait this long for the write lock

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS streams (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    chunk INTEGER NOT NULL DEFAULT 0,      -- the chunk file new records go to
    chunk_end INTEGER NOT NULL DEFAULT 0,  -- committed end offset inside that chunk
    bytes INTEGER NOT NULL DEFAULT 0,      -- record bytes of the live segments
    max_span REAL NOT NULL DEFAULT 0,      -- longest segment (end - start), bounds time-range scans
    max_age REAL,                          -- retention, seconds
    max_bytes INTEGER                      -- retention, bytes on disk
);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream_id INTEGER NOT NULL REFERENCES streams(id),
    start REAL NOT NULL,
    end REAL NOT NULL,
    frames INTEGER NOT NULL,
    cut INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    slow INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,               -- token bytes (int8 records include their scales)
    checksum INTEGER NOT NULL,             -- CRC32 of the token bytes
    jpeg_bytes INTEGER NOT NULL DEFAULT 0, -- keyframe JPEG stored right after the tokens
    jpeg_checksum INTEGER NOT NULL DEFAULT 0,
    record_bytes INTEGER NOT NULL,         -- padded size of the whole record
    caption TEXT,
    created REAL NOT NULL,
    views TEXT                             -- JSON: the compressor's key and low views (compressors.base.Views)
);
CREATE INDEX IF NOT EXISTS segments_stream_start ON segments(stream_id, start);
CREATE INDEX IF NOT EXISTS segments_stream_chunk ON segments(stream_id, chunk);
CREATE INDEX IF NOT EXISTS segments_start ON segments(start);
CREATE TABLE IF NOT EXISTS vectors (
    vid INTEGER PRIMARY KEY AUTOINCREMENT, -- the FAISS id
    segment_id INTEGER NOT NULL,
    kind TEXT NOT NULL,                    -- 'image' (keyframe) or 'caption'
    vec BLOB NOT NULL                      -- float32, L2-normalised
);
CREATE INDEX IF NOT EXISTS vectors_segment ON vectors(segment_id);
CREATE TABLE IF NOT EXISTS changes (       -- what FAISS indexes in any process must replay
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,                      -- 'add' | 'del' (a vector) | 'extend' (its segment's end moved)
    kind TEXT NOT NULL,                    -- the vector's kind, so each index replays only its own
    vid INTEGER NOT NULL,
    segment_id INTEGER
);
CREATE TABLE IF NOT EXISTS rules (
    stream TEXT NOT NULL,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (stream, id)
);
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    stream TEXT,
    start_time REAL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_stream_start ON events(stream, start_time);
CREATE TABLE IF NOT EXISTS sources (       -- what each stream's source is doing (live, reconnecting, ended)
    stream TEXT PRIMARY KEY,
    body TEXT NOT NULL,                    -- SourceStatus JSON
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS gaps (          -- stretches a live source lost to a broken connection
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    start REAL NOT NULL,
    end REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS gaps_stream_start ON gaps(stream, start);
"""


def connect(db: Path, *, readonly: bool) -> sqlite3.Connection:
    """Open the database with the settings every vidmem connection uses."""
    try:
        if readonly:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        else:
            new = not db.exists() or db.stat().st_size == 0
            conn = sqlite3.connect(db, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None)
            if new:  # returns the pages retention frees to the file system (`PRAGMA incremental_vacuum`); it only
                # takes effect before the first table exists, and set on an old database it would write to it
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed segment survives power loss too, not only a killed process.
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(SCHEMA)
            migrate(conn)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return conn
    except sqlite3.DatabaseError as exc:
        raise MemoryStoreError(f"cannot open the memory database {db}: {exc}.") from exc


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a memory written by an older vidmem up to SCHEMA_VERSION (columns are only ever added)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(segments)")}
    if "views" not in columns:
        conn.execute("ALTER TABLE segments ADD COLUMN views TEXT")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema' AND CAST(value AS INTEGER) < ?",
                 (str(SCHEMA_VERSION), SCHEMA_VERSION))
