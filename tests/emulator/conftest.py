"""Fixtures for the emulator tests: a running emulator and real google-genai clients pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from google import genai

from batchd.emulator import EmulatorServer

from .support import API_KEY, JOB_SECONDS, VERSIONS, make_client


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorServer]:
    """One emulator shared by the tests that do not need their own (tests use unique names)."""
    with EmulatorServer(tmp_path_factory.mktemp("emulator"), job_seconds=JOB_SECONDS, api_key=API_KEY) as server:
        yield server


@pytest.fixture
def fresh_emulator(tmp_path: Path) -> Iterator[EmulatorServer]:
    """An emulator of its own, for tests whose fault counters or job lists must start from zero."""
    with EmulatorServer(tmp_path / "emulator", job_seconds=JOB_SECONDS, api_key=API_KEY) as server:
        yield server


@pytest.fixture(params=VERSIONS)
def version(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def client(emulator: EmulatorServer, version: str) -> genai.Client:
    return make_client(emulator.base_url, version)
