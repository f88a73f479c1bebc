"""A local emulator of the Gemini Developer API's Batch Mode, Files and a few model routes.

Speaks the wire protocol google-genai uses, so any program built on the SDK can run against it by
changing only the base URL. See docs/emulator.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchd.emulator.models import DEFAULT_MODELS

if TYPE_CHECKING:
    from batchd.emulator.server import EmulatorServer, serve

__all__ = ["DEFAULT_MODELS", "EmulatorServer", "serve"]


def __getattr__(name: str):
    # The server (uvicorn, Starlette) is imported on first use: batchd.emulator.process, which the
    # daemon imports to start the embedded emulator as a child process, needs none of it.
    if name in ("EmulatorServer", "serve"):
        from batchd.emulator import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
