"""Token records in an S3-compatible object store: `TokenFiles`' interface over one object per written record.

A shared memory whose URL says `tokens=s3://BUCKET/PREFIX` keeps its token records here instead of in a directory
on shared storage. Objects cannot be appended to, so each record written at (stream, chunk, offset) is its own
object, `PREFIX/<stream>/<chunk:08d>/<offset:016d>`; a chunk is the set of objects under its prefix, and
retention deletes chunks by deleting those objects. `write` returns once the store has the object (S3 makes it
durable before it answers), so the rows that point at a record commit after its bytes, as with fsynced files;
`sync` has nothing left to do. A writer killed mid-segment leaves an object past the committed end that no row
points at: the next writer overwrites it (same offset, same key) or `seal` removes it when the chunk fills.

The endpoint is the URL's `s3_endpoint` or the standard AWS_ENDPOINT_URL(_S3) variable; credentials come from
the standard AWS variables, profile files or instance roles, never from the memory URL.
"""
from __future__ import annotations

import bisect
import logging
import os
import threading
from collections import OrderedDict
from urllib.parse import urlsplit

from vidmem.errors import MemoryStoreError

log = logging.getLogger(__name__)

MAX_PIECES = 64  # whole records kept per process: a segment's tokens and then its keyframe cost one request
CONNECT_TIMEOUT_S = 5
DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys


class ObjectTokens:
    """Token records as objects under `s3://bucket/prefix/<stream>/<chunk>/<offset>`."""

    def __init__(self, url: str, *, endpoint: str | None, readonly: bool) -> None:
        from vidmem.memory.postgres import require

        boto3 = require("boto3")
        from botocore.config import Config

        parts = urlsplit(url)
        self.url = url
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.readonly = readonly
        config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=60,
                        retries={"max_attempts": 3, "mode": "standard"},
                        s3={"addressing_style": "path"} if endpoint or _endpoint_from_environment() else None)
        session = boto3.session.Session()
        self._client = session.client("s3", endpoint_url=endpoint, config=config,
                                      region_name=session.region_name or "us-east-1")
        self.endpoint = self._client.meta.endpoint_url
        self._lock = threading.Lock()
        self._pieces: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()  # (stream, chunk, offset) -> record

    # -- naming ----------------------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _chunk_prefix(self, stream: str, chunk: int) -> str:
        return self._key(stream, f"{chunk:08d}") + "/"

    def _piece_key(self, stream: str, chunk: int, offset: int) -> str:
        return self._key(stream, f"{chunk:08d}", f"{offset:016d}")

    def path(self, stream: str, chunk: int) -> str:
        """The chunk's name in messages."""
        return f"s3://{self.bucket}/{self._chunk_prefix(stream, chunk)}"

    # -- errors ----------------------------------------------------------------------------------------
    def _fail(self, doing: str, exc: Exception) -> MemoryStoreError:
        """One line for a failed request: unreachable, no bucket, no credentials, refused, or the store's own words."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"the token store {self.url} at {self.endpoint}"
        if isinstance(exc, NoCredentialsError):
            return MemoryStoreError(f"no credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                    "(or AWS_PROFILE).")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("NoSuchBucket", "404") and doing == "open the bucket":
                return MemoryStoreError(f"the bucket {self.bucket!r} of {where} does not exist; create it first.")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return MemoryStoreError(f"{where} refused the credentials from the AWS environment ({code}) "
                                        f"while trying to {doing}.")
            return MemoryStoreError(f"cannot {doing} in {where}: {code} {error.get('Message', '')}".rstrip() + ".")
        if isinstance(exc, EndpointConnectionError):
            return MemoryStoreError(f"cannot reach {where}: {exc}.")
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return MemoryStoreError(f"cannot reach {where}: {reason}")

    def _call(self, doing: str, method: str, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, method)(Bucket=self.bucket, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(doing, exc) from None

    def _list(self, prefix: str) -> dict[str, int]:
        """key -> size of every object under `prefix`."""
        from botocore.exceptions import BotoCoreError, ClientError

        out: dict[str, int] = {}
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    out[item["Key"]] = int(item["Size"])
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("list token objects", exc) from None
        return out

    def _delete(self, keys: list[str]) -> None:
        for lo in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": k} for k in keys[lo:lo + DELETE_BATCH]]
            answer = self._call("delete token objects", "delete_objects", Delete={"Objects": batch, "Quiet": True})
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise MemoryStoreError(f"cannot delete {len(errors)} token objects in {self.url}: "
                                       f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip())

    # -- opening ---------------------------------------------------------------------------------------
    def claim(self, instance: str, marker: str, display: str) -> None:
        """The store is reachable, its bucket exists, and PREFIX belongs to this memory (a marker object names its
        instance; written unless readonly). One clear line otherwise."""
        self._call("open the bucket", "head_bucket")
        key = self._key(marker)
        body = self._get_optional("read the marker", key)
        owner = body.decode().strip() if body is not None else None
        if owner is None and not self.readonly:
            self._call("write the marker", "put_object", Key=key, Body=(instance + "\n").encode())
        elif owner is not None and owner != instance:
            raise MemoryStoreError(f"the token store {self.url} belongs to another vidmem memory ({owner}), not to "
                                   f"{display} ({instance}); give each memory its own tokens=s3://BUCKET/PREFIX.")

    # -- writing ---------------------------------------------------------------------------------------
    def write(self, stream: str, chunk: int, offset: int, data: bytes) -> None:
        """Store one record as its own object; durable when this returns."""
        body = bytes(data)
        self._call("write a token record", "put_object", Key=self._piece_key(stream, chunk, offset), Body=body)
        with self._lock:
            self._pieces.pop((stream, chunk, offset), None)  # a killed writer's record at this offset is replaced

    def sync(self) -> None:
        """Nothing to do: every write is durable when it returns."""

    def seal(self, stream: str, chunk: int, end: int) -> None:
        """A chunk is full: remove records a killed writer left at or past its committed end."""
        try:
            stale = [key for key in self._list(self._chunk_prefix(stream, chunk))
                     if _offset(key) is not None and _offset(key) >= end]
            if stale:
                self._delete(stale)
        except MemoryStoreError as exc:  # harmless: they are never read
            log.warning("could not remove uncommitted records past %d in %s: %s", end, self.path(stream, chunk), exc)

    def delete_chunk(self, stream: str, chunk: int) -> int:
        """Delete one chunk's objects; returns the bytes freed."""
        objects = self._list(self._chunk_prefix(stream, chunk))
        self._delete(sorted(objects))
        with self._lock:
            for key in [k for k in self._pieces if k[0] == stream and k[1] == chunk]:
                del self._pieces[key]
        return sum(objects.values())

    def chunks_on_disk(self, stream: str) -> dict[int, int]:
        """chunk number -> bytes of its objects, for the chunks present."""
        out: dict[int, int] = {}
        for key, size in self._list(self._key(stream) + "/").items():
            chunk = _chunk(key)
            if chunk is not None:
                out[chunk] = out.get(chunk, 0) + size
        return out

    def total_bytes(self) -> int:
        """Bytes of every stream's records (what the disk budget counts for the tokens)."""
        return sum(size for key, size in self._list(self._key("") + "/" if self.prefix else "").items()
                   if _chunk(key) is not None)

    def remove_stream(self, stream: str) -> None:
        self._delete(sorted(self._list(self._key(stream) + "/")))
        with self._lock:
            for key in [k for k in self._pieces if k[0] == stream]:
                del self._pieces[key]

    # -- reading ---------------------------------------------------------------------------------------
    def view(self, stream: str, chunk: int, offset: int, nbytes: int) -> memoryview:
        """Committed bytes [offset, offset + nbytes) of a chunk: from the record that holds them, fetched whole
        (the keyframe after a segment's tokens is then already here) and kept in a small cache."""
        with self._lock:
            for (s, c, start), data in reversed(self._pieces.items()):
                if s == stream and c == chunk and start <= offset and offset + nbytes <= start + len(data):
                    self._pieces.move_to_end((s, c, start))
                    return memoryview(data)[offset - start:offset - start + nbytes]
        start = offset
        data = self._get(stream, chunk, offset)
        if data is None:  # the bytes start inside a record (a keyframe): find the record that holds them
            starts = sorted(o for o in map(_offset, self._list(self._chunk_prefix(stream, chunk))) if o is not None)
            at = bisect.bisect_right(starts, offset) - 1
            if at >= 0:
                start = starts[at]
                data = self._get(stream, chunk, start)
        if data is None:
            raise MemoryStoreError(f"token record {self._piece_key(stream, chunk, offset)} is missing from "
                                   f"{self.url}; the segment was deleted or the memory is damaged.")
        if start + len(data) < offset + nbytes:
            raise MemoryStoreError(f"token record {self._piece_key(stream, chunk, start)} in {self.url} is "
                                   f"truncated: {len(data)} bytes, a segment needs {offset + nbytes - start}.")
        with self._lock:
            self._pieces[stream, chunk, start] = data
            while len(self._pieces) > MAX_PIECES:
                self._pieces.popitem(last=False)
        return memoryview(data)[offset - start:offset - start + nbytes]

    def _get(self, stream: str, chunk: int, offset: int) -> bytes | None:
        return self._get_optional("read a token record", self._piece_key(stream, chunk, offset))

    def _get_optional(self, doing: str, key: str) -> bytes | None:
        """An object's bytes, or None when there is no such object."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404"):
                return None
            raise self._fail(doing, exc) from None
        except BotoCoreError as exc:
            raise self._fail(doing, exc) from None

    def close(self) -> None:
        with self._lock:
            self._pieces.clear()
        self._client.close()


def _endpoint_from_environment() -> str | None:
    """The endpoint boto3 takes from the standard variables when the memory URL names none."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _chunk(key: str) -> int | None:
    parts = key.rsplit("/", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() else None


def _offset(key: str) -> int | None:
    last = key.rsplit("/", 1)[-1]
    return int(last) if last.isdigit() else None
