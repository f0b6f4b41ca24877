"""One exception hierarchy for vidmem.

Every error a user can cause or meet derives from `VidmemError`, whose message is one complete sentence
fit to print on its own line: the CLI prints it and exits non-zero, the services send it back as an error
reply. Library errors are wrapped where they enter vidmem (`raise SourceError(...) from exc`).
"""
from __future__ import annotations


class VidmemError(Exception):
    """Base of every error vidmem raises on purpose. `code` names the kind for protocol replies."""

    code = "error"


class ConfigError(VidmemError):
    """A setting, option or rule is invalid; the message names the bad key."""

    code = "bad_config"


class SourceError(VidmemError):
    """A video source cannot be opened, read or decoded (missing, corrupt, unreachable, timed out)."""

    code = "bad_source"


class ModelNotFoundError(VidmemError):
    """A model or embedder could not be loaded from a hub id or a local directory."""

    code = "model_not_found"


class MemoryStoreError(VidmemError):
    """The memory directory is unusable or inconsistent (named to avoid shadowing the builtin MemoryError)."""

    code = "memory"


class EncoderMismatchError(MemoryStoreError):
    """Tokens from one vision encoder or compressor offered to a memory made with another."""

    code = "encoder_mismatch"


class UnknownStreamError(VidmemError):
    """A question or command named a stream the memory does not hold."""

    code = "unknown_stream"


class BudgetError(VidmemError):
    """A visual-token budget too small to hold any evidence, or a question too long for the context."""

    code = "budget"


class ProtocolError(VidmemError):
    """A malformed, oversized or unexpected message on the websocket or MQTT interface."""

    code = "bad_message"


class BrokerError(VidmemError):
    """The MQTT broker cannot be reached, or it refused the connection (bad credentials, TLS failure)."""

    code = "broker"
