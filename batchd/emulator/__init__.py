"""A local emulator of the Gemini Developer API's Batch Mode, Files and a few model routes.

Speaks the wire protocol google-genai uses, so any program built on the SDK can run against it by
changing only the base URL. See docs/emulator.md.
"""

from batchd.emulator.models import DEFAULT_MODELS
from batchd.emulator.server import EmulatorServer, serve

__all__ = ["DEFAULT_MODELS", "EmulatorServer", "serve"]
