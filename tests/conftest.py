"""Shared fixtures: batchd's own tests use the same ones plugin authors get from batchd.testing
(``emulator``, ``workspace``, ``daemon``)."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["batchd.testing"]

REPO = Path(__file__).resolve().parent.parent
