"""Fixtures of the reliability suite: `--soak` (longer runs), a per-test budget of seconds, shared helpers.

`python3 -m pytest` runs every scenario in a bounded form; `--soak` (or VIDMEM_SOAK=1) lengthens the
soak and raises the number of kills and fuzzed inputs. tests/conftest.py's fixtures (`videos`, `tiny_models`)
apply here too.
"""
from __future__ import annotations

import os

import pytest


def soak_enabled(config: pytest.Config) -> bool:
    try:
        flag = bool(config.getoption("--soak"))
    except ValueError:  # the option was not registered (this conftest was not an initial one)
        flag = False
    return flag or os.environ.get("VIDMEM_SOAK", "") not in ("", "0")


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> bool:
    """True for the long runs (--soak or VIDMEM_SOAK=1)."""
    return soak_enabled(request.config)


@pytest.fixture(autouse=True)
def quiet_progress_bars(monkeypatch: pytest.MonkeyPatch):
    """The `vidmem` script silences transformers' progress bars before importing it; tests that call the CLI
    in-process (`vidmem.agents.cli.main`) have it imported already, so they silence them here."""
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("TQDM_DISABLE", "1")
    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()
