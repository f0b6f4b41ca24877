"""vidmem's agents: the answering VLM, retrieval, the CLI and the services.

Kept import-light on purpose: `import vidmem.agents` loads no torch or transformers; import the submodules
(`vidmem.agents.models`, ...) for what they hold.
"""
from __future__ import annotations
