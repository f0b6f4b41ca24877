"""The PostgreSQL side of a shared memory: the memory URL, the schema and connections that fail with one clear line.

A shared memory is named by one URL:

    postgresql://USER[:PASS]@HOST:PORT/DB?index=milvus://HOST:PORT&tokens=DIR
    postgresql://USER[:PASS]@HOST:PORT/DB?index=milvus://HOST:PORT&tokens=s3://BUCKET/PREFIX[&s3_endpoint=URL]

PostgreSQL holds what SQLite holds in an embedded memory (streams, segments, retrieval vectors, the change log,
rules, events, the manifest), Milvus holds the retrieval index (derived data, rebuilt from the `vectors` table),
and DIR (shared storage every node mounts) holds the token files in the embedded layout, or an S3-compatible
bucket holds them as objects (memory/objectstore.py). The object store's endpoint is `s3_endpoint` or the
standard AWS_ENDPOINT_URL variable; its credentials come from the standard AWS variables and files, never the URL.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from vidmem.errors import ConfigError, MemoryStoreError

log = logging.getLogger(__name__)

SCHEMES = ("postgresql://", "postgres://")
SCHEMA_VERSION = 1
CONNECT_TIMEOUT_S = 5  # an unreachable server fails within this, with one line naming it
CHANGES_LOCK = 0x7669646D  # advisory lock: change-log rows commit in sequence order (see SharedMemory)
SYNC_LOCK = 0x7669646E  # advisory lock: one process at a time replays the change log into Milvus
SCHEMA_LOCK = 0x7669646F  # advisory lock: one process at a time creates the tables (no writer ever takes it)

# Column names follow the embedded schema, except `start`/`end`/`offset` (reserved words in PostgreSQL).
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS streams (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created DOUBLE PRECISION NOT NULL,
    chunk INTEGER NOT NULL DEFAULT 0,
    chunk_end BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    max_span DOUBLE PRECISION NOT NULL DEFAULT 0,
    max_age DOUBLE PRECISION,
    max_bytes BIGINT
);
CREATE TABLE IF NOT EXISTS segments (
    id BIGSERIAL PRIMARY KEY,
    stream_id BIGINT NOT NULL REFERENCES streams(id),
    t_start DOUBLE PRECISION NOT NULL,
    t_end DOUBLE PRECISION NOT NULL,
    frames INTEGER NOT NULL,
    cut BOOLEAN NOT NULL,
    tokens INTEGER NOT NULL,
    slow INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    byte_offset BIGINT NOT NULL,
    nbytes BIGINT NOT NULL,
    checksum BIGINT NOT NULL,
    jpeg_bytes BIGINT NOT NULL DEFAULT 0,
    jpeg_checksum BIGINT NOT NULL DEFAULT 0,
    record_bytes BIGINT NOT NULL,
    caption TEXT,
    views TEXT,
    created DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_stream_start ON segments(stream_id, t_start);
CREATE INDEX IF NOT EXISTS segments_stream_chunk ON segments(stream_id, chunk);
CREATE INDEX IF NOT EXISTS segments_start ON segments(t_start);
CREATE TABLE IF NOT EXISTS vectors (
    vid BIGSERIAL PRIMARY KEY,
    segment_id BIGINT NOT NULL,
    kind TEXT NOT NULL,
    vec BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS vectors_segment ON vectors(segment_id);
CREATE TABLE IF NOT EXISTS changes (
    seq BIGSERIAL PRIMARY KEY,
    op TEXT NOT NULL,
    kind TEXT NOT NULL,
    vid BIGINT NOT NULL,
    segment_id BIGINT
);
CREATE TABLE IF NOT EXISTS rules (
    stream TEXT NOT NULL,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (stream, id)
);
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    stream TEXT,
    start_time DOUBLE PRECISION,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_stream_start ON events(stream, start_time);
CREATE TABLE IF NOT EXISTS sources (
    stream TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    updated DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS gaps (
    id BIGSERIAL PRIMARY KEY,
    stream TEXT NOT NULL,
    t_start DOUBLE PRECISION NOT NULL,
    t_end DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS gaps_stream_start ON gaps(stream, t_start);
"""


def is_memory_url(spec: object) -> bool:
    """Whether `spec` names a shared memory (a postgresql:// URL) rather than a directory."""
    return isinstance(spec, str) and spec.startswith(SCHEMES)


@dataclass(frozen=True)
class SharedSpec:
    """A parsed shared-memory URL."""

    dsn: str  # the PostgreSQL URL without vidmem's query parameters
    index: str  # Milvus URI, http://HOST:PORT
    tokens: Path | None  # token directory on shared storage (None when the tokens live in an object store)
    display: str  # the URL with its password masked, for messages
    objects: str | None = None  # s3://BUCKET/PREFIX: the tokens live in an S3-compatible object store
    s3_endpoint: str | None = None  # that store's endpoint URL (None: AWS_ENDPOINT_URL or AWS itself)

    @classmethod
    def parse(cls, url: str) -> SharedSpec:
        parts = urlsplit(url)
        if not url.startswith(SCHEMES) or not parts.hostname or not parts.path.strip("/"):
            raise ConfigError(f"a shared memory URL looks like postgresql://USER[:PASS]@HOST:PORT/DB"
                              f"?index=milvus://HOST:PORT&tokens=DIR, not {_mask(url)!r}.")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - {"index", "tokens", "s3_endpoint"})
        if unknown:
            raise ConfigError(f"unknown parameters {', '.join(unknown)} in the memory URL {_mask(url)}; "
                              "use index=milvus://HOST:PORT, tokens=DIR or tokens=s3://BUCKET/PREFIX, and "
                              "s3_endpoint=http://HOST:PORT.")
        repeated = sorted(key for key, values in query.items() if len(values) > 1)
        if repeated:
            raise ConfigError(f"the memory URL {_mask(url)} gives {', '.join(repeated)} more than once.")
        index = (query.get("index") or [""])[0]
        tokens = (query.get("tokens") or [""])[0]
        if not index.startswith("milvus://") or not urlsplit(index).hostname or urlsplit(index).port is None:
            raise ConfigError(f"the memory URL {_mask(url)} needs index=milvus://HOST:PORT (the retrieval index).")
        if not tokens:
            raise ConfigError(f"the memory URL {_mask(url)} needs tokens=DIR (a directory on shared storage) or "
                              "tokens=s3://BUCKET/PREFIX (an S3-compatible object store).")
        index_parts = urlsplit(index)
        dsn = parts._replace(query="", fragment="").geturl()
        endpoint = (query.get("s3_endpoint") or [""])[0] or None
        if tokens.startswith("s3://"):
            bucket = urlsplit(tokens).netloc
            if not bucket:
                raise ConfigError(f"the memory URL {_mask(url)} needs tokens=s3://BUCKET/PREFIX, not {tokens!r}.")
            endpoint_parts = urlsplit(endpoint or "")
            if endpoint is not None and (endpoint_parts.scheme not in ("http", "https") or not endpoint_parts.hostname
                                         or endpoint_parts.username or endpoint_parts.password):
                raise ConfigError(f"s3_endpoint in the memory URL {_mask(url)} must be http(s)://HOST[:PORT] "
                                  "(credentials come from the AWS environment variables or files, not the URL).")
            return cls(dsn=dsn, index=f"http://{index_parts.hostname}:{index_parts.port}", tokens=None,
                       display=_mask(url), objects=tokens.rstrip("/"), s3_endpoint=endpoint)
        if endpoint is not None:
            raise ConfigError(f"s3_endpoint in the memory URL {_mask(url)} goes with tokens=s3://BUCKET/PREFIX.")
        return cls(dsn=dsn, index=f"http://{index_parts.hostname}:{index_parts.port}",
                   tokens=Path(unquote(tokens)).expanduser(), display=_mask(url))

    @property
    def where(self) -> str:
        """host:port/db of the PostgreSQL server, for messages."""
        parts = urlsplit(self.dsn)
        return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


def _mask(url: str) -> str:
    """The URL with every password masked: PostgreSQL's, and any in a parameter (an s3_endpoint given with keys)."""
    parts = urlsplit(url)
    if parts.password is not None:
        url = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()
    return re.sub(r"(=[a-z0-9+.-]+://[^:/@?&#]*):[^/@?&#]*@", r"\1:***@", url)


def require(module: str):
    """Import one of the `cluster` extra's client libraries, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"a shared memory needs {module}: pip install 'vidmem[cluster]'") from None


def connect(spec: SharedSpec, *, create: bool):
    """An autocommit psycopg connection; creates the schema when `create`. One clear error when unreachable."""
    psycopg = require("psycopg")
    try:
        conn = psycopg.connect(spec.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name="vidmem")
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise MemoryStoreError(f"cannot reach PostgreSQL at {spec.where}: {reason}") from None
    if create and not _has_schema(conn):
        # Two first openers race here: a lock of its own serializes them. Not CHANGES_LOCK, which writers take
        # while they hold row locks that CREATE INDEX waits for: PostgreSQL would see a deadlock and abort one.
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                conn.execute(SCHEMA)
        except psycopg.Error as exc:
            conn.close()
            raise MemoryStoreError(f"cannot create the vidmem tables in {spec.where}: {exc}".rstrip()) from None
    return conn


def _has_schema(conn) -> bool:
    """Whether every table and index SCHEMA creates is there already (then opening takes no lock at all)."""
    names = re.findall(r"IF NOT EXISTS (\w+)", SCHEMA)
    found = conn.execute("SELECT count(*) FROM pg_class WHERE relname = ANY(%s) AND relnamespace = "
                         "current_schema()::regnamespace", (names,)).fetchone()[0]
    return found == len(names)


@contextmanager
def transaction(conn) -> Iterator:
    """One transaction on an autocommit connection (nested use joins the outer one)."""
    import psycopg

    try:
        with conn.transaction():
            yield conn
    except psycopg.OperationalError as exc:
        raise MemoryStoreError(f"lost the connection to PostgreSQL: {str(exc).strip()}") from None
