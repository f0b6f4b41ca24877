"""The README's two commands are the ones that work: CI runs the test command verbatim."""
from __future__ import annotations

import re

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    ci_command = [line for line in ci.splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))][-1]
    first_blocks = _readme_commands()[:2]
    assert len(first_blocks) == 2, "the README opens with two command blocks: use it, and test it"
    test_command = first_blocks[1].strip()
    # CI may add -q to pip for quieter logs; otherwise it is the same command.
    assert ci_command.replace("pip install -q ", "pip install ") == test_command


def test_readme_first_command_installs_and_runs_the_main_job():
    first = _readme_commands()[0]
    assert "pip install" in first and "vidmem ingest" in first and "vidmem ask" in first
