"""Fixtures for the emulator tests: one emulator shared by the session, or one of a test's own.

Both are batchd.testing's :class:`~batchd.testing.Emulator`, the one plugin authors get; the
``emulator`` fixture here replaces batchd.testing's per-test one with a shared one, for speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from google import genai

from batchd.testing import Emulator

from .support import VERSIONS


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """One emulator shared by the tests that do not need their own (tests use unique names)."""
    with Emulator(tmp_path_factory.mktemp("emulator")) as server:
        yield server


@pytest.fixture
def fresh_emulator(tmp_path: Path) -> Iterator[Emulator]:
    """An emulator of its own, for tests whose fault counters or job lists must start from zero."""
    with Emulator(tmp_path / "emulator") as server:
        yield server


@pytest.fixture(params=VERSIONS)
def version(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def client(emulator: Emulator, version: str) -> genai.Client:
    return emulator.client(version)
