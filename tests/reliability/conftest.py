"""Fixtures of the reliability suite: `--soak` (longer runs), a per-test budget of seconds, shared helpers.

`python3 -m pytest` runs every scenario in a bounded form; `--soak` (or VIDMEM_SOAK=1) lengthens the
soak and raises the number of kills and fuzzed inputs. tests/conftest.py's fixtures (`videos`, `tiny_models`)
apply here too.
"""
from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vidmem reliability")
    group.addoption("--soak", action="store_true", default=False,
                    help="long reliability runs: a 10-minute soak (VIDMEM_SOAK_S), more kills and fuzzed inputs")


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
