"""Plain records the memory hands out, and the checks on names that come from users."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from vidmem.errors import ConfigError, EncoderMismatchError

# A stream name becomes a folder name under tokens/, so it may not contain separators, start with a dot or be long.
STREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_stream_name(name: str) -> str:
    """Return `name` when it is a safe stream name, else raise ConfigError naming it."""
    # fullmatch: with match, '$' lets a trailing newline through ("cam\n" would become a folder name)
    if not isinstance(name, str) or not STREAM_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"invalid stream name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit."
        )
    return name


@dataclass(frozen=True)
class Manifest:
    """What made the tokens in a memory; a memory holds tokens from exactly one of these."""

    encoder: str  # vision encoder fingerprint (hex string)
    encoder_name: str  # model id or directory it came from (for messages only)
    compressor: str  # compressor name plus weights fingerprint if any, e.g. "timeperceiver@ab12cd"
    dim: int  # token width D
    embedder: str  # retrieval embedder name
    embed_dim: int  # retrieval embedding width E
    space: str = "language"  # tokens are language-model input embeddings ("language"); vidmem 0.1 stored "vision"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        return cls(
            encoder=str(data["encoder"]),
            encoder_name=str(data.get("encoder_name", "")),
            compressor=str(data["compressor"]),
            dim=int(data["dim"]),
            embedder=str(data["embedder"]),
            embed_dim=int(data["embed_dim"]),
            space=str(data.get("space", "vision")),  # manifests without the field are vidmem 0.1's
        )

    def check_compatible(self, other: Manifest, where: str) -> None:
        """Raise EncoderMismatchError naming both sides when `other` made tokens this memory cannot mix with."""
        if self.space != other.space:
            raise EncoderMismatchError(
                f"the memory at {where} holds tokens in the {self.space} space (written by vidmem 0.1), which this "
                f"version cannot show to the model; ingest the footage again into a new --memory directory."
            )
        if self.encoder != other.encoder:
            raise EncoderMismatchError(
                f"the memory at {where} holds tokens from vision encoder {self.encoder_name or '?'} "
                f"({self.encoder[:12]}), not {other.encoder_name or '?'} ({other.encoder[:12]}); "
                "use another --memory directory or the original model."
            )
        for field, label in (("compressor", "compressor"), ("dim", "token width"), ("embedder", "retrieval embedder"),
                             ("embed_dim", "retrieval embedding width")):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                raise EncoderMismatchError(
                    f"the memory at {where} was made with {label} {mine}, not {theirs}; "
                    "use another --memory directory or the original settings."
                )


@dataclass(frozen=True)
class SegmentRow:
    """One stored segment: a time range of one stream and its token block."""

    id: int  # segment id, increasing in insertion order
    stream: str  # stream name
    start: float  # seconds (from file start for recordings, unix seconds for live)
    end: float  # seconds, >= start
    frames: int  # sampled frames the segment covers (grows when the static check extends it)
    cut: bool  # the segment starts at a shot boundary
    tokens: int  # token count N
    slow: int  # how many of the N are keyframe (slow) tokens, stored first
    caption: str | None  # optional caption text
    views: str | None = None  # JSON: how each detail level shows the segment (compressors.Views); None: keyframe first


@dataclass(frozen=True)
class StreamInfo:
    """Summary of one stream."""

    name: str  # stream name
    segments: int  # live segments
    bytes: int  # token and keyframe bytes of the live segments
    start: float | None  # earliest segment start, None when empty
    end: float | None  # latest segment end, None when empty
    seconds_covered: float  # sum of segment durations


@dataclass(frozen=True)
class Retention:
    """How much of a stream to keep; None means no limit."""

    max_age_seconds: float | None = None  # drop segments that ended longer ago than this
    max_bytes: int | None = None  # keep the stream's token files under this many bytes on disk

    def __post_init__(self) -> None:
        if self.max_age_seconds is not None and not self.max_age_seconds > 0:
            raise ConfigError(f"retention max_age_seconds must be positive, got {self.max_age_seconds!r}.")
        if self.max_bytes is not None and not self.max_bytes > 0:
            raise ConfigError(f"retention max_bytes must be positive, got {self.max_bytes!r}.")
