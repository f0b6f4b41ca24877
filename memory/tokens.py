"""Append-only token files: one folder per stream, rotated in chunks so retention can free disk space.

A record is the segment's token block (fp16, or int8 with one fp16 scale per token) followed by its keyframe
JPEG, padded to ALIGN bytes. Offsets, lengths and CRC32 checksums live in SQLite; a record is only ever
read at a committed offset, so bytes a crashed writer left past the committed end are never seen and the next
writer simply overwrites them.
"""
from __future__ import annotations

import logging
import mmap
import os
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from vidmem.errors import MemoryStoreError

log = logging.getLogger(__name__)

ALIGN = 64  # bytes; records start on a cache-line boundary so fp16 views are aligned
DTYPES = ("float16", "int8")
MAX_MAPS = 64  # open read mappings kept per process


def checksum(buf: bytes | memoryview) -> int:
    return zlib.crc32(buf) & 0xFFFFFFFF


def padded(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def encode(tokens: np.ndarray, dtype: str) -> bytes:
    """Token block (N, D) -> bytes in the stored layout."""
    if dtype == "float16":
        return np.ascontiguousarray(tokens, dtype=np.float16).tobytes()
    if dtype == "int8":
        x = np.asarray(tokens, dtype=np.float32)
        scale = np.abs(x).max(axis=1, keepdims=True) / 127.0  # (N, 1) per-token scale
        scale = scale.astype(np.float16).astype(np.float32)  # round first so decode sees the stored scale
        q = np.rint(x / np.where(scale > 0, scale, 1.0)).clip(-127, 127).astype(np.int8)  # (N, D)
        return q.tobytes() + scale.astype(np.float16).tobytes()
    raise MemoryStoreError(f"unknown token dtype {dtype!r}; use one of {', '.join(DTYPES)}.")


def decode(buf: memoryview, n: int, d: int, dtype: str) -> np.ndarray:
    """Stored bytes -> (N, D) float16; a zero-copy view for fp16 records."""
    if dtype == "float16":
        return np.frombuffer(buf, dtype=np.float16, count=n * d).reshape(n, d)  # (N, D)
    q = np.frombuffer(buf, dtype=np.int8, count=n * d).reshape(n, d)  # (N, D)
    scale = np.frombuffer(buf, dtype=np.float16, count=n, offset=n * d).astype(np.float32)  # (N,)
    return (q.astype(np.float32) * scale[:, None]).astype(np.float16)


def encoded_size(n: int, d: int, dtype: str) -> int:
    return n * d * 2 if dtype == "float16" else n * d + n * 2


class TokenFiles:
    """Chunk files under `root/<stream>/<chunk>.tok`: positioned writes with fsync, memory-mapped reads."""

    def __init__(self, root: Path, *, readonly: bool) -> None:
        self.root = root
        self.readonly = readonly
        self._fds: dict[tuple[str, int], int] = {}  # open write descriptors
        self._dirty: set[tuple[str, int]] = set()
        self._maps: OrderedDict[tuple[str, int], mmap.mmap] = OrderedDict()

    def path(self, stream: str, chunk: int) -> Path:
        return self.root / stream / f"{chunk:08d}.tok"

    # -- writing ---------------------------------------------------------------------------------------
    def _fd(self, stream: str, chunk: int) -> int:
        key = (stream, chunk)
        fd = self._fds.get(key)
        if fd is None:
            folder = self.root / stream
            new_folder = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            path = self.path(stream, chunk)
            existed = path.exists()
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not existed:
                _fsync_dir(folder)  # the new file's name must survive a crash too
            if new_folder:
                _fsync_dir(self.root)
            self._fds[key] = fd
        return fd

    def write(self, stream: str, chunk: int, offset: int, data: bytes) -> None:
        """Write `data` at `offset` (not yet durable: call sync())."""
        try:
            fd = self._fd(stream, chunk)
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise MemoryStoreError(f"cannot write token file {self.path(stream, chunk)}: {exc.strerror}.") from exc
        self._dirty.add((stream, chunk))

    def sync(self) -> None:
        """Make every write so far durable (fdatasync per touched chunk)."""
        try:
            for key in self._dirty:
                os.fdatasync(self._fds[key])
        except OSError as exc:
            raise MemoryStoreError(f"cannot flush token files under {self.root}: {exc.strerror}.") from exc
        self._dirty.clear()

    def seal(self, stream: str, chunk: int, end: int) -> None:
        """A chunk is full: drop whatever a crashed writer left past its committed end and close it."""
        fd = self._fds.pop((stream, chunk), None)
        path = self.path(stream, chunk)
        try:
            if path.exists() and path.stat().st_size > end:
                os.truncate(path, end)
        except OSError as exc:  # harmless: the tail is never read
            log.warning("could not trim %s: %s", path, exc)
        if fd is not None:
            os.close(fd)
        self._dirty.discard((stream, chunk))

    def delete_chunk(self, stream: str, chunk: int) -> int:
        """Remove one chunk file; returns the bytes freed."""
        self.seal(stream, chunk, 1 << 62)
        self._maps.pop((stream, chunk), None)
        path = self.path(stream, chunk)
        try:
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:
            return 0

    def chunks_on_disk(self, stream: str) -> dict[int, int]:
        """chunk number -> file size, for the files present."""
        out: dict[int, int] = {}
        try:
            entries = list(os.scandir(self.root / stream))
        except FileNotFoundError:  # no such stream, or removed meanwhile
            return out
        for entry in entries:
            stem, dot, ext = entry.name.partition(".")
            if ext == "tok" and stem.isdigit():
                try:
                    out[int(stem)] = entry.stat().st_size
                except FileNotFoundError:  # deleted (retention) since the folder was listed
                    continue
        return out

    def total_bytes(self) -> int:
        """Bytes of every stream's chunk files (what a disk budget counts for the tokens; streams deleted meanwhile
        count 0)."""
        try:
            streams = [e.name for e in os.scandir(self.root) if e.is_dir()]
        except FileNotFoundError:
            return 0
        return sum(sum(self.chunks_on_disk(name).values()) for name in streams)

    def remove_stream(self, stream: str) -> None:
        for chunk in list(self.chunks_on_disk(stream)):
            self.delete_chunk(stream, chunk)
        try:
            (self.root / stream).rmdir()
        except OSError:
            pass

    # -- reading ---------------------------------------------------------------------------------------
    def view(self, stream: str, chunk: int, offset: int, nbytes: int) -> memoryview:
        """A read-only view of committed bytes, through a cached mmap of the chunk."""
        key = (stream, chunk)
        mm = self._maps.get(key)
        if mm is None or len(mm) < offset + nbytes:
            path = self.path(stream, chunk)
            try:
                with open(path, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    if size < offset + nbytes:
                        raise MemoryStoreError(f"token file {path} is truncated: {size} bytes, "
                                               f"a segment needs {offset + nbytes}.")
                    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except FileNotFoundError:
                raise MemoryStoreError(f"token file {path} is missing; the segment was deleted or the "
                                       "memory is damaged.") from None
            self._maps[key] = mm  # old mappings close when the last array viewing them goes away
            while len(self._maps) > MAX_MAPS:
                self._maps.popitem(last=False)
        self._maps.move_to_end(key)
        return memoryview(mm)[offset:offset + nbytes]

    def close(self) -> None:
        self.sync()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._maps.clear()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
