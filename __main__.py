"""`python -m vidmem` is the `vidmem` command."""
from __future__ import annotations

import sys

from vidmem.agents.cli import main

sys.exit(main())
